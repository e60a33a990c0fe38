//! The coordinator: the one task that owns the core, the engine and the sessions' outboxes.
//!
//! Sessions send it [`Inbound`] messages over a bounded channel (that is where backpressure
//! comes from). Every rule lives in the core ([`crate::core::Machine`], which does no I/O):
//! this module is the thin async shell around it. It turns each message into an [`Input`]
//! (with the time, and a resume secret drawn from the operating system for a Join) and carries
//! out the [`Effect`]s the core returns: a record appended to the write-ahead log (then the
//! core is told it is held), JSON to an outbox, a Delta fanned out to every outbox as one
//! shared, reference-counted frame, an aggregation step handed to the engine's thread, an
//! event for the record. It also writes checkpoints, exports the core's counters as metrics,
//! and publishes the status. With a [`Tape`], every input and the effects it gave are kept,
//! so a test can replay the run through the core alone.
//!
//! Pipelining: a step goes to the engine's thread ([`EngineWorker`]) and the coordinator does
//! not wait for it. While the engine aggregates step n, the coordinator goes on validating,
//! logging and admitting pushes, and the core forms step n + 1 (up to `steps_in_flight`
//! steps are outstanding; the engine runs them in order). Results come back into the same
//! loop as messages do. What must see the model as the core sees it waits until the engine
//! holds no step the core has not released (*settles*): a snapshot of x̂ for a Join or a
//! resync, a checkpoint, a state read and shutdown. While the engine has steps, at most
//! `max_batch` messages are taken from sessions per finished step, so when the engine is the
//! bottleneck the inbound channel fills and sessions stop reading their sockets.

mod durable;
mod tape;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::log::RecordLog;
use super::metrics::Metrics;
use super::outbox::{Outbound, Outbox};
use super::record::SharedRecord;
pub use super::status::EvalPoint;
use super::status::Status;
use crate::config::ServerConfig;
use crate::core::{Effect, Input, Machine, StatusInputs, StepJob, StepOutcome};
use crate::engine::worker::{EngineWorker, Pending};
use crate::engine::{
    Aggregator, Broadcast, EngineCounters, EngineError, EngineInfo, ModelState, StageTimes, UpdateRef,
};
use crate::policy::{SessionId, SyncPolicy};
use crate::protocol::frame::encode_snapshot;
use crate::protocol::message::Hello;
use crate::protocol::model::ModelLayout;
use durable::Durable;
pub use durable::Resume;
pub use tape::{Tape, TapeEntry};

/// Shortest time between two status publications.
const STATUS_PERIOD: Duration = Duration::from_millis(100);
/// Groups of records a log may hold unsettled before no more messages are taken from sessions
/// (a JetStream log whose cluster is unreachable: pushes wait in the sessions' sockets).
const LOG_BACKLOG: usize = 64;
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
    /// What to replay before serving: a checkpoint's client ids' seqs, pending pushes and log.
    pub resume: Option<Resume>,
    /// Where records and checkpoints go.
    pub log: Box<dyn RecordLog>,
    /// A standby's follower of the leader's JetStream log (`serve --standby`): the
    /// coordinator replays the leader's records until it takes over, before it serves.
    pub follower: Option<crate::server::nats::Follower>,
    /// Where events are recorded (shared with `/api/record`).
    pub record: SharedRecord,
    /// Keeps every input to the core and the effects it gave (tests replay it).
    pub tape: Option<Tape>,
}

/// What the engine's thread reports for one step.
struct StepReport {
    broadcast: Option<Broadcast>,
    agg: Duration,
    topk: Duration,
    parts: StageTimes,
    info: EngineInfo,
    counters: EngineCounters,
}

/// The async shell around the [`Machine`].
pub struct Coordinator {
    cfg: Arc<ServerConfig>,
    machine: Machine,
    engine: EngineWorker,
    engine_info: EngineInfo,
    /// Steps handed to the engine and not yet reported, oldest first.
    running: VecDeque<Pending<StepReport>>,
    /// A step failed on the engine: the steps queued behind it are not run (the core keeps
    /// their pushes pending, so a checkpoint must not find them applied).
    engine_failed: Arc<std::sync::atomic::AtomicBool>,
    /// Messages that may still be taken from sessions while the engine has steps: `max_batch`
    /// after every finished step, less those taken since (unlimited while it has none).
    intake: usize,
    /// Sessions owed a Snapshot that could not be read yet (the engine held steps the core
    /// had not released); sent once it settles.
    snapshots_due: Vec<SessionId>,
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
    /// Checkpoint times (when the log keeps checkpoints).
    durable: Option<Durable>,
    log: Box<dyn RecordLog>,
    /// Another server leads the log: nothing more is appended or acknowledged.
    deposed: bool,
    /// What to replay before serving.
    resume: Option<Resume>,
    follower: Option<crate::server::nats::Follower>,
    tape: Option<Tape>,
}

impl Coordinator {
    pub fn new(p: CoordinatorParts) -> std::io::Result<Self> {
        let version = p.engine.version();
        let engine_info = p.engine.info();
        let machine = Machine::new(p.cfg.clone(), p.layout, p.policy, version, p.engine.replica_version());
        let durable =
            p.log.keeps_checkpoints().then(|| Durable { last_at: Instant::now(), last_version: version });
        let intake = p.cfg.max_batch;
        Ok(Self {
            cfg: p.cfg,
            machine,
            engine: EngineWorker::spawn(p.engine)?,
            engine_info,
            running: VecDeque::new(),
            engine_failed: Default::default(),
            intake,
            snapshots_due: Vec::new(),
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
            log: p.log,
            deposed: false,
            resume: p.resume,
            follower: p.follower,
            tape: p.tape,
        })
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
            let slot_free = self.machine.can_step();
            // The policy's timers matter only when a step could start.
            let wake = if slot_free { self.machine.next_wakeup().map(|d| self.started + d) } else { None };
            let period = if self.status_dirty { STATUS_PERIOD } else { STATUS_HEARTBEAT };
            let status_due = self.last_status.map(|t| t + period);
            // Records wait for the log in groups; past LOG_BACKLOG of them no more is taken
            // (unless the log stalled: then pushes are refused as busy and add no records).
            let open = (self.running.is_empty() || self.intake > 0) && self.log_has_room();
            let woke = tokio::select! {
                biased;
                d = self.log.done() => Woke::Log(d),
                r = next_report(&mut self.running) => Woke::Step(r),
                m = self.rx.recv(), if open => match m {
                    Some(m) => Woke::Message(m),
                    None => break,
                },
                _ = sleep_until(wake) => Woke::Time,
                _ = sleep_until(status_due) => Woke::Time,
            };
            let busy_from = std::time::Instant::now();
            let mut stop = false;
            match woke {
                Woke::Log(d) => stop = self.log_done(d).await,
                Woke::Step(r) => self.step_reported(r).await,
                Woke::Message(m) => stop = self.take(m).await,
                Woke::Time => {}
            }
            // What queued meanwhile is handled before the policy is polled (with ASP, the
            // pushes that arrived while the engine was busy form one batch): at most max_batch
            // messages, and within the intake allowance while the engine has steps. Without
            // the first bound an idle engine would wait for a queue that never runs dry: ASP
            // acknowledges on admission, and clients answer every Ack with a push.
            let mut round = self.cfg.max_batch;
            while !stop && round > 0 && (self.running.is_empty() || self.intake > 0) && self.log_has_room() {
                let Ok(m) = self.rx.try_recv() else { break };
                round -= 1;
                stop = self.take(m).await;
            }
            // Deposed (reported while settling, say): nothing more is taken or acknowledged.
            if stop || self.deposed {
                break;
            }
            self.send_due_snapshots().await;
            // A checkpoint settles the engine: before the poll, so that a step can start after.
            self.maybe_checkpoint().await;
            self.poll_policy().await;
            // What this round appended is written as one group.
            if !self.deposed {
                self.log.commit();
            }
            self.publish_status(false);
            self.metrics.engine_busy(self.engine.busy());
            self.metrics.log_bytes(self.log.bytes());
            self.metrics.coordinator_busy(busy_from.elapsed());
        }
        if !self.deposed {
            // (Not waiting for a stalled log: what it has not confirmed was never acknowledged.)
            self.settle_within(!self.log_stalled()).await;
        }
        self.metrics.engine_busy(self.engine.busy());
        self.publish_status(true);
    }

    /// Whether the log may be handed more records: fewer than [`LOG_BACKLOG`] groups wait, or
    /// it stalled (pushes are refused as busy then, so messages are taken to answer them).
    fn log_has_room(&self) -> bool {
        self.log_stalled() || self.log.backlog() < LOG_BACKLOG
    }

    /// The log confirms no writes now (its cluster is unreachable, as the core was told):
    /// pushes are refused as busy, and what would wait for the log (a join, a snapshot, a
    /// checkpoint) waits or is refused instead of holding up the loop.
    fn log_stalled(&self) -> bool {
        self.machine.log_stalled()
    }

    /// Handles a message from a session, counting it against the intake allowance; returns
    /// true when the coordinator must stop.
    async fn take(&mut self, m: Inbound) -> bool {
        self.intake = self.intake.saturating_sub(1);
        self.handle(m).await
    }

    /// Runs the policy's decisions while a step could start and it has some.
    async fn poll_policy(&mut self) {
        while self.machine.can_step() {
            let effects = self.core(Input::Poll);
            if effects.is_empty() {
                return;
            }
            self.apply(effects).await;
        }
    }

    /// Hands a step to the engine's thread; its report comes back through `running`.
    fn dispatch(&mut self, job: StepJob) {
        let StepJob { updates, broadcast } = job;
        let failed = self.engine_failed.clone();
        let pending = self.engine.submit(move |e| {
            use std::sync::atomic::Ordering;
            if failed.load(Ordering::Acquire) {
                return Err(EngineError::Stopped("an earlier step failed; this one was not run".into()));
            }
            // A step that fails or panics stops the ones behind it (the worker catches the
            // panic; the flag must be set before it does).
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_step(e, &updates, broadcast)))
                    .unwrap_or_else(|_| Err(EngineError::Stopped("the aggregation step panicked".into())));
            if r.is_err() {
                failed.store(true, Ordering::Release);
            }
            r
        });
        self.running.push_back(pending);
    }

    /// The engine reported the oldest step it was given: the core learns of it and its
    /// effects are carried out.
    async fn step_reported(&mut self, r: Result<StepReport, EngineError>) {
        self.intake = self.cfg.max_batch;
        let outcome = r.map(|r| self.step_metrics(r)).map_err(|e| e.to_string());
        let effects = self.core(Input::StepDone { outcome });
        self.apply(effects).await;
    }

    /// Waits until the engine holds no step the core has not been told of, and the log holds
    /// every record handed to it (so the core has released every step the engine ran).
    async fn settle(&mut self) {
        self.settle_within(true).await;
    }

    /// [`Coordinator::settle`], or false (not settled) once the log stalls when `patient` is
    /// false, and when the server was deposed.
    async fn settle_within(&mut self, patient: bool) -> bool {
        loop {
            while let Some(p) = self.running.pop_front() {
                let r = p.wait().await;
                self.step_reported(r).await;
            }
            if !self.drain_log(patient).await {
                return false;
            }
            if self.running.is_empty() {
                return true;
            }
        }
    }

    /// Why the log cannot settle now (it stalled, or this server was deposed), if it cannot.
    async fn try_settle(&mut self) -> Result<(), String> {
        if self.settle_within(false).await {
            return Ok(());
        }
        Err(if self.deposed {
            "this server no longer leads the log".into()
        } else {
            "the server cannot make records durable now (its log is unreachable); try again later".into()
        })
    }

    /// Sends the Snapshots that had to wait for the engine to settle (they wait on while the
    /// log is stalled).
    async fn send_due_snapshots(&mut self) {
        if self.snapshots_due.is_empty() || self.log_stalled() || self.try_settle().await.is_err() {
            return;
        }
        for session in std::mem::take(&mut self.snapshots_due) {
            self.send_snapshot(session).await;
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
                if let Err(e) = self.try_settle().await {
                    let _ = reply.send(Err(e));
                    return false;
                }
                let v = self.machine.replica_version();
                let r = self.engine.call(|e| e.read_replica()).await;
                let _ = reply.send(r.map(|values| (v, values)).map_err(|e| e.to_string()));
                return false;
            }
            Inbound::State { reply } => {
                if let Err(e) = self.try_settle().await {
                    let _ = reply.send(Err(e));
                    return false;
                }
                let r = self.engine.call(|e| e.read_state()).await;
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
        // The Snapshot that follows the Welcome is read before the machine admits the session,
        // at the replica version the Welcome names: the engine settles first.
        if let Err(e) = self.try_settle().await {
            if self.deposed {
                return Err(("server", "this server no longer leads the log; join another".into()));
            }
            return Err(("busy", e));
        }
        match self.snapshot_frame().await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(("server", "the model replica is not settled; try again".into())),
            Err(e) => return Err(("server", format!("engine failed to read the model: {e}"))),
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
                Effect::Step(job) => self.dispatch(job),
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

    /// Exports what the engine reported for a step as metrics; the step's outcome for the core.
    fn step_metrics(&mut self, r: StepReport) -> StepOutcome {
        let StepReport { broadcast, agg, topk, parts, info, counters } = r;
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
        StepOutcome { broadcast, agg_seconds: agg.as_secs_f64(), topk_seconds: topk.as_secs_f64() }
    }

    /// The snapshot of x̂ at the replica version, encoded once per version (on the engine's
    /// thread). `None` when it is not cached and the engine holds steps the core has not
    /// released: x̂ there may be ahead of the replica version, with steps a resumed server
    /// would not replay.
    async fn snapshot_frame(&mut self) -> Result<Option<(u64, Bytes)>, EngineError> {
        let v = self.machine.replica_version();
        if let Some((sv, f)) = &self.snapshot
            && *sv == v
        {
            return Ok(Some((v, f.clone())));
        }
        if !self.running.is_empty() {
            return Ok(None);
        }
        let (engine_v, frame) = self
            .engine
            .call(|e| {
                let values = e.read_replica()?;
                let v = e.replica_version();
                Ok((v, Bytes::from(encode_snapshot(v, &values))))
            })
            .await?;
        if engine_v != v {
            return Ok(None);
        }
        self.snapshot = Some((v, frame.clone()));
        Ok(Some((v, frame)))
    }

    /// Queues a Snapshot of x̂ to a session (the Deltas queued before it are dropped; those
    /// after it follow from it). It waits for the engine to settle when it must.
    async fn send_snapshot(&mut self, session: SessionId) {
        let Some(outbox) = self.outboxes.get(&session).cloned() else { return };
        match self.snapshot_frame().await {
            Ok(Some((v, f))) => {
                self.core(Input::Sent { session, bytes: f.len() as u64 });
                outbox.push_snapshot(v, f);
            }
            // The engine's x̂ is ahead of the core's: steps still run, or wait for the log (which
            // may be stalled for a while). Sent once it settles.
            Ok(None) if !self.running.is_empty() || self.log.backlog() > 0 || self.log_stalled() => {
                if !self.snapshots_due.contains(&session) {
                    self.snapshots_due.push(session);
                }
            }
            Ok(None) => tracing::error!(
                replica_version = self.machine.replica_version(),
                "snapshot skipped: the engine's x̂ is at another version than the core's with no step running"
            ),
            Err(e) => tracing::error!(error = %e, "snapshot failed"),
        }
    }

    async fn shutdown(&mut self, reason: &str) -> Result<ModelState, EngineError> {
        if self.deposed {
            // Another server leads: nothing more may be logged or acknowledged from here.
            return self.engine.call(|e| e.read_state()).await;
        }
        // Everything accepted is applied and acknowledged before the state is taken, unless
        // the log is stalled: then what it has not confirmed was never acknowledged, and the
        // server stops without it (and without a final checkpoint) rather than wait for it.
        let effects = self.core(Input::Shutdown);
        self.apply(effects).await;
        let settled = self.settle_within(false).await;
        if !settled && !self.deposed {
            tracing::warn!(
                pending = self.machine.pending_len(),
                "stopping while the log confirms no writes: no final checkpoint; pushes it has not confirmed were never acknowledged and are not kept"
            );
        }
        if settled && self.durable.is_some() {
            match self.checkpoint(true).await {
                Ok(at) => tracing::info!(%at, "final checkpoint written"),
                Err(e) => tracing::error!(error = %e, "final checkpoint failed"),
            }
        }
        let effects = self.core(Input::Farewell { reason: reason.into() });
        self.apply(effects).await;
        self.settle_within(false).await;
        self.engine.call(|e| e.read_state()).await
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

/// One step on the engine's thread: aggregate, then the broadcast if the step has one.
fn run_step(
    e: &mut dyn Aggregator,
    updates: &[(crate::protocol::frame::ValidatedPush, f32)],
    broadcast: Option<crate::engine::Selection>,
) -> Result<StepReport, EngineError> {
    let refs: Vec<UpdateRef<'_>> = updates.iter().map(|(p, w)| UpdateRef::from_push(&p.view(), *w)).collect();
    let t0 = std::time::Instant::now();
    e.aggregate(&refs)?;
    let agg = t0.elapsed();
    let t1 = std::time::Instant::now();
    let broadcast = match broadcast {
        Some(selection) => Some(e.broadcast(selection)?),
        None => None,
    };
    let topk = t1.elapsed();
    Ok(StepReport {
        broadcast,
        agg,
        topk,
        parts: e.take_stage_times(),
        info: e.info(),
        counters: e.counters(),
    })
}

/// What woke the coordinator's loop.
enum Woke {
    Log(crate::server::log::LogDone),
    Step(Result<StepReport, EngineError>),
    Message(Inbound),
    Time,
}

/// The report of the oldest step on the engine (never, when none is).
async fn next_report(running: &mut VecDeque<Pending<StepReport>>) -> Result<StepReport, EngineError> {
    let Some(p) = running.front_mut() else { return std::future::pending().await };
    let r = p.wait_mut().await;
    running.pop_front();
    r
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
