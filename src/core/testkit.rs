//! What the core's unit tests share: a machine on a tiny model, pushes, and a log that plays
//! the shell's part (it carries out [`Effect::Append`] and reports back, as the server does).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use half::f16;

use super::log::WalOp;
use super::status::{Status, StatusInputs};
use super::{Effect, Machine, StepJob, StepOutcome};
use crate::config::{PolicyKind, ServerConfig};
use crate::engine::Broadcast;
use crate::policy::SessionId;
use crate::protocol::PROTOCOL_VERSION;
use crate::protocol::frame::{DeltaHeader, PushHeader, PushLimits, ValidatedPush, encode_push};
use crate::protocol::message::{ClientKind, Hello, Role, ServerMessage};
use crate::protocol::model::ModelLayout;

pub const MODEL: &str = "flat-64";

/// A configuration for `policy` on the tiny model, with one step in flight (the unit tests
/// drive the engine's part one step at a time unless they ask for more).
pub fn config(policy: PolicyKind, edit: impl FnOnce(&mut ServerConfig)) -> Arc<ServerConfig> {
    let mut c = ServerConfig { policy, model: MODEL.into(), steps_in_flight: 1, ..Default::default() };
    edit(&mut c);
    Arc::new(c)
}

pub fn machine(cfg: &Arc<ServerConfig>) -> Machine {
    let layout = ModelLayout::builtin(MODEL).unwrap();
    let policy = cfg.policy.build(&cfg.policies, &cfg.policy_common());
    Machine::new(cfg.clone(), layout, policy, 0, 0)
}

pub fn hello(client_id: &str, role: Role) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION as u32,
        client_id: client_id.into(),
        token: None,
        kind: ClientKind::Synthetic,
        model: MODEL.into(),
        role,
        device: None,
        resume_secret: None,
    }
}

pub fn push_with(seq: u64, base_version: u64, samples: u32) -> ValidatedPush {
    let header = PushHeader { base_version, seq, samples, local_steps: 1, loss: 0.5, nnz: 2 };
    let frame = encode_push(&header, &[3, 7], &[f16::from_f32(0.25), f16::from_f32(-1.0)]);
    ValidatedPush::decode(frame.into(), &PushLimits { num_params: 64, max_nnz: 64 }).unwrap()
}

pub fn push(seq: u64, base_version: u64) -> ValidatedPush {
    push_with(seq, base_version, 1)
}

pub fn t(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

pub fn join(m: &mut Machine, client_id: &str) -> SessionId {
    m.join_as(t(0), hello(client_id, Role::Trainer), false).unwrap().0
}

/// (client id, seq, weight) of each push of a logged step, and its broadcast flag.
pub type LoggedItems = (Vec<(String, u64, f32)>, bool);

/// The machine's `/api/status`, with an idle CPU engine and empty outboxes.
pub fn status(m: &Machine) -> Status {
    let engine = crate::engine::cpu::CpuAggregator::new(vec![0.0; 4], Default::default());
    let inputs = StatusInputs {
        engine: crate::engine::Aggregator::info(&engine),
        stages: vec![],
        staleness_histogram: vec![],
    };
    m.status(t(2), inputs, |_| (false, 0))
}

/// The log, as a test plays it.
pub trait Log {
    fn keep(&mut self, op: &WalOp) -> Result<(), String>;
}

/// A log that keeps nothing and always succeeds (a server without `--wal`).
pub struct NoLog;

impl Log for NoLog {
    fn keep(&mut self, _: &WalOp) -> Result<(), String> {
        Ok(())
    }
}

/// A log that keeps every record, in order.
#[derive(Default)]
pub struct KeepLog {
    pub ops: Vec<WalOp>,
}

impl Log for KeepLog {
    fn keep(&mut self, op: &WalOp) -> Result<(), String> {
        self.ops.push(op.clone());
        Ok(())
    }
}

/// A log that records what it was given, and can be made to fail.
#[derive(Default)]
pub struct MemLog {
    pub pushes: Vec<(String, usize)>,
    pub steps: Vec<LoggedItems>,
    pub fail: bool,
}

impl Log for MemLog {
    fn keep(&mut self, op: &WalOp) -> Result<(), String> {
        match op {
            WalOp::Push(_) if self.fail => Err("disk full".into()),
            WalOp::Push(p) => {
                self.pushes.push((p.client_id.clone(), p.frame.len()));
                Ok(())
            }
            WalOp::Step(s) => {
                self.steps.push((s.items.clone(), s.broadcast));
                Ok(())
            }
        }
    }
}

impl Machine {
    /// Joins with a secret made from the session number (a test needs no CSPRNG).
    pub fn join_as(
        &mut self,
        now: Duration,
        hello: Hello,
        proven: bool,
    ) -> Result<(SessionId, Vec<Effect>), super::sessions::JoinRefusal> {
        let secret = format!("{:032x}", 0x5ec0_0000 + self.next_session);
        self.join(now, hello, proven, secret)
    }

    /// Carries out the [`Effect::Append`]s of `fx` on `log` as the server does (each one as it
    /// comes, what it brings after what is left), and returns the other effects in order.
    pub fn settle(&mut self, now: Duration, fx: Vec<Effect>, log: &mut dyn Log) -> Vec<Effect> {
        let mut queue: VecDeque<Effect> = fx.into();
        let mut out = Vec::new();
        while let Some(e) = queue.pop_front() {
            match e {
                Effect::Append { seq, op } => {
                    let more = match log.keep(&op) {
                        Ok(()) => self.appended(now, seq),
                        Err(why) => self.append_failed(now, seq, &why),
                    };
                    queue.extend(more);
                }
                other => out.push(other),
            }
        }
        out
    }

    pub fn push_logged(
        &mut self,
        now: Duration,
        session: SessionId,
        push: ValidatedPush,
        log: &mut dyn Log,
    ) -> Vec<Effect> {
        let fx = self.push(now, session, push);
        self.settle(now, fx, log)
    }

    pub fn step_done_logged(
        &mut self,
        now: Duration,
        outcome: Result<StepOutcome, String>,
        log: &mut dyn Log,
    ) -> Vec<Effect> {
        let fx = self.step_done(now, outcome);
        self.settle(now, fx, log)
    }
}

/// What the engine would answer to a step: the next Delta when the step broadcasts.
pub fn outcome(m: &Machine, job: &StepJob) -> StepOutcome {
    let v = m.version();
    let broadcast = job.broadcast.map(|_| Broadcast {
        header: DeltaHeader { base_version: m.replica_version(), version: v + 1, nnz: 0 },
        frame: vec![0; 24],
        exact: true,
    });
    StepOutcome { broadcast, agg_seconds: 0.0, topk_seconds: 0.0 }
}

/// The engine finishes `job` and the log keeps its record.
pub fn done(m: &mut Machine, job: &StepJob, log: &mut dyn Log) -> Vec<Effect> {
    let r = outcome(m, job);
    m.step_done_logged(t(1), Ok(r), log)
}

pub fn acks(effects: &[Effect]) -> Vec<(SessionId, u64, u64, u64)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { session, msg: ServerMessage::Ack(a) } => {
                Some((*session, a.seq, a.version, a.staleness))
            }
            _ => None,
        })
        .collect()
}

pub fn rejects(effects: &[Effect]) -> Vec<(u64, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { msg: ServerMessage::Reject(r), .. } => Some((r.seq, r.field.clone())),
            _ => None,
        })
        .collect()
}

/// A push under a policy that aggregates when polled (ASP): push, poll, finish the step.
/// Returns every effect on the way.
pub fn cycle(m: &mut Machine, session: SessionId, p: ValidatedPush, log: &mut dyn Log) -> Vec<Effect> {
    let mut fx = m.push_logged(t(1), session, p, log);
    if let Some(more) = m.poll(t(1)) {
        fx.extend(more);
    }
    if let Some(Effect::Step(job)) = fx.last() {
        let more = done(m, job, log);
        fx.extend(more);
    }
    fx
}

pub fn step_of(effects: &[Effect]) -> Option<&StepJob> {
    let steps: Vec<&StepJob> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Step(j) => Some(j),
            _ => None,
        })
        .collect();
    assert!(steps.len() <= 1, "at most one step per batch of effects");
    if steps.len() == 1 {
        assert!(matches!(effects.last(), Some(Effect::Step(_))), "a step is the last effect of its batch");
    }
    steps.first().copied()
}
