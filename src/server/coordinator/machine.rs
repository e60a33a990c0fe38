//! The coordinator's rules, as a synchronous state machine with no I/O.
//!
//! [`Machine`] takes events (a session joins, a validated push arrives, a session leaves, a step
//! finished, time passed, …) and returns [`Effect`]s: messages to send, a Delta to broadcast,
//! a step to run on the engine, events to record. It owns every rule about sessions and client
//! ids, sequence numbers, staleness, acks, batches, resyncs and shutdown; the async shell in
//! [`super`] owns the channels, the outboxes, the engine thread, durability and status, and only
//! carries effects out. The rules are unit-tested here without sockets or tokio (`tests.rs`).
//!
//! Vocabulary (the same in the wire protocol and docs/protocol.md): a *client id* is the
//! string a client names itself with in Hello, kept across reconnects; a *session* is one
//! joined WebSocket connection, numbered by the server ([`SessionId`], Welcome's `session`); a
//! *connection* is a TCP connection before or without a session.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::ServerConfig;
use crate::engine::{Broadcast, EngineInfo, Selection, SelectionMode};
use crate::policy::staleness::{Normalization, WeightInput, Weighting, batch_weights};
use crate::policy::{Action, LossSource, PushId, PushMeta, SessionId, SyncPolicy};
use crate::protocol::PROTOCOL_VERSION;
use crate::protocol::frame::{PushHeader, PushLimits, ValidatedPush};
use crate::protocol::message::{
    Ack, ClientKind, Directive, EvalReport, Hello, Reject, Role, RoundTime, ServerMessage, SessionSettings,
    SkipReport, Welcome,
};
use crate::protocol::model::ModelLayout;
use crate::server::durability::{PendingPush, WalOp};
use crate::server::history::History;
use crate::server::metrics::Metrics;
use crate::server::record::{AggregatedPush, Event};
use crate::server::status::{ClientStatus, EvalPoint, StageTime, Status};

/// A push's seq may be at most this far above the client's last accepted seq (or above 0 for
/// its first push): a client, or someone using its id, cannot push seq = u64::MAX and lock the
/// client out.
pub const MAX_SEQ_GAP: u64 = 1 << 20;

/// What the shell must do, in order.
#[derive(Debug)]
pub enum Effect {
    /// Queue a message to a session (the shell makes the JSON).
    Send { session: SessionId, msg: ServerMessage },
    /// Queue a Snapshot of x̂ at [`Machine::replica_version`] to a session.
    Snapshot { session: SessionId },
    /// Queue the Deltas from replica version `from` (those of `chain`, in order) to a session;
    /// when its outbox cannot take them (it moved on, or they do not fit), a Snapshot instead.
    Deltas { session: SessionId, from: u64, chain: Vec<(u64, u64, Bytes)> },
    /// Queue a Delta (`base` → `version`) to every session whose replica follows the chain.
    Broadcast { base: u64, version: u64, frame: Bytes },
    /// Close a session's connection after what is queued to it.
    Close { session: SessionId, code: u16, reason: String },
    /// Run one aggregation step on the engine, then report with [`Machine::step_done`]. It is
    /// always the last effect of a batch: nothing else happens until the step is done.
    Step(StepJob),
    /// Append an event to the run's record (`/api/record`).
    Record(Event),
    /// The engine failed: stop serving (the checkpoint and the log hold what was accepted).
    Stop,
}

/// One aggregation step for the engine.
#[derive(Debug)]
pub struct StepJob {
    /// The pushes, in aggregation order, with their weights.
    pub updates: Vec<(ValidatedPush, f32)>,
    /// The selection of the broadcast after the step, if this step broadcasts.
    pub broadcast: Option<Selection>,
}

/// What the engine did with a [`StepJob`].
#[derive(Debug)]
pub struct StepOutcome {
    pub broadcast: Option<Broadcast>,
    pub agg_seconds: f64,
    pub topk_seconds: f64,
}

/// The write-ahead log, as the machine sees it.
pub trait Log {
    /// Makes an accepted push durable; it is acknowledged only if this succeeds.
    fn push(&mut self, client_id: &str, frame: &[u8]) -> Result<(), String>;
    /// Makes an applied step durable, before its Delta and Acks go out.
    fn step(&mut self, items: &[(&str, u64, f32)], broadcast: bool) -> Result<(), String>;
}

/// No write-ahead log (tests).
#[cfg(test)]
pub struct NoLog;

#[cfg(test)]
impl Log for NoLog {
    fn push(&mut self, _: &str, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn step(&mut self, _: &[(&str, u64, f32)], _: bool) -> Result<(), String> {
        Ok(())
    }
}

/// Why a join was refused: the Hello field at fault, and the reason.
pub type JoinRefusal = (&'static str, String);

/// A joined session.
struct Session {
    client_id: String,
    kind: ClientKind,
    role: Role,
    device: Option<String>,
    joined: Duration,
    directive: Directive,
}

/// What the server keeps of a client id across its sessions.
#[derive(Default, Clone)]
struct ClientStats {
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
    /// The session that pushed it (it may have ended since).
    session: SessionId,
    client_id: String,
    /// The header with the sample count as used (clipped to `max_samples`).
    header: PushHeader,
    push: ValidatedPush,
    accepted_at: Duration,
}

/// An accepted push whose Ack the policy has not released yet.
struct Unacked {
    session: SessionId,
    seq: u64,
    base_version: u64,
    /// Its staleness when it was aggregated (the one its weight used), once it was.
    applied_staleness: Option<u64>,
}

/// The weights of a step: from the weighting rule, or as a log recorded them.
#[derive(Debug)]
enum Weights {
    Computed(Normalization),
    Logged(Vec<f32>),
}

/// Work the machine still has to do, in order.
enum Work {
    Action(Action),
    /// Aggregate these pushes; `follow_up` hands the result to the policy.
    Step {
        ids: Vec<PushId>,
        weights: Weights,
        broadcast: Option<bool>,
        follow_up: bool,
    },
    /// Aggregate every accepted push, in the order accepted, in steps of up to `max_batch`.
    Flush,
    /// Release every Ack still held (at shutdown, everything accepted has been applied).
    AckAll,
    /// A trainer session joined: tell the policy (its actions come next).
    Joined(SessionId),
}

/// The step the engine is running.
struct InFlight {
    items: Vec<Pending>,
    ids: Vec<PushId>,
    inputs: Vec<WeightInput>,
    broadcast: bool,
    follow_up: bool,
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

/// What a recovery found in the checkpoint and its log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub pushes: usize,
    pub steps: usize,
    /// Logged pushes that no logged step applied (they are applied after the steps).
    pub not_yet_aggregated: usize,
}

/// What a checkpoint needs from the machine.
pub struct CheckpointParts {
    pub pending: Vec<PendingPush>,
    /// Client id → last accepted seq.
    pub last_seqs: BTreeMap<String, u64>,
    pub policy: String,
    pub policy_state: serde_json::Value,
}

/// Everything `/api/status` needs that the machine does not own.
pub struct StatusInputs {
    pub engine: EngineInfo,
    pub stages: Vec<StageTime>,
    pub staleness_histogram: Vec<u64>,
}

/// The coordinator's state and rules.
pub struct Machine {
    cfg: Arc<ServerConfig>,
    layout: ModelLayout,
    policy: Box<dyn SyncPolicy>,
    weighting: Weighting,
    selection: SelectionMode,
    sessions: HashMap<SessionId, Session>,
    by_client_id: HashMap<String, SessionId>,
    clients: HashMap<String, ClientStats>,
    pending: BTreeMap<PushId, Pending>,
    unacked: HashMap<PushId, Unacked>,
    next_session: SessionId,
    next_push: PushId,
    version: u64,
    replica_version: u64,
    /// Recent Deltas (base, version, frame), for resynchronising lagging sessions.
    deltas: VecDeque<(u64, u64, Bytes)>,
    counters: Counters,
    /// The evaluator's reports over the whole run (bounded, see [`History`]).
    evals: History<EvalPoint>,
    metrics: Arc<Metrics>,
    work: VecDeque<Work>,
    in_flight: Option<InFlight>,
    failed: bool,
    out: Vec<Effect>,
    weights: Vec<f32>,
}

impl Machine {
    /// A machine for a model at `version` (x̂ at `replica_version`).
    pub fn new(
        cfg: Arc<ServerConfig>,
        layout: ModelLayout,
        policy: Box<dyn SyncPolicy>,
        version: u64,
        replica_version: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        Machine {
            weighting: cfg.weighting(),
            selection: cfg.selection,
            cfg,
            layout,
            policy,
            sessions: HashMap::new(),
            by_client_id: HashMap::new(),
            clients: HashMap::new(),
            pending: BTreeMap::new(),
            unacked: HashMap::new(),
            next_session: 1,
            next_push: 1,
            version,
            replica_version,
            deltas: VecDeque::new(),
            counters: Counters::default(),
            evals: History::default(),
            metrics,
            work: VecDeque::new(),
            in_flight: None,
            failed: false,
            out: Vec::new(),
            weights: Vec::new(),
        }
    }

    /// The model version (aggregation steps applied).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The version of x̂, the replica every client holds (it trails `version` with
    /// `broadcast_every` > 1).
    pub fn replica_version(&self) -> u64 {
        self.replica_version
    }

    /// The model's layout.
    pub fn layout(&self) -> &ModelLayout {
        &self.layout
    }

    /// Accepted pushes not yet aggregated.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// When the policy wants [`Machine::poll`] called (time since start).
    pub fn next_wakeup(&self) -> Option<Duration> {
        self.policy.next_wakeup()
    }

    fn emit(&mut self, e: Effect) {
        self.out.push(e);
    }

    fn send(&mut self, session: SessionId, msg: ServerMessage) {
        self.out.push(Effect::Send { session, msg });
    }

    fn finish(&mut self, now: Duration) -> Vec<Effect> {
        self.run(now);
        std::mem::take(&mut self.out)
    }

    fn queue_actions(&mut self, actions: Vec<Action>) {
        self.work.extend(actions.into_iter().map(Work::Action));
    }

    /// The settings every session is told in its Welcome.
    pub fn settings(&self) -> SessionSettings {
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

    // ---- recovery ------------------------------------------------------------------------

    /// Re-applies what a checkpoint and its log hold: `last_seqs` from the checkpoint, then its
    /// pending pushes and the log's records in order. Logged steps are replayed exactly (the
    /// same pushes, weights and broadcasts), so the model, x̂ and the version are those the
    /// crashed server had reached. Pushes that no logged step applied are then aggregated in
    /// steps of up to `max_batch`, in the order they were accepted. Nobody is acknowledged: the
    /// clients that pushed them are gone.
    pub fn recover(
        &mut self,
        now: Duration,
        last_seqs: BTreeMap<String, u64>,
        ops: Vec<WalOp>,
    ) -> (Recovered, Vec<Effect>) {
        for (id, seq) in last_seqs {
            self.clients.insert(id, ClientStats { last_seq: Some(seq), ..Default::default() });
        }
        let n = self.layout.num_params() as u64;
        let limits = PushLimits { num_params: n, max_nnz: n };
        let mut by_seq: HashMap<(String, u64), PushId> = HashMap::new();
        let mut found = Recovered::default();
        for op in ops {
            match op {
                WalOp::Push(p) => {
                    let push = match ValidatedPush::decode(p.frame, &limits) {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::warn!(error = %e, client = %p.client_id, "a recovered push does not decode; skipped");
                            continue;
                        }
                    };
                    let mut header = *push.header();
                    header.samples = header.samples.min(self.cfg.max_samples.max(1));
                    let stats = self.clients.entry(p.client_id.clone()).or_default();
                    stats.last_seq = Some(stats.last_seq.map_or(header.seq, |s| s.max(header.seq)));
                    let id = self.next_push;
                    self.next_push += 1;
                    by_seq.insert((p.client_id.clone(), header.seq), id);
                    let pending =
                        Pending { session: 0, client_id: p.client_id, header, push, accepted_at: now };
                    self.pending.insert(id, pending);
                    found.pushes += 1;
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
                            None => tracing::error!(
                                client = %name,
                                seq,
                                "a logged step names a push the log lacks: the resumed model differs from the crashed server's"
                            ),
                        }
                    }
                    self.work.push_back(Work::Step {
                        ids,
                        weights: Weights::Logged(weights),
                        broadcast: Some(s.broadcast),
                        follow_up: false,
                    });
                    found.steps += 1;
                }
            }
        }
        found.not_yet_aggregated = by_seq.len();
        self.work.push_back(Work::Flush);
        (found, self.finish(now))
    }

    // ---- sessions ------------------------------------------------------------------------

    /// A session asks to join with `hello`; `proven` says its token is the client id's own.
    ///
    /// A client id held by a live session is refused unless the newcomer proves it is the same
    /// client (its own token, or the `resume_secret` of that id's Welcome); then the old
    /// session is told Bye and closed. The new session gets Welcome, a Snapshot and the
    /// initial Directive, in that order.
    pub fn join(
        &mut self,
        now: Duration,
        hello: Hello,
        proven: bool,
    ) -> Result<(SessionId, Vec<Effect>), JoinRefusal> {
        if let Some(&old) = self.by_client_id.get(&hello.client_id) {
            let secret = self.clients.get(&hello.client_id).and_then(|c| c.secret.as_deref()).unwrap_or("");
            let same = proven
                || hello.resume_secret.as_deref().is_some_and(|s| {
                    use subtle::ConstantTimeEq;
                    !secret.is_empty() && bool::from(s.as_bytes().ct_eq(secret.as_bytes()))
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
            let reason = "replaced by a new session with the same client_id";
            self.send(old, ServerMessage::Bye { reason: reason.into() });
            self.emit(Effect::Close { session: old, code: 1000, reason: "replaced by a new session".into() });
            self.end_session(now, old, "replaced by a new session");
        }
        // Only a session that is admitted creates the client id's entry (and its secret).
        let secret = self
            .clients
            .entry(hello.client_id.clone())
            .or_default()
            .secret
            .get_or_insert_with(|| format!("{:032x}", rand::random::<u128>()))
            .clone();
        let id = self.next_session;
        self.next_session += 1;
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
        self.send(id, ServerMessage::Welcome(welcome));
        self.emit(Effect::Snapshot { session: id });
        let directive = Directive {
            local_steps: Some(self.cfg.local_steps),
            batch_size: Some(self.cfg.batch_size),
            learning_rate: Some(self.cfg.learning_rate),
            reason: Some("initial settings".into()),
            ..Default::default()
        };
        self.send(id, ServerMessage::Directive(directive.clone()));
        self.emit(Effect::Record(Event::Join {
            t: now.as_secs_f64(),
            session: id,
            client_id: hello.client_id.clone(),
            role: hello.role,
            kind: hello.kind,
        }));
        tracing::info!(session = id, client_id = %hello.client_id, kind = ?hello.kind, role = ?hello.role, "client joined");
        self.by_client_id.insert(hello.client_id.clone(), id);
        let role = hello.role;
        self.sessions.insert(
            id,
            Session {
                client_id: hello.client_id,
                kind: hello.kind,
                role,
                device: hello.device,
                joined: now,
                directive,
            },
        );
        if role == Role::Trainer {
            // After what the replaced session's leave queued (a policy sees the leave first).
            self.work.push_back(Work::Joined(id));
        }
        Ok((id, self.finish(now)))
    }

    /// A session ended. Its accepted pushes stay and are aggregated; Acks it can no longer
    /// receive are dropped.
    pub fn leave(&mut self, now: Duration, session: SessionId, reason: &str) -> Vec<Effect> {
        self.end_session(now, session, reason);
        self.finish(now)
    }

    fn end_session(&mut self, now: Duration, session: SessionId, reason: &str) {
        let Some(s) = self.sessions.remove(&session) else { return };
        if self.by_client_id.get(&s.client_id) == Some(&session) {
            self.by_client_id.remove(&s.client_id);
        }
        self.unacked.retain(|_, u| u.session != session);
        self.emit(Effect::Record(Event::Leave { t: now.as_secs_f64(), session, reason: reason.into() }));
        tracing::info!(session, client_id = %s.client_id, reason, "client left");
        if s.role == Role::Trainer {
            let actions = self.policy.on_leave(now, session);
            self.queue_actions(actions);
        }
    }

    // ---- pushes --------------------------------------------------------------------------

    fn reject(&mut self, now: Duration, session: SessionId, seq: u64, field: &str, reason: String) {
        if let Some(s) = self.sessions.get(&session) {
            if let Some(c) = self.clients.get_mut(&s.client_id) {
                c.rejected += 1;
            }
            let msg = ServerMessage::Reject(Reject { seq, field: field.into(), reason: reason.clone() });
            self.send(session, msg);
        }
        self.counters.rejected += 1;
        self.metrics.rejected(field);
        self.emit(Effect::Record(Event::Reject {
            t: now.as_secs_f64(),
            session,
            seq,
            field: field.into(),
            reason,
        }));
    }

    /// A push that passed the stateless checks. It is accepted when its seq is above the
    /// client id's last accepted seq (by at most [`MAX_SEQ_GAP`]), its base version is not in
    /// the future, and its staleness is at most `max_staleness`; its sample count is clipped
    /// to `max_samples`. An accepted push is made durable by `log` first, then handed to the
    /// policy, which decides when it is aggregated and acknowledged. A rejected push does not
    /// use up its seq.
    pub fn push(
        &mut self,
        now: Duration,
        session: SessionId,
        push: ValidatedPush,
        log: &mut dyn Log,
    ) -> Vec<Effect> {
        self.accept(now, session, push, log);
        self.finish(now)
    }

    fn accept(&mut self, now: Duration, session: SessionId, push: ValidatedPush, log: &mut dyn Log) {
        let Some(s) = self.sessions.get(&session) else { return };
        let mut header = *push.header();
        let seq = header.seq;
        if self.failed {
            return self.reject(
                now,
                session,
                seq,
                "server",
                "the aggregation engine failed; the server is stopping".into(),
            );
        }
        if s.role != Role::Trainer {
            return self.reject(now, session, seq, "role", "evaluators do not push".into());
        }
        let client_id = s.client_id.clone();
        let last_seq = self.clients.get(&client_id).and_then(|c| c.last_seq);
        if let Some(last) = last_seq
            && seq <= last
        {
            let why = format!("seq {seq} is not above the last accepted seq {last} (duplicate or replay)");
            return self.reject(now, session, seq, "seq", why);
        }
        // A client can only hold a replica version: anything above it was never sent.
        if header.base_version > self.replica_version {
            let why = format!(
                "base version {} is in the future: the replica is at version {}",
                header.base_version, self.replica_version
            );
            return self.reject(now, session, seq, "base_version", why);
        }
        let staleness = self.version - header.base_version;
        if staleness > self.cfg.max_staleness {
            let why = format!(
                "staleness {staleness} (version {} - base {}) exceeds max_staleness {}",
                self.version, header.base_version, self.cfg.max_staleness
            );
            return self.reject(now, session, seq, "base_version", why);
        }
        let last = last_seq.unwrap_or(0);
        if seq - last > MAX_SEQ_GAP {
            let why = format!(
                "seq {seq} jumps more than {MAX_SEQ_GAP} past the last accepted seq {last} (a first seq is at most {MAX_SEQ_GAP})"
            );
            return self.reject(now, session, seq, "seq_gap", why);
        }
        let cap = self.cfg.max_samples.max(1);
        if header.samples > cap {
            tracing::warn!(client_id = %client_id, claimed = header.samples, cap, "a push's sample count was clipped to max_samples");
            self.metrics.rejected("samples_clipped");
            header.samples = cap;
        }
        if let Err(e) = log.push(&client_id, push.frame()) {
            tracing::error!(error = %e, "write-ahead log failed");
            return self.reject(now, session, seq, "server", format!("write-ahead log failed: {e}"));
        }
        let id = self.next_push;
        self.next_push += 1;
        let bytes = push.frame().len() as u64;
        let c = self.clients.entry(client_id.clone()).or_default();
        c.last_seq = Some(seq);
        c.accepted += 1;
        c.bytes_in += bytes;
        c.last_staleness = staleness;
        c.last_loss = header.loss;
        self.counters.accepted += 1;
        self.counters.bytes_in += bytes;
        self.metrics.accepted(bytes);
        self.emit(Effect::Record(Event::Accept {
            t: now.as_secs_f64(),
            session,
            push: id,
            seq,
            base_version: header.base_version,
            staleness,
            samples: header.samples,
            local_steps: header.local_steps,
            loss: header.loss,
            nnz: header.nnz,
            bytes,
        }));
        self.pending.insert(id, Pending { session, client_id, header, push, accepted_at: now });
        self.unacked
            .insert(id, Unacked { session, seq, base_version: header.base_version, applied_staleness: None });
        self.policy.on_loss(now, LossSource::Push(session), header.loss as f64);
        let meta = PushMeta {
            id,
            session,
            seq,
            base_version: header.base_version,
            staleness,
            samples: header.samples,
            local_steps: header.local_steps,
            loss: header.loss,
        };
        let actions = self.policy.on_push(now, &meta);
        self.queue_actions(actions);
    }

    // ---- other client messages -----------------------------------------------------------

    /// An evaluation report: only from an evaluator, with accuracy in [0, 1] and a finite,
    /// non-negative loss.
    pub fn eval(&mut self, now: Duration, session: SessionId, report: EvalReport) -> Vec<Effect> {
        let Some(role) = self.sessions.get(&session).map(|s| s.role) else { return Vec::new() };
        let refusal = if role == Role::Trainer {
            Some("only a client that joined with role \"evaluator\" may report evaluations")
        } else if !(0.0..=1.0).contains(&report.accuracy) {
            Some("accuracy must be a number in [0, 1]")
        } else if !(report.loss.is_finite() && report.loss >= 0.0) {
            Some("loss must be a finite number ≥ 0")
        } else {
            None
        };
        if let Some(why) = refusal {
            self.metrics.rejected("eval");
            self.send(session, ServerMessage::error("eval", why, false));
            return self.finish(now);
        }
        let (bytes_in, bytes_out) = (self.counters.bytes_in, self.counters.bytes_out);
        self.emit(Effect::Record(Event::Eval {
            t: now.as_secs_f64(),
            session,
            version: report.version,
            accuracy: report.accuracy,
            loss: report.loss,
            bytes_in,
            bytes_out,
        }));
        self.evals.push(EvalPoint {
            t: now.as_secs_f64(),
            version: report.version,
            accuracy: report.accuracy,
            loss: report.loss,
            bytes_in,
            bytes_out,
        });
        self.policy.on_loss(now, LossSource::Evaluator, report.loss);
        self.finish(now)
    }

    /// A client skipped a round (Hermes' gate).
    pub fn skip(&mut self, now: Duration, session: SessionId, report: SkipReport) -> Vec<Effect> {
        if self.sessions.contains_key(&session) {
            self.emit(Effect::Record(Event::Skip {
                t: now.as_secs_f64(),
                session,
                round: report.round,
                loss: report.loss,
            }));
            let actions = self.policy.on_skip(now, session, &report);
            self.queue_actions(actions);
        }
        self.finish(now)
    }

    /// A client's measured round time.
    pub fn round_time(&mut self, now: Duration, session: SessionId, report: RoundTime) -> Vec<Effect> {
        if self.sessions.contains_key(&session) && report.is_valid() {
            let actions = self.policy.on_round_time(now, session, &report);
            self.queue_actions(actions);
        }
        self.finish(now)
    }

    /// The client asked for a snapshot (`snapshot_request`): it always gets one.
    pub fn snapshot_request(&mut self, session: SessionId) -> Vec<Effect> {
        if self.sessions.contains_key(&session) {
            self.emit(Effect::Snapshot { session });
        }
        std::mem::take(&mut self.out)
    }

    /// A session's replica fell behind (its outbox dropped Deltas) and it holds x̂ at `have`:
    /// it gets the Deltas it missed when the server still keeps them (the newest
    /// `max_delta_chain`), else a Snapshot.
    pub fn resync(&mut self, session: SessionId, have: Option<u64>) -> Vec<Effect> {
        if !self.sessions.contains_key(&session) {
            return Vec::new();
        }
        // The newest `max_delta_chain` Deltas are kept (counted in Deltas, not in versions:
        // with `broadcast_every` > 1 a Delta spans several versions).
        let chain = have.and_then(|h| {
            if h == self.replica_version {
                return Some((h, Vec::new()));
            }
            let start = self.deltas.iter().position(|(b, _, _)| *b == h)?;
            Some((h, self.deltas.iter().skip(start).cloned().collect()))
        });
        match chain {
            Some((from, chain)) => self.emit(Effect::Deltas { session, from, chain }),
            None => self.emit(Effect::Snapshot { session }),
        }
        std::mem::take(&mut self.out)
    }

    /// The shell sent `bytes` of frames (Deltas, snapshots) to a session.
    pub fn count_sent(&mut self, session: SessionId, bytes: u64) {
        self.counters.bytes_out += bytes;
        self.metrics.sent(bytes);
        if let Some(s) = self.sessions.get(&session)
            && let Some(c) = self.clients.get_mut(&s.client_id)
        {
            c.bytes_out += bytes;
        }
    }

    // ---- the policy and steps ------------------------------------------------------------

    /// Time passed: runs what the policy decides now. `None` when it decided nothing.
    pub fn poll(&mut self, now: Duration) -> Option<Vec<Effect>> {
        let actions = self.policy.poll(now);
        if actions.is_empty() {
            return None;
        }
        self.queue_actions(actions);
        Some(self.finish(now))
    }

    /// Carries out queued work until it is done or a step is handed to the engine.
    fn run(&mut self, now: Duration) {
        while self.in_flight.is_none() && !self.failed {
            let Some(w) = self.work.pop_front() else { break };
            match w {
                Work::Action(a) => self.action(now, a),
                Work::Step { ids, weights, broadcast, follow_up } => {
                    self.start_step(now, ids, weights, broadcast, follow_up)
                }
                Work::Flush => {
                    let ids: Vec<PushId> =
                        self.pending.keys().take(self.cfg.max_batch.max(1)).copied().collect();
                    if !ids.is_empty() {
                        self.work.push_front(Work::Flush);
                        self.start_step(now, ids, Weights::Computed(Normalization::Batch), None, false);
                    }
                }
                Work::Joined(session) => {
                    let actions = self.policy.on_join(now, session);
                    for (i, a) in actions.into_iter().enumerate() {
                        self.work.insert(i, Work::Action(a));
                    }
                }
                Work::AckAll => {
                    let mut ids: Vec<PushId> = self.unacked.keys().copied().collect();
                    ids.sort_unstable();
                    for id in ids {
                        self.ack(now, id);
                    }
                }
            }
        }
    }

    fn action(&mut self, now: Duration, a: Action) {
        match a {
            Action::Ack(id) => self.ack(now, id),
            Action::RoundDropped { session: client, round, reason } => {
                self.emit(Effect::Record(Event::RoundDropped {
                    t: now.as_secs_f64(),
                    session: client,
                    round,
                    reason: reason.clone(),
                }));
                if self.sessions.contains_key(&client) {
                    self.send(client, ServerMessage::RoundDropped { round, reason });
                }
            }
            Action::Directive { session: client, directive } => {
                if let Some(s) = self.sessions.get_mut(&client) {
                    s.directive.merge(&directive);
                    self.send(client, ServerMessage::Directive(directive.clone()));
                    self.emit(Effect::Record(Event::Directive {
                        t: now.as_secs_f64(),
                        session: client,
                        directive,
                    }));
                }
            }
            Action::Aggregate { pushes, normalization } => {
                self.start_step(now, pushes, Weights::Computed(normalization), None, true)
            }
        }
    }

    /// Releases a push's Ack with the model version now and the push's staleness: the one
    /// its aggregation used when it was already aggregated (BSP acknowledges after the round's
    /// step: a push built on the version the step started from has staleness 0, as in its
    /// weight and in `/api/status`), else the staleness now.
    fn ack(&mut self, now: Duration, id: PushId) {
        let Some(u) = self.unacked.remove(&id) else { return };
        let staleness = u.applied_staleness.unwrap_or_else(|| self.version.saturating_sub(u.base_version));
        if self.sessions.contains_key(&u.session) {
            self.send(u.session, ServerMessage::Ack(Ack { seq: u.seq, version: self.version, staleness }));
        }
        self.emit(Effect::Record(Event::Ack {
            t: now.as_secs_f64(),
            session: u.session,
            push: id,
            seq: u.seq,
        }));
    }

    /// Takes the pushes of a step out of `pending`, weighs them and hands the step to the
    /// engine. Weights are computed by the weighting rule, or given (a logged step replayed);
    /// `broadcast` is given when replayed, else it follows `broadcast_every`.
    fn start_step(
        &mut self,
        _now: Duration,
        ids: Vec<PushId>,
        w: Weights,
        broadcast: Option<bool>,
        follow_up: bool,
    ) {
        let mut items = Vec::with_capacity(ids.len());
        let mut taken = Vec::with_capacity(ids.len());
        let mut logged = Vec::new();
        for (j, id) in ids.iter().enumerate() {
            if let Some(p) = self.pending.remove(id) {
                items.push(p);
                taken.push(*id);
                if let Weights::Logged(lw) = &w {
                    logged.push(lw.get(j).copied().unwrap_or(0.0));
                }
            }
        }
        if items.is_empty() {
            return;
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
        match w {
            Weights::Computed(normalization) => {
                batch_weights(&self.weighting, normalization, &inputs, &mut weights)
            }
            Weights::Logged(_) => {
                weights.clear();
                weights.extend_from_slice(&logged);
            }
        }
        let broadcast = broadcast.unwrap_or_else(|| (t + 1).is_multiple_of(self.cfg.broadcast_every));
        let k = crate::protocol::select::k_for_density(self.cfg.rho_down, self.layout.num_params());
        let job = StepJob {
            updates: items.iter().zip(&weights).map(|(p, &w)| (p.push.clone(), w)).collect(),
            broadcast: broadcast.then(|| self.selection.with_k(k)),
        };
        self.weights = weights;
        self.in_flight = Some(InFlight { items, ids: taken, inputs, broadcast, follow_up });
        self.emit(Effect::Step(job));
    }

    /// The engine finished the step of the last [`Effect::Step`] (or failed: then every
    /// session is told and closed, and the machine stops). The step is logged before its Delta
    /// is broadcast and its Acks are released: no client sees a step that a resumed server
    /// would not replay.
    pub fn step_done(
        &mut self,
        now: Duration,
        outcome: Result<StepOutcome, String>,
        log: &mut dyn Log,
    ) -> Vec<Effect> {
        let Some(step) = self.in_flight.take() else { return Vec::new() };
        let r = match outcome {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "aggregation engine failed; stopping");
                self.failed = true;
                // Not applied: they stay pending, so a final checkpoint still holds them.
                for (id, p) in step.ids.into_iter().zip(step.items) {
                    self.pending.insert(id, p);
                }
                let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
                ids.sort_unstable();
                for s in ids {
                    self.send(s, ServerMessage::error("engine", format!("server engine failed: {e}"), true));
                    self.emit(Effect::Close { session: s, code: 1011, reason: "engine failure".into() });
                }
                self.emit(Effect::Stop);
                return std::mem::take(&mut self.out);
            }
        };
        self.version += 1;
        self.counters.steps += 1;
        self.counters.aggregated += step.items.len() as u64;
        self.counters.agg_seconds += r.agg_seconds;
        self.counters.topk_seconds += r.topk_seconds;
        self.counters.agg_bytes += step.items.iter().map(|p| p.push.frame().len() as u64).sum::<u64>();
        let mut record_items = Vec::with_capacity(step.items.len());
        for ((p, id), (input, w)) in
            step.items.iter().zip(&step.ids).zip(step.inputs.iter().zip(&self.weights))
        {
            if let Some(c) = self.clients.get_mut(&p.client_id) {
                c.commits += 1;
                c.staleness_sum += input.staleness;
            }
            if let Some(u) = self.unacked.get_mut(id) {
                u.applied_staleness = Some(input.staleness);
            }
            record_items.push(AggregatedPush {
                push: *id,
                session: p.session,
                seq: p.header.seq,
                staleness: input.staleness,
                weight: *w,
                waited: (now.saturating_sub(p.accepted_at)).as_secs_f64(),
            });
        }
        self.metrics.step(
            self.version,
            r.agg_seconds,
            r.topk_seconds,
            record_items.iter().map(|i| i.staleness),
        );
        self.emit(Effect::Record(Event::Aggregate {
            t: now.as_secs_f64(),
            version: self.version,
            items: record_items,
            agg_seconds: r.agg_seconds,
            topk_seconds: r.topk_seconds,
            delta_nnz: r.broadcast.as_ref().map(|b| b.header.nnz as u64),
        }));
        let logged: Vec<(&str, u64, f32)> = step
            .items
            .iter()
            .zip(&self.weights)
            .map(|(p, &w)| (p.client_id.as_str(), p.header.seq, w))
            .collect();
        if let Err(e) = log.step(&logged, step.broadcast) {
            tracing::error!(error = %e, "write-ahead log failed: a crash now would replay this step differently");
        }
        if let Some(bc) = r.broadcast {
            let frame = Bytes::from(bc.frame);
            let (base, version) = (bc.header.base_version, bc.header.version);
            self.replica_version = version;
            self.deltas.push_back((base, version, frame.clone()));
            while self.deltas.len() as u64 > self.cfg.max_delta_chain {
                self.deltas.pop_front();
            }
            self.emit(Effect::Broadcast { base, version, frame });
        }
        if step.follow_up {
            // The policy's answer comes before any work queued after the batch of actions
            // that asked for this step (e.g. a shutdown's flush), as if handled inline.
            let actions = self.policy.on_aggregated(now, self.version, &step.ids);
            let at = self.work.iter().position(|w| !matches!(w, Work::Action(_))).unwrap_or(self.work.len());
            for (i, a) in actions.into_iter().enumerate() {
                self.work.insert(at + i, Work::Action(a));
            }
        }
        self.finish(now)
    }

    // ---- shutdown ------------------------------------------------------------------------

    /// Stop: what the policy holds is released, every accepted push is aggregated, and every
    /// Ack still held is sent. Then the shell writes the final checkpoint and calls
    /// [`Machine::farewell`].
    pub fn shutdown(&mut self, now: Duration) -> Vec<Effect> {
        let actions = self.policy.drain();
        self.queue_actions(actions);
        self.work.push_back(Work::Flush);
        self.work.push_back(Work::AckAll);
        self.finish(now)
    }

    /// Says Bye to every session and closes it.
    pub fn farewell(&mut self, reason: &str) -> Vec<Effect> {
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        for s in ids {
            self.send(s, ServerMessage::Bye { reason: reason.into() });
            self.emit(Effect::Close { session: s, code: 1000, reason: reason.into() });
        }
        std::mem::take(&mut self.out)
    }

    // ---- what the shell reads ------------------------------------------------------------

    /// What a checkpoint holds besides the engine's state.
    pub fn checkpoint_parts(&self) -> CheckpointParts {
        CheckpointParts {
            pending: self
                .pending
                .values()
                .map(|p| PendingPush { client_id: p.client_id.clone(), frame: p.push.frame().clone() })
                .collect(),
            last_seqs: self.clients.iter().filter_map(|(k, c)| c.last_seq.map(|s| (k.clone(), s))).collect(),
            policy: self.policy.name().into(),
            policy_state: self.policy.state(),
        }
    }

    /// The status `/api/status` shows; `outbox(session)` tells whether a session is lagging
    /// and how many bytes are queued to it.
    pub fn status(
        &self,
        now: Duration,
        inputs: StatusInputs,
        outbox: impl Fn(SessionId) -> (bool, u64),
    ) -> Status {
        let uptime = now.as_secs_f64();
        let mut clients: Vec<ClientStatus> = self
            .sessions
            .iter()
            .map(|(&id, s)| {
                let c = self.clients.get(&s.client_id).cloned().unwrap_or_default();
                let (lagging, queued_bytes) = outbox(id);
                ClientStatus {
                    session: id,
                    client_id: s.client_id.clone(),
                    kind: s.kind,
                    role: s.role,
                    device: s.device.clone(),
                    connected_s: uptime - s.joined.as_secs_f64(),
                    accepted: c.accepted,
                    rejected: c.rejected,
                    commits: c.commits,
                    bytes_in: c.bytes_in,
                    bytes_out: c.bytes_out,
                    last_staleness: c.last_staleness,
                    mean_staleness: if c.commits == 0 {
                        0.0
                    } else {
                        c.staleness_sum as f64 / c.commits as f64
                    },
                    last_loss: c.last_loss,
                    lagging,
                    queued_bytes,
                    directive: s.directive.clone(),
                }
            })
            .collect();
        clients.sort_by_key(|c| c.session);
        let c = self.counters;
        Status {
            model: self.layout.name.clone(),
            params: self.layout.num_params() as u64,
            version: self.version,
            replica_version: self.replica_version,
            uptime_s: uptime,
            engine: inputs.engine,
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
            stages: inputs.stages,
            staleness_histogram: inputs.staleness_histogram,
        }
    }
}

#[cfg(test)]
mod tests;
