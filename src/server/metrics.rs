//! Prometheus metrics, served as text at `/metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

/// Where an update's time goes, in the order it travels. Sessions decode and send in parallel,
/// so those stages add up time across connections.
pub const STAGES: [&str; 9] =
    ["decode", "policy", "wal", "upload", "aggregate", "topk", "encode", "fanout", "send"];

/// Every metric the server exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    accepted: Counter,
    rejected: Family<ReasonLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    sessions: Gauge,
    staleness: Histogram,
    queue_depth: Gauge,
    pending: Gauge,
    aggregate_seconds: Histogram,
    topk_seconds: Histogram,
    bytes: Family<DirectionLabel, Counter>,
    version: Gauge,
    stages: Family<StageLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    engine: Family<EngineLabel, Counter>,
    engine_busy: Counter<f64, std::sync::atomic::AtomicU64>,
    coordinator_busy: Counter<f64, std::sync::atomic::AtomicU64>,
    log_bytes: Counter,
    /// The engine's totals at the last report (counters grow by the difference).
    engine_seen: Mutex<crate::engine::EngineCounters>,
    /// The core's counters at the last report.
    core_seen: Mutex<crate::core::Counters>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EngineLabel {
    what: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("sparsync");
        let accepted = Counter::default();
        r.register("updates_accepted", "Pushes accepted", accepted.clone());
        let rejected = Family::<ReasonLabel, Counter>::default();
        r.register("updates_rejected", "Pushes and frames refused, by the field at fault", rejected.clone());
        let refused = Family::<ReasonLabel, Counter>::default();
        r.register("handshakes_refused", "Connections refused at the handshake, by reason", refused.clone());
        let sessions = Gauge::default();
        r.register("sessions", "Open sessions", sessions.clone());
        let staleness = Histogram::new([0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]);
        r.register("staleness", "Staleness of aggregated updates", staleness.clone());
        let queue_depth = Gauge::default();
        r.register("queue_depth", "Messages waiting for the coordinator", queue_depth.clone());
        let pending = Gauge::default();
        r.register("pending_updates", "Accepted updates not yet aggregated", pending.clone());
        let buckets = || prometheus_client::metrics::histogram::exponential_buckets(1e-5, 4.0, 12);
        let aggregate_seconds = Histogram::new(buckets());
        r.register("aggregate_seconds", "Engine time per aggregation step", aggregate_seconds.clone());
        let topk_seconds = Histogram::new(buckets());
        r.register(
            "topk_seconds",
            "Engine time per broadcast (Top-k and replica update)",
            topk_seconds.clone(),
        );
        let bytes = Family::<DirectionLabel, Counter>::default();
        r.register("bytes", "Frame bytes received (in) and sent (out)", bytes.clone());
        let version = Gauge::default();
        r.register("model_version", "Model version t", version.clone());
        let stages = Family::<StageLabel, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        r.register(
            "stage_seconds",
            "Time per stage of an update's path: decode, policy, wal, upload, aggregate, topk, encode, \
             fanout (coordinator) and send (session writers, summed over sessions)",
            stages.clone(),
        );
        for stage in STAGES {
            let _ = stages.get_or_create(&StageLabel { stage });
        }
        let engine = Family::<EngineLabel, Counter>::default();
        r.register(
            "engine",
            "Engine work: steps, broadcasts, topk_input_passes (full passes the broadcast selections \
             made over the model delta; steady state on the GPU: one per broadcast), topk_recollections \
             (selections that needed a second pass), topk_misses (selections that ran a full radix \
             select), dispatches, submits, waits (device round \
             trips) and staging_allocations (upload buffers created)",
            engine.clone(),
        );
        let engine_busy = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        r.register(
            "engine_busy_seconds",
            "Time the engine's thread spent running steps and reads (its busy fraction is the rate)",
            engine_busy.clone(),
        );
        let coordinator_busy = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        r.register(
            "coordinator_busy_seconds",
            "Time the coordinator spent handling messages, step reports and timers (the rest it waited)",
            coordinator_busy.clone(),
        );
        let log_bytes = Counter::default();
        r.register(
            "log_bytes",
            "Bytes of records written to the write-ahead log (the file WAL, or handed to the JetStream writer)",
            log_bytes.clone(),
        );
        Self {
            registry: Mutex::new(r),
            accepted,
            rejected,
            refused,
            sessions,
            staleness,
            queue_depth,
            pending,
            aggregate_seconds,
            topk_seconds,
            bytes,
            version,
            stages,
            engine,
            engine_busy,
            coordinator_busy,
            log_bytes,
            engine_seen: Mutex::new(Default::default()),
            core_seen: Mutex::new(Default::default()),
        }
    }

    /// Reports the engine's totals (after a fall back to another engine they restart at
    /// zero; the counters keep growing).
    pub fn engine(&self, now: &crate::engine::EngineCounters) {
        let mut seen = self.engine_seen.lock().unwrap_or_else(|p| p.into_inner());
        let pairs = [
            ("steps", now.steps, seen.steps),
            ("broadcasts", now.broadcasts, seen.broadcasts),
            ("topk_input_passes", now.topk_input_passes, seen.topk_input_passes),
            ("topk_recollections", now.topk_recollections, seen.topk_recollections),
            ("topk_misses", now.topk_misses, seen.topk_misses),
            ("dispatches", now.dispatches, seen.dispatches),
            ("submits", now.submits, seen.submits),
            ("waits", now.waits, seen.waits),
            ("staging_allocations", now.staging_allocations, seen.staging_allocations),
        ];
        for (what, new, old) in pairs {
            let delta = if new >= old { new - old } else { new };
            self.engine.get_or_create(&EngineLabel { what }).inc_by(delta);
        }
        *seen = *now;
    }

    /// The engine thread's busy time so far (the counter follows it).
    pub fn engine_busy(&self, total: std::time::Duration) {
        let (now, seen) = (total.as_secs_f64(), self.engine_busy.get());
        if now > seen {
            self.engine_busy.inc_by(now - seen);
        }
    }

    /// The log's bytes so far (the counter follows it).
    pub fn log_bytes(&self, total: u64) {
        let seen = self.log_bytes.get();
        if total > seen {
            self.log_bytes.inc_by(total - seen);
        }
    }

    /// Adds `d` to the coordinator's busy time.
    pub fn coordinator_busy(&self, d: std::time::Duration) {
        self.coordinator_busy.inc_by(d.as_secs_f64());
    }

    /// Adds `d` to a stage's time (`stage` is one of [`STAGES`]).
    pub fn stage(&self, stage: &'static str, d: std::time::Duration) {
        self.stages.get_or_create(&StageLabel { stage }).inc_by(d.as_secs_f64());
    }

    /// Seconds spent so far in each stage of [`STAGES`], in path order.
    pub fn stage_seconds(&self) -> Vec<super::status::StageTime> {
        STAGES
            .iter()
            .map(|&stage| super::status::StageTime {
                stage,
                seconds: self.stages.get_or_create(&StageLabel { stage }).get(),
            })
            .collect()
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
    }
    pub fn refused(&self, reason: &str) {
        self.refused.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
    }
    pub fn session_opened(&self) {
        self.sessions.inc();
    }
    pub fn session_closed(&self) {
        self.sessions.dec();
    }
    /// Follows the core's counters: each Prometheus counter grows by what the core counted
    /// since the last call.
    pub fn core(&self, now: &crate::core::Counters) {
        let mut seen = self.core_seen.lock().unwrap_or_else(|p| p.into_inner());
        self.accepted.inc_by(now.accepted.saturating_sub(seen.accepted));
        let bytes = |direction| self.bytes.get_or_create(&DirectionLabel { direction });
        bytes("in").inc_by(now.bytes_in.saturating_sub(seen.bytes_in));
        bytes("out").inc_by(now.bytes_out.saturating_sub(seen.bytes_out));
        for (reason, &n) in &now.refusals {
            let old = seen.refusals.get(reason).copied().unwrap_or(0);
            if n > old {
                self.rejected.get_or_create(&ReasonLabel { reason: reason.clone() }).inc_by(n - old);
            }
        }
        *seen = now.clone();
    }

    /// What an event of the core's record adds: a step's version, times and staleness.
    pub fn event(&self, e: &crate::core::event::Event) {
        if let crate::core::event::Event::Aggregate { version, items, agg_seconds, topk_seconds, .. } = e {
            self.version.set(*version as i64);
            self.aggregate_seconds.observe(*agg_seconds);
            self.topk_seconds.observe(*topk_seconds);
            for i in items {
                self.staleness.observe(i.staleness as f64);
            }
        }
    }
    pub fn queues(&self, queue_depth: usize, pending: usize) {
        self.queue_depth.set(queue_depth as i64);
        self.pending.set(pending as i64);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String cannot fail");
        out
    }
}
