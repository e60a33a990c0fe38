//! What the core asks the log to keep ([`Effect::Append`](super::Effect::Append)) and what a
//! recovery reads back: accepted pushes and applied steps, in order. The log itself (none, the
//! local file WAL) is the shell's; the core only learns how far it got
//! ([`Machine::appended`](super::Machine::appended)).

use bytes::Bytes;

/// An accepted push that was not aggregated yet.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingPush {
    pub client_id: String,
    pub frame: Bytes,
}

/// One record of the write-ahead log: an accepted push, or an aggregation step that was applied
/// (which pushes, with which weights, and whether a Delta was broadcast after it).
#[derive(Clone, Debug, PartialEq)]
pub enum WalOp {
    Push(PendingPush),
    Step(LoggedStep),
}

/// An applied aggregation step, as the log holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedStep {
    /// (client id, seq, weight) of each push, in the order they were aggregated.
    pub items: Vec<(String, u64, f32)>,
    pub broadcast: bool,
}
