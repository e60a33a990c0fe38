//! Crashes and restarts of a real `sparsync serve` process: SIGTERM loses no acknowledged
//! update; kill -9 with --wal loses none; without the WAL at most what came after the last
//! checkpoint; clients reconnect and continue; a torn checkpoint is detected and skipped.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use half::f16;
use sparsync::client::{ClientOptions, Connection};
use sparsync::protocol::model::ModelLayout;
use sparsync::server::durability::{self, Checkpoint};

struct Server {
    child: Child,
    addr: std::net::SocketAddr,
}

fn start(dir: &Path, extra: &[&str], resume: bool) -> Server {
    let ckpt = dir.join("ckpt");
    let ckpt = ckpt.to_str().expect("utf-8 temp path");
    let mut args = vec!["--engine", "cpu", "--model", "logreg", "--log", "warn", "--checkpoint-dir", ckpt];
    args.extend_from_slice(extra);
    if resume {
        args.extend(["--resume", ckpt]);
    }
    let (child, addr) = spawn_serve(dir, &args);
    Server { child, addr }
}

fn signal(s: &Server, sig: &str) {
    let ok = Command::new("kill").args([sig, &s.child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig}");
}

fn opts(s: &Server) -> ClientOptions {
    let mut o = ClientOptions::new(format!("ws://{}/ws", s.addr), "writer", "logreg");
    o.timeout = Duration::from_secs(20);
    o
}

/// Push `seq` touches indices seq*10 .. seq*10+5 only (disjoint), with value 0.5.
fn indices(seq: u64) -> Vec<u32> {
    (0..5).map(|i| (seq * 10 + i) as u32).collect()
}

/// Pushes seqs `from..=to`, each waiting for its Ack; returns the acknowledged ones.
async fn push_range(c: &mut Connection, from: u64, to: u64) -> Vec<u64> {
    let mut acked = Vec::new();
    for seq in from..=to {
        let idx = indices(seq);
        let vals = vec![f16::from_f32(0.5); idx.len()];
        let base = c.version();
        c.push(&header(base, seq, idx.len()), &idx, &vals).await.unwrap();
        wait_ack(c, seq).await;
        acked.push(seq);
    }
    acked
}

/// The server's model x.
async fn model(s: &Server) -> Vec<f32> {
    let (code, bytes) = http_get_bytes(s.addr, "/api/model.safetensors").await;
    assert_eq!(code, 200);
    ModelLayout::from_safetensors("logreg", &bytes).unwrap().1
}

/// The pushes among `seqs` whose indices differ from the initial model.
fn applied(x: &[f32], x0: &[f32], seqs: &[u64]) -> Vec<u64> {
    seqs.iter().copied().filter(|&s| indices(s).iter().all(|&i| x[i as usize] != x0[i as usize])).collect()
}

fn x0() -> Vec<f32> {
    ModelLayout::builtin("logreg").unwrap().init(0)
}

fn wait_exit(s: &mut Server) -> std::process::ExitStatus {
    for _ in 0..200 {
        if let Some(st) = s.child.try_wait().unwrap() {
            return st;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server did not exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_loses_no_acknowledged_update_and_clients_continue() {
    let dir = tempfile::tempdir().unwrap();
    // FedBuff with a huge K: every push is acknowledged but none aggregated until shutdown.
    let mut s = start(dir.path(), &["--policy", "fedbuff", "--fedbuff-k", "1000"], false);
    let mut c = Connection::connect(&opts(&s)).await.unwrap();
    let acked = push_range(&mut c, 1, 20).await;
    signal(&s, "-TERM");
    assert!(wait_exit(&mut s).success(), "clean exit on SIGTERM");

    let mut s = start(dir.path(), &["--policy", "fedbuff", "--fedbuff-k", "1000"], true);
    let x = model(&s).await;
    assert_eq!(applied(&x, &x0(), &acked), acked, "every acknowledged push survived SIGTERM");
    // The client reconnects and continues; its sequence numbers were kept.
    let mut c = Connection::connect(&opts(&s)).await.unwrap();
    assert_eq!(push_range(&mut c, 21, 22).await, vec![21, 22]);
    let idx = indices(20);
    let base = c.version();
    c.push(&header(base, 20, 5), &idx, &[f16::from_f32(0.5); 5]).await.unwrap();
    let r = wait_for(&mut c, |e| match e {
        sparsync::client::Event::Reject(r) => Some(r.clone()),
        _ => None,
    })
    .await;
    assert_eq!(r.field, "seq", "a replayed push is refused after the restart: {r:?}");
    signal(&s, "-TERM");
    assert!(wait_exit(&mut s).success());

    // A torn newest checkpoint is detected: the server resumes from the previous one.
    let ckpts = durability::list(&dir.path().join("ckpt"));
    let (newest_v, newest) = ckpts.last().cloned().unwrap();
    let (older_v, _) = ckpts[ckpts.len() - 2].clone();
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let mut s = start(dir.path(), &[], true);
    let (_, status) = http_get(s.addr, "/api/status").await;
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        v["version"].as_u64(),
        Some(older_v),
        "resumed from the older checkpoint, not torn {newest_v}"
    );
    signal(&s, "-KILL");
    wait_exit(&mut s);
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("skipping an unusable checkpoint"), "the torn file is reported: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_wal_loses_no_acknowledged_update() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--policy", "fedbuff", "--fedbuff-k", "1000", "--wal"];
    let mut s = start(dir.path(), &args, false);
    let mut c = Connection::connect(&opts(&s)).await.unwrap();
    let acked = push_range(&mut c, 1, 20).await;
    signal(&s, "-KILL");
    wait_exit(&mut s);

    let mut s = start(dir.path(), &args, true);
    let x = model(&s).await;
    assert_eq!(applied(&x, &x0(), &acked), acked, "every acknowledged push survived kill -9");
    signal(&s, "-KILL");
    wait_exit(&mut s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_without_wal_loses_at_most_what_followed_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--policy", "asp", "--checkpoint-every-versions", "6"];
    let mut s = start(dir.path(), &args, false);
    let mut c = Connection::connect(&opts(&s)).await.unwrap();
    let mut acked = push_range(&mut c, 1, 20).await;
    // On a busy machine ASP may fold several pushes into one step: push on until the model has
    // passed two checkpoint periods, so that a periodic checkpoint exists to be checked.
    let mut next = 21;
    while c.version() < 12 && next <= 200 {
        acked.extend(push_range(&mut c, next, next).await);
        next += 1;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&s, "-KILL");
    wait_exit(&mut s);

    // What the newest checkpoint covers: the writer's pushes up to its registry's seq.
    let (_, ckpt) = Checkpoint::newest(&dir.path().join("ckpt")).unwrap();
    let covered = ckpt.registry.get("writer").copied().unwrap_or(0);
    assert!(covered >= 6, "periodic checkpoints were written (covered {covered})");
    let mut s = start(dir.path(), &args, true);
    let x = model(&s).await;
    let present = applied(&x, &x0(), &acked);
    let must: Vec<u64> = acked.iter().copied().filter(|&q| q <= covered).collect();
    assert!(
        must.iter().all(|q| present.contains(q)),
        "pushes up to seq {covered} survive: present {present:?}"
    );
    let lost: Vec<u64> = acked.iter().copied().filter(|q| !present.contains(q)).collect();
    assert!(lost.iter().all(|&q| q > covered), "only pushes after the checkpoint may be lost: {lost:?}");
    signal(&s, "-KILL");
    wait_exit(&mut s);
}

/// kill -9 with --wal reproduces acknowledged history exactly: 80 pushes from two clients,
/// aggregated in whatever batches the server formed (with their weights and broadcasts), then
/// kill -9 and --resume: x, x̂ and the version are bit-identical to the crashed server's. (The
/// replay used to regroup the pushes into new batches with other weights: 400 entries differed
/// and the version went back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_wal_resumes_the_exact_model_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--policy", "asp", "--weighting", "polynomial", "--wal"];
    let mut s = start(dir.path(), &args, false);
    let mut a = Connection::connect(&opts(&s)).await.unwrap();
    let mut ob = opts(&s);
    ob.client_id = "second".into();
    let mut b = Connection::connect(&ob).await.unwrap();
    // Both clients push at once, so that steps hold several pushes of different staleness.
    let (ra, rb) = tokio::join!(push_range(&mut a, 1, 40), push_range(&mut b, 41, 80));
    assert_eq!(ra.len() + rb.len(), 80);
    let status = loop {
        let (_, body) = http_get(s.addr, "/api/status").await;
        let st: serde_json::Value = serde_json::from_str(&body).unwrap();
        if st["aggregated"] == 80 && st["pending"] == 0 {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let version = status["version"].as_u64().unwrap();
    eprintln!("80 pushes in {version} steps");
    let x = model(&s).await;
    let (_, replica) = http_get(s.addr, "/api/replica").await;
    signal(&s, "-KILL");
    wait_exit(&mut s);

    let mut s = start(dir.path(), &args, true);
    let (_, body) = http_get(s.addr, "/api/status").await;
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["version"].as_u64(), Some(version), "the version after resume");
    assert_eq!(bits(&model(&s).await), bits(&x), "x after resume, bit for bit");
    let (_, replica2) = http_get(s.addr, "/api/replica").await;
    assert_eq!(replica2, replica, "x̂ after resume");
    signal(&s, "-KILL");
    wait_exit(&mut s);
}

/// kill -9 at a random moment while two clients push: after --resume every acknowledged push
/// is in the model, and the version is at least the newest one any client had received a
/// Delta for (each step is logged before its Delta leaves, so no client is ahead of the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_at_a_random_moment() {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let delay = Duration::from_millis(50 + (nanos % 400) as u64);
    let dir = tempfile::tempdir().unwrap();
    let args = ["--policy", "asp", "--weighting", "polynomial", "--wal"];
    let mut s = start(dir.path(), &args, false);
    let run = |id: &'static str, from: u64| {
        let mut o = opts(&s);
        o.client_id = id.into();
        async move {
            let mut c = Connection::connect(&o).await.unwrap();
            let (mut acked, mut seen) = (Vec::new(), 0u64);
            for seq in from..from + 90 {
                let idx = indices(seq);
                let vals = vec![f16::from_f32(0.5); idx.len()];
                let base = c.version();
                if c.push(&header(base, seq, idx.len()), &idx, &vals).await.is_err() {
                    break;
                }
                let acked_now = tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        match c.next_event().await {
                            Ok(sparsync::client::Event::Ack(a)) if a.seq == seq => return true,
                            Ok(_) => {}
                            Err(_) => return false,
                        }
                    }
                })
                .await;
                seen = seen.max(c.version());
                if acked_now != Ok(true) {
                    break;
                }
                acked.push(seq);
            }
            (acked, seen)
        }
    };
    let a = tokio::spawn(run("one", 1));
    let b = tokio::spawn(run("two", 100));
    tokio::time::sleep(delay).await;
    signal(&s, "-KILL");
    wait_exit(&mut s);
    let (acked_a, seen_a) = a.await.unwrap();
    let (acked_b, seen_b) = b.await.unwrap();
    let acked: Vec<u64> = acked_a.iter().chain(&acked_b).copied().collect();

    let mut s = start(dir.path(), &args, true);
    let x = model(&s).await;
    assert_eq!(applied(&x, &x0(), &acked), acked, "killed after {delay:?}: every acknowledged push survived");
    let (_, body) = http_get(s.addr, "/api/status").await;
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    let version = st["version"].as_u64().unwrap();
    assert!(
        version >= seen_a.max(seen_b),
        "killed after {delay:?}: version {version} behind a client's {}",
        seen_a.max(seen_b)
    );
    eprintln!("killed after {delay:?}: {} pushes acknowledged, resumed at version {version}", acked.len());
    signal(&s, "-KILL");
    wait_exit(&mut s);
}
