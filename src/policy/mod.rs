//! Synchronization policies (docs/algorithms.md §5): *when* updates form a batch, *whether* a client
//! may go on, and *what* each client is told.
//!
//! A policy is pure logic over a clock: the coordinator calls it with the time since the server
//! started and executes the [`Action`]s it returns. No sockets, no GPU, no runtime; tests drive
//! time by passing it.
//!
//! Each policy is one file, `src/policy/<name>.rs`: the policy, its settings (declared with
//! `settings!`: flags, TOML keys, defaults and help), how it is built ([`Policy`]), its status
//! (`state()`) and its tests; and one arm of the `policies!` registry below, from which
//! [`PolicyKind`], `--policy` and [`PolicySettings`] (every policy's settings) are generated.

pub mod staleness;

use std::time::Duration;

use crate::protocol::message::{Directive, RoundTime, SkipReport};
use crate::settings::{Invalid, Settings};
use staleness::Normalization;

/// The registry of policies: one arm per policy, `Variant => module::Type`, whose doc comment is
/// the policy's line in `--help`. The module is `src/policy/<module>.rs` and its name is the
/// policy's name (`--policy`, TOML, `/api/status`), so `Variant` is that name capitalised (serde
/// and clap lowercase it; `a_policy_has_one_name_everywhere` checks); `Type` implements
/// [`Policy`].
macro_rules! policies {
    ($( $(#[doc = $doc:literal])* $variant:ident => $module:ident :: $ty:ident, )+) => {
        $( pub mod $module; )+

        /// Synchronization policy (docs/algorithms.md §5).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
        #[serde(rename_all = "lowercase")]
        pub enum PolicyKind {
            $( $(#[doc = $doc])* $variant, )+
        }

        impl PolicyKind {
            /// Every policy, in the registry's order.
            pub const ALL: &[PolicyKind] = &[$(Self::$variant),+];

            /// The policy's name: its file's.
            pub fn name(self) -> &'static str {
                match self {
                    $( Self::$variant => stringify!($module), )+
                }
            }

            /// Builds this policy from its settings.
            pub fn build(self, settings: &PolicySettings, common: &Common) -> Box<dyn SyncPolicy> {
                match self {
                    $( Self::$variant => Box::new(<$module::$ty as Policy>::build(&settings.$module, common)), )+
                }
            }
        }

        /// Every policy's own settings, each group from its file (flattened: the TOML keys and
        /// flags are the fields' names). The server's config holds all of them, whichever policy
        /// runs.
        ///
        /// Unknown keys are refused here: this is the only group flattened into `ServerConfig`,
        /// so the keys that reach it are exactly those `ServerConfig` does not know, and the
        /// policies' groups take theirs (serde's `deny_unknown_fields` on `ServerConfig` itself
        /// would not see through the nested flattening).
        #[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct PolicySettings {
            $( #[serde(flatten)] pub $module: <$module::$ty as Policy>::Settings, )+
        }

        #[derive(clap::Args, Clone, Debug, Default)]
        pub struct PolicyFlags {
            $( #[command(flatten)] pub $module: <<$module::$ty as Policy>::Settings as Settings>::Flags, )+
        }

        impl Settings for PolicySettings {
            type Flags = PolicyFlags;
            fn apply(&mut self, flags: PolicyFlags) {
                $( self.$module.apply(flags.$module); )+
            }
        }

        impl PolicySettings {
            /// Checks every policy's settings (a config file may set any of them).
            pub fn validate(&self) -> Result<(), Invalid> {
                $( <$module::$ty as Policy>::validate(&self.$module)?; )+
                Ok(())
            }
        }

        policies!(@help $($module),+);
    };
    (@help $first:ident $(, $rest:ident)*) => {
        /// The help of `--policy`: every policy by name, in the registry's order.
        macro_rules! policy_help {
            () => { concat!("Synchronization policy: ", stringify!($first) $(, ", ", stringify!($rest))*) };
        }
        pub(crate) use policy_help;
    };
}

policies! {
    /// Bulk synchronous: one update from every active client per round, with a deadline.
    Bsp => bsp::Bsp,
    /// Asynchronous: every update as soon as possible (what queued while busy is one batch).
    Asp => asp::Asp,
    /// Stale synchronous: no client more than `ssp_bound` pushes ahead of the slowest.
    Ssp => ssp::Ssp,
    /// Buffered asynchronous: aggregate every `fedbuff_k` updates.
    Fedbuff => fedbuff::FedBuff,
    /// ADSP: equal commit counts per check period, per-client commit intervals.
    Adsp => adsp::Adsp,
    /// Hermes: clients push only significant updates; the server equalises round times.
    Hermes => hermes::Hermes,
}

/// The settings outside a policy's own group that policies may use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Common {
    /// Most updates aggregated in one step (`max_batch`).
    pub max_batch: usize,
}

/// What the registry needs of a policy: its settings and how it is built from them.
pub trait Policy: SyncPolicy + Sized + 'static {
    /// Its own settings, declared with `settings!` in its file.
    type Settings: Settings
        + Clone
        + std::fmt::Debug
        + PartialEq
        + serde::Serialize
        + serde::de::DeserializeOwned;
    fn build(settings: &Self::Settings, common: &Common) -> Self;
    /// Checks ranges that the types do not.
    fn validate(_settings: &Self::Settings) -> Result<(), Invalid> {
        Ok(())
    }
}

/// A session, as numbered by the coordinator.
pub type SessionId = u64;
/// An accepted Push waiting in the coordinator, as numbered by the coordinator.
pub type PushId = u64;

/// Where a loss sample came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossSource {
    /// The training loss a client sent with a Push.
    Push(SessionId),
    /// An evaluator's score of the public replica (held-out data).
    Evaluator,
}

/// What a policy knows of an accepted Push.
#[derive(Clone, Debug, PartialEq)]
pub struct PushMeta {
    pub id: PushId,
    pub session: SessionId,
    pub seq: u64,
    pub base_version: u64,
    /// Staleness at acceptance.
    pub staleness: u64,
    pub samples: u32,
    pub local_steps: u32,
    pub loss: f32,
}

#[cfg(test)]
impl PushMeta {
    /// A push for policy tests: seq = id, built on version 0, fresh, one sample, loss 1.
    pub(crate) fn for_test(id: PushId, session: SessionId) -> Self {
        PushMeta {
            id,
            session,
            seq: id,
            base_version: 0,
            staleness: 0,
            samples: 1,
            local_steps: 1,
            loss: 1.0,
        }
    }
}

/// What the coordinator must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Aggregate these accepted pushes as one batch, in this order, then broadcast.
    Aggregate {
        pushes: Vec<PushId>,
        normalization: Normalization,
    },
    /// Let the client go on: send the Ack of this push.
    Ack(PushId),
    /// Tell a client it was dropped from a synchronous round.
    RoundDropped {
        session: SessionId,
        round: u64,
        reason: String,
    },
    Directive {
        session: SessionId,
        directive: Directive,
    },
}

/// A synchronization policy. Only trainers are reported to it (evaluators never push).
pub trait SyncPolicy: Send + Sync {
    fn name(&self) -> &'static str;
    fn on_join(&mut self, now: Duration, client: SessionId) -> Vec<Action>;
    fn on_leave(&mut self, now: Duration, client: SessionId) -> Vec<Action>;
    fn on_push(&mut self, now: Duration, push: &PushMeta) -> Vec<Action>;
    /// A batch was aggregated and broadcast as `version`.
    fn on_aggregated(&mut self, _now: Duration, _version: u64, _pushes: &[PushId]) -> Vec<Action> {
        Vec::new()
    }
    /// Hermes: a client finished a round without a significant improvement.
    fn on_skip(&mut self, _now: Duration, _client: SessionId, _report: &SkipReport) -> Vec<Action> {
        Vec::new()
    }
    /// A client reports how long its last local round took.
    fn on_round_time(&mut self, _now: Duration, _client: SessionId, _report: &RoundTime) -> Vec<Action> {
        Vec::new()
    }
    /// A sample of the global loss.
    fn on_loss(&mut self, _now: Duration, _source: LossSource, _loss: f64) {}
    /// Timers: called after every round of events and at [`SyncPolicy::next_wakeup`], whenever
    /// a step may start (`Machine::can_step` in `crate::core`).
    fn poll(&mut self, now: Duration) -> Vec<Action>;
    /// When `poll` next needs to run, if a timer is pending.
    fn next_wakeup(&self) -> Option<Duration> {
        None
    }
    /// Shutdown: aggregate every accepted push still held.
    fn drain(&mut self) -> Vec<Action>;
    /// The policy's own state, for `/api/status`.
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Splits `pushes` into `Aggregate` actions of at most `max_batch` each.
pub fn batches(pushes: Vec<PushId>, max_batch: usize, normalization: Normalization) -> Vec<Action> {
    pushes.chunks(max_batch.max(1)).map(|c| Action::Aggregate { pushes: c.to_vec(), normalization }).collect()
}

/// Accepted pushes waiting to be aggregated as soon as possible, in acceptance order: every
/// `poll` takes at most `max_batch` of them as one batch, so what queued while the engine was
/// busy forms the next batch. ASP, SSP, ADSP and Hermes aggregate this way.
#[derive(Clone, Debug)]
pub struct Ready {
    pushes: Vec<PushId>,
    max_batch: usize,
}

impl Ready {
    pub fn new(max_batch: usize) -> Self {
        Self { pushes: Vec::new(), max_batch: max_batch.max(1) }
    }

    pub fn push(&mut self, id: PushId) {
        self.pushes.push(id);
    }

    pub fn len(&self) -> usize {
        self.pushes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pushes.is_empty()
    }

    /// The oldest `max_batch` pushes as one batch, if any wait.
    pub fn next_batch(&mut self, normalization: Normalization) -> Option<Action> {
        if self.pushes.is_empty() {
            return None;
        }
        let take = self.pushes.len().min(self.max_batch);
        Some(Action::Aggregate { pushes: self.pushes.drain(..take).collect(), normalization })
    }

    /// Every waiting push, in batches of at most `max_batch` (shutdown).
    pub fn drain(&mut self, normalization: Normalization) -> Vec<Action> {
        batches(std::mem::take(&mut self.pushes), self.max_batch, normalization)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_has_one_name_everywhere() {
        let help = policy_help!();
        for &kind in PolicyKind::ALL {
            let name = kind.name();
            assert_eq!(serde_json::to_value(kind).unwrap(), name, "serde");
            let value = clap::ValueEnum::to_possible_value(&kind).unwrap();
            assert_eq!(value.get_name(), name, "clap");
            assert!(help.contains(name), "{help}");
            let built = kind.build(&PolicySettings::default(), &Common { max_batch: 8 });
            assert_eq!(built.name(), name, "SyncPolicy::name");
        }
        assert_eq!(help, "Synchronization policy: bsp, asp, ssp, fedbuff, adsp, hermes");
    }

    #[test]
    fn the_ready_queue_batches_in_acceptance_order() {
        let mut r = Ready::new(2);
        for id in [5, 3, 9] {
            r.push(id);
        }
        let agg = |v: Vec<PushId>| Action::Aggregate { pushes: v, normalization: Normalization::Batch };
        assert_eq!(r.next_batch(Normalization::Batch), Some(agg(vec![5, 3])));
        r.push(1);
        assert_eq!(r.drain(Normalization::Batch), vec![agg(vec![9, 1])]);
        assert!(r.is_empty() && r.next_batch(Normalization::Batch).is_none());
    }
}
