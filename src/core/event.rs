//! What the core records of what happened: joins, accepted and refused pushes, acks, batches
//! and their weights ([`Effect::Record`](super::Effect::Record)). `session` is the session number
//! (Welcome's `session`); a Join names the session's client id. Policy tests check their
//! invariants on it; the server keeps the newest of them for `/api/record`.

use serde::{Deserialize, Serialize};

use crate::policy::{PushId, SessionId};
use crate::protocol::message::{ClientKind, Directive, Role};

/// One push inside an aggregation step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AggregatedPush {
    pub push: PushId,
    pub session: SessionId,
    pub seq: u64,
    /// t − τ when aggregated.
    pub staleness: u64,
    pub weight: f32,
    /// Seconds between acceptance and aggregation.
    pub waited: f64,
}

/// One thing that happened; `t` is seconds since the server started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Join {
        t: f64,
        session: SessionId,
        client_id: String,
        role: Role,
        kind: ClientKind,
    },
    Leave {
        t: f64,
        session: SessionId,
        reason: String,
    },
    Accept {
        t: f64,
        session: SessionId,
        push: PushId,
        seq: u64,
        base_version: u64,
        staleness: u64,
        samples: u32,
        local_steps: u32,
        loss: f32,
        nnz: u32,
        bytes: u64,
    },
    Reject {
        t: f64,
        session: SessionId,
        seq: u64,
        field: String,
        reason: String,
    },
    Ack {
        t: f64,
        session: SessionId,
        push: PushId,
        seq: u64,
    },
    Aggregate {
        t: f64,
        /// The version this step produced.
        version: u64,
        items: Vec<AggregatedPush>,
        agg_seconds: f64,
        topk_seconds: f64,
        /// Entries in the Delta broadcast after this step (none if it did not broadcast).
        delta_nnz: Option<u64>,
    },
    RoundDropped {
        t: f64,
        session: SessionId,
        round: u64,
        reason: String,
    },
    Directive {
        t: f64,
        session: SessionId,
        directive: Directive,
    },
    /// An evaluator's score, with the server's frame byte counters at that moment.
    Eval {
        t: f64,
        session: SessionId,
        version: u64,
        accuracy: f64,
        loss: f64,
        bytes_in: u64,
        bytes_out: u64,
    },
    Skip {
        t: f64,
        session: SessionId,
        round: u64,
        loss: f64,
    },
}
