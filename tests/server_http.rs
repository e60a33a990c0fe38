//! The server as a user starts it: `--init` from safetensors, `/api/status`, `/metrics`.

mod common;

use common::*;
use sparsync::client::{ClientOptions, Connection};
use sparsync::config::{EngineChoice, ServerConfig};
use sparsync::protocol::model::{ModelLayout, TensorSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_safetensors_model_and_reports_status() {
    let layout = ModelLayout {
        name: "tiny".into(),
        tensors: vec![
            TensorSpec::new("enc.w", &[6, 4]),
            TensorSpec::new("enc.b", &[4]),
            TensorSpec::new("head", &[4, 3]),
        ],
    };
    let values: Vec<f32> = (0..layout.num_params()).map(|i| i as f32 * 0.25 - 3.0).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    std::fs::write(&path, layout.to_safetensors(&values).unwrap()).unwrap();

    let cfg = ServerConfig { init: Some(path), engine: EngineChoice::Cpu, ..Default::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = sparsync::server::start(cfg, listener).await.unwrap();
    let mut opts = ClientOptions::new(format!("ws://{}/ws", h.addr), "c1", "tiny");
    opts.kind = sparsync::protocol::message::ClientKind::Native;
    let mut c = Connection::connect(&opts).await.unwrap();
    assert_eq!(c.welcome.layout, layout.tensors, "layout in file order from the metadata");
    assert_eq!(c.welcome.params, 40);
    assert_eq!(c.replica.values(), &values[..]);

    c.push(&header(0, 1, 2), &[0, 39], &[half::f16::from_f32(1.0), half::f16::from_f32(-1.0)]).await.unwrap();
    wait_ack(&mut c, 1).await;
    catch_up(&mut c, 1).await;
    // The status is published at most every 100 ms.
    let mut status = None;
    for _ in 0..100 {
        let (code, body) = http_get(h.addr, "/api/status").await;
        assert_eq!(code, 200);
        let s: serde_json::Value = serde_json::from_str(&body).unwrap();
        if s["version"] == 1 && s["clients"].as_array().is_some_and(|a| a.len() == 1) {
            status = Some(s);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let s = status.expect("status shows the client and version 1");
    assert_eq!(s["model"], "tiny");
    assert_eq!(s["engine"]["kind"], "cpu");
    assert_eq!(s["accepted"], 1);
    assert_eq!(s["clients"][0]["client_id"], "c1");
    assert_eq!(s["clients"][0]["kind"], "native");
    let (code, metrics) = http_get(h.addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("sparsync_updates_accepted_total 1"), "{metrics}");
    // The engine's work: one step, one broadcast, its selection's passes over d (4 on the CPU
    // engine: keys, histogram, bucket, emit).
    assert!(metrics.contains(r#"sparsync_engine_total{what="steps"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"sparsync_engine_total{what="broadcasts"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"sparsync_engine_total{what="topk_input_passes"} 4"#), "{metrics}");
    let (code, _) = http_get(h.addr, "/nope").await;
    assert_eq!(code, 404);
    c.close("done").await;
    h.shutdown("done").await.unwrap();
}

/// A session the server closes (here: replaced by a newer session of the same client)
/// ends cleanly: the open-sessions gauge counts only the live one. (A session task that
/// panicked on the way out never decremented it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_session_ends_cleanly() {
    let cfg = ServerConfig { model: "logreg".into(), engine: EngineChoice::Cpu, ..Default::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = sparsync::server::start(cfg, listener).await.unwrap();
    let mut opts = ClientOptions::new(format!("ws://{}/ws", h.addr), "same", "logreg");
    let mut old = Connection::connect(&opts).await.unwrap();
    // The same client reconnecting proves it with its Welcome's secret.
    opts.resume_secret = Some(old.welcome.resume_secret.clone());
    let _new = Connection::connect(&opts).await.unwrap();
    let bye = wait_for(&mut old, |e| match e {
        sparsync::client::Event::Bye { reason } => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(bye.contains("replaced"), "{bye}");
    let mut gauge = String::new();
    for _ in 0..100 {
        gauge = h.metrics().lines().find(|l| l.starts_with("sparsync_sessions ")).unwrap_or("").to_string();
        if gauge == "sparsync_sessions 1" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(gauge, "sparsync_sessions 1");
    h.shutdown("done").await.unwrap();
}

/// A client that pushes a few rounds right after the server is ready and leaves: within a
/// fraction of a second `/api/status` and `/metrics` show every acknowledged push, although
/// nothing happens on the server afterwards (the last change used to wait for a next event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_every_acked_push_when_the_server_goes_idle() {
    let n = 64;
    let cfg = ServerConfig { engine: EngineChoice::Cpu, ..Default::default() };
    let h =
        start(cfg, n, Box::new(sparsync::engine::cpu::CpuAggregator::new(init(n, 1), Default::default())))
            .await;
    let mut c = connect(&h, "burst").await;
    for seq in 1..=5u64 {
        c.push(&header(0, seq, 1), &[seq as u32], &[half::f16::from_f32(0.5)]).await.unwrap();
    }
    for seq in 1..=5u64 {
        wait_ack(&mut c, seq).await;
    }
    c.close("done").await;
    let acked_at = std::time::Instant::now();
    let mut seen = (serde_json::Value::Null, String::new());
    while acked_at.elapsed() < std::time::Duration::from_millis(400) {
        let (_, body) = http_get(h.addr, "/api/status").await;
        let s: serde_json::Value = serde_json::from_str(&body).unwrap();
        let (_, metrics) = http_get(h.addr, "/metrics").await;
        if s["accepted"] == 5
            && s["aggregated"] == 5
            && s["version"].as_u64() >= Some(1)
            && metrics.contains("sparsync_updates_accepted_total 5")
        {
            h.shutdown("done").await.unwrap();
            return;
        }
        seen = (s, metrics);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!(
        "400 ms after the last ack the status still shows accepted {} aggregated {} version {}; metrics:\n{}",
        seen.0["accepted"], seen.0["aggregated"], seen.0["version"], seen.1
    );
}

/// `snapshot_request` is answered in every case with a Snapshot of x̂ at the replica version:
/// by a client that is up to date, and by one that had not read the Deltas of two new versions.
/// (An up-to-date client got no answer at all, so a client that waited for one was stuck.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_request_is_always_answered() {
    use sparsync::client::Event;
    use sparsync::protocol::message::ClientMessage;
    let n = 64;
    let cfg = ServerConfig { engine: EngineChoice::Cpu, ..Default::default() };
    let h =
        start(cfg, n, Box::new(sparsync::engine::cpu::CpuAggregator::new(init(n, 1), Default::default())))
            .await;
    let mut c = connect(&h, "current").await;
    c.send(&ClientMessage::SnapshotRequest).await.unwrap();
    let v = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        wait_for(&mut c, |e| match e {
            Event::Snapshot { version, .. } => Some(*version),
            _ => None,
        }),
    )
    .await
    .expect("an up-to-date client's request is answered");
    assert_eq!(v, 0);

    // A client that reads nothing while two versions are made, then asks.
    let mut lazy = connect(&h, "lazy").await;
    for seq in 1..=2u64 {
        let base = c.version();
        c.push(&header(base, seq, 1), &[seq as u32], &[half::f16::from_f32(0.5)]).await.unwrap();
        wait_ack(&mut c, seq).await;
        catch_up(&mut c, seq).await;
    }
    lazy.send(&ClientMessage::SnapshotRequest).await.unwrap();
    let v = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        wait_for(&mut lazy, |e| match e {
            Event::Snapshot { version, .. } => Some(*version),
            _ => None,
        }),
    )
    .await
    .expect("a client that skipped Deltas gets a Snapshot");
    assert_eq!(v, 2);
    assert_eq!(bits(lazy.replica.values()), bits(c.replica.values()), "the snapshot is x̂");
    h.shutdown("done").await.unwrap();
}
