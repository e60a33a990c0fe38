//! `CpuAggregator`: the reference engine, and the fallback when no GPU adapter exists.
//!
//! It follows `protocol::numerics` operation for operation; the GPU engine's deterministic mode
//! is tested to produce the same bits.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::select::{self, exact_topk};
use super::{
    Aggregator, Broadcast, EngineError, EngineInfo, ModelState, OptimizerSettings, Selection, UpdateRef,
};
use crate::protocol::frame::{DeltaHeader, encode_delta};
use crate::protocol::numerics::{self, add, canon, mul};

/// The reference aggregation engine.
pub struct CpuAggregator {
    x: Vec<f32>,
    momentum: Vec<f32>,
    replica: Vec<f32>,
    acc: Vec<f32>,
    version: u64,
    replica_version: u64,
    opt: OptimizerSettings,
    // Reused scratch: magnitude keys, selection work space, selected indices, d values.
    keys: Vec<u32>,
    scratch: Vec<u32>,
    selected: Vec<u32>,
    /// One update's values widened to f32.
    values: Vec<f32>,
    encode_time: std::time::Duration,
    counters: super::EngineCounters,
}

impl CpuAggregator {
    /// An engine holding `x` (and x̂ = x) at version 0.
    pub fn new(initial: Vec<f32>, opt: OptimizerSettings) -> Self {
        let x: Vec<f32> = initial.into_iter().map(canon).collect();
        let n = x.len();
        Self {
            replica: x.clone(),
            acc: vec![0.0; n],
            momentum: if opt.momentum != 0.0 { vec![0.0; n] } else { Vec::new() },
            x,
            version: 0,
            replica_version: 0,
            opt,
            keys: Vec::new(),
            scratch: Vec::new(),
            selected: Vec::new(),
            values: Vec::new(),
            encode_time: std::time::Duration::ZERO,
            counters: super::EngineCounters::default(),
        }
    }

    /// Accumulates a batch into `acc` in batch order (the deterministic order).
    fn accumulate(&mut self, batch: &[UpdateRef<'_>]) {
        for u in batch {
            let (hi, lo) = numerics::split_weight(u.weight);
            // Widen the values in bulk (SIMD F16C where the CPU has it) rather than one call
            // per element; then the scatter loop is loads, two multiplies and two adds.
            let nnz = u.values.len() / 2;
            self.values.clear();
            self.values.resize(nnz, 0.0);
            match bytemuck::try_cast_slice::<u8, f16>(u.values) {
                Ok(h) => h.convert_to_f32_slice(&mut self.values),
                Err(_) => {
                    for (dst, v) in self.values.iter_mut().zip(u.values.chunks_exact(2)) {
                        *dst = f16::from_le_bytes([v[0], v[1]]).to_f32();
                    }
                }
            }
            for (c, &v) in u.indices.chunks_exact(4).zip(&self.values) {
                let i = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
                let a = &mut self.acc[i];
                *a = numerics::accumulate(*a, hi, lo, v);
            }
        }
    }

    #[inline(always)]
    fn apply_one(x: &mut f32, u: f32, eta: f32) {
        if u != 0.0 {
            let step = if eta == 1.0 { u } else { mul(eta, u) };
            *x = add(*x, step);
        }
    }

    fn d(&self, i: usize) -> f32 {
        canon(self.x[i] - self.replica[i])
    }
}

impl Aggregator for CpuAggregator {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            kind: "cpu".into(),
            adapter: "cpu".into(),
            backend: "native".into(),
            mode: "deterministic".into(),
        }
    }

    fn num_params(&self) -> usize {
        self.x.len()
    }

    fn version(&self) -> u64 {
        self.version
    }

    fn replica_version(&self) -> u64 {
        self.replica_version
    }

    fn aggregate(&mut self, batch: &[UpdateRef<'_>]) -> Result<(), EngineError> {
        self.accumulate(batch);
        let eta = self.opt.server_lr;
        if self.opt.momentum == 0.0 {
            // Only touched entries can change: visit them through the batch's indices. An entry
            // seen twice has acc = 0 the second time, so it is applied once.
            for u in batch {
                for c in u.indices.chunks_exact(4) {
                    let i = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
                    let g = std::mem::take(&mut self.acc[i]);
                    Self::apply_one(&mut self.x[i], g, eta);
                }
            }
        } else {
            let mu = self.opt.momentum;
            for ((x, m), a) in self.x.iter_mut().zip(self.momentum.iter_mut()).zip(self.acc.iter_mut()) {
                let u = add(mul(mu, *m), std::mem::take(a));
                *m = u;
                Self::apply_one(x, u, eta);
            }
        }
        self.version += 1;
        self.counters.steps += 1;
        Ok(())
    }

    fn broadcast(&mut self, selection: Selection) -> Result<Broadcast, EngineError> {
        let n = self.x.len();
        let k = selection.k().min(n);
        self.keys.clear();
        self.keys
            .extend(self.x.iter().zip(&self.replica).map(|(&x, &r)| numerics::magnitude_key(canon(x - r))));
        self.counters.broadcasts += 1;
        let exact = match selection {
            Selection::Exact { .. } => {
                exact_topk(&self.keys, k, &mut self.scratch, &mut self.selected);
                // d to keys, the histogram, the bucket's keys, the emitting pass.
                self.counters.topk_input_passes += 4;
                true
            }
            Selection::GaussianK { .. } => {
                self.selected.clear();
                if k > 0 {
                    let (mean, std) = mean_std((0..n).map(|i| self.d(i) as f64));
                    let t0 = select::gaussiank_threshold(mean, std, k, n);
                    let keys = &self.keys;
                    let count = |t: f64| keys.iter().filter(|&&key| f32::from_bits(key) as f64 > t).count();
                    let t = select::gaussiank_refine(t0, k, count);
                    self.counters.topk_input_passes += 4;
                    self.selected
                        .extend((0..n as u32).filter(|&i| f32::from_bits(self.keys[i as usize]) as f64 > t));
                }
                false
            }
        };
        let mut values = Vec::with_capacity(self.selected.len());
        for &i in &self.selected {
            let h: f16 = numerics::to_f16_sat(self.d(i as usize));
            let r = &mut self.replica[i as usize];
            *r = numerics::apply_delta_entry(*r, h);
            values.push(h);
        }
        let header = DeltaHeader {
            version: self.version,
            base_version: self.replica_version,
            nnz: self.selected.len() as u32,
        };
        self.replica_version = self.version;
        let t0 = std::time::Instant::now();
        let frame = encode_delta(&header, &self.selected, &values);
        self.encode_time += t0.elapsed();
        Ok(Broadcast { header, frame, exact })
    }

    fn read_replica(&mut self) -> Result<Vec<f32>, EngineError> {
        Ok(self.replica.clone())
    }

    fn read_state(&mut self) -> Result<ModelState, EngineError> {
        Ok(ModelState {
            x: self.x.clone(),
            momentum: self.momentum.clone(),
            replica: self.replica.clone(),
            version: self.version,
            replica_version: self.replica_version,
        })
    }

    fn counters(&self) -> super::EngineCounters {
        self.counters
    }

    fn take_stage_times(&mut self) -> super::StageTimes {
        super::StageTimes { upload: std::time::Duration::ZERO, encode: std::mem::take(&mut self.encode_time) }
    }

    fn load_state(&mut self, s: &ModelState) -> Result<(), EngineError> {
        let n = self.x.len();
        for len in [s.x.len(), s.replica.len()] {
            if len != n {
                return Err(EngineError::StateSize { expected: n, got: len });
            }
        }
        self.x = s.x.iter().copied().map(canon).collect();
        self.replica = s.replica.iter().copied().map(canon).collect();
        if self.opt.momentum != 0.0 {
            self.momentum = if s.momentum.len() == n {
                s.momentum.iter().copied().map(canon).collect()
            } else {
                vec![0.0; n]
            };
        }
        self.version = s.version;
        self.replica_version = s.replica_version;
        Ok(())
    }
}

/// Mean and population standard deviation, accumulated in f64.
pub fn mean_std(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut n, mut sum, mut sq) = (0u64, 0.0, 0.0);
    for v in values {
        n += 1;
        sum += v;
        sq += v * v;
    }
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = sum / n as f64;
    (mean, (sq / n as f64 - mean * mean).max(0.0).sqrt())
}
