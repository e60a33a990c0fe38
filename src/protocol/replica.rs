//! The public replica x̂ as a client holds it: a Snapshot, then Deltas applied in order.

use super::frame::{DeltaView, FrameError, SnapshotView};
use super::numerics;

/// Why a frame could not be applied to the replica.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReplicaError {
    #[error("delta applies to version {base}, replica is at {have}: a snapshot is needed")]
    Gap { have: u64, base: u64 },
    #[error("no snapshot received yet")]
    NoSnapshot,
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A replica of the server's public model x̂.
#[derive(Clone, Debug)]
pub struct Replica {
    values: Vec<f32>,
    version: Option<u64>,
}

impl Replica {
    pub fn new(num_params: usize) -> Self {
        Self { values: vec![0.0; num_params], version: None }
    }

    /// The version held, or `None` before the first snapshot.
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Replaces the values with a Snapshot's.
    pub fn apply_snapshot_frame(&mut self, frame: &[u8]) -> Result<u64, ReplicaError> {
        let s = SnapshotView::decode(frame, self.values.len() as u64)?;
        s.read_into(&mut self.values);
        self.version = Some(s.version);
        Ok(s.version)
    }

    /// Applies a Delta frame; the Delta must start at the version held.
    pub fn apply_delta_frame(&mut self, frame: &[u8]) -> Result<u64, ReplicaError> {
        let d = DeltaView::decode(frame, self.values.len() as u64)?;
        self.apply_delta(&d)
    }

    pub fn apply_delta(&mut self, d: &DeltaView<'_>) -> Result<u64, ReplicaError> {
        let have = self.version.ok_or(ReplicaError::NoSnapshot)?;
        if d.header.base_version != have {
            return Err(ReplicaError::Gap { have, base: d.header.base_version });
        }
        for (i, h) in d.entries() {
            let x = &mut self.values[i as usize];
            *x = numerics::apply_delta_entry(*x, h);
        }
        self.version = Some(d.header.version);
        Ok(d.header.version)
    }

    /// FNV-1a over the values' bits: a cheap fingerprint to compare replicas.
    pub fn checksum(&self) -> u64 {
        checksum(&self.values)
    }
}

/// FNV-1a 64 over the little-endian bytes of `values` (the browser client computes the same).
pub fn checksum(values: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}
