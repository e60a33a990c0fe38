//! The coordinator: the one task that owns the engine and the policy.
//!
//! Sessions send it [`Inbound`] messages over a bounded channel (that is where backpressure
//! comes from). It checks what needs server state (sequence numbers, versions, staleness),
//! feeds the policy, runs engine steps on a blocking thread, and fans each Delta out to every
//! session's outbox as one shared, reference-counted frame.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::history::History;
use super::outbox::{Outbound, Outbox};
use super::record::{AggregatedPush, Event, SharedRecord};
use super::status::{ClientStatus, Status};
use crate::config::ServerConfig;
use crate::engine::{Aggregator, Broadcast, EngineError, EngineInfo, ModelState, SelectionMode, UpdateRef};
use crate::policy::staleness::{Normalization, WeightInput, Weighting, batch_weights};
use crate::policy::{Action, ClientId, LossSource, PushId, PushMeta, SyncPolicy};
use crate::protocol::PROTOCOL_VERSION;
use crate::protocol::frame::{PushHeader, PushView, encode_snapshot};
use crate::protocol::message::{
    Ack, ClientKind, Directive, EvalReport, Hello, Reject, Role, ServerMessage, SessionSettings, SkipReport,
    Welcome,
};
use crate::protocol::model::ModelLayout;

/// A push's seq may be at most this far above the client's last accepted seq (or above 0 for
/// its first push): a client, or someone using its id, cannot push seq = u64::MAX and lock the
/// client out.
pub const MAX_SEQ_GAP: u64 = 1 << 20;

/// Shortest time between two status publications.
const STATUS_PERIOD: Duration = Duration::from_millis(100);
/// An idle server still republishes its status this often (uptime, connection times).
const STATUS_HEARTBEAT: Duration = Duration::from_secs(1);

/// Messages from sessions (and the server) to the coordinator.
pub enum Inbound {
    Join {
        hello: Hello,
        /// The Hello's token is the client id's own (per-client tokens).
        proven: bool,
        outbox: Arc<Outbox>,
        reply: oneshot::Sender<JoinReply>,
    },
    /// A Push that passed the stateless checks.
    Push {
        client: ClientId,
        header: PushHeader,
        frame: Bytes,
    },
    Leave {
        client: ClientId,
        reason: String,
    },
    /// The session needs its replica brought up to date from `have` (or a snapshot).
    Resync {
        client: ClientId,
        have: Option<u64>,
    },
    /// The client asked for a snapshot (`snapshot_request`): it always gets one.
    SnapshotRequest {
        client: ClientId,
    },
    Eval {
        client: ClientId,
        report: EvalReport,
    },
    Skip {
        client: ClientId,
        report: SkipReport,
    },
    RoundTime {
        client: ClientId,
        report: crate::protocol::message::RoundTime,
    },
    /// Model state (tests, checkpoints).
    State {
        reply: oneshot::Sender<Result<ModelState, String>>,
    },
    /// The public replica and its version.
    Replica {
        reply: oneshot::Sender<Result<(u64, Vec<f32>), String>>,
    },
    /// Stop: aggregate every accepted push, say Bye to every session, return the final state.
    Shutdown {
        reason: String,
        reply: oneshot::Sender<Result<ModelState, String>>,
    },
}

/// The coordinator's answer to a Join.
/// The session number, or the field at fault and why the join was refused.
pub type JoinReply = Result<ClientId, (&'static str, String)>;

struct Client {
    name: String,
    kind: ClientKind,
    role: Role,
    device: Option<String>,
    outbox: Arc<Outbox>,
    joined: Duration,
    directive: Directive,
}

/// What the server remembers of a client id across its sessions.
#[derive(Default, Clone)]
struct Registry {
    last_seq: Option<u64>,
    accepted: u64,
    rejected: u64,
    bytes_in: u64,
    last_staleness: u64,
    last_loss: f32,
    commits: u64,
    /// Frame bytes sent to this client (Deltas, snapshots).
    bytes_out: u64,
    /// Sum of the staleness of this client's aggregated pushes.
    staleness_sum: u64,
    /// The id's resume secret (see `Welcome::resume_secret`).
    secret: Option<String>,
}

/// An accepted push waiting to be aggregated.
struct Pending {
    client: ClientId,
    /// The client id of the session that pushed it (kept after the session ends).
    name: String,
    header: PushHeader,
    frame: Bytes,
    accepted_at: Duration,
}

/// An accepted push whose Ack the policy has not released yet.
struct Unacked {
    client: ClientId,
    seq: u64,
    base_version: u64,
}

/// Owns the engine, the policy and the clients.
pub struct Coordinator {
    cfg: Arc<ServerConfig>,
    layout: ModelLayout,
    engine: Arc<Mutex<Box<dyn Aggregator>>>,
    engine_info: EngineInfo,
    policy: Box<dyn SyncPolicy>,
    weighting: Weighting,
    selection: SelectionMode,
    rx: mpsc::Receiver<Inbound>,
    clients: HashMap<ClientId, Client>,
    by_name: HashMap<String, ClientId>,
    registry: HashMap<String, Registry>,
    pending: HashMap<PushId, Pending>,
    unacked: HashMap<PushId, Unacked>,
    next_client: ClientId,
    next_push: PushId,
    version: u64,
    replica_version: u64,
    /// Recent Deltas (base, version, frame), for resynchronising lagging sessions.
    deltas: VecDeque<(u64, u64, Bytes)>,
    snapshot: Option<(u64, Bytes)>,
    started: Instant,
    record: SharedRecord,
    status_tx: watch::Sender<Arc<Status>>,
    last_status: Option<Instant>,
    /// Something changed since the last status publication.
    status_dirty: bool,
    counters: Counters,
    /// The evaluator's reports over the whole run (bounded, see [`History`]).
    evals: History<EvalPoint>,
    weights: Vec<f32>,
    metrics: Arc<super::metrics::Metrics>,
    durable: Option<Durable>,
    /// Pushes to apply before serving (from a checkpoint and its WAL).
    resume: Vec<super::durability::PendingPush>,
    /// The WAL written after that checkpoint: pushes and the steps that applied them.
    resume_wal: Vec<super::durability::WalOp>,
}

/// Checkpoint and WAL state (with `--checkpoint-dir`).
struct Durable {
    dir: std::path::PathBuf,
    wal: Option<super::durability::Wal>,
    wal_seq: u64,
    last_at: Instant,
    last_version: u64,
}

#[derive(Default, Clone, Copy)]
struct Counters {
    accepted: u64,
    rejected: u64,
    aggregated: u64,
    steps: u64,
    bytes_in: u64,
    bytes_out: u64,
    agg_seconds: f64,
    topk_seconds: f64,
    agg_bytes: u64,
}

/// One evaluator report, kept for `/api/status`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct EvalPoint {
    pub t: f64,
    pub version: u64,
    pub accuracy: f64,
    pub loss: f64,
    /// Frame bytes the server had received (pushes) and sent (Deltas, snapshots) by then.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The weights of a step: from the weighting rule, or as a log recorded them.
enum Weights {
    Computed(Normalization),
    Logged(Vec<f32>),
}

/// How the coordinator is built.
pub struct CoordinatorParts {
    pub cfg: Arc<ServerConfig>,
    pub layout: ModelLayout,
    pub engine: Box<dyn Aggregator>,
    pub policy: Box<dyn SyncPolicy>,
    pub rx: mpsc::Receiver<Inbound>,
    pub status_tx: watch::Sender<Arc<Status>>,
    pub metrics: Arc<super::metrics::Metrics>,
    /// A checkpoint to continue from: its client registry and the pushes to apply first.
    pub resume: Option<super::durability::Checkpoint>,
    /// Where events are recorded (shared with `/api/record`).
    pub record: SharedRecord,
}

impl Coordinator {
    pub fn new(p: CoordinatorParts) -> Self {
        let version = p.engine.version();
        let replica_version = p.engine.replica_version();
        let engine_info = p.engine.info();
        let durable = p.cfg.checkpoint_dir.clone().map(|dir| Durable {
            wal_seq: super::durability::Wal::next_seq(&dir),
            dir,
            wal: None,
            last_at: Instant::now(),
            last_version: version,
        });
        let mut registry = HashMap::new();
        let mut resume = Vec::new();
        let mut resume_wal = Vec::new();
        if let Some(c) = p.resume {
            resume_wal = c.wal;
            for (id, seq) in c.registry {
                registry.insert(id, Registry { last_seq: Some(seq), ..Default::default() });
            }
            resume = c.pending;
        }
        Self {
            durable,
            resume,
            resume_wal,
            weighting: p.cfg.weighting(),
            selection: p.cfg.selection,
            layout: p.layout,
            engine: Arc::new(Mutex::new(p.engine)),
            engine_info,
            policy: p.policy,
            rx: p.rx,
            clients: HashMap::new(),
            by_name: HashMap::new(),
            registry,
            pending: HashMap::new(),
            unacked: HashMap::new(),
            next_client: 1,
            next_push: 1,
            version,
            replica_version,
            deltas: VecDeque::new(),
            snapshot: None,
            started: Instant::now(),
            record: p.record,
            status_tx: p.status_tx,
            last_status: None,
            status_dirty: false,
            counters: Counters::default(),
            evals: History::default(),
            weights: Vec::new(),
            metrics: p.metrics,
            cfg: p.cfg,
        }
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Runs until every sender is gone or a Shutdown arrives.
    pub async fn run(mut self) {
        if let Err(e) = self.start_durability().await {
            tracing::error!(error = %e, "cannot start checkpoints; stopping");
            self.rx.close();
            return;
        }
        // The status reflects the (possibly resumed) model before anything happens.
        self.publish_status(true);
        loop {
            let wake = self.policy.next_wakeup().map(|d| self.started + d);
            let period = if self.status_dirty { STATUS_PERIOD } else { STATUS_HEARTBEAT };
            let status_due = self.last_status.map(|t| t + period);
            let msg = tokio::select! {
                m = self.rx.recv() => match m {
                    Some(m) => Some(m),
                    None => break,
                },
                _ = sleep_until(wake) => None,
                _ = sleep_until(status_due) => None,
            };
            let mut stop = false;
            if let Some(m) = msg {
                stop |= self.handle(m).await;
            }
            // Everything that queued meanwhile is handled before the policy is polled: with
            // ASP, the pushes that arrived while the engine was busy form one batch.
            while !stop && let Ok(m) = self.rx.try_recv() {
                stop |= self.handle(m).await;
            }
            if stop {
                break;
            }
            if self.poll_policy().await {
                break;
            }
            self.maybe_checkpoint().await;
            self.publish_status(false);
        }
        self.publish_status(true);
    }

    /// Applies what a checkpoint and its WAL hold, writes a fresh checkpoint and opens a WAL.
    ///
    /// The WAL's step records are replayed exactly: the same pushes in the same steps with the
    /// same weights and broadcasts, so the model, x̂ and the version are those the crashed
    /// server had reached (bit for bit). Pushes that were acknowledged but not yet aggregated
    /// when it died are then applied in steps of up to `max_batch`, in the order they were
    /// accepted, before any client is served.
    async fn start_durability(&mut self) -> Result<(), String> {
        use super::durability::WalOp;
        let resume = std::mem::take(&mut self.resume);
        let wal = std::mem::take(&mut self.resume_wal);
        let mut ops: Vec<WalOp> = resume.into_iter().map(WalOp::Push).collect();
        ops.extend(wal);
        if !ops.is_empty() {
            let limits = crate::protocol::frame::PushLimits {
                num_params: self.layout.num_params() as u64,
                max_nnz: self.layout.num_params() as u64,
            };
            // (client id, seq) → pending push, for the step records to find their pushes.
            let mut by_seq: HashMap<(String, u64), PushId> = HashMap::new();
            let mut order = Vec::new();
            let (mut pushes, mut steps) = (0usize, 0usize);
            for op in ops {
                match op {
                    WalOp::Push(p) => {
                        let mut header = match PushView::decode(&p.frame, &limits) {
                            Ok(v) => v.header,
                            Err(e) => {
                                tracing::warn!(error = %e, client = %p.client_id, "a recovered push does not decode; skipped");
                                continue;
                            }
                        };
                        header.samples = header.samples.min(self.cfg.max_samples.max(1));
                        let r = self.registry.entry(p.client_id.clone()).or_default();
                        r.last_seq = Some(r.last_seq.map_or(header.seq, |s| s.max(header.seq)));
                        let id = self.next_push;
                        self.next_push += 1;
                        by_seq.insert((p.client_id.clone(), header.seq), id);
                        self.pending.insert(
                            id,
                            Pending {
                                client: 0,
                                name: p.client_id,
                                header,
                                frame: p.frame,
                                accepted_at: self.now(),
                            },
                        );
                        order.push(id);
                        pushes += 1;
                    }
                    WalOp::Step(s) => {
                        let mut ids = Vec::with_capacity(s.items.len());
                        let mut weights = Vec::with_capacity(s.items.len());
                        for (name, seq, w) in s.items {
                            match by_seq.remove(&(name.clone(), seq)) {
                                Some(id) => {
                                    ids.push(id);
                                    weights.push(w);
                                }
                                None => {
                                    tracing::error!(client = %name, seq, "a logged step names a push the log lacks: the resumed model differs from the crashed server's")
                                }
                            }
                        }
                        self.step_with(ids, Weights::Logged(weights), Some(s.broadcast)).await;
                        steps += 1;
                    }
                }
            }
            let left: Vec<PushId> = order.into_iter().filter(|id| self.pending.contains_key(id)).collect();
            for batch in left.chunks(self.cfg.max_batch) {
                self.step(batch.to_vec(), Normalization::Batch).await;
            }
            tracing::info!(
                pushes,
                steps,
                not_yet_aggregated = left.len(),
                version = self.version,
                "replayed the checkpoint and WAL"
            );
        }
        if self.durable.is_some() {
            self.checkpoint().await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn maybe_checkpoint(&mut self) {
        let Some(d) = &self.durable else { return };
        let by_time = self.cfg.checkpoint_every_s > 0.0
            && d.last_at.elapsed() >= Duration::from_secs_f64(self.cfg.checkpoint_every_s);
        let by_versions = self.cfg.checkpoint_every_versions > 0
            && self.version >= d.last_version + self.cfg.checkpoint_every_versions;
        if (by_time || by_versions)
            && self.version != d.last_version
            && let Err(e) = self.checkpoint().await
        {
            tracing::error!(error = %e, "checkpoint failed");
        }
    }

    /// Writes a checkpoint of everything accepted so far, then starts a new WAL file.
    async fn checkpoint(&mut self) -> Result<std::path::PathBuf, String> {
        let Some(d) = &self.durable else { return Err("no checkpoint directory".into()) };
        let dir = d.dir.clone();
        let wal_seq = d.wal_seq;
        let state = self.with_engine(|e| e.read_state()).await.map_err(|e| e.to_string())?;
        let mut ids: Vec<&PushId> = self.pending.keys().collect();
        ids.sort();
        let pending = ids
            .into_iter()
            .map(|id| {
                let p = &self.pending[id];
                super::durability::PendingPush { client_id: p.name.clone(), frame: p.frame.clone() }
            })
            .collect();
        let ckpt = super::durability::Checkpoint {
            model: self.layout.name.clone(),
            layout: self.layout.tensors.clone(),
            registry: self.registry.iter().filter_map(|(k, r)| r.last_seq.map(|s| (k.clone(), s))).collect(),
            pending,
            policy: self.policy.name().into(),
            policy_state: self.policy.state(),
            wal_seq,
            state,
            wal: Vec::new(),
        };
        let version = ckpt.state.version;
        let written = tokio::task::spawn_blocking(move || ckpt.write(&dir, 3))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let d = self.durable.as_mut().expect("checked above");
        if self.cfg.wal {
            // The checkpoint naming this WAL file is durable: records before it can go.
            match &mut d.wal {
                Some(w) => w.rotate(wal_seq).map_err(|e| e.to_string())?,
                None => {
                    d.wal = Some(super::durability::Wal::start(&d.dir, wal_seq).map_err(|e| e.to_string())?)
                }
            }
        }
        d.wal_seq = wal_seq + 1;
        d.last_at = Instant::now();
        d.last_version = version;
        tracing::info!(version, path = %written.display(), "checkpoint written");
        Ok(written)
    }

    /// Runs the policy's actions until it has none; returns true when a Shutdown arrived.
    async fn poll_policy(&mut self) -> bool {
        loop {
            let now = self.now();
            let actions = self.policy.poll(now);
            if actions.is_empty() {
                return false;
            }
            self.execute(actions).await;
            // Handle what arrived during the step before the next batch forms, but at most
            // one batch worth: while the engine is the bottleneck the backlog of accepted
            // pushes stays bounded, the inbound channel fills and sessions stop reading their
            // sockets (TCP backpressure) instead of the server buffering without limit.
            for _ in 0..self.cfg.max_batch {
                let Ok(m) = self.rx.try_recv() else { break };
                if self.handle(m).await {
                    return true;
                }
            }
            // A server saturated for minutes still publishes its status and checkpoints.
            self.maybe_checkpoint().await;
            self.publish_status(false);
        }
    }

    /// Handles one message; returns true when the coordinator must stop.
    async fn handle(&mut self, msg: Inbound) -> bool {
        let now = self.now();
        match msg {
            Inbound::Join { hello, proven, outbox, reply } => {
                let r = self.join(hello, proven, outbox).await;
                let _ = reply.send(r);
            }
            Inbound::Push { client, header, frame } => self.push(client, header, frame).await,
            Inbound::Leave { client, reason } => self.leave(client, &reason).await,
            Inbound::Resync { client, have } => self.resync(client, have).await,
            Inbound::SnapshotRequest { client } => self.send_snapshot(client).await,
            Inbound::Eval { client, report } => {
                let role = self.clients.get(&client).map(|c| c.role);
                let refusal = match role {
                    None => None,
                    Some(Role::Trainer) => {
                        Some("only a client that joined with role \"evaluator\" may report evaluations")
                    }
                    Some(_) if !(0.0..=1.0).contains(&report.accuracy) => {
                        Some("accuracy must be a number in [0, 1]")
                    }
                    Some(_) if !(report.loss.is_finite() && report.loss >= 0.0) => {
                        Some("loss must be a finite number ≥ 0")
                    }
                    Some(_) => None,
                };
                if let Some(why) = refusal {
                    self.metrics.rejected("eval");
                    if let Some(c) = self.clients.get(&client) {
                        c.outbox.push(Outbound::Text(ServerMessage::error("eval", why, false).to_json()));
                    }
                } else if role.is_some() {
                    let (bytes_in, bytes_out) = (self.counters.bytes_in, self.counters.bytes_out);
                    self.record.push(Event::Eval {
                        t: now.as_secs_f64(),
                        client,
                        version: report.version,
                        accuracy: report.accuracy,
                        loss: report.loss,
                        bytes_in,
                        bytes_out,
                    });
                    self.evals.push(EvalPoint {
                        t: now.as_secs_f64(),
                        version: report.version,
                        accuracy: report.accuracy,
                        loss: report.loss,
                        bytes_in,
                        bytes_out,
                    });
                    self.policy.on_loss(now, LossSource::Evaluator, report.loss);
                }
            }
            Inbound::Skip { client, report } => {
                if self.clients.contains_key(&client) {
                    self.record.push(Event::Skip {
                        t: now.as_secs_f64(),
                        client,
                        round: report.round,
                        loss: report.loss,
                    });
                    let actions = self.policy.on_skip(now, client, &report);
                    self.execute(actions).await;
                }
            }
            Inbound::RoundTime { client, report } => {
                if self.clients.contains_key(&client) && report.is_valid() {
                    let actions = self.policy.on_round_time(now, client, &report);
                    self.execute(actions).await;
                }
            }
            Inbound::Replica { reply } => {
                let v = self.replica_version;
                let r = self.with_engine(|e| e.read_replica()).await;
                let _ = reply.send(r.map(|values| (v, values)).map_err(|e| e.to_string()));
            }
            Inbound::State { reply } => {
                let r = self.with_engine(|e| e.read_state()).await;
                let _ = reply.send(r.map_err(|e| e.to_string()));
            }
            Inbound::Shutdown { reason, reply } => {
                let r = self.shutdown(&reason).await;
                let _ = reply.send(r.map_err(|e| e.to_string()));
                return true;
            }
        }
        false
    }

    async fn with_engine<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Aggregator) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || {
            let mut e = engine.lock().unwrap_or_else(|p| p.into_inner());
            f(e.as_mut())
        })
        .await
        .unwrap_or_else(|join| Err(EngineError::Gpu(format!("engine task failed: {join}"))))
    }

    fn settings(&self) -> SessionSettings {
        let n = self.layout.num_params() as u64;
        SessionSettings {
            policy: self.policy.name().into(),
            rho_up: self.cfg.rho_up,
            rho_down: self.cfg.rho_down,
            max_staleness: self.cfg.max_staleness,
            max_nnz: self.cfg.max_nnz.unwrap_or(n).min(n),
            max_frame_bytes: self.cfg.max_frame_bytes as u64,
            max_delta_chain: self.cfg.max_delta_chain,
            max_push_rate: self.cfg.max_push_rate,
        }
    }

    async fn join(&mut self, hello: Hello, proven: bool, outbox: Arc<Outbox>) -> JoinReply {
        let now = self.now();
        let secret = self
            .registry
            .entry(hello.client_id.clone())
            .or_default()
            .secret
            .get_or_insert_with(|| format!("{:032x}", rand::random::<u128>()))
            .clone();
        if self.by_name.contains_key(&hello.client_id) {
            // A live session holds this id: only the same client may replace it, proven by a
            // token of the id's own or by the secret of its Welcome.
            let same = proven
                || hello.resume_secret.as_deref().is_some_and(|s| {
                    use subtle::ConstantTimeEq;
                    bool::from(s.as_bytes().ct_eq(secret.as_bytes()))
                });
            if !same {
                return Err((
                    "client_id",
                    format!(
                        "client_id {:?} is in use by a live session; a client reconnecting to its own \
                         session sends the resume_secret of its Welcome",
                        hello.client_id
                    ),
                ));
            }
        }
        if let Some(&old) = self.by_name.get(&hello.client_id) {
            if let Some(c) = self.clients.get(&old) {
                c.outbox.push(Outbound::Text(
                    ServerMessage::Bye { reason: "replaced by a new session with the same client_id".into() }
                        .to_json(),
                ));
                c.outbox.close("replaced by a new session");
            }
            self.leave(old, "replaced by a new session").await;
        }
        let id = self.next_client;
        self.next_client += 1;
        let welcome = Welcome {
            protocol: PROTOCOL_VERSION as u32,
            session: id,
            model: self.layout.name.clone(),
            layout: self.layout.tensors.clone(),
            params: self.layout.num_params() as u64,
            version: self.replica_version,
            settings: self.settings(),
            resume_secret: secret,
        };
        outbox.push(Outbound::Text(ServerMessage::Welcome(welcome).to_json()));
        let (version, frame) = match self.snapshot_frame().await {
            Ok(s) => s,
            Err(e) => return Err(("server", format!("engine failed to read the model: {e}"))),
        };
        outbox.push_snapshot(version, frame);
        let directive = Directive {
            local_steps: Some(self.cfg.local_steps),
            batch_size: Some(self.cfg.batch_size),
            learning_rate: Some(self.cfg.learning_rate),
            reason: Some("initial settings".into()),
            ..Default::default()
        };
        outbox.push(Outbound::Text(ServerMessage::Directive(directive.clone()).to_json()));
        self.record.push(Event::Join {
            t: now.as_secs_f64(),
            client: id,
            name: hello.client_id.clone(),
            role: hello.role,
            kind: hello.kind,
        });
        tracing::info!(client = id, name = %hello.client_id, kind = ?hello.kind, role = ?hello.role, "client joined");
        self.registry.entry(hello.client_id.clone()).or_default();
        self.by_name.insert(hello.client_id.clone(), id);
        let role = hello.role;
        self.clients.insert(
            id,
            Client {
                name: hello.client_id,
                kind: hello.kind,
                role,
                device: hello.device,
                outbox,
                joined: now,
                directive,
            },
        );
        if role == Role::Trainer {
            let actions = self.policy.on_join(now, id);
            self.execute(actions).await;
        }
        Ok(id)
    }

    async fn leave(&mut self, client: ClientId, reason: &str) {
        let Some(c) = self.clients.remove(&client) else { return };
        if self.by_name.get(&c.name) == Some(&client) {
            self.by_name.remove(&c.name);
        }
        // Its accepted pushes stay (they are aggregated); acks it can no longer receive go.
        self.unacked.retain(|_, u| u.client != client);
        let now = self.now();
        self.record.push(Event::Leave { t: now.as_secs_f64(), client, reason: reason.into() });
        tracing::info!(client, name = %c.name, reason, "client left");
        if c.role == Role::Trainer {
            let actions = self.policy.on_leave(now, client);
            self.execute(actions).await;
        }
    }

    fn reject(&mut self, client: ClientId, seq: u64, field: &str, reason: String) {
        let now = self.now();
        if let Some(c) = self.clients.get(&client) {
            if let Some(r) = self.registry.get_mut(&c.name) {
                r.rejected += 1;
            }
            c.outbox.push(Outbound::Text(
                ServerMessage::Reject(Reject { seq, field: field.into(), reason: reason.clone() }).to_json(),
            ));
        }
        self.counters.rejected += 1;
        self.metrics.rejected(field);
        self.record.push(Event::Reject { t: now.as_secs_f64(), client, seq, field: field.into(), reason });
    }

    async fn push(&mut self, client: ClientId, header: PushHeader, frame: Bytes) {
        let started = std::time::Instant::now();
        let now = self.now();
        let Some(c) = self.clients.get(&client) else { return };
        if c.role != Role::Trainer {
            return self.reject(client, header.seq, "role", "evaluators do not push".into());
        }
        let reg = self.registry.get(&c.name).cloned().unwrap_or_default();
        if let Some(last) = reg.last_seq
            && header.seq <= last
        {
            return self.reject(
                client,
                header.seq,
                "seq",
                format!("seq {} is not above the last accepted seq {last} (duplicate or replay)", header.seq),
            );
        }
        if header.base_version > self.version {
            return self.reject(
                client,
                header.seq,
                "base_version",
                format!(
                    "base version {} is in the future: the server is at version {}",
                    header.base_version, self.version
                ),
            );
        }
        let staleness = self.version - header.base_version;
        if staleness > self.cfg.max_staleness {
            return self.reject(
                client,
                header.seq,
                "base_version",
                format!(
                    "staleness {staleness} (version {} - base {}) exceeds max_staleness {}",
                    self.version, header.base_version, self.cfg.max_staleness
                ),
            );
        }
        let last = reg.last_seq.unwrap_or(0);
        if header.seq - last > MAX_SEQ_GAP {
            return self.reject(
                client,
                header.seq,
                "seq_gap",
                format!(
                    "seq {} jumps more than {MAX_SEQ_GAP} past the last accepted seq {last} (a first seq is at most {MAX_SEQ_GAP})",
                    header.seq
                ),
            );
        }
        let mut header = header;
        let cap = self.cfg.max_samples.max(1);
        if header.samples > cap {
            tracing::warn!(client = %c.name, claimed = header.samples, cap, "a push's sample count was clipped to max_samples");
            self.metrics.rejected("samples_clipped");
            header.samples = cap;
        }
        let mut wal_time = std::time::Duration::ZERO;
        if let Some(w) = self.durable.as_mut().and_then(|d| d.wal.as_mut()) {
            let t0 = std::time::Instant::now();
            let appended = w.append(&c.name, &frame);
            wal_time = t0.elapsed();
            self.metrics.stage("wal", wal_time);
            if let Err(e) = appended {
                tracing::error!(error = %e, "write-ahead log failed");
                return self.reject(client, header.seq, "server", format!("write-ahead log failed: {e}"));
            }
        }
        let id = self.next_push;
        self.next_push += 1;
        let bytes = frame.len() as u64;
        if let Some(r) = self.registry.get_mut(&c.name) {
            r.last_seq = Some(header.seq);
            r.accepted += 1;
            r.bytes_in += bytes;
            r.last_staleness = staleness;
            r.last_loss = header.loss;
        }
        self.counters.accepted += 1;
        self.counters.bytes_in += bytes;
        self.metrics.accepted(bytes);
        self.record.push(Event::Accept {
            t: now.as_secs_f64(),
            client,
            push: id,
            seq: header.seq,
            base_version: header.base_version,
            staleness,
            samples: header.samples,
            local_steps: header.local_steps,
            loss: header.loss,
            nnz: header.nnz,
            bytes,
        });
        self.pending.insert(id, Pending { client, name: c.name.clone(), header, frame, accepted_at: now });
        self.unacked.insert(id, Unacked { client, seq: header.seq, base_version: header.base_version });
        self.policy.on_loss(now, LossSource::Push(client), header.loss as f64);
        let meta = PushMeta {
            id,
            client,
            seq: header.seq,
            base_version: header.base_version,
            staleness,
            samples: header.samples,
            local_steps: header.local_steps,
            loss: header.loss,
        };
        let actions = self.policy.on_push(now, &meta);
        self.metrics.stage("policy", started.elapsed().saturating_sub(wal_time));
        self.execute(actions).await;
    }

    async fn execute(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                Action::Ack(id) => self.ack(id),
                Action::Drop { push, reason } => {
                    // Only a push that was neither acknowledged nor aggregated can be dropped.
                    if self.pending.contains_key(&push)
                        && let Some(u) = self.unacked.remove(&push)
                    {
                        self.pending.remove(&push);
                        self.record.push(Event::Drop {
                            t: self.now().as_secs_f64(),
                            client: u.client,
                            push,
                            seq: u.seq,
                            reason: reason.clone(),
                        });
                        if let Some(c) = self.clients.get(&u.client) {
                            c.outbox.push(Outbound::Text(
                                ServerMessage::Reject(Reject { seq: u.seq, field: "round".into(), reason })
                                    .to_json(),
                            ));
                        }
                    }
                }
                Action::RoundDropped { client, round, reason } => {
                    self.record.push(Event::RoundDropped {
                        t: self.now().as_secs_f64(),
                        client,
                        round,
                        reason: reason.clone(),
                    });
                    if let Some(c) = self.clients.get(&client) {
                        c.outbox
                            .push(Outbound::Text(ServerMessage::RoundDropped { round, reason }.to_json()));
                    }
                }
                Action::Directive { client, directive } => {
                    if let Some(c) = self.clients.get_mut(&client) {
                        c.directive.merge(&directive);
                        c.outbox.push(Outbound::Text(ServerMessage::Directive(directive.clone()).to_json()));
                        self.record.push(Event::Directive {
                            t: self.started.elapsed().as_secs_f64(),
                            client,
                            directive,
                        });
                    }
                }
                Action::Aggregate { pushes, normalization } => {
                    let more = self.step(pushes, normalization).await;
                    queue.extend(more);
                }
            }
        }
    }

    fn ack(&mut self, id: PushId) {
        let Some(u) = self.unacked.remove(&id) else { return };
        let staleness = self.version.saturating_sub(u.base_version);
        if let Some(c) = self.clients.get(&u.client) {
            c.outbox.push(Outbound::Text(
                ServerMessage::Ack(Ack { seq: u.seq, version: self.version, staleness }).to_json(),
            ));
        }
        self.record.push(Event::Ack { t: self.now().as_secs_f64(), client: u.client, push: id, seq: u.seq });
    }

    /// Aggregates a batch and broadcasts; returns the policy's follow-up actions.
    async fn step(&mut self, ids: Vec<PushId>, normalization: Normalization) -> Vec<Action> {
        self.step_with(ids, Weights::Computed(normalization), None).await
    }

    /// One aggregation step. `weights` are computed by the weighting rule, or given (a logged
    /// step replayed); `broadcast` is given when replayed, else it follows `broadcast_every`.
    async fn step_with(
        &mut self,
        ids: Vec<PushId>,
        weights_in: Weights,
        broadcast: Option<bool>,
    ) -> Vec<Action> {
        let mut items = Vec::with_capacity(ids.len());
        let mut taken = Vec::with_capacity(ids.len());
        let mut logged = Vec::with_capacity(ids.len());
        for (j, id) in ids.iter().enumerate() {
            if let Some(p) = self.pending.remove(id) {
                items.push(p);
                taken.push(*id);
                if let Weights::Logged(w) = &weights_in {
                    logged.push(w.get(j).copied().unwrap_or(0.0));
                }
            }
        }
        if items.is_empty() {
            return Vec::new();
        }
        let t = self.version;
        let inputs: Vec<WeightInput> = items
            .iter()
            .map(|p| WeightInput {
                staleness: t.saturating_sub(p.header.base_version),
                samples: p.header.samples,
                loss: p.header.loss,
            })
            .collect();
        let mut weights = std::mem::take(&mut self.weights);
        match weights_in {
            Weights::Computed(normalization) => {
                batch_weights(&self.weighting, normalization, &inputs, &mut weights)
            }
            Weights::Logged(_) => {
                weights.clear();
                weights.extend_from_slice(&logged);
            }
        }
        let broadcast_now = broadcast.unwrap_or_else(|| (t + 1).is_multiple_of(self.cfg.broadcast_every));
        let k = crate::engine::k_for_density(self.cfg.rho_down, self.layout.num_params());
        let selection = self.selection.with_k(k);
        let frames: Vec<(Bytes, f32)> =
            items.iter().zip(&weights).map(|(p, &w)| (p.frame.clone(), w)).collect();
        let agg_bytes: u64 = items.iter().map(|p| p.frame.len() as u64).sum();
        let result = self
            .with_engine(move |e| {
                let updates: Vec<UpdateRef<'_>> = frames
                    .iter()
                    .map(|(f, w)| UpdateRef::from_push(&PushView::from_validated(f), *w))
                    .collect();
                let t0 = std::time::Instant::now();
                e.aggregate(&updates)?;
                let agg = t0.elapsed();
                let t1 = std::time::Instant::now();
                let bc = if broadcast_now { Some(e.broadcast(selection)?) } else { None };
                Ok((bc, agg, t1.elapsed(), e.take_stage_times(), e.info(), e.counters()))
            })
            .await;
        let now = self.now();
        let (bc, agg_time, topk_time, parts, info, engine_counters) = match result {
            Ok(r) => r,
            Err(e) => {
                // The engine failed (device lost): acknowledged updates cannot be applied.
                // Stop serving rather than pretend; the last checkpoint and the WAL hold them.
                tracing::error!(error = %e, "aggregation engine failed; stopping");
                for c in self.clients.values() {
                    c.outbox.push(Outbound::Text(
                        ServerMessage::error("engine", format!("server engine failed: {e}"), true).to_json(),
                    ));
                    c.outbox.close_with(1011, "engine failure");
                }
                self.rx.close();
                return Vec::new();
            }
        };
        if info != self.engine_info {
            tracing::info!(engine = %info.kind, adapter = %info.adapter, "engine changed");
            self.engine_info = info;
            // Published at the next chance, not at the end of the status period.
            self.last_status = None;
        }
        self.metrics.engine(&engine_counters);
        self.metrics.stage("upload", parts.upload);
        self.metrics.stage("aggregate", agg_time.saturating_sub(parts.upload));
        self.metrics.stage("topk", topk_time.saturating_sub(parts.encode));
        self.metrics.stage("encode", parts.encode);
        self.version = t + 1;
        self.counters.steps += 1;
        self.counters.aggregated += items.len() as u64;
        self.counters.agg_seconds += agg_time.as_secs_f64();
        self.counters.topk_seconds += topk_time.as_secs_f64();
        self.counters.agg_bytes += agg_bytes;
        let mut record_items = Vec::with_capacity(items.len());
        for ((p, id), (input, w)) in items.iter().zip(&taken).zip(inputs.iter().zip(&weights)) {
            if let Some(r) = self.registry.get_mut(&p.name) {
                r.commits += 1;
                r.staleness_sum += input.staleness;
            }
            record_items.push(AggregatedPush {
                push: *id,
                client: p.client,
                seq: p.header.seq,
                staleness: input.staleness,
                weight: *w,
                waited: (now - p.accepted_at).as_secs_f64(),
            });
        }
        self.weights = weights;
        self.metrics.step(
            self.version,
            agg_time.as_secs_f64(),
            topk_time.as_secs_f64(),
            record_items.iter().map(|i| i.staleness),
        );
        self.record.push(Event::Aggregate {
            t: now.as_secs_f64(),
            version: self.version,
            items: record_items,
            agg_seconds: agg_time.as_secs_f64(),
            topk_seconds: topk_time.as_secs_f64(),
            delta_nnz: bc.as_ref().map(|b| b.header.nnz as u64),
        });
        // The step goes to the log before its Delta is sent and its Acks are released: a
        // client never sees a step that a resumed server would not replay.
        if let Some(w) = self.durable.as_mut().and_then(|d| d.wal.as_mut()) {
            let logged: Vec<(&str, u64, f32)> =
                items.iter().zip(&self.weights).map(|(p, &w)| (p.name.as_str(), p.header.seq, w)).collect();
            if let Err(e) = w.append_step(&logged, broadcast_now) {
                tracing::error!(error = %e, "write-ahead log failed: a crash now would replay this step differently");
            }
        }
        if let Some(bc) = bc {
            let t0 = std::time::Instant::now();
            self.publish(bc);
            self.metrics.stage("fanout", t0.elapsed());
        }
        self.policy.on_aggregated(now, self.version, &taken)
    }

    /// Fans a Delta out to every session and remembers it for resyncs.
    fn publish(&mut self, bc: Broadcast) {
        let frame = Bytes::from(bc.frame);
        let (base, version) = (bc.header.base_version, bc.header.version);
        self.replica_version = version;
        self.snapshot = None;
        self.deltas.push_back((base, version, frame.clone()));
        while self.deltas.len() as u64 > self.cfg.max_delta_chain {
            self.deltas.pop_front();
        }
        let mut sent = 0u64;
        for c in self.clients.values() {
            if c.outbox.push_delta(base, version, frame.clone()) {
                sent += frame.len() as u64;
                if let Some(r) = self.registry.get_mut(&c.name) {
                    r.bytes_out += frame.len() as u64;
                }
            }
        }
        self.counters.bytes_out += sent;
        self.metrics.sent(sent);
    }

    /// The snapshot of x̂ at the replica version, encoded once per version.
    async fn snapshot_frame(&mut self) -> Result<(u64, Bytes), EngineError> {
        if let Some((v, f)) = &self.snapshot
            && *v == self.replica_version
        {
            return Ok((*v, f.clone()));
        }
        let values = self.with_engine(|e| e.read_replica()).await?;
        let v = self.replica_version;
        let frame = Bytes::from(encode_snapshot(v, &values));
        self.snapshot = Some((v, frame.clone()));
        Ok((v, frame))
    }

    /// Answers a `snapshot_request`: a Snapshot of x̂ at the replica version, whatever the
    /// client holds (the Deltas queued before it are dropped; those after it follow from it).
    async fn send_snapshot(&mut self, client: ClientId) {
        let Some((outbox, name)) = self.clients.get(&client).map(|c| (c.outbox.clone(), c.name.clone()))
        else {
            return;
        };
        match self.snapshot_frame().await {
            Ok((v, f)) => {
                self.counters.bytes_out += f.len() as u64;
                self.registry.entry(name).or_default().bytes_out += f.len() as u64;
                outbox.push_snapshot(v, f);
            }
            Err(e) => tracing::error!(error = %e, "snapshot failed"),
        }
    }

    async fn resync(&mut self, client: ClientId, have: Option<u64>) {
        let Some((outbox, name)) = self.clients.get(&client).map(|c| (c.outbox.clone(), c.name.clone()))
        else {
            return;
        };
        if let Some(h) = have
            && self.replica_version.saturating_sub(h) <= self.cfg.max_delta_chain
        {
            if h == self.replica_version && outbox.resync_with_deltas(h, &[]) {
                return;
            }
            if let Some(start) = self.deltas.iter().position(|(b, _, _)| *b == h) {
                let chain: Vec<_> = self.deltas.iter().skip(start).cloned().collect();
                if outbox.resync_with_deltas(h, &chain) {
                    let bytes: u64 = chain.iter().map(|(_, _, f)| f.len() as u64).sum();
                    self.counters.bytes_out += bytes;
                    self.registry.entry(name).or_default().bytes_out += bytes;
                    return;
                }
            }
        }
        self.send_snapshot(client).await;
    }

    async fn shutdown(&mut self, reason: &str) -> Result<ModelState, EngineError> {
        // Everything accepted is applied before the state is taken.
        let actions = self.policy.drain();
        self.execute(actions).await;
        let mut leftover: Vec<PushId> = self.pending.keys().copied().collect();
        leftover.sort_unstable();
        for batch in leftover.chunks(self.cfg.max_batch) {
            self.step(batch.to_vec(), Normalization::Batch).await;
        }
        // Whatever the policy still held is applied now: release those clients too.
        let unacked: Vec<PushId> = self.unacked.keys().copied().collect();
        for id in unacked {
            self.ack(id);
        }
        if self.durable.is_some() {
            match self.checkpoint().await {
                Ok(path) => tracing::info!(path = %path.display(), "final checkpoint written"),
                Err(e) => tracing::error!(error = %e, "final checkpoint failed"),
            }
        }
        for c in self.clients.values() {
            c.outbox.push(Outbound::Text(ServerMessage::Bye { reason: reason.into() }.to_json()));
            c.outbox.close(reason);
        }
        self.with_engine(|e| e.read_state()).await
    }

    /// Publishes the status at most every [`STATUS_PERIOD`]; a change inside the period is
    /// published when it ends.
    fn publish_status(&mut self, force: bool) {
        let now = Instant::now();
        if !force && self.last_status.is_some_and(|t| now - t < STATUS_PERIOD) {
            self.status_dirty = true;
            return;
        }
        self.status_dirty = false;
        self.last_status = Some(now);
        self.metrics.queues(self.rx.len(), self.pending.len());
        let uptime = self.now().as_secs_f64();
        let clients = self
            .clients
            .iter()
            .map(|(&id, c)| {
                let r = self.registry.get(&c.name).cloned().unwrap_or_default();
                ClientStatus {
                    session: id,
                    client_id: c.name.clone(),
                    kind: c.kind,
                    role: c.role,
                    device: c.device.clone(),
                    connected_s: uptime - c.joined.as_secs_f64(),
                    accepted: r.accepted,
                    rejected: r.rejected,
                    commits: r.commits,
                    bytes_in: r.bytes_in,
                    bytes_out: r.bytes_out,
                    last_staleness: r.last_staleness,
                    mean_staleness: if r.commits == 0 {
                        0.0
                    } else {
                        r.staleness_sum as f64 / r.commits as f64
                    },
                    last_loss: r.last_loss,
                    lagging: c.outbox.is_lagging(),
                    queued_bytes: c.outbox.queued_bytes() as u64,
                    directive: c.directive.clone(),
                }
            })
            .collect();
        let c = self.counters;
        let status = Status {
            model: self.layout.name.clone(),
            params: self.layout.num_params() as u64,
            version: self.version,
            replica_version: self.replica_version,
            uptime_s: uptime,
            engine: self.engine_info.clone(),
            policy: self.policy.name().into(),
            policy_state: self.policy.state(),
            settings: self.settings(),
            clients,
            accepted: c.accepted,
            rejected: c.rejected,
            aggregated: c.aggregated,
            steps: c.steps,
            pending: self.pending.len() as u64,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            aggregate_seconds: c.agg_seconds,
            topk_seconds: c.topk_seconds,
            aggregate_bytes: c.agg_bytes,
            evals: self.evals.points(),
            evals_seen: self.evals.seen(),
            stages: self.metrics.stage_seconds(),
            staleness_histogram: self.record.staleness_histogram(),
        };
        let _ = self.status_tx.send(Arc::new(status));
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
