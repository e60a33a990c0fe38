//! What `/api/status` reports: the machine's view ([`Machine::status`]) plus what the shell
//! adds (the engine, stage times, the staleness histogram, outboxes).

use std::time::Duration;

use serde::Serialize;

use super::Machine;

use crate::engine::EngineInfo;
use crate::policy::SessionId;
use crate::protocol::message::{ClientKind, Directive, Role, SessionSettings};

/// One connected client.
#[derive(Clone, Debug, Serialize)]
pub struct ClientStatus {
    pub session: SessionId,
    pub client_id: String,
    pub kind: ClientKind,
    pub role: Role,
    pub device: Option<String>,
    pub connected_s: f64,
    pub accepted: u64,
    pub rejected: u64,
    /// Pushes of this client that were aggregated.
    pub commits: u64,
    pub bytes_in: u64,
    /// Frame bytes sent to this client (Deltas, snapshots).
    pub bytes_out: u64,
    pub last_staleness: u64,
    /// Mean staleness of this client's aggregated pushes.
    pub mean_staleness: f64,
    pub last_loss: f32,
    pub lagging: bool,
    pub queued_bytes: u64,
    /// The settings the policy gave this client.
    pub directive: Directive,
}

/// Time spent in one stage of an update's path (as `/metrics`' `sparsync_stage_seconds`).
#[derive(Clone, Debug, Serialize)]
pub struct StageTime {
    pub stage: &'static str,
    pub seconds: f64,
}

/// The server's state, as `/api/status` serves it.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub model: String,
    pub params: u64,
    /// Model version t.
    pub version: u64,
    /// Public replica version (what clients hold).
    pub replica_version: u64,
    pub uptime_s: f64,
    pub engine: EngineInfo,
    pub policy: String,
    pub policy_state: serde_json::Value,
    pub settings: SessionSettings,
    pub clients: Vec<ClientStatus>,
    pub accepted: u64,
    pub rejected: u64,
    pub aggregated: u64,
    pub steps: u64,
    pub pending: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Seconds spent in aggregation kernels (engine.aggregate) and in broadcast (Top-k).
    pub aggregate_seconds: f64,
    pub topk_seconds: f64,
    /// Update bytes aggregated (indices and values).
    pub aggregate_bytes: u64,
    /// The evaluator's reports over the whole run: every report until there are 512, then
    /// evenly thinned (every 2nd, 4th, … report; see `core::history`), always ending with the
    /// newest.
    pub evals: Vec<EvalPoint>,
    /// How many reports the evaluator made in all.
    pub evals_seen: u64,
    /// Seconds per stage of an update's path since the start (decode … send).
    pub stages: Vec<StageTime>,
    /// Aggregated updates per staleness (last bucket: 65 and more).
    pub staleness_histogram: Vec<u64>,
}

impl Status {
    /// The status before the coordinator's first publication.
    pub fn empty(layout: &crate::protocol::model::ModelLayout, engine: &EngineInfo) -> Self {
        Self {
            model: layout.name.clone(),
            params: layout.num_params() as u64,
            version: 0,
            replica_version: 0,
            uptime_s: 0.0,
            engine: engine.clone(),
            policy: String::new(),
            policy_state: serde_json::Value::Null,
            settings: SessionSettings {
                policy: String::new(),
                rho_up: 0.0,
                rho_down: 0.0,
                max_staleness: 0,
                max_nnz: 0,
                max_frame_bytes: 0,
                max_delta_chain: 0,
                max_push_rate: 0.0,
            },
            clients: Vec::new(),
            accepted: 0,
            rejected: 0,
            aggregated: 0,
            steps: 0,
            pending: 0,
            bytes_in: 0,
            bytes_out: 0,
            aggregate_seconds: 0.0,
            topk_seconds: 0.0,
            aggregate_bytes: 0,
            evals: Vec::new(),
            evals_seen: 0,
            stages: Vec::new(),
            staleness_histogram: Vec::new(),
        }
    }
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

/// Everything `/api/status` needs that the machine does not own.
pub struct StatusInputs {
    pub engine: EngineInfo,
    pub stages: Vec<StageTime>,
    pub staleness_histogram: Vec<u64>,
}

impl Machine {
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
        let c = &self.counters;
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
            pending: self.pending_len() as u64,
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
