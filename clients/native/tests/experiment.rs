//! `sparsync experiment` end to end: 2 policies, 3 client processes, a low target. The files
//! exist, parse, and agree with each other.

use std::path::PathBuf;

use sparsync::config::{EngineChoice, ServerConfig};
use sparsync::orchestrate::experiment::{self, ExperimentConfig, Results};
use sparsync::policy::staleness::WeightingKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiment_writes_consistent_results() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exp");
    let cfg = ExperimentConfig {
        policies: vec!["asp".into(), "bsp".into()],
        sweep: vec![],
        weighting: WeightingKind::Polynomial,
        clients: 3,
        slowdowns: vec![1.0, 2.0, 4.0],
        partition: "iid".into(),
        target_accuracy: 0.4,
        repeat: 1,
        seed: 5,
        max_seconds: 60.0,
        out: out.clone(),
        client_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_sparsync-client"))),
        // The embedded subset: quick to load, and the same on every machine.
        data: Some(tempfile_data(dir.path())),
        eval_samples: Some(500),
        server: ServerConfig { model: "logreg".into(), engine: EngineChoice::Cpu, ..Default::default() },
        trainer_args: vec!["--local-steps".into(), "8".into()],
        server_args: vec!["--max-batch".into(), "7".into(), "--rho-down".into(), "0.02".into()],
    };
    let results = experiment::run(&cfg, "test").await.expect("experiment runs");
    assert_eq!(results.runs.len(), 2);
    for r in &results.runs {
        assert!(r.reached, "{} did not reach 40%: best {:?}", r.variant, r.best_accuracy);
        assert_eq!(r.commits.len(), 3, "three trainers committed: {:?}", r.commits);
        // The run's settings are recorded: the variant's policy, the overrides, the trainers'.
        assert_eq!(r.server["policy"], r.policy, "{}", r.server);
        assert_eq!(r.server["max_batch"], 7, "{}", r.server);
        assert_eq!(r.server["rho_down"], 0.02, "{}", r.server);
        assert_eq!(r.trainer_args, ["--local-steps", "8"]);
    }
    // BSP's own setting stays unless overridden.
    assert_eq!(results.runs[1].server["bsp_deadline_s"], 10.0);

    // results.json parses and equals what run returned.
    let json: Results =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json.runs, results.runs);
    // results.csv has one row per run with the same figures.
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2);
    for (row, r) in rows.iter().zip(&json.runs) {
        assert_eq!(row[col("variant")], r.variant);
        assert_eq!(row[col("reached")], r.reached.to_string());
        let t: f64 = row[col("time_to_target_s")].parse().unwrap();
        assert!((t - r.time_to_target_s.unwrap()).abs() < 1e-3);
        let up: u64 = row[col("bytes_up_to_target")].parse().unwrap();
        assert_eq!(Some(up), r.bytes_up_to_target);
        assert_eq!(row[col("versions")].parse::<u64>().unwrap(), r.versions);
        // The curve agrees: the first point at or past the target is the one reported.
        let hit = r.curve.iter().find(|p| p.accuracy >= 0.4).unwrap();
        assert_eq!((hit.t, hit.bytes_up), (r.time_to_target_s.unwrap(), up));
        // Commits add up to what was aggregated.
        let total: u64 = r.commits.values().sum();
        assert_eq!(total, r.staleness_histogram.iter().sum::<u64>());
    }
    // The table and the plots.
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    assert!(summary.contains("asp") && summary.contains("bsp") && summary.contains("1/1"), "{summary}");
    for png in ["accuracy_vs_time.png", "accuracy_vs_bytes.png", "staleness.png"] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png}");
    }
}

/// Writes the embedded subset to a directory, so that clients load it with --data.
fn tempfile_data(dir: &std::path::Path) -> PathBuf {
    let d = dir.join("fashion-mnist");
    std::fs::create_dir_all(&d).unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-subset");
    for f in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    d
}
