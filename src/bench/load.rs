//! The load generator: N protocol-level clients on one runtime pushing sparse updates at a
//! server, and the raw TCP baseline with the same layout. `sparsync bench e2e` runs it in its
//! own process (`sparsync bench loadgen`); the load test runs it in the test process.
//!
//! Clients track only versions, not replicas (applying every Delta to 1000 replicas would
//! measure the load generator instead of the server). Payloads come from a small pool per
//! client, generated once and reproducible with [`payload`], so that a test can replay exactly
//! what was accepted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use half::f16;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::protocol::PROTOCOL_VERSION;
use crate::protocol::frame::{
    FrameKind, PUSH_HEADER_LEN, PushHeader, check_prefix, encode_push, push_header_bytes, sparse_payload_len,
};
use crate::protocol::message::{Ack, ClientKind, ClientMessage, Hello, Role, ServerMessage, Welcome};
use crate::protocol::model::SplitMix64;

/// What to run. Also the flags of `sparsync bench loadgen`: each flag's default is the value of
/// [`LoadSpec::default`], and the settings without a flag keep theirs in that process.
#[derive(Clone, Debug, Serialize, Deserialize, clap::Args)]
pub struct LoadSpec {
    /// `ws://HOST:PORT/ws`.
    #[arg(long, default_value_t = LoadSpec::default().url)]
    pub url: String,
    /// Join token, when the server requires one.
    #[arg(long, env = "SPARSYNC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The server's model name (`flat-N` and the like).
    #[arg(long, default_value_t = LoadSpec::default().model)]
    pub model: String,
    /// Simulated clients.
    #[arg(long, default_value_t = LoadSpec::default().clients)]
    pub clients: usize,
    /// nnz of each push as a fraction of the model.
    #[arg(long, default_value_t = LoadSpec::default().density)]
    pub density: f64,
    /// Pushes per second per client; 0: as fast as `window` allows.
    #[arg(long, default_value_t = LoadSpec::default().rate)]
    pub rate: f64,
    /// Most pushes a client has unanswered at once.
    #[arg(long, default_value_t = LoadSpec::default().window)]
    pub window: usize,
    /// How long clients push (after all have connected), seconds.
    #[arg(long = "duration", default_value_t = LoadSpec::default().duration_s)]
    pub duration_s: f64,
    /// How long to wait for the answers to the last pushes.
    #[arg(skip = LoadSpec::default().drain_s)]
    pub drain_s: f64,
    #[arg(skip = LoadSpec::default().seed)]
    pub seed: u64,
    /// Client ids are `{prefix}-{i}`.
    #[arg(skip = LoadSpec::default().prefix)]
    pub prefix: String,
    /// Distinct payloads per client.
    #[arg(skip = LoadSpec::default().pool)]
    pub pool: usize,
    /// Fetch `/api/record` afterwards to measure Push → Delta latency.
    #[arg(skip = LoadSpec::default().latency)]
    pub latency: bool,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            url: String::new(),
            token: None,
            model: "flat-65536".into(),
            clients: 8,
            density: 0.01,
            rate: 0.0,
            // Enough in flight that a client is not what limits a server that pipelines.
            window: 8,
            duration_s: 5.0,
            drain_s: 30.0,
            seed: 1,
            prefix: "load".into(),
            pool: 4,
            latency: true,
        }
    }
}

impl LoadSpec {
    /// The flags of `sparsync bench loadgen` that run this spec. Without the token (a child
    /// process gets it from `SPARSYNC_TOKEN`, not from a command line others can read) and the
    /// settings that have no flag (the child uses their defaults).
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--url", self.url.clone()),
            ("--model", self.model.clone()),
            ("--clients", self.clients.to_string()),
            ("--density", self.density.to_string()),
            ("--rate", self.rate.to_string()),
            ("--window", self.window.to_string()),
            ("--duration", self.duration_s.to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect()
    }
}

/// p50, p99, mean and count of a sample, in seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Quantiles {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
    pub max: f64,
}

impl Quantiles {
    pub fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
        Self {
            count: v.len(),
            p50: at(0.5),
            p99: at(0.99),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            max: v[v.len() - 1],
        }
    }
}

/// Server counters read from `/metrics`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServerCounters {
    pub accepted: f64,
    pub rejected: f64,
    pub bytes_in: f64,
    pub bytes_out: f64,
    pub version: f64,
    pub queue_depth: f64,
    pub pending: f64,
    /// `sparsync_stage_seconds_total` by stage.
    pub stages: BTreeMap<String, f64>,
    /// Seconds the coordinator spent handling messages, step reports and timers.
    #[serde(default)]
    pub coordinator_busy: f64,
    /// Seconds the engine's thread spent running steps and reads.
    #[serde(default)]
    pub engine_busy: f64,
    /// Broadcasts the engine made (`sparsync_engine_total{what="broadcasts"}`).
    #[serde(default)]
    pub broadcasts: f64,
    /// Bytes of records written to the log (`sparsync_log_bytes_total`).
    #[serde(default)]
    pub log_bytes: f64,
}

impl ServerCounters {
    /// Parses the Prometheus text of `/metrics`.
    pub fn parse(text: &str) -> Self {
        let mut c = Self::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else { continue };
            let Ok(v) = value.parse::<f64>() else { continue };
            match key {
                "sparsync_updates_accepted_total" => c.accepted = v,
                "sparsync_bytes_total{direction=\"in\"}" => c.bytes_in = v,
                "sparsync_bytes_total{direction=\"out\"}" => c.bytes_out = v,
                "sparsync_model_version" => c.version = v,
                "sparsync_queue_depth" => c.queue_depth = v,
                "sparsync_pending_updates" => c.pending = v,
                "sparsync_coordinator_busy_seconds_total" => c.coordinator_busy = v,
                "sparsync_engine_busy_seconds_total" => c.engine_busy = v,
                "sparsync_engine_total{what=\"broadcasts\"}" => c.broadcasts = v,
                "sparsync_log_bytes_total" => c.log_bytes = v,
                k if k.starts_with("sparsync_updates_rejected_total{") => c.rejected += v,
                k => {
                    if let Some(stage) = k
                        .strip_prefix("sparsync_stage_seconds_total{stage=\"")
                        .and_then(|s| s.strip_suffix("\"}"))
                    {
                        c.stages.insert(stage.to_string(), v);
                    }
                }
            }
        }
        c
    }

    /// `self - before`, field by field (gauges keep `self`'s value).
    pub fn since(&self, before: &Self) -> Self {
        Self {
            accepted: self.accepted - before.accepted,
            rejected: self.rejected - before.rejected,
            bytes_in: self.bytes_in - before.bytes_in,
            bytes_out: self.bytes_out - before.bytes_out,
            version: self.version - before.version,
            queue_depth: self.queue_depth,
            pending: self.pending,
            stages: self
                .stages
                .iter()
                .map(|(k, v)| (k.clone(), v - before.stages.get(k).copied().unwrap_or(0.0)))
                .collect(),
            coordinator_busy: self.coordinator_busy - before.coordinator_busy,
            engine_busy: self.engine_busy - before.engine_busy,
            broadcasts: self.broadcasts - before.broadcasts,
            log_bytes: self.log_bytes - before.log_bytes,
        }
    }
}

/// What a load run saw.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub clients: usize,
    pub connected: usize,
    /// The first connection errors (all are counted in `connect_failures`).
    pub connect_errors: Vec<String>,
    pub connect_failures: usize,
    /// Seconds to connect every client.
    pub connect_s: f64,
    pub params: u64,
    pub nnz: usize,
    /// Bytes of one Push frame.
    pub frame_bytes: usize,
    /// Length of the window in which clients pushed.
    pub window_s: f64,
    pub sent: u64,
    pub acked: u64,
    /// Rejections by the field the server named.
    pub rejected: BTreeMap<String, u64>,
    /// Pushes with neither Ack nor Reject after the drain.
    pub unanswered: u64,
    /// Push frame bytes sent, and of those acknowledged.
    pub bytes_up: u64,
    pub bytes_up_acked: u64,
    /// Binary frame bytes received (Deltas and snapshots).
    pub bytes_down: u64,
    pub deltas: u64,
    pub snapshots: u64,
    /// Error messages the server sent (field: message), first few.
    pub server_errors: Vec<String>,
    /// Sessions that ended before the run did.
    pub sessions_lost: usize,
    /// Push → Ack.
    pub ack_latency_s: Quantiles,
    /// Push → the first Delta (or snapshot) holding the version that aggregated it.
    pub delta_latency_s: Quantiles,
    /// Server counters over the push window (from `/metrics` at its start and end).
    pub server: ServerCounters,
}

/// The payload of push number `slot` of client `client`: `nnz` distinct ascending indices
/// below `n` and values in ±2^-8.
pub fn payload(seed: u64, client: usize, slot: usize, n: usize, nnz: usize) -> (Vec<u32>, Vec<f16>) {
    let nnz = nnz.clamp(1, n);
    let mut rng =
        SplitMix64::new(seed ^ (client as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (slot as u64) << 48);
    // Stratified: one index in each of nnz equal strata, so they are distinct and ascending.
    let mut idx = Vec::with_capacity(nnz);
    for j in 0..nnz {
        let lo = (j as u64 * n as u64 / nnz as u64) as u32;
        let hi = ((j as u64 + 1) * n as u64 / nnz as u64) as u32;
        idx.push(lo + (rng.next_u64() % u64::from(hi - lo).max(1)) as u32);
    }
    let vals = idx.iter().map(|_| f16::from_f32((rng.next_unit_f32() * 2.0 - 1.0) / 256.0)).collect();
    (idx, vals)
}

/// Pushes per client for `spec`: the nnz of one push.
pub fn nnz_for(spec: &LoadSpec, n: usize) -> usize {
    ((spec.density * n as f64).ceil() as usize).clamp(1, n)
}

/// One push as its client saw it.
struct PushLog {
    seq: u64,
    sent: Instant,
    bytes: usize,
    /// Some(true): acknowledged; Some(false): rejected; None: no answer.
    answer: Option<bool>,
    answered: Option<Instant>,
}

/// One client's log.
#[derive(Default)]
struct ClientLog {
    name: String,
    pushes: Vec<PushLog>,
    /// (version, arrival) of each Delta or snapshot, in arrival order.
    versions: Vec<(u64, Instant)>,
    rejected: BTreeMap<String, u64>,
    bytes_down: u64,
    deltas: u64,
    snapshots: u64,
    errors: Vec<String>,
    lost: bool,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects one client: Hello, Welcome, first snapshot. Returns the socket, the parameter
/// count and the snapshot's version.
async fn join(spec: &LoadSpec, name: &str) -> Result<(Ws, usize, u64, u64), String> {
    let config = WebSocketConfig::default().max_message_size(None).max_frame_size(None);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_tungstenite::connect_async_with_config(spec.url.as_str(), Some(config), true),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let hello = ClientMessage::Hello(Hello {
        resume_secret: None,
        protocol: PROTOCOL_VERSION as u32,
        client_id: name.to_string(),
        token: spec.token.clone(),
        kind: ClientKind::Synthetic,
        model: spec.model.clone(),
        role: Role::Trainer,
        device: Some("load generator".into()),
    });
    let text = serde_json::to_string(&hello).map_err(|e| e.to_string())?;
    ws.send(Message::text(text)).await.map_err(|e| e.to_string())?;
    let mut params = None;
    let mut bytes = 0u64;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| "no welcome within 30 s".to_string())?;
        match m {
            None => return Err("closed during the handshake".into()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMessage>(t.as_str()) {
                Ok(ServerMessage::Welcome(w)) => params = Some(w.params as usize),
                Ok(ServerMessage::Error(e)) => return Err(format!("refused ({}): {}", e.field, e.message)),
                _ => {}
            },
            Some(Ok(Message::Binary(b))) => {
                bytes += b.len() as u64;
                if let (Some(n), Ok(FrameKind::Snapshot)) = (params, check_prefix(&b)) {
                    return Ok((ws, n, frame_version(&b), bytes));
                }
            }
            Some(Ok(_)) => {}
        }
    }
}

/// The version field of a Delta or Snapshot (bytes 8..16).
fn frame_version(b: &[u8]) -> u64 {
    b.get(8..16).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0)
}

/// Where a load run is, for progress displays.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    /// Clients are pushing; seconds since the window opened (0 when it opens, then each second).
    Pushing(f64),
    /// The window closed; waiting for the last answers.
    Draining,
}

/// Runs a load: connects every client, pushes for `duration_s`, drains, and (with `latency`)
/// reads the server's record. `progress` hears when the window opens, each second of it, and
/// when it closes.
pub async fn run(spec: &LoadSpec, progress: impl Fn(Phase) + Send + Sync + 'static) -> LoadReport {
    let base = spec.url.trim_end_matches("/ws").replacen("ws://", "http://", 1);
    let (start_tx, start_rx) = watch::channel(None::<Instant>);
    let connect_started = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let (ready_tx, mut ready_rx) =
        tokio::sync::mpsc::channel::<Result<(usize, usize), String>>(spec.clients.max(1));
    let mut tasks = Vec::with_capacity(spec.clients);
    for i in 0..spec.clients {
        let spec = spec.clone();
        let limit = limit.clone();
        let ready = ready_tx.clone();
        let mut start = start_rx.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("{}-{i}", spec.prefix);
            let permit = limit.acquire_owned().await.ok();
            let joined = join(&spec, &name).await;
            drop(permit);
            let (ws, n, version, bytes) = match joined {
                Ok(j) => j,
                Err(e) => {
                    let _ = ready.send(Err(e)).await;
                    return ClientLog { name, lost: true, ..Default::default() };
                }
            };
            let nnz = nnz_for(&spec, n);
            // Each payload is encoded once, before the clock starts: a push then costs its
            // 40-byte header and one copy of the body, not an encoding.
            let pool: Vec<Body> =
                (0..spec.pool.max(1)).map(|s| Body::new(payload(spec.seed, i, s, n, nnz))).collect();
            let _ = ready.send(Ok((n, nnz))).await;
            drop(ready);
            let Ok(t0) = start.wait_for(|s| s.is_some()).await.map(|s| s.expect("set")) else {
                return ClientLog { name, ..Default::default() };
            };
            client_loop(ws, &spec, name, i, pool, version, bytes, t0).await
        }));
    }
    drop(ready_tx);
    let mut report = LoadReport { clients: spec.clients, ..Default::default() };
    while let Some(r) = ready_rx.recv().await {
        match r {
            Ok((n, nnz)) => {
                report.connected += 1;
                report.params = n as u64;
                report.nnz = nnz;
            }
            Err(e) => {
                report.connect_failures += 1;
                if report.connect_errors.len() < 5 {
                    report.connect_errors.push(e);
                }
            }
        }
    }
    report.connect_s = connect_started.elapsed().as_secs_f64();
    report.frame_bytes = PUSH_HEADER_LEN + sparse_payload_len(report.nnz);
    let before = metrics(&base, spec.token.as_deref()).await.unwrap_or_default();
    let t0 = Instant::now();
    let _ = start_tx.send(Some(t0));
    let progress = Arc::new(progress);
    progress(Phase::Pushing(0.0));
    let ticker = {
        let duration = spec.duration_s;
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut s = 0.0;
            while s + 1.0 < duration {
                tokio::time::sleep(Duration::from_secs(1)).await;
                s += 1.0;
                progress(Phase::Pushing(s));
            }
        })
    };
    tokio::time::sleep(Duration::from_secs_f64(spec.duration_s)).await;
    let after = metrics(&base, spec.token.as_deref()).await.unwrap_or_default();
    report.window_s = t0.elapsed().as_secs_f64();
    report.server = after.since(&before);
    ticker.abort();
    progress(Phase::Draining);

    let mut logs = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await {
            Ok(l) => logs.push(l),
            Err(e) => report.server_errors.push(format!("load client task failed: {e}")),
        }
    }
    let mut ack_lat = Vec::new();
    for l in &logs {
        for p in &l.pushes {
            report.sent += 1;
            report.bytes_up += p.bytes as u64;
            match p.answer {
                Some(true) => {
                    report.acked += 1;
                    report.bytes_up_acked += p.bytes as u64;
                    if let Some(at) = p.answered {
                        ack_lat.push((at - p.sent).as_secs_f64());
                    }
                }
                Some(false) => {}
                None => report.unanswered += 1,
            }
        }
        for (k, v) in &l.rejected {
            *report.rejected.entry(k.clone()).or_default() += v;
        }
        report.bytes_down += l.bytes_down;
        report.deltas += l.deltas;
        report.snapshots += l.snapshots;
        report.sessions_lost += usize::from(l.lost && !l.pushes.is_empty());
        for e in &l.errors {
            if report.server_errors.len() < 10 {
                report.server_errors.push(format!("{}: {e}", l.name));
            }
        }
    }
    report.ack_latency_s = Quantiles::of(ack_lat);
    if spec.latency {
        match delta_latencies(&base, spec.token.as_deref(), &logs).await {
            Ok(v) => report.delta_latency_s = Quantiles::of(v),
            Err(e) => report.server_errors.push(format!("reading /api/record: {e}")),
        }
    }
    report
}

/// A push's body (indices, values, padding), encoded once.
struct Body {
    nnz: u32,
    bytes: Vec<u8>,
}

impl Body {
    fn new((idx, vals): (Vec<u32>, Vec<f16>)) -> Self {
        let header = PushHeader { base_version: 0, seq: 0, samples: 0, local_steps: 0, loss: 0.0, nnz: 0 };
        let frame = encode_push(&header, &idx, &vals);
        Body { nnz: idx.len() as u32, bytes: frame[PUSH_HEADER_LEN..].to_vec() }
    }

    /// The whole Push frame with `header` (its nnz set from the body).
    fn frame(&self, header: PushHeader) -> Vec<u8> {
        let mut out = Vec::with_capacity(PUSH_HEADER_LEN + self.bytes.len());
        out.extend_from_slice(&push_header_bytes(&PushHeader { nnz: self.nnz, ..header }));
        out.extend_from_slice(&self.bytes);
        out
    }
}

#[allow(clippy::too_many_arguments)]
async fn client_loop(
    ws: Ws,
    spec: &LoadSpec,
    name: String,
    index: usize,
    pool: Vec<Body>,
    mut version: u64,
    bytes_before: u64,
    t0: Instant,
) -> ClientLog {
    let mut log = ClientLog { name, bytes_down: bytes_before, snapshots: 1, ..Default::default() };
    let (mut tx, mut rx) = ws.split();
    let end = t0 + Duration::from_secs_f64(spec.duration_s);
    let drain_end = end + Duration::from_secs_f64(spec.drain_s);
    let period = (spec.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / spec.rate));
    // Spread the clients' first pushes over one period so they do not arrive in lockstep.
    let mut next_push = match period {
        Some(p) => t0 + p.mul_f64((index as f64 * 0.618_034) % 1.0),
        None => t0,
    };
    let mut outstanding: HashMap<u64, usize> = HashMap::new();
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        let sending = now < end;
        if !sending && outstanding.is_empty() {
            break;
        }
        if now >= drain_end {
            break;
        }
        if sending && outstanding.len() < spec.window.max(1) && now >= next_push {
            seq += 1;
            let body = &pool[(seq as usize) % pool.len()];
            let h = PushHeader { base_version: version, seq, samples: 32, local_steps: 1, loss: 1.0, nnz: 0 };
            let frame = body.frame(h);
            let len = frame.len();
            log.pushes.push(PushLog { seq, sent: Instant::now(), bytes: len, answer: None, answered: None });
            outstanding.insert(seq, log.pushes.len() - 1);
            if tx.send(Message::binary(frame)).await.is_err() {
                log.lost = true;
                break;
            }
            if let Some(p) = period {
                next_push += p;
                if next_push < now {
                    next_push = now; // fell behind: do not burst to catch up
                }
            }
            continue;
        }
        let wake = if sending && outstanding.len() < spec.window.max(1) {
            next_push.min(end)
        } else if sending {
            end
        } else {
            drain_end
        };
        let msg = tokio::select! {
            m = rx.next() => m,
            _ = tokio::time::sleep_until(wake.into()) => continue,
        };
        let m = match msg {
            None | Some(Err(_)) => {
                log.lost = true;
                break;
            }
            Some(Ok(m)) => m,
        };
        let at = Instant::now();
        match m {
            Message::Binary(b) => {
                log.bytes_down += b.len() as u64;
                match check_prefix(&b) {
                    Ok(FrameKind::Delta) => log.deltas += 1,
                    Ok(FrameKind::Snapshot) => log.snapshots += 1,
                    _ => continue,
                }
                version = version.max(frame_version(&b));
                log.versions.push((version, at));
            }
            Message::Text(t) => match serde_json::from_str::<ServerMessage>(t.as_str()) {
                Ok(ServerMessage::Ack(a)) => {
                    if let Some(i) = outstanding.remove(&a.seq) {
                        log.pushes[i].answer = Some(true);
                        log.pushes[i].answered = Some(at);
                    }
                }
                Ok(ServerMessage::Reject(r)) => {
                    if let Some(i) = outstanding.remove(&r.seq) {
                        log.pushes[i].answer = Some(false);
                        *log.rejected.entry(r.field).or_default() += 1;
                    }
                }
                Ok(ServerMessage::Error(e)) => log.errors.push(format!("{}: {}", e.field, e.message)),
                _ => {}
            },
            Message::Close(_) => {
                log.lost = true;
                break;
            }
            _ => {}
        }
    }
    let bye = ClientMessage::Bye { reason: "load run over".into() };
    if let Ok(t) = serde_json::to_string(&bye) {
        let _ = tx.send(Message::text(t)).await;
    }
    let _ = tx.close().await;
    log
}

/// Push → Delta latencies: the server's record says which version aggregated each push; the
/// client's log says when that version (or a later one) arrived.
async fn delta_latencies(base: &str, token: Option<&str>, logs: &[ClientLog]) -> Result<Vec<f64>, String> {
    let (code, body) = http_get(base, "/api/record?since=0", token).await?;
    if code != 200 {
        return Err(format!("HTTP {code}: {}", String::from_utf8_lossy(&body)));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let events = v["events"].as_array().ok_or("no events")?;
    let by_name: HashMap<&str, usize> = logs.iter().enumerate().map(|(i, l)| (l.name.as_str(), i)).collect();
    // Session numbers → client logs (a name can only have joined once in a load run).
    let mut session: HashMap<u64, usize> = HashMap::new();
    let mut aggregated: HashMap<(usize, u64), u64> = HashMap::new();
    for e in events {
        match e["event"].as_str() {
            Some("join") => {
                if let (Some(c), Some(i)) =
                    (e["session"].as_u64(), e["client_id"].as_str().and_then(|n| by_name.get(n)))
                {
                    session.insert(c, *i);
                }
            }
            Some("aggregate") => {
                let version = e["version"].as_u64().unwrap_or(0);
                for it in e["items"].as_array().into_iter().flatten() {
                    if let (Some(c), Some(seq)) = (it["session"].as_u64(), it["seq"].as_u64())
                        && let Some(&i) = session.get(&c)
                    {
                        aggregated.insert((i, seq), version);
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (i, l) in logs.iter().enumerate() {
        for p in l.pushes.iter().filter(|p| p.answer == Some(true)) {
            let Some(&v) = aggregated.get(&(i, p.seq)) else { continue };
            let at = l.versions.partition_point(|(have, _)| *have < v);
            if let Some((_, arrived)) = l.versions.get(at) {
                out.push(arrived.saturating_duration_since(p.sent).as_secs_f64());
            }
        }
    }
    Ok(out)
}

/// The server's counters from `/metrics`.
pub async fn metrics(base: &str, token: Option<&str>) -> Result<ServerCounters, String> {
    let (code, body) = http_get(base, "/metrics", token).await?;
    if code != 200 {
        return Err(format!("/metrics: HTTP {code}"));
    }
    Ok(ServerCounters::parse(&String::from_utf8_lossy(&body)))
}

/// A GET over plain HTTP/1.1 (`base` is `http://HOST:PORT`): (status, body).
pub async fn http_get(base: &str, path: &str, token: Option<&str>) -> Result<(u16, Vec<u8>), String> {
    let host = base.strip_prefix("http://").ok_or_else(|| format!("{base}: only http:// is supported"))?;
    let mut s = tokio::net::TcpStream::connect(host).await.map_err(|e| format!("{host}: {e}"))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no HTTP header end")? + 4;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf[split..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok((code, dechunk(&body)?));
    }
    Ok((code, body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
        let size = std::str::from_utf8(&b[..line_end]).map_err(|e| e.to_string())?;
        let n = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
        b = &b[line_end + 2..];
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..n).ok_or("short chunk")?);
        b = b.get(n + 2..).ok_or("short chunk")?;
    }
}

/// The raw TCP baseline's client side: `clients` connections to `addr` each writing
/// `frame_bytes`-byte messages for `duration_s` once all are connected. Returns bytes written.
pub async fn raw_blast(
    addr: &str,
    clients: usize,
    frame_bytes: usize,
    duration_s: f64,
) -> Result<u64, String> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        let s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("{addr}: {e}"))?;
        let _ = s.set_nodelay(true);
        conns.push(s);
    }
    let end = Instant::now() + Duration::from_secs_f64(duration_s);
    let buf = Arc::new(vec![0x5au8; frame_bytes.max(1)]);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let buf = buf.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < end {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                    n += buf.len() as u64;
                }
                let _ = s.shutdown().await;
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| e.to_string())?;
    }
    Ok(total)
}

/// The raw TCP baseline's server side: accepts `clients` connections and reads them to their
/// end. Returns (bytes read, seconds from the first byte to the last connection's end).
pub async fn raw_sink(listener: tokio::net::TcpListener, clients: usize) -> std::io::Result<(u64, f64)> {
    let first = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (mut s, _) = listener.accept().await?;
        let first = first.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        first.get_or_init(Instant::now);
                        n += k as u64;
                    }
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    let secs = first.get().map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
    Ok((total, secs))
}

/// The client-side ceiling's server: every WebSocket Hello gets a Welcome for the built-in
/// `model` and one shared zero Snapshot, every Push its Ack at once, and nothing else is sent
/// or checked. The same load generator pushing at it measures what the clients alone can do
/// (encode, mask, send, read Acks), so an e2e row can say how much of that the server reaches.
/// Runs until the listener's task is dropped; connections that are not WebSockets (the load
/// generator's `/metrics` requests) are closed.
pub async fn ack_sink(listener: tokio::net::TcpListener, model: String) -> Result<(), String> {
    let layout = crate::protocol::model::ModelLayout::builtin(&model).map_err(|e| e.to_string())?;
    let n = layout.num_params();
    let snapshot = bytes::Bytes::from(crate::protocol::frame::encode_snapshot(0, &vec![0.0; n]));
    let welcome = Arc::new(crate::protocol::message::Welcome {
        protocol: PROTOCOL_VERSION as u32,
        session: 0,
        model: layout.name.clone(),
        layout: layout.tensors.clone(),
        params: n as u64,
        version: 0,
        settings: crate::protocol::message::SessionSettings {
            policy: "ack-sink".into(),
            rho_up: 1.0,
            rho_down: 1.0,
            max_staleness: u64::MAX,
            max_nnz: n as u64,
            max_frame_bytes: u64::MAX,
            max_delta_chain: 0,
            max_push_rate: 0.0,
        },
        resume_secret: String::new(),
    });
    loop {
        let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let (snapshot, welcome) = (snapshot.clone(), welcome.clone());
        tokio::spawn(async move {
            let config = WebSocketConfig::default().max_message_size(None).max_frame_size(None);
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
                return;
            };
            let mut welcomed = false;
            while let Some(Ok(m)) = ws.next().await {
                let reply = match m {
                    // The first text is the Hello; later ones (Bye) need no answer.
                    Message::Text(_) if !welcomed => {
                        welcomed = true;
                        let w = ServerMessage::Welcome(Welcome::clone(&welcome)).to_json();
                        if ws.send(Message::text(w)).await.is_err() {
                            return;
                        }
                        Message::Binary(snapshot.clone())
                    }
                    Message::Binary(b) => {
                        let Some(seq) = b.get(16..24).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes)
                        else {
                            continue;
                        };
                        Message::text(ServerMessage::Ack(Ack { seq, version: 0, staleness: 0 }).to_json())
                    }
                    Message::Close(_) => return,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_encoded_once_makes_the_frame_a_fresh_encoding_makes() {
        for (n, nnz) in [(1000, 7), (1 << 20, 10486), (5, 1)] {
            let (idx, vals) = payload(3, 2, 1, n, nnz);
            let body = Body::new((idx.clone(), vals.clone()));
            for (seq, base) in [(1, 0), (77, 12), (u64::MAX, u64::MAX - 1)] {
                let h = PushHeader {
                    base_version: base,
                    seq,
                    samples: 32,
                    local_steps: 1,
                    loss: 1.0,
                    nnz: nnz as u32,
                };
                assert_eq!(body.frame(h), encode_push(&h, &idx, &vals), "seq {seq}, nnz {nnz}");
            }
        }
    }

    #[test]
    fn payloads_are_ascending_distinct_and_reproducible() {
        for (n, nnz) in [(10, 10), (1000, 7), (1 << 20, 10486), (5, 1)] {
            let (i, v) = payload(3, 2, 1, n, nnz);
            assert_eq!(i.len(), nnz);
            assert_eq!(v.len(), nnz);
            assert!(i.windows(2).all(|w| w[0] < w[1]));
            assert!(i.iter().all(|&x| (x as usize) < n));
            assert_eq!(payload(3, 2, 1, n, nnz), (i.clone(), v));
            if nnz < n {
                assert_ne!(payload(3, 2, 2, n, nnz).0, i);
            }
        }
    }

    #[test]
    fn counters_parse_prometheus_text() {
        let text = "# HELP x\nsparsync_updates_accepted_total 12\nsparsync_bytes_total{direction=\"in\"} 3400\n\
                    sparsync_bytes_total{direction=\"out\"} 99\nsparsync_updates_rejected_total{reason=\"rate\"} 2\n\
                    sparsync_updates_rejected_total{reason=\"seq\"} 1\nsparsync_stage_seconds_total{stage=\"topk\"} 0.5\n\
                    sparsync_queue_depth 4\n";
        let c = ServerCounters::parse(text);
        assert_eq!(
            (c.accepted, c.bytes_in, c.bytes_out, c.rejected, c.queue_depth),
            (12.0, 3400.0, 99.0, 3.0, 4.0)
        );
        assert_eq!(c.stages.get("topk"), Some(&0.5));
        let d = c.since(&ServerCounters { accepted: 2.0, ..Default::default() });
        assert_eq!(d.accepted, 10.0);
    }

    #[test]
    fn quantiles() {
        let q = Quantiles::of((1..=100).map(f64::from).collect());
        assert_eq!((q.count, q.p50, q.max), (100, 51.0, 100.0));
        assert_eq!(q.p99, 99.0);
        assert_eq!(Quantiles::of(vec![]).count, 0);
    }

    /// `bench loadgen`'s flags default to `LoadSpec::default()`, and `to_args` gives them back.
    #[test]
    fn loadgen_flags_round_trip() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            spec: LoadSpec,
        }
        let parse = |args: Vec<String>| {
            let mut spec = Cli::parse_from(std::iter::once("loadgen".to_string()).chain(args)).spec;
            spec.token = None; // SPARSYNC_TOKEN may be set where the tests run
            format!("{spec:?}")
        };
        assert_eq!(parse(vec![]), format!("{:?}", LoadSpec::default()));
        let spec = LoadSpec {
            url: "ws://127.0.0.1:1/ws".into(),
            model: "flat-1024".into(),
            clients: 3,
            density: 0.25,
            rate: 2.5,
            window: 4,
            duration_s: 1.5,
            ..LoadSpec::default()
        };
        assert_eq!(parse(spec.to_args()), format!("{spec:?}"));
    }
}
