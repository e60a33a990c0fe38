//! A run recorded on a live server (sockets, the engine's thread, the write-ahead log) replays
//! through the core alone, with no sockets, no engine and no runtime: every input gives the
//! same effects, in the same order, as it did live. The tape keeps resume secrets only as
//! hashes, and the replay decides the same with them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::scripted::{self, Script};
use common::*;
use sparsync::client::Connection;
use sparsync::config::{EngineChoice, PolicyKind, ServerConfig};
use sparsync::core::{Input, Machine};
use sparsync::protocol::message::{ClientMessage, EvalReport, Role};
use sparsync::server::{Tape, TapeEntry};

const N: usize = 4096;

/// A server of the tests' one-tensor model "test" (from a file, as `--init` serves it), with a
/// checkpoint directory and the write-ahead log.
fn cfg(policy: PolicyKind, dir: &std::path::Path) -> ServerConfig {
    let init = dir.join("test.safetensors");
    std::fs::write(&init, layout(N).to_safetensors(&common::init(N, 3)).expect("encode")).expect("write");
    let mut c = ServerConfig {
        policy,
        init: Some(init),
        engine: EngineChoice::Cpu,
        rho_down: 0.02,
        checkpoint_dir: Some(dir.join("ckpt")),
        wal: sparsync::config::WalTarget::File,
        // What the server derives when it is 0: the replay's Welcomes must say the same.
        max_frame_bytes: sparsync::server::derived_frame_limit(N),
        ..Default::default()
    };
    c.policies.bsp.bsp_deadline_s = 0.5;
    c.policies.fedbuff.fedbuff_k = 3;
    c
}

/// Three scripted trainers of different speeds, and a client id whose second session
/// replaces its first with the resume secret. Returns the tape and that secret.
async fn record(cfg: ServerConfig) -> (Vec<TapeEntry>, String) {
    let tape = Tape::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let h = sparsync::server::start_taped(cfg, listener, Some(tape.clone())).await.expect("server starts");
    let h = Arc::new(h);
    let scripts = [("a", 0.004), ("b", 0.006), ("c", 0.015)]
        .map(|(id, s)| Script { run_for: Duration::from_millis(1200), ..Script::new(id, s) });
    let tasks: Vec<_> = scripts
        .into_iter()
        .map(|s| {
            let h = h.clone();
            tokio::spawn(async move { scripted::run(&h, s).await })
        })
        .collect();
    // An evaluator that reports, then comes back with its resume secret (replacing itself).
    let mut o = options(&h, "twin");
    o.role = Role::Evaluator;
    let mut first = Connection::connect(&o).await.expect("connect");
    let report = EvalReport { version: 0, accuracy: 0.5, loss: 1.0, samples: 10 };
    first.send(&ClientMessage::Eval(report)).await.expect("eval");
    o.resume_secret = Some(first.welcome.resume_secret.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = Connection::connect(&o).await.expect("the secret lets the same client back in");
    let mut pushed = 0;
    for t in tasks {
        pushed += t.await.expect("client task").pushes;
    }
    assert!(pushed >= 6, "the run pushed only {pushed} times");
    second.close("done").await;
    drop(first);
    let secret = o.resume_secret.unwrap_or_default();
    match Arc::try_unwrap(h) {
        Ok(h) => {
            h.shutdown("test done").await.expect("shutdown");
        }
        Err(_) => panic!("handle still shared"),
    }
    (tape.entries(), secret)
}

/// Feeds the tape to a fresh core and compares every input's effects with the live ones.
fn replay(cfg: &ServerConfig, tape: &[TapeEntry]) {
    let (layout, _) = sparsync::server::load_model(cfg).expect("model");
    let policy = sparsync::server::build_policy(cfg);
    let mut m = Machine::new(Arc::new(cfg.clone()), layout, policy, 0, 0);
    for (i, e) in tape.iter().enumerate() {
        let got = format!("{:?}", m.handle(e.now, e.input.clone()));
        if got != e.effects {
            let at = got.bytes().zip(e.effects.bytes()).take_while(|(a, b)| a == b).count();
            let around =
                |s: &str| s.get(at.saturating_sub(120)..(at + 200).min(s.len())).unwrap_or("").to_string();
            panic!(
                "{:?}: input {i} of {} ({:?}) gave other effects on replay.\nlive:   …{}…\nreplay: …{}…",
                cfg.policy,
                tape.len(),
                kind(&e.input),
                around(&e.effects),
                around(&got)
            );
        }
    }
}

fn kind(i: &Input) -> String {
    format!("{i:?}").split([' ', '{', '(']).next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_run_replays_through_the_core_alone_with_the_same_effects() {
    for policy in [PolicyKind::Asp, PolicyKind::Bsp, PolicyKind::Ssp, PolicyKind::Fedbuff, PolicyKind::Adsp] {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = cfg(policy, dir.path());
        let (tape, secret) = record(cfg.clone()).await;
        // The run went through every kind of input that matters, the log included.
        let count = |k: &str| tape.iter().filter(|e| kind(&e.input) == k).count();
        for k in ["Join", "Push", "Appended", "StepDone", "Sent", "Eval", "Leave", "Shutdown", "Farewell"] {
            assert!(count(k) > 0, "{policy:?}: the tape has no {k} input");
        }
        assert!(tape.iter().any(|e| e.effects.contains("Ack(Ack")), "{policy:?}: no Ack was sent");
        assert!(tape.iter().any(|e| e.effects.contains("Broadcast {")), "{policy:?}: no Delta was sent");
        // The secret the client was given is on the tape only as a hash.
        let text = format!("{tape:?}");
        assert!(!text.contains(&secret), "{policy:?}: the tape holds a resume secret in clear");
        replay(&cfg, &tape);
    }
}
