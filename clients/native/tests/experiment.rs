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
        regimes: vec![],
        scenario: None,
        x_label: String::new(),
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

/// Each scenario of `sparsync experiment --scenario` in a reduced form: 2 trainers, logreg
/// (where the scenario does not sweep models), a low target, a few seconds per run. Every
/// variant of every regime is present, its settings are recorded, and bytes and times agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_in_a_reduced_form_and_records_its_regime() {
    use sparsync::orchestrate::scenario;
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile_data(dir.path());
    for name in scenario::NAMES {
        let sc = scenario::scenario(name).unwrap();
        let out = dir.path().join(name);
        let cfg = ExperimentConfig {
            policies: sc.policies.clone(),
            sweep: sc.sweep.clone(),
            weighting: sc.weighting,
            clients: 2,
            slowdowns: sc.slowdowns.clone(),
            partition: "iid".into(),
            target_accuracy: 0.3,
            repeat: 1,
            seed: 3,
            max_seconds: 15.0,
            out: out.clone(),
            client_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_sparsync-client"))),
            data: Some(data.clone()),
            eval_samples: Some(300),
            server: ServerConfig { model: "logreg".into(), engine: EngineChoice::Cpu, ..Default::default() },
            trainer_args: vec![],
            server_args: sc.server_args.clone(),
            regimes: sc.regimes.clone(),
            scenario: Some(name.into()),
            x_label: sc.x_label.into(),
        };
        let results = experiment::run(&cfg, "test").await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let json: Results =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
        assert_eq!(json.runs, results.runs, "{name}");
        assert_eq!(json.scenario.as_deref(), Some(name));
        let subset = sparsync::data::load(Some(&data)).unwrap().train.len();
        assert_eq!(json.train_images, subset, "{name}: the subset's training images are recorded");
        // Every variant in every regime, once.
        let mut expected = Vec::new();
        for regime in &sc.regimes {
            let names = sc.policies.iter().cloned().chain(
                sc.sweep
                    .iter()
                    .map(|w| format!("asp-{}", serde_json::to_value(w).unwrap().as_str().unwrap())),
            );
            for v in names {
                expected.push(if regime.name.is_empty() { v } else { format!("{v}@{}", regime.name) });
            }
        }
        let got: Vec<String> = results.runs.iter().map(|r| r.variant.clone()).collect();
        assert_eq!(got, expected, "{name}");
        for r in &results.runs {
            let regime = sc.regimes.iter().find(|g| g.name == r.regime).expect("a regime of the scenario");
            let what = format!("{name}/{}", r.variant);
            // Settings recorded: policy, model, the regime's slowdowns and trainer flags.
            assert_eq!(r.server["policy"], r.policy, "{what}");
            let model = regime.model.clone().unwrap_or_else(|| "logreg".into());
            assert_eq!(r.server["model"], model.as_str(), "{what}");
            let slow = regime.slowdowns.clone().unwrap_or_else(|| sc.slowdowns.clone());
            assert_eq!(r.slowdowns, [slow[0], slow[1 % slow.len()]], "{what}");
            assert_eq!(r.trainer_args, regime.trainer_args, "{what}");
            assert_eq!(r.regime_x, regime.x, "{what}");
            // Times and bytes agree with the curve.
            assert!(r.reached, "{what}: best accuracy {:?}", r.best_accuracy);
            let t = r.time_to_target_s.unwrap();
            assert!(t >= 0.0 && t <= r.duration_s, "{what}: {t} s of {} s", r.duration_s);
            let hit = r.curve.iter().find(|p| p.accuracy >= 0.3).unwrap();
            assert_eq!(
                (hit.t, Some(hit.bytes_up), Some(hit.bytes_down)),
                (t, r.bytes_up_to_target, r.bytes_down_to_target)
            );
            assert!(
                r.curve.windows(2).all(|w| w[0].t <= w[1].t
                    && w[0].bytes_up <= w[1].bytes_up
                    && w[0].bytes_down <= w[1].bytes_down),
                "{what}"
            );
            let updates = r.updates_to_target.unwrap();
            assert!(
                updates >= 1 && updates <= r.staleness_histogram.iter().sum::<u64>(),
                "{what}: {updates} of {}",
                r.accepted
            );
            // The version that reached the target holds at least one update per step.
            assert!(updates >= hit.version, "{what}: {updates} updates for version {}", hit.version);
            assert_eq!(r.commits.values().sum::<u64>(), r.staleness_histogram.iter().sum::<u64>(), "{what}");
            assert!(
                r.pushes.values().sum::<u64>() >= r.commits.values().sum::<u64>(),
                "{what}: every aggregated push was accepted"
            );
        }
        if name == "hermes" {
            let h = results.runs.iter().find(|r| r.policy == "hermes").unwrap();
            assert!(
                h.decisions.iter().any(|d| d.directive.chunk_size.is_some()),
                "Hermes's data allocation is recorded: {:?}",
                h.decisions
            );
        }
        if name == "nbsync" {
            let wan = results.runs.iter().find(|r| r.regime == "wan").unwrap();
            assert!(wan.trainer_args.contains(&"--downlink-kbps".to_string()), "{:?}", wan.trainer_args);
            // The trainers ran under the WAN emulation (each logs its emulation at start).
            let logs = out.join("clients").join(format!("{}-0", wan.variant));
            let emulated = std::fs::read_dir(&logs)
                .unwrap()
                .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
                .filter(|log| log.contains("uplink 1000 kbit/s, downlink 4000 kbit/s, latency 50 ms"))
                .count();
            assert_eq!(
                emulated,
                2,
                "both trainers of {} emulate the WAN (logs in {})",
                wan.variant,
                logs.display()
            );
        }
        for png in [
            "staleness.png",
            if sc.regimes.len() > 1 { "time_to_target.png" } else { "accuracy_vs_time.png" },
        ] {
            let bytes = std::fs::read(out.join(png)).unwrap_or_else(|e| panic!("{name}/{png}: {e}"));
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name}/{png}");
        }
    }
}
