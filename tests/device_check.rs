//! The device check (`scripts/device/check.sh`, what runs on a lent H100/H200) run here in its
//! reduced form on whatever adapter exists (lavapipe in CI), so that the one command prepared
//! for the rare GPU machine cannot rot: every step must pass and the summary must hold the
//! adapter, the kernel tables and the end-to-end rows.

mod common;

use common::gpu;

#[test]
fn the_device_check_runs_end_to_end_on_this_adapter() {
    if gpu::shared().is_none() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let status = std::process::Command::new("bash")
        .arg(format!("{root}/scripts/device/check.sh"))
        .args(["--quick", "--no-tests"])
        .env("OUT", out.path())
        .env("SPARSYNC_BIN", env!("CARGO_BIN_EXE_sparsync"))
        // Here the adapter may be a software one (lavapipe); on the GPU machine it may not.
        .env("SPARSYNC_DEVICE_ALLOW_SOFTWARE", "1")
        .env("RUST_LOG", "warn")
        .output()
        .expect("bash runs");
    let summary = std::fs::read_to_string(out.path().join("summary.txt")).unwrap_or_default();
    assert!(
        status.status.success(),
        "check.sh failed:\n{summary}\n{}\n{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(summary.contains("RESULT: all steps passed"), "{summary}");
    let check: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("check.json")).unwrap()).unwrap();
    let opened = &check["adapter"]["opened"]["name"];
    assert!(opened.as_str().is_some_and(|n| !n.is_empty()), "no adapter in {check}");
    let steps: Vec<(String, String)> = check["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap().to_string(), s["status"].as_str().unwrap().to_string()))
        .collect();
    for want in ["adapter", "copy", "aggregate", "topk", "e2e", "e2e-fast"] {
        assert!(
            steps.iter().any(|(s, st)| s == want && st == "0"),
            "step {want} missing or failed: {steps:?}"
        );
    }
    assert!(steps.iter().any(|(s, st)| s == "tests" && st == "not-requested"));
    let engines: Vec<&str> =
        check["aggregate"].as_array().unwrap().iter().filter_map(|r| r["engine"].as_str()).collect();
    assert!(engines.iter().any(|e| e.starts_with("gpu-deterministic")), "{engines:?}");
    assert!(engines.iter().any(|e| e.starts_with("gpu-fast")), "{engines:?}");
    for r in check["topk"].as_array().unwrap() {
        assert_eq!(r["input_passes"].as_f64(), Some(1.0), "steady selections read d once: {r}");
    }
    let e2e = check["e2e"].as_array().unwrap();
    assert!(
        !e2e.is_empty() && e2e.iter().all(|r| r["updates_per_s"].as_f64().unwrap_or(0.0) > 0.0),
        "{e2e:?}"
    );
    assert!(out.path().join("raw.tar.gz").exists());
}
