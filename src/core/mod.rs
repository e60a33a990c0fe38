//! The core: the coordinator's rules as a synchronous state machine that does no I/O.
//!
//! [`Machine`] takes [`Input`]s (a session joins with a secret the shell drew, a validated Push
//! arrives, the log appended up to record n, a step finished, time passed, …) and returns
//! [`Effect`]s (append these records to the log, send these messages, broadcast this Delta,
//! run this step, record these events), in the order the shell must carry them out. It owns
//! every rule about sessions and client ids, sequence numbers, staleness, durability order,
//! acks, batches, resyncs and shutdown, and the counters that `/api/status` and `/metrics`
//! show. It owns no clock, no random number generator, no socket and no file: time and secrets
//! come in with the inputs, so a recorded run replays through it alone ([`Input`],
//! `tests/replay.rs`). The server (`crate::server`) is the shell that performs the effects.
//! Anchors: raft-rs (`Ready`/`advance`: persist before send), quinn-proto (a protocol state
//! machine under an async shell).
//!
//! Persist before acknowledge: an accepted Push is emitted as [`Effect::Append`] and reaches
//! the policy, and so its Ack, only once the shell reports [`Input::Appended`] for it; a step's
//! record is appended before its Delta and its Acks go out.
//!
//! Files, by concern: `sessions.rs` (admission, client ids, resync), `pushes.rs` (the checks
//! of a Push, durability), `steps.rs` (policy actions, steps, acks, shutdown), `recovery.rs`
//! (replaying a checkpoint and its log), `status.rs` (what `/api/status` shows), `input.rs`
//! (the one entry the shell and a replay use). Each has its unit tests beside it.
//!
//! Vocabulary (the same in the wire protocol and docs/protocol.md): a *client id* is the
//! string a client names itself with in Hello, kept across reconnects; a *session* is one
//! joined WebSocket connection, numbered by the core ([`SessionId`], Welcome's `session`); a
//! *connection* is a TCP connection before or without a session.

mod counters;
pub mod event;
pub mod history;
mod input;
pub mod log;
mod pushes;
mod recovery;
mod sessions;
pub mod status;
mod steps;
#[cfg(test)]
mod testkit;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::ServerConfig;
use crate::engine::{Broadcast, Selection, SelectionMode};
use crate::policy::staleness::{Normalization, WeightInput, Weighting};
use crate::policy::{Action, PushId, SessionId, SyncPolicy};
use crate::protocol::frame::{PushHeader, ValidatedPush};
use crate::protocol::message::{ClientKind, Directive, Role, ServerMessage, SessionSettings};
use crate::protocol::model::ModelLayout;
pub use counters::Counters;
use event::Event;
use history::History;
pub use input::Input;
use log::WalOp;
pub use recovery::{CheckpointParts, Recovered};
use status::EvalPoint;
pub use status::StatusInputs;

/// A push's seq may be at most this far above the client's last accepted seq (or above 0 for
/// its first push): a client, or someone using its id, cannot push seq = u64::MAX and lock the
/// client out.
pub const MAX_SEQ_GAP: u64 = 1 << 20;
/// How long a client refused as busy is asked to wait before it pushes again.
pub const BUSY_RETRY_MS: u64 = 1000;

/// What the shell must do, in order.
#[derive(Debug)]
pub enum Effect {
    /// A Join was admitted as this session (the first effect of an admitted Join: the shell
    /// attaches the session's outbox before carrying out the rest).
    Joined { session: SessionId },
    /// A Join was refused: the Hello field at fault, and why. Nothing else follows.
    Refused { field: &'static str, reason: String },
    /// What a recovery found (the first effect of [`Input::Recover`]).
    Recovered(Recovered),
    /// Make this record durable, then report [`Input::Appended`] with its `seq` (or
    /// [`Input::AppendFailed`]). Records are numbered from 1 in the order emitted.
    Append { seq: u64, op: WalOp },
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
    /// Run one aggregation step on the engine, then report [`Input::StepDone`]. Steps are
    /// reported in the order they were emitted; up to `steps_in_flight` may be outstanding,
    /// and effects after a Step do not wait for it.
    Step(StepJob),
    /// Append an event to the run's record (`/api/record`; the shell also feeds `/metrics`'
    /// histograms from it).
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
#[derive(Clone, Debug)]
pub struct StepOutcome {
    pub broadcast: Option<Broadcast>,
    pub agg_seconds: f64,
    pub topk_seconds: f64,
}

/// A joined session.
struct Session {
    client_id: String,
    kind: ClientKind,
    role: Role,
    device: Option<String>,
    joined: Duration,
    directive: Directive,
}

/// What the core keeps of a client id across its sessions.
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
    /// The id's resume secret (see `Welcome::resume_secret`), as the shell drew it for the
    /// id's first admitted session.
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

/// A resend of a push the log has not confirmed yet (a client that reconnected): answered
/// once the log holds the record, or refused if it cannot keep it.
struct Resent {
    /// The original push's record.
    record: u64,
    session: SessionId,
    seq: u64,
}

/// A push that passed every check and waits for the log to hold it.
struct Appending {
    session: SessionId,
    /// The seq the client id had before this push (restored if the log fails).
    previous_seq: Option<u64>,
    pending: Pending,
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

/// A step the engine is running, or whose record the log is appending.
struct InFlight {
    items: Vec<Pending>,
    ids: Vec<PushId>,
    inputs: Vec<WeightInput>,
    /// The weight of each push, as the step's job carries it.
    weights: Vec<f32>,
    broadcast: bool,
    follow_up: bool,
    /// A logged step replayed by a recovery: the log holds it already, so it is released
    /// without a new record (the steps a recovery forms for pushes no logged step applied are
    /// new, and are logged like any other).
    replayed: bool,
    /// Once the engine is done: the log record that must be appended before the step's
    /// Delta and Acks go out.
    applied: Option<Applied>,
}

/// A step the engine applied, waiting for the log to hold its record.
struct Applied {
    record: u64,
    /// The version the step produced.
    version: u64,
    /// The Delta to broadcast then: (base, version, frame).
    delta: Option<(u64, u64, Bytes)>,
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
    /// Accepted pushes waiting for the log, by log record number.
    appending: BTreeMap<u64, Appending>,
    /// Resends of pushes among `appending`, answered when their record settles.
    resent: Vec<Resent>,
    pending: BTreeMap<PushId, Pending>,
    unacked: HashMap<PushId, Unacked>,
    next_session: SessionId,
    next_push: PushId,
    /// Pushes a recovery or a standby's replay read from the log and no logged step applied
    /// yet, by (client id, seq): a later logged step names them so.
    replayed_pushes: HashMap<(String, u64), PushId>,
    /// The number of the next log record.
    next_record: u64,
    version: u64,
    replica_version: u64,
    /// Recent Deltas (base, version, frame), for resynchronising lagging sessions.
    deltas: VecDeque<(u64, u64, Bytes)>,
    /// When the last broadcasting step was formed, the bytes received by then, and the
    /// version it yields (`broadcast_interval_ms`).
    last_broadcast: Option<(Duration, u64, u64)>,
    /// The size of the last Delta released (what `auto` expects the next one to cost).
    last_delta_len: u64,
    counters: Counters,
    /// The evaluator's reports over the whole run (bounded, see [`History`]).
    evals: History<EvalPoint>,
    work: VecDeque<Work>,
    /// Steps handed to the engine and not yet released, oldest first (at most
    /// `steps_in_flight`). The engine finishes them in this order.
    in_flight: VecDeque<InFlight>,
    steps_in_flight: usize,
    failed: bool,
    /// Why the log confirms no writes now ([`Input::LogStalled`]): pushes are refused as busy.
    log_stalled: Option<String>,
    out: Vec<Effect>,
}

impl Machine {
    /// A machine for a model at `version` (x̂ at `replica_version`).
    pub fn new(
        cfg: Arc<ServerConfig>,
        layout: ModelLayout,
        policy: Box<dyn SyncPolicy>,
        version: u64,
        replica_version: u64,
    ) -> Self {
        Machine {
            steps_in_flight: cfg.steps_in_flight.max(1),
            weighting: cfg.weighting(),
            selection: cfg.selection,
            cfg,
            layout,
            policy,
            sessions: HashMap::new(),
            by_client_id: HashMap::new(),
            clients: HashMap::new(),
            appending: BTreeMap::new(),
            resent: Vec::new(),
            pending: BTreeMap::new(),
            unacked: HashMap::new(),
            next_session: 1,
            next_push: 1,
            replayed_pushes: HashMap::new(),
            next_record: 1,
            version,
            replica_version,
            deltas: VecDeque::new(),
            last_broadcast: None,
            last_delta_len: 0,
            counters: Counters::default(),
            evals: History::default(),
            work: VecDeque::new(),
            in_flight: VecDeque::new(),
            failed: false,
            log_stalled: None,
            out: Vec::new(),
        }
    }

    /// Lets up to `n` steps be in flight at once (at least 1; `steps_in_flight` of the
    /// configuration otherwise): step n + 1 is
    /// formed while the engine runs step n, weighted for the version it will be applied to.
    /// The engine must finish steps in the order it got them. The batches, weights and
    /// records are those a serial replay of the log gives.
    pub fn with_steps_in_flight(mut self, n: usize) -> Self {
        self.steps_in_flight = n.max(1);
        self
    }

    /// Steps handed to the engine and not yet released (their Delta and Acks sent).
    pub fn steps_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The policy may start a step now: the engine has not failed, and either no step is in
    /// flight, or fewer than the limit are and a full batch (`max_batch` pushes) is pending.
    /// The policy is polled only then ([`Input::Poll`] answers nothing otherwise): a second
    /// step is queued behind a running one only when it is as large as a step can be, so the
    /// pushes that arrive while the engine works form one batch instead of many small ones
    /// (every step costs the engine a pass over the model).
    pub fn can_step(&self) -> bool {
        !self.failed
            && (self.in_flight.is_empty()
                || (self.in_flight.len() < self.steps_in_flight && self.pending.len() >= self.cfg.max_batch))
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

    /// Whether the log confirms no writes now ([`Input::LogStalled`]).
    pub fn log_stalled(&self) -> bool {
        self.log_stalled.is_some()
    }

    /// Accepted pushes not yet aggregated (those the log is still appending included).
    pub fn pending_len(&self) -> usize {
        self.pending.len() + self.appending.len()
    }

    /// The counters the core keeps (each counted once; `/metrics` is derived from them).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// When the policy wants [`Input::Poll`] (time since start).
    pub fn next_wakeup(&self) -> Option<Duration> {
        self.policy.next_wakeup()
    }

    fn emit(&mut self, e: Effect) {
        self.out.push(e);
    }

    fn send(&mut self, session: SessionId, msg: ServerMessage) {
        self.out.push(Effect::Send { session, msg });
    }

    /// Asks the log to keep `op`; returns its record number.
    fn append(&mut self, op: WalOp) -> u64 {
        let seq = self.next_record;
        self.next_record += 1;
        self.emit(Effect::Append { seq, op });
        seq
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
}
