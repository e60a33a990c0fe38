//! The counters the core owns. `/api/status` shows them as they are and the server's `/metrics`
//! derives its Prometheus counters from them (by the difference since it last looked), so each
//! thing is counted once, here.

use std::collections::BTreeMap;

/// Totals since the server started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Pushes accepted (held by the log).
    pub accepted: u64,
    /// Pushes rejected by the core's checks.
    pub rejected: u64,
    /// What the core refused or corrected, by the field at fault: a rejected push's field,
    /// `samples_clipped` for a sample count clipped to `max_samples`, `eval` for a refused
    /// evaluation report.
    pub refusals: BTreeMap<String, u64>,
    /// Pushes aggregated, and the steps that aggregated them.
    pub aggregated: u64,
    pub steps: u64,
    /// Frame bytes of accepted pushes, and of frames sent (Deltas, snapshots).
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Engine seconds in aggregation and in broadcasts (Top-k), over all steps.
    pub agg_seconds: f64,
    pub topk_seconds: f64,
    /// Update bytes aggregated (frames).
    pub agg_bytes: u64,
}

impl Counters {
    pub(super) fn refused(&mut self, field: &str) {
        *self.refusals.entry(field.to_string()).or_default() += 1;
    }
}
