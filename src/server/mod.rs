//! The server: listener → sessions → coordinator (engine + policy) → outboxes.
//!
//! [`start`] takes a bound listener and returns a [`ServerHandle`], so tests run the real server
//! in-process on `127.0.0.1:0`; the binary calls [`run`] with a shutdown signal.

pub(crate) mod auth;
pub(crate) mod coordinator;
pub mod durability;
pub(crate) mod http;
pub(crate) mod listener;
pub mod log;
pub(crate) mod metrics;
pub mod nats;
pub(crate) mod outbox;
pub mod record;
pub(crate) mod session;
pub(crate) mod web;

/// What `/api/status` shows (defined by the core, which computes most of it).
pub use crate::core::status;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{EngineChoice, ServerConfig, WalTarget};
use crate::engine::cpu::CpuAggregator;
use crate::engine::fallback::FallbackEngine;
use crate::engine::{Aggregator, ModelState, OptimizerSettings};
use crate::policy::SyncPolicy;
use crate::protocol::model::ModelLayout;
use auth::Auth;
use coordinator::{Coordinator, CoordinatorParts, Inbound};
pub use coordinator::{Tape, TapeEntry};
use log::RecordLog;
use metrics::Metrics;
use record::Event;
use status::Status;

/// State every session and route shares.
pub struct Shared {
    pub cfg: Arc<ServerConfig>,
    pub layout: ModelLayout,
    pub num_params: u64,
    pub max_nnz: u64,
    pub tx: mpsc::Sender<Inbound>,
    pub auth: Auth,
    /// Failed tokens per address (see [`auth::Throttle`]).
    pub throttle: auth::Throttle,
    /// The event record (appended by the coordinator, read by `/api/record`).
    pub record: record::SharedRecord,
    pub metrics: Arc<Metrics>,
    pub status: watch::Receiver<Arc<Status>>,
    /// Fashion-MNIST for browser shards, loaded on first request.
    pub data: tokio::sync::OnceCell<Arc<crate::data::FashionMnist>>,
    /// The next browser shard to hand out.
    pub next_shard: std::sync::atomic::AtomicUsize,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// Resolves when the server starts shutting down.
    pub async fn shutdown_started(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("model: {0}")]
    Layout(#[from] crate::protocol::model::LayoutError),
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("policy: {0}")]
    Policy(String),
    #[error("resume: {0}")]
    Resume(String),
    #[error("log: {0}")]
    Log(String),
    /// Another server leads the JetStream log (a standby waits and tries again).
    #[error("log: {0}")]
    LeaseHeld(String),
    /// The JetStream log is not set up for this (a standby does not try again).
    #[error("log: {0}")]
    LogSetup(String),
    #[error("this server stopped leading the log (another server leads it now)")]
    Deposed,
    #[error("the coordinator stopped: {0}")]
    Stopped(String),
}

/// The model to serve: layout and initial values, from `--init` or a built-in family.
pub fn load_model(cfg: &ServerConfig) -> Result<(ModelLayout, Vec<f32>), ServerError> {
    match &cfg.init {
        Some(path) => {
            let bytes = std::fs::read(path)
                .map_err(|source| ServerError::Read { path: path.display().to_string(), source })?;
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("custom").to_string();
            Ok(ModelLayout::from_safetensors(&name, &bytes)?)
        }
        None => {
            let layout = ModelLayout::builtin(&cfg.model)?;
            let values = layout.init(cfg.seed);
            Ok((layout, values))
        }
    }
}

/// Builds the engine the config asks for.
pub fn build_engine(cfg: &ServerConfig, values: Vec<f32>) -> Result<Box<dyn Aggregator>, ServerError> {
    let opt = OptimizerSettings { momentum: cfg.momentum, server_lr: cfg.server_lr };
    let threads = cfg.cpu_threads.unwrap_or_else(|| CpuAggregator::default_threads(values.len()));
    let cpu = move |values: Vec<f32>| CpuAggregator::with_threads(values, opt, threads);
    if cfg.shards > 1 {
        let per = (threads / cfg.shards).max(1);
        return Ok(Box::new(crate::engine::sharded::ShardedAggregator::new(values, opt, cfg.shards, per)));
    }
    match cfg.engine {
        EngineChoice::Cpu => Ok(Box::new(cpu(values))),
        EngineChoice::Gpu | EngineChoice::Auto => {
            let require = cfg.engine == EngineChoice::Gpu || cfg.require_gpu;
            match crate::engine::gpu::GpuAggregator::new(&values, opt, &gpu_options(cfg)) {
                Ok(g) if require => Ok(Box::new(g)),
                Ok(g) => Ok(Box::new(FallbackEngine::new(Box::new(g), opt, threads))),
                Err(e) if !require => {
                    tracing::warn!(error = %e, "no usable GPU: falling back to the CPU engine");
                    Ok(Box::new(cpu(values)))
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// The GPU engine's options from the server's settings.
fn gpu_options(cfg: &ServerConfig) -> crate::engine::gpu::GpuOptions {
    crate::engine::gpu::GpuOptions {
        mode: cfg.gpu_mode,
        chunk_elems: cfg.chunk_elems,
        device: crate::engine::gpu::device::DeviceOptions {
            adapter: cfg.adapter.clone(),
            hardware_only: cfg.adapter.is_none(),
            ..Default::default()
        },
        fault: cfg.inject_gpu_fault,
    }
}

/// Builds the policy the config asks for, each from its own settings (src/policy/mod.rs).
pub fn build_policy(cfg: &ServerConfig) -> Box<dyn SyncPolicy> {
    cfg.policy.build(&cfg.policies, &cfg.policy_common())
}

/// A running server.
pub struct ServerHandle {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    listener: tokio::task::JoinHandle<()>,
    coordinator: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// The latest published status.
    pub fn status(&self) -> Arc<Status> {
        self.shared.status.borrow().clone()
    }

    /// Waits for the next status publication.
    pub async fn status_changed(&self) -> Arc<Status> {
        let mut rx = self.shared.status.clone();
        let _ = rx.changed().await;
        rx.borrow().clone()
    }

    /// The event record from event `since` on.
    pub async fn record(&self, since: usize) -> Result<(usize, Vec<Event>), ServerError> {
        Ok(self.shared.record.since(since))
    }

    /// The engine's state (x, momentum, x̂, versions).
    pub async fn state(&self) -> Result<ModelState, ServerError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .tx
            .send(Inbound::State { reply: tx })
            .await
            .map_err(|_| ServerError::Stopped("state".into()))?;
        rx.await.map_err(|_| ServerError::Stopped("state".into()))?.map_err(ServerError::Stopped)
    }

    pub fn metrics(&self) -> String {
        self.shared.metrics.encode()
    }

    /// Graceful stop: no new connections, every accepted push applied, sessions told Bye.
    /// Returns the final state.
    pub async fn shutdown(self, reason: &str) -> Result<ModelState, ServerError> {
        let (tx, rx) = oneshot::channel();
        let sent = self.shared.tx.send(Inbound::Shutdown { reason: reason.into(), reply: tx }).await;
        let state = match sent {
            Ok(()) => {
                rx.await.map_err(|_| ServerError::Stopped("shutdown".into()))?.map_err(ServerError::Stopped)
            }
            Err(_) => Err(ServerError::Stopped("coordinator already stopped".into())),
        };
        let _ = self.shutdown_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.listener).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.coordinator).await;
        state
    }
}

/// Loads TLS settings when a certificate and key are configured.
fn tls_acceptor(cfg: &ServerConfig) -> Result<Option<tokio_rustls::TlsAcceptor>, ServerError> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else { return Ok(None) };
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| ServerError::Read { path: p.display().to_string(), source })
    };
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!("{}: no certificate found", cert.display())));
    }
    let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| ServerError::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| ServerError::Tls(format!("{}: no private key found", key.display())))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// Starts a server on `listener` with the engine the config asks for (resuming from a
/// checkpoint with `--resume`).
pub async fn start(cfg: ServerConfig, listener: TcpListener) -> Result<ServerHandle, ServerError> {
    start_taped(cfg, listener, None).await
}

/// [`start`], keeping every input to the core and its effects on `tape` (a replay test feeds
/// them to a core alone).
pub async fn start_taped(
    cfg: ServerConfig,
    listener: TcpListener,
    tape: Option<Tape>,
) -> Result<ServerHandle, ServerError> {
    cfg.validate()?;
    let (layout, values) = load_model(&cfg)?;
    let (checkpoint, records, log): (
        Option<durability::Checkpoint>,
        Vec<durability::WalOp>,
        Box<dyn RecordLog>,
    ) = match &cfg.wal {
        WalTarget::Nats(target) => {
            let holder = format!("sparsync (pid {}) at {}", std::process::id(), listener.local_addr()?);
            let start = nats::start(target, &holder).await.map_err(start_error)?;
            let (log, c, ops) = nats::NatsLog::open(start, cfg.keep_log).await.map_err(ServerError::Log)?;
            if let Some(c) = &c {
                same_layout(c, &layout, &format!("{target}"))?;
                tracing::info!(%target, version = c.state.version, pending = c.pending.len(), records = ops.len(), "resuming from the JetStream log");
            } else if !ops.is_empty() {
                tracing::info!(%target, records = ops.len(), "replaying the JetStream log (no checkpoint yet)");
            }
            (c, ops, Box::new(log))
        }
        _ => {
            let (c, ops) = match &cfg.resume {
                Some(dir) => {
                    let mut c = resume_from(dir, &layout)?;
                    let ops = std::mem::take(&mut c.wal);
                    (Some(c), ops)
                }
                None => (None, Vec::new()),
            };
            (c, ops, local_log(&cfg))
        }
    };
    let resume = (checkpoint.is_some() || !records.is_empty())
        .then(|| coordinator::Resume::from_checkpoint(checkpoint.as_ref(), records));
    let engine = engine_from(&cfg, values, checkpoint.map(|c| c.state)).await?;
    start_inner(cfg, Listen::Bound(listener), layout, engine, Parts { resume, log, follower: None, tape })
        .await
}

/// A standby (`serve --standby` with `--wal nats://…`): reads the newest checkpoint and the
/// records after it, follows what the leader appends while it holds the lease, then takes
/// over and binds `cfg.listen`. Returns once it serves (or fails).
pub async fn start_standby(cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
    cfg.validate()?;
    let WalTarget::Nats(target) = &cfg.wal else {
        return Err(ServerError::Log("--standby needs --wal nats://…".into()));
    };
    let (layout, values) = load_model(&cfg)?;
    // The port is taken now (a standby that cannot listen must not take over), listened on
    // once it serves.
    let socket = reserve(cfg.listen)?;
    let (follower, checkpoint, ops) = nats::Follower::start(target).await.map_err(start_error)?;
    if let Some(c) = &checkpoint {
        same_layout(c, &layout, &format!("{target}"))?;
    }
    tracing::info!(%target, records = ops.len(), "standby: read the checkpoint and the log");
    let mut resume = coordinator::Resume::from_checkpoint(checkpoint.as_ref(), ops);
    resume.following = true;
    let engine = engine_from(&cfg, values, checkpoint.map(|c| c.state)).await?;
    let parts =
        Parts { resume: Some(resume), log: Box::new(log::NoLog), follower: Some(follower), tape: None };
    start_inner(cfg, Listen::Later(socket), layout, engine, parts).await
}

/// The engine the config asks for, on the initial values and then `state` (a checkpoint's).
async fn engine_from(
    cfg: &ServerConfig,
    values: Vec<f32>,
    state: Option<ModelState>,
) -> Result<Box<dyn Aggregator>, ServerError> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || -> Result<Box<dyn Aggregator>, ServerError> {
        let mut e = build_engine(&cfg, values)?;
        if let Some(s) = state {
            e.load_state(&s)?;
        }
        Ok(e)
    })
    .await
    .map_err(|e| ServerError::Stopped(e.to_string()))?
}

/// A socket bound to `addr` that does not listen yet (connections to it are refused).
fn reserve(addr: SocketAddr) -> Result<tokio::net::TcpSocket, ServerError> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

fn start_error(e: nats::StartError) -> ServerError {
    match e {
        nats::StartError::LeaseHeld(m) => ServerError::LeaseHeld(m),
        nats::StartError::Setup(m) => ServerError::LogSetup(m),
        nats::StartError::Other(m) => ServerError::Log(m),
    }
}

/// The log of a server without a JetStream log: checkpoints (and with `--wal`, the file WAL)
/// in `--checkpoint-dir`, or nothing.
fn local_log(cfg: &ServerConfig) -> Box<dyn RecordLog> {
    match &cfg.checkpoint_dir {
        Some(dir) => Box::new(log::FileLog::new(dir.clone(), cfg.wal == WalTarget::File)),
        None => Box::new(log::NoLog),
    }
}

fn same_layout(c: &durability::Checkpoint, layout: &ModelLayout, at: &str) -> Result<(), ServerError> {
    if c.layout != layout.tensors {
        return Err(ServerError::Resume(format!(
            "{at} holds model {:?} with another layout than the one configured ({:?})",
            c.model, layout.name
        )));
    }
    Ok(())
}

/// The newest valid checkpoint in `dir`, with the WAL records written after it appended to its
/// pending pushes.
fn resume_from(dir: &Path, layout: &ModelLayout) -> Result<durability::Checkpoint, ServerError> {
    let (path, mut c) =
        durability::Checkpoint::newest(dir).map_err(|e| ServerError::Resume(e.to_string()))?;
    same_layout(&c, layout, &path.display().to_string())?;
    let wal = durability::replay(dir, c.wal_seq).map_err(|e| ServerError::Resume(e.to_string()))?;
    tracing::info!(
        path = %path.display(), version = c.state.version, pending = c.pending.len(), wal_records = wal.len(),
        "resuming from checkpoint"
    );
    c.wal = wal;
    Ok(c)
}

/// Starts a server with a given layout and engine (tests inject their own).
pub async fn start_with(
    cfg: ServerConfig,
    listener: TcpListener,
    layout: ModelLayout,
    engine: Box<dyn Aggregator>,
) -> Result<ServerHandle, ServerError> {
    let log = local_log(&cfg);
    start_inner(cfg, Listen::Bound(listener), layout, engine, Parts::new(log, None)).await
}

/// File descriptors the server needs beyond one per connection (files, the listener, the
/// GPU driver, the runtime).
const SPARE_FILES: u64 = 256;

/// Raises this process's open-file limit towards its hard limit so that `max_clients`
/// connections fit; says so, with the fix, when the operating system does not allow it.
pub fn raise_file_limit(max_clients: usize) {
    let want = max_clients as u64 + SPARE_FILES;
    match rlimit::increase_nofile_limit(want.max(65_536)) {
        Ok(got) if got >= want => tracing::debug!(limit = got, "open-file limit"),
        Ok(got) => tracing::warn!(
            limit = got,
            max_clients,
            "the open-file limit {got} is below max_clients + {SPARE_FILES}: connections past it will be \
             refused by the operating system; raise the hard limit (`ulimit -Hn`, or LimitNOFILE= in \
             a systemd unit) or lower --max-clients"
        ),
        Err(e) => tracing::warn!(error = %e, max_clients, "could not read or raise the open-file limit"),
    }
}

/// [`start_with`], keeping every input to the core and its effects on `tape`.
pub async fn start_with_tape(
    cfg: ServerConfig,
    listener: TcpListener,
    layout: ModelLayout,
    engine: Box<dyn Aggregator>,
    tape: Tape,
) -> Result<ServerHandle, ServerError> {
    let log = local_log(&cfg);
    start_inner(cfg, Listen::Bound(listener), layout, engine, Parts::new(log, Some(tape))).await
}

/// The default frame limit of a model of `n` parameters: a Push of every parameter (a 40-byte
/// header and 6 bytes per entry) plus 64 KiB, the most a control message may take. For `mlp`
/// (101,770 parameters) that is 0.67 MB, instead of the 64 MiB every session could be made to
/// buffer before.
pub fn derived_frame_limit(n: usize) -> usize {
    crate::protocol::frame::PUSH_HEADER_LEN + 6 * n + crate::protocol::message::MAX_CONTROL_BYTES
}

/// Where a server listens: a socket bound already, or an address bound once the coordinator
/// is ready (a standby binds when it takes over, so that clients find the leader meanwhile).
enum Listen {
    Bound(TcpListener),
    Later(tokio::net::TcpSocket),
}

/// What a server is built from besides its config and engine.
struct Parts {
    resume: Option<coordinator::Resume>,
    log: Box<dyn RecordLog>,
    follower: Option<nats::Follower>,
    tape: Option<Tape>,
}

impl Parts {
    fn new(log: Box<dyn RecordLog>, tape: Option<Tape>) -> Self {
        Self { resume: None, log, follower: None, tape }
    }
}

async fn start_inner(
    cfg: ServerConfig,
    listener: Listen,
    layout: ModelLayout,
    engine: Box<dyn Aggregator>,
    parts: Parts,
) -> Result<ServerHandle, ServerError> {
    let Parts { resume, log, follower, tape } = parts;
    cfg.validate()?;
    let mut cfg = cfg;
    if cfg.max_frame_bytes == 0 {
        cfg.max_frame_bytes = derived_frame_limit(layout.num_params());
    }
    let info = engine.info();
    tracing::info!(
        engine = %info.kind, adapter = %info.adapter, backend = %info.backend, mode = %info.mode,
        model = %layout.name, params = layout.num_params(), "engine ready"
    );
    raise_file_limit(cfg.max_clients);
    let mut auth = Auth::new(&cfg.token.0);
    if let Some(f) = &cfg.token_file {
        auth.load_file(f)?;
    }
    let tls = tls_acceptor(&cfg)?;
    let cfg = Arc::new(cfg);
    let n = layout.num_params() as u64;
    let (tx, rx) = mpsc::channel(1024);
    let (status_tx, status_rx) = watch::channel(Arc::new(Status::empty(&layout, &info)));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let record = record::SharedRecord::new(cfg.record_events.max(1));
    let coordinator = Coordinator::new(CoordinatorParts {
        cfg: cfg.clone(),
        layout: layout.clone(),
        engine,
        policy: build_policy(&cfg),
        rx,
        status_tx,
        metrics: metrics.clone(),
        resume,
        log,
        follower,
        record: record.clone(),
        tape,
    })?;
    let shared = Arc::new(Shared {
        max_nnz: cfg.max_nnz.unwrap_or(n).min(n),
        num_params: n,
        layout,
        tx,
        auth,
        throttle: auth::Throttle::default(),
        record,
        metrics,
        status: status_rx,
        data: tokio::sync::OnceCell::new(),
        next_shard: std::sync::atomic::AtomicUsize::new(0),
        shutdown: shutdown_rx.clone(),
        cfg: cfg.clone(),
    });
    // Serve once the coordinator has published its first status, after it applied what a
    // checkpoint and its WAL hold: no one sees the empty state of a server that is resuming.
    let mut first_status = shared.status.clone();
    let coordinator = tokio::spawn(coordinator.run());
    if first_status.changed().await.is_err() {
        return Err(ServerError::Stopped("the coordinator stopped before serving (see the log)".into()));
    }
    let listener = match listener {
        Listen::Bound(l) => l,
        Listen::Later(socket) => socket.listen(1024)?,
    };
    let addr = listener.local_addr()?;
    let router = http::router(shared.clone());
    let limits = listener::Limits {
        max_connections: cfg.max_clients,
        max_per_ip: cfg.max_connections_per_ip,
        header_timeout: Duration::from_secs_f64(cfg.handshake_timeout_s),
    };
    let listener = tokio::spawn(listener::serve(
        listener,
        router,
        tls.clone(),
        limits,
        shared.metrics.clone(),
        shutdown_rx,
    ));
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!("listening on {scheme}://{addr} (WebSocket at /ws, status at /api/status)");
    Ok(ServerHandle { addr, shared, shutdown_tx, listener, coordinator })
}

/// Runs a server until `until` resolves, then stops it gracefully and returns the final state.
///
/// `until` is first polled once the server serves (after what a checkpoint holds is applied), so
/// it may also announce the server, as `sparsync serve --ready-file` does. When it resolves to an
/// error, the server is stopped the same way and that error is returned.
pub async fn run<E: From<ServerError>>(
    cfg: ServerConfig,
    listener: TcpListener,
    until: impl std::future::Future<Output = Result<(), E>>,
) -> Result<ModelState, E> {
    let handle = start(cfg, listener).await?;
    serve_until(handle, until).await
}

/// Serves until `until` resolves (then shuts down cleanly) or another server takes over the
/// log (then fails with [`ServerError::Deposed`]).
pub async fn serve_until<E: From<ServerError>>(
    handle: ServerHandle,
    until: impl std::future::Future<Output = Result<(), E>>,
) -> Result<ModelState, E> {
    // The coordinator stops by itself only when another server took over the log.
    let mut status = handle.shared.status.clone();
    let stopped = async move { while status.changed().await.is_ok() {} };
    let outcome = tokio::select! {
        o = until => o,
        _ = stopped => {
            let _ = handle.shutdown("deposed").await;
            return Err(ServerError::Deposed.into());
        }
    };
    tracing::info!("shutting down: applying accepted updates");
    let state = handle.shutdown("server shutting down").await;
    outcome?;
    let state = state?;
    tracing::info!(version = state.version, "stopped");
    Ok(state)
}
