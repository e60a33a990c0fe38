//! `sparsync demo` for a few seconds: the accuracy series covers the whole run (it starts in
//! the first seconds and ends at the end) in bounded size, even with an evaluator that scores
//! every Delta; the summary has a row per trainer and says why the run ended where it did.

use std::path::PathBuf;
use std::time::Duration;

use sparsync::config::{EngineChoice, ServerConfig};
use sparsync::core::history::DEFAULT_CAP;
use sparsync::orchestrate::demo::{self, DemoConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_series_covers_the_whole_run_in_bounded_size() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DemoConfig {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            model: "logreg".into(),
            engine: EngineChoice::Cpu,
            ..Default::default()
        },
        slowdowns: vec![1.0, 2.0],
        duration: Duration::from_secs(10),
        // Out of reach, and no plateau rule: the run lasts its full 10 s.
        target_accuracy: Some(0.999),
        plateau: None,
        out: dir.path().join("runs"),
        client_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_sparsync-client"))),
        data: None,
        eval_samples: Some(200),
        // Score after every Delta (hundreds a second): more reports than the series keeps.
        eval_interval: Some(Duration::ZERO),
    };
    let s = demo::run(cfg).await.expect("demo runs");
    assert_eq!(s.stop, "ran for 10 s");

    let csv = std::fs::read_to_string(s.dir.join("evals.csv")).unwrap();
    let t: Vec<f64> = csv.lines().skip(1).map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert!(t.len() >= 20, "{} rows", t.len());
    assert!(t.len() <= DEFAULT_CAP + 1, "{} rows: the series is bounded", t.len());
    assert!(s.evaluations > t.len() as u64, "{} reports, {} rows: thinned", s.evaluations, t.len());
    assert!(t[0] < 3.0, "the series starts in the first seconds: t0 = {}", t[0]);
    assert!(
        *t.last().unwrap() > s.seconds - 2.0,
        "the series ends at the end: {} of {} s",
        t.last().unwrap(),
        s.seconds
    );
    assert!(t.windows(2).all(|w| w[0] <= w[1]), "time order");
    // No hole: the largest gap is a small part of the run.
    let gap = t.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    assert!(gap < s.seconds / 8.0, "largest gap {gap} s");
    let (a, b) = s.curve_span_s.expect("a curve");
    assert!((a - t[0]).abs() < 1e-3 && (b - t[t.len() - 1]).abs() < 1e-3, "span {a}…{b} against the csv");

    assert_eq!(s.trainers.len(), 2, "{:?}", s.trainers);
    for r in &s.trainers {
        assert!(r.pushes > 0 && r.bytes_up > 0 && r.bytes_down > 0, "{r:?}");
        assert!(r.mean_staleness.is_finite() && r.mean_staleness >= 0.0, "{r:?}");
    }
    assert_eq!(s.trainers.iter().map(|r| r.pushes).sum::<u64>(), s.accepted);
    assert!(s.why.iter().any(|w| w.contains("down is")), "{:?}", s.why);
    let text = demo::describe(&s);
    assert!(text.contains("trainer-0-x1") && text.contains("trainer-1-x2"), "{text}");
    assert!(s.dir.join("accuracy.png").is_file());
}
