//! `sparsync bench e2e --quick` runs end to end (server and load-generator processes, the raw
//! loopback baseline, the client-side ceiling) and writes a JSON report that is complete and
//! self-consistent.

use std::process::Command;

use serde_json::Value;
use sparsync::protocol::frame::PUSH_HEADER_LEN;

const STAGES: [&str; 9] =
    ["decode", "policy", "wal", "upload", "aggregate", "topk", "encode", "fanout", "send"];

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("{k} missing or not a number in {v}"))
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} missing or not an integer in {v}"))
}

#[test]
fn quick_e2e_report_is_complete_and_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("e2e.json");
    let out = Command::new(env!("CARGO_BIN_EXE_sparsync"))
        .args(["bench", "e2e", "--quick", "--engine", "cpu", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench e2e failed ({}):\n{stdout}\n{stderr}", out.status);
    // The table is printed, with the raw baseline column filled.
    assert!(
        stdout.contains("updates/s") && stdout.contains("of raw") && stdout.contains("of ceiling"),
        "{stdout}"
    );

    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let env = &report["environment"];
    assert!(u(env, "cores") >= 1, "{env}");
    assert!(env["sparsync"].is_string(), "{env}");
    let spec = &report["e2e"]["spec"];
    let rows = report["e2e"]["rows"].as_array().expect("rows");

    // --quick: clients 4 and 16 on 2^16 parameters, then sizes 2^14 and 2^16 with 8 clients.
    let configs: Vec<(String, u64, u64)> = rows
        .iter()
        .map(|r| (r["sweep"].as_str().unwrap().to_string(), u(r, "clients"), u(r, "params")))
        .collect();
    assert_eq!(
        configs,
        vec![
            ("clients".into(), 4, 1 << 16),
            ("clients".into(), 16, 1 << 16),
            ("size".into(), 8, 1 << 14),
            ("size".into(), 8, 1 << 16)
        ]
    );

    let density = f(spec, "density");
    let window = u(spec, "window");
    for r in rows {
        let ctx = format!("row {}/{}/{}", r["sweep"], r["clients"], r["params"]);
        assert_eq!(r["engine"], "cpu", "{ctx}");
        // Nothing went wrong.
        assert!(r["errors"].as_array().unwrap().is_empty(), "{ctx}: {}", r["errors"]);
        assert_eq!((u(r, "unanswered"), u(r, "sessions_lost"), u(r, "rejected")), (0, 0, 0), "{ctx}");
        // The push size follows from the model size and the density.
        let (params, nnz, frame) = (u(r, "params"), u(r, "nnz"), u(r, "frame_bytes"));
        assert_eq!(nnz, (params as f64 * density).ceil() as u64, "{ctx}");
        assert_eq!(frame, PUSH_HEADER_LEN as u64 + 6 * nnz, "{ctx}");
        // Server counters agree with the load generator's, up to the pushes in flight when the
        // window opened and closed.
        let (accepted, sent, acked) = (u(r, "accepted"), u(r, "sent"), u(r, "acked"));
        assert!(accepted > 0, "{ctx}: nothing accepted");
        let in_flight = u(r, "clients") * window;
        assert!(accepted.abs_diff(sent) <= in_flight, "{ctx}: accepted {accepted} vs sent {sent}");
        assert!(acked <= sent, "{ctx}");
        // bytes in ≈ updates × frame size.
        let bytes_in = u(r, "bytes_in");
        assert!(
            bytes_in.abs_diff(accepted * frame) <= in_flight * frame,
            "{ctx}: bytes in {bytes_in} vs {accepted} updates × {frame} bytes"
        );
        // Rates are the counts over the window.
        let w = f(r, "window_s");
        assert!(w > 1.0, "{ctx}: window {w}");
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
        assert!(close(f(r, "updates_per_s"), accepted as f64 / w), "{ctx}");
        assert!(close(f(r, "mb_in_per_s"), bytes_in as f64 / w / 1e6), "{ctx}");
        assert!(close(f(r, "mb_out_per_s"), u(r, "bytes_out") as f64 / w / 1e6), "{ctx}");
        assert!(u(r, "bytes_out") > 0, "{ctx}: no Delta sent");
        assert!(f(r, "versions_per_s") > 0.0, "{ctx}");
        // The raw baseline ran, and the fraction is the ratio of the two rates.
        let raw = f(r, "raw_tcp_mb_per_s");
        assert!(raw > 0.0, "{ctx}");
        assert!(close(f(r, "fraction_of_raw"), f(r, "mb_in_per_s") / raw), "{ctx}");
        // The client-side ceiling ran (the same clients against a sink that only acknowledges),
        // its rates agree with the frame size, and the fraction is the ratio of the two rates.
        let ceiling = f(r, "client_ceiling_updates_per_s");
        assert!(ceiling > 0.0, "{ctx}");
        assert!(close(f(r, "client_ceiling_mb_per_s"), ceiling * frame as f64 / 1e6), "{ctx}");
        assert!(close(f(r, "fraction_of_ceiling"), f(r, "updates_per_s") / ceiling), "{ctx}");
        // Latencies: every ack timed, quantiles ordered, Deltas observed.
        for (k, count) in [("ack_latency_s", Some(acked)), ("delta_latency_s", None)] {
            let q = &r[k];
            let (p50, p99, max) = (f(q, "p50"), f(q, "p99"), f(q, "max"));
            assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{ctx}: {k} {q}");
            match count {
                Some(c) => assert_eq!(u(q, "count"), c, "{ctx}: {k}"),
                None => assert!(u(q, "count") > 0, "{ctx}: {k}"),
            }
        }
        // Where the time went: every stage reported; shares are time over the window.
        let secs = &r["stage_seconds"];
        let share = &r["stage_share"];
        for s in STAGES {
            assert!(f(secs, s) >= 0.0, "{ctx}: stage {s}");
            assert!(close(f(share, s), f(secs, s) / w), "{ctx}: share of {s}");
        }
        assert!(
            f(secs, "aggregate") > 0.0 && f(secs, "topk") > 0.0 && f(secs, "decode") > 0.0,
            "{ctx}: {secs}"
        );
        // Busy fractions are measured time over the window: the engine's covers its stages.
        let busy = f(r, "coordinator_busy");
        assert!(busy > 0.0 && busy < 1.5, "{ctx}: busy {busy}");
        let engine = f(r, "engine_busy");
        let engine_stages = f(secs, "aggregate") + f(secs, "topk");
        assert!(engine > 0.0 && engine < 1.5, "{ctx}: engine busy {engine}");
        assert!(
            engine * w >= 0.9 * engine_stages,
            "{ctx}: engine busy {engine} < its stages {engine_stages} s"
        );
        assert!(f(r, "queue_depth_max") >= f(r, "queue_depth_mean"), "{ctx}");
        // Broadcasts happened (one per step by default) and the byte ratio is out over in.
        assert!(f(r, "broadcasts_per_s") > 0.0, "{ctx}");
        assert!(close(f(r, "out_per_in"), f(r, "bytes_out") / f(r, "bytes_in")), "{ctx}");
        assert!(f(r, "server_peak_mb") > 1.0, "{ctx}");
    }
}
