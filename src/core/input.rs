//! The one entry into the core: every [`Input`] the shell feeds it, and [`Machine::handle`],
//! which the server and a replay both call. A run recorded as `(now, Input)` pairs (the
//! server's tape, `server::Tape`) replays through a fresh machine alone and gives the same
//! effects.

use std::collections::BTreeMap;
use std::time::Duration;

use super::log::WalOp;
use super::{Effect, Machine, StepOutcome};
use crate::policy::SessionId;
use crate::protocol::frame::ValidatedPush;
use crate::protocol::message::{EvalReport, Hello, RoundTime, SkipReport};

/// Something that happened, as the shell tells the core.
#[derive(Clone, Debug)]
pub enum Input {
    /// Before serving: a checkpoint's client ids and seqs, then its pending pushes and its
    /// log's records, in order.
    Recover {
        last_seqs: BTreeMap<String, u64>,
        ops: Vec<WalOp>,
    },
    /// A standby following the log: records the leader appended, replayed as a recovery does
    /// but without aggregating what no logged step applied yet (the leader decides that; a
    /// later [`Input::Recover`], at takeover, does).
    Follow {
        last_seqs: BTreeMap<String, u64>,
        ops: Vec<WalOp>,
    },
    /// A connection sent Hello; `proven`: its token is the client id's own; `secret`: a resume
    /// secret the shell drew from the operating system's CSPRNG.
    Join {
        hello: Hello,
        proven: bool,
        secret: String,
    },
    /// A Push that passed the stateless checks (the session decoded and validated it).
    Push {
        session: SessionId,
        push: ValidatedPush,
    },
    /// The log holds every record up to this one.
    Appended {
        upto: u64,
    },
    /// The log could not keep this record.
    AppendFailed {
        seq: u64,
        reason: String,
    },
    /// The log stopped confirming writes (`Some`: why; its cluster is unreachable, say), or
    /// confirms them again (`None`). Meanwhile new pushes are refused as busy.
    LogStalled {
        reason: Option<String>,
    },
    /// The engine finished the oldest [`Effect::Step`] not yet reported (steps finish in the
    /// order they were emitted).
    StepDone {
        outcome: Result<StepOutcome, String>,
    },
    Leave {
        session: SessionId,
        reason: String,
    },
    /// The session's replica fell behind; it holds x̂ at `have` (if it knows).
    Resync {
        session: SessionId,
        have: Option<u64>,
    },
    /// The client asked for a snapshot.
    SnapshotRequest {
        session: SessionId,
    },
    Eval {
        session: SessionId,
        report: EvalReport,
    },
    Skip {
        session: SessionId,
        report: SkipReport,
    },
    RoundTime {
        session: SessionId,
        report: RoundTime,
    },
    /// The shell sent this many frame bytes to a session.
    Sent {
        session: SessionId,
        bytes: u64,
    },
    /// Time passed (at [`Machine::next_wakeup`], or after a round of messages): the policy
    /// may decide. No effects: it decided nothing, or no step may start now
    /// ([`Machine::can_step`]; the shell polls only when one may).
    Poll,
    /// Stop: apply and acknowledge everything accepted.
    Shutdown,
    /// Say Bye to every session.
    Farewell {
        reason: String,
    },
}

impl Machine {
    /// Handles one input at time `now` (since the server started) and returns what the shell
    /// must do, in order.
    pub fn handle(&mut self, now: Duration, input: Input) -> Vec<Effect> {
        match input {
            Input::Recover { last_seqs, ops } => {
                let (found, effects) = self.recover(now, last_seqs, ops);
                std::iter::once(Effect::Recovered(found)).chain(effects).collect()
            }
            Input::Follow { last_seqs, ops } => {
                let (found, effects) = self.follow(now, last_seqs, ops);
                std::iter::once(Effect::Recovered(found)).chain(effects).collect()
            }
            Input::Join { hello, proven, secret } => match self.join(now, hello, proven, secret) {
                Ok((session, effects)) => {
                    std::iter::once(Effect::Joined { session }).chain(effects).collect()
                }
                Err((field, reason)) => vec![Effect::Refused { field, reason }],
            },
            Input::Push { session, push } => self.push(now, session, push),
            Input::Appended { upto } => self.appended(now, upto),
            Input::AppendFailed { seq, reason } => self.append_failed(now, seq, &reason),
            Input::LogStalled { reason } => {
                self.log_stalled = reason;
                Vec::new()
            }
            Input::StepDone { outcome } => self.step_done(now, outcome),
            Input::Leave { session, reason } => self.leave(now, session, &reason),
            Input::Resync { session, have } => self.resync(session, have),
            Input::SnapshotRequest { session } => self.snapshot_request(session),
            Input::Eval { session, report } => self.eval(now, session, report),
            Input::Skip { session, report } => self.skip(now, session, report),
            Input::RoundTime { session, report } => self.round_time(now, session, report),
            Input::Sent { session, bytes } => {
                self.sent(session, bytes);
                Vec::new()
            }
            Input::Poll => self.poll(now).unwrap_or_default(),
            Input::Shutdown => self.shutdown(now),
            Input::Farewell { reason } => self.farewell(&reason),
        }
    }
}
