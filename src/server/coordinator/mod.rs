//! The coordinator: the one task that owns the core, the engine and the sessions' outboxes.
//!
//! Sessions send it [`Inbound`] messages over a bounded channel (that is where backpressure
//! comes from). Every rule lives in the core ([`crate::core::Machine`], which does no I/O):
//! this module is the thin async shell around it. It turns each message into an [`Input`]
//! (with the time, and a resume secret drawn from the operating system for a Join) and carries
//! out the [`Effect`]s the core returns: a record appended to the write-ahead log (then the
//! core is told it is held), JSON to an outbox, a Delta fanned out to every outbox as one
//! shared, reference-counted frame, an aggregation step on the engine's blocking thread, an
//! event for the record. It also writes checkpoints, exports the core's counters as metrics,
//! and publishes the status. With a [`Tape`], every input and the effects it gave are kept,
//! so a test can replay the run through the core alone.

mod durable;
mod tape;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::durability::{Checkpoint, Wal};
use super::metrics::Metrics;
use super::outbox::{Outbound, Outbox};
use super::record::SharedRecord;
pub use super::status::EvalPoint;
use super::status::Status;
use crate::config::ServerConfig;
use crate::core::{Effect, Input, Machine, StatusInputs, StepJob, StepOutcome};
use crate::engine::{Aggregator, EngineError, EngineInfo, ModelState, UpdateRef};
use crate::policy::{SessionId, SyncPolicy};
use crate::protocol::frame::encode_snapshot;
use crate::protocol::message::Hello;
use crate::protocol::model::ModelLayout;
use durable::Durable;
pub use tape::{Tape, TapeEntry};

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
    /// A session's message for the core as it is (a validated Push, a Leave, a Resync, a
    /// snapshot request, an evaluation, a skip, a round time).
    Core(Input),
    /// Model state (tests, checkpoints).
    State { reply: oneshot::Sender<Result<ModelState, String>> },
    /// The public replica and its version.
    Replica { reply: oneshot::Sender<Result<(u64, Vec<f32>), String>> },
    /// Stop: aggregate every accepted push, say Bye to every session, return the final state.
    Shutdown { reason: String, reply: oneshot::Sender<Result<ModelState, String>> },
}

/// The coordinator's answer to a Join: the session, or the Hello field at fault and why.
pub type JoinReply = Result<SessionId, (&'static str, String)>;

/// How the coordinator is built.
pub struct CoordinatorParts {
    pub cfg: Arc<ServerConfig>,
    pub layout: ModelLayout,
    pub engine: Box<dyn Aggregator>,
    pub policy: Box<dyn SyncPolicy>,
    pub rx: mpsc::Receiver<Inbound>,
    pub status_tx: watch::Sender<Arc<Status>>,
    pub metrics: Arc<Metrics>,
    /// A checkpoint to continue from: its client ids' seqs, its pending pushes and its log.
    pub resume: Option<Checkpoint>,
    /// Where events are recorded (shared with `/api/record`).
    pub record: SharedRecord,
    /// Keeps every input to the core and the effects it gave (tests replay it).
    pub tape: Option<Tape>,
}

/// The async shell around the [`Machine`].
pub struct Coordinator {
    cfg: Arc<ServerConfig>,
    machine: Machine,
    engine: Arc<Mutex<Box<dyn Aggregator>>>,
    engine_info: EngineInfo,
    rx: mpsc::Receiver<Inbound>,
    outboxes: HashMap<SessionId, Arc<Outbox>>,
    /// x̂ encoded as a Snapshot frame, once per replica version.
    snapshot: Option<(u64, Bytes)>,
    started: Instant,
    record: SharedRecord,
    status_tx: watch::Sender<Arc<Status>>,
    last_status: Option<Instant>,
    /// Something changed since the last status publication.
    status_dirty: bool,
    metrics: Arc<Metrics>,
    durable: Option<Durable>,
    /// A checkpoint (and its WAL) to apply before serving.
    resume: Option<Checkpoint>,
    tape: Option<Tape>,
}

impl Coordinator {
    pub fn new(p: CoordinatorParts) -> Self {
        let version = p.engine.version();
        let engine_info = p.engine.info();
        let machine = Machine::new(p.cfg.clone(), p.layout, p.policy, version, p.engine.replica_version());
        let durable = p.cfg.checkpoint_dir.clone().map(|dir| Durable {
            wal_seq: Wal::next_seq(&dir),
            dir,
            wal: None,
            last_at: Instant::now(),
            last_version: version,
        });
        Self {
            cfg: p.cfg,
            machine,
            engine: Arc::new(Mutex::new(p.engine)),
            engine_info,
            rx: p.rx,
            outboxes: HashMap::new(),
            snapshot: None,
            started: Instant::now(),
            record: p.record,
            status_tx: p.status_tx,
            last_status: None,
            status_dirty: false,
            metrics: p.metrics,
            durable,
            resume: p.resume,
            tape: p.tape,
        }
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Hands one input to the core (and to the tape, with what it gave).
    fn core(&mut self, input: Input) -> Vec<Effect> {
        let now = self.now();
        let taped = self.tape.as_ref().map(|_| input.clone());
        let effects = self.machine.handle(now, input);
        if let (Some(tape), Some(input)) = (&self.tape, taped) {
            tape.keep(now, input, &effects);
        }
        effects
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
            let wake = self.machine.next_wakeup().map(|d| self.started + d);
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
            if stop || self.poll_policy().await {
                break;
            }
            self.maybe_checkpoint().await;
            self.publish_status(false);
        }
        self.publish_status(true);
    }

    /// Runs the policy's decisions until it has none; returns true when a Shutdown arrived.
    async fn poll_policy(&mut self) -> bool {
        loop {
            let effects = self.core(Input::Poll);
            if effects.is_empty() {
                return false;
            }
            self.apply(effects).await;
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
        let effects = match msg {
            Inbound::Join { hello, proven, outbox, reply } => {
                let r = self.join(hello, proven, outbox).await;
                let _ = reply.send(r);
                return false;
            }
            Inbound::Core(input) => {
                if let Input::Leave { session, .. } = &input {
                    self.outboxes.remove(session);
                }
                let t0 = std::time::Instant::now();
                let is_push = matches!(input, Input::Push { .. });
                let effects = self.core(input);
                if is_push {
                    self.metrics.stage("policy", t0.elapsed());
                }
                effects
            }
            Inbound::Replica { reply } => {
                let v = self.machine.replica_version();
                let r = self.with_engine(|e| e.read_replica()).await;
                let _ = reply.send(r.map(|values| (v, values)).map_err(|e| e.to_string()));
                return false;
            }
            Inbound::State { reply } => {
                let r = self.with_engine(|e| e.read_state()).await;
                let _ = reply.send(r.map_err(|e| e.to_string()));
                return false;
            }
            Inbound::Shutdown { reason, reply } => {
                let r = self.shutdown(&reason).await;
                let _ = reply.send(r.map_err(|e| e.to_string()));
                return true;
            }
        };
        self.apply(effects).await;
        false
    }

    async fn join(&mut self, hello: Hello, proven: bool, outbox: Arc<Outbox>) -> JoinReply {
        // The Snapshot that follows the Welcome is read before the machine admits the session.
        if let Err(e) = self.snapshot_frame().await {
            return Err(("server", format!("engine failed to read the model: {e}")));
        }
        let secret = match resume_secret() {
            Ok(s) => s,
            Err(e) => {
                return Err((
                    "server",
                    format!("no resume secret: the operating system's random source failed: {e}"),
                ));
            }
        };
        let mut effects = self.core(Input::Join { hello, proven, secret });
        match effects.first() {
            Some(Effect::Joined { session }) => {
                let session = *session;
                effects.remove(0);
                self.outboxes.insert(session, outbox);
                self.apply(effects).await;
                Ok(session)
            }
            Some(Effect::Refused { field, reason }) => Err((field, reason.clone())),
            _ => Err(("server", "the core neither admitted nor refused the join".into())),
        }
    }

    /// Carries out the machine's effects in order.
    async fn apply(&mut self, effects: Vec<Effect>) {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Send { session, msg } => {
                    if let Some(o) = self.outboxes.get(&session) {
                        o.push(Outbound::Text(msg.to_json()));
                    }
                }
                Effect::Snapshot { session } => self.send_snapshot(session).await,
                Effect::Deltas { session, from, chain } => {
                    let Some(o) = self.outboxes.get(&session).cloned() else { continue };
                    if o.resync_with_deltas(from, &chain) {
                        let bytes: u64 = chain.iter().map(|(_, _, f)| f.len() as u64).sum();
                        self.core(Input::Sent { session, bytes });
                    } else {
                        self.send_snapshot(session).await;
                    }
                }
                Effect::Broadcast { base, version, frame } => {
                    let t0 = std::time::Instant::now();
                    let len = frame.len() as u64;
                    let sent: Vec<SessionId> = self
                        .outboxes
                        .iter()
                        .filter(|(_, o)| o.push_delta(base, version, frame.clone()))
                        .map(|(&s, _)| s)
                        .collect();
                    for session in sent {
                        self.core(Input::Sent { session, bytes: len });
                    }
                    self.metrics.stage("fanout", t0.elapsed());
                }
                Effect::Close { session, code, reason } => {
                    if let Some(o) = self.outboxes.remove(&session) {
                        o.close_with(code, reason);
                    }
                }
                Effect::Step(job) => {
                    let outcome = self.run_step(job).await;
                    queue.extend(self.core(Input::StepDone { outcome }));
                }
                Effect::Append { seq, op } => {
                    let more = self.append(seq, &op);
                    queue.extend(more);
                }
                Effect::Record(event) => {
                    self.metrics.event(&event);
                    self.record.push(event);
                }
                Effect::Stop => self.rx.close(),
                // Answered where the input was given (join, recovery).
                Effect::Joined { .. } | Effect::Refused { .. } | Effect::Recovered(_) => {}
            }
        }
        // /metrics follows the core's counters (each counted there, once).
        self.metrics.core(self.machine.counters());
    }

    /// Runs one aggregation step (and its broadcast) on the engine's blocking thread.
    async fn run_step(&mut self, job: StepJob) -> Result<StepOutcome, String> {
        let StepJob { updates, broadcast } = job;
        let result = self
            .with_engine(move |e| {
                let refs: Vec<UpdateRef<'_>> =
                    updates.iter().map(|(p, w)| UpdateRef::from_push(&p.view(), *w)).collect();
                let t0 = std::time::Instant::now();
                e.aggregate(&refs)?;
                let agg = t0.elapsed();
                let t1 = std::time::Instant::now();
                let bc = match broadcast {
                    Some(selection) => Some(e.broadcast(selection)?),
                    None => None,
                };
                Ok((bc, agg, t1.elapsed(), e.take_stage_times(), e.info(), e.counters()))
            })
            .await;
        let (broadcast, agg, topk, parts, info, counters) = result.map_err(|e| e.to_string())?;
        if info != self.engine_info {
            tracing::info!(engine = %info.kind, adapter = %info.adapter, "engine changed");
            self.engine_info = info;
            // Published at the next chance, not at the end of the status period.
            self.last_status = None;
        }
        self.metrics.engine(&counters);
        self.metrics.stage("upload", parts.upload);
        self.metrics.stage("aggregate", agg.saturating_sub(parts.upload));
        self.metrics.stage("topk", topk.saturating_sub(parts.encode));
        self.metrics.stage("encode", parts.encode);
        Ok(StepOutcome { broadcast, agg_seconds: agg.as_secs_f64(), topk_seconds: topk.as_secs_f64() })
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

    /// The snapshot of x̂ at the replica version, encoded once per version.
    async fn snapshot_frame(&mut self) -> Result<(u64, Bytes), EngineError> {
        let v = self.machine.replica_version();
        if let Some((sv, f)) = &self.snapshot
            && *sv == v
        {
            return Ok((v, f.clone()));
        }
        let values = self.with_engine(|e| e.read_replica()).await?;
        let frame = Bytes::from(encode_snapshot(v, &values));
        self.snapshot = Some((v, frame.clone()));
        Ok((v, frame))
    }

    /// Queues a Snapshot of x̂ to a session (the Deltas queued before it are dropped; those
    /// after it follow from it).
    async fn send_snapshot(&mut self, session: SessionId) {
        let Some(outbox) = self.outboxes.get(&session).cloned() else { return };
        match self.snapshot_frame().await {
            Ok((v, f)) => {
                self.core(Input::Sent { session, bytes: f.len() as u64 });
                outbox.push_snapshot(v, f);
            }
            Err(e) => tracing::error!(error = %e, "snapshot failed"),
        }
    }

    async fn shutdown(&mut self, reason: &str) -> Result<ModelState, EngineError> {
        // Everything accepted is applied and acknowledged before the state is taken.
        let effects = self.core(Input::Shutdown);
        self.apply(effects).await;
        if self.durable.is_some() {
            match self.checkpoint().await {
                Ok(path) => tracing::info!(path = %path.display(), "final checkpoint written"),
                Err(e) => tracing::error!(error = %e, "final checkpoint failed"),
            }
        }
        let effects = self.core(Input::Farewell { reason: reason.into() });
        self.apply(effects).await;
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
        self.metrics.queues(self.rx.len(), self.machine.pending_len());
        let inputs = StatusInputs {
            engine: self.engine_info.clone(),
            stages: self.metrics.stage_seconds(),
            staleness_histogram: self.record.staleness_histogram(),
        };
        let outboxes = &self.outboxes;
        let status = self.machine.status(self.now(), inputs, |s| {
            outboxes.get(&s).map_or((false, 0), |o| (o.is_lagging(), o.queued_bytes() as u64))
        });
        let _ = self.status_tx.send(Arc::new(status));
    }
}

/// A fresh resume secret: 128 bits from the operating system's CSPRNG, in hex.
fn resume_secret() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
