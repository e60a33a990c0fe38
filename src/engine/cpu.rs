//! `CpuAggregator`: the reference engine, and the fallback when no GPU adapter exists.
//!
//! It follows `protocol::numerics` operation for operation; the GPU engine's deterministic mode
//! is tested to produce the same bits.
//!
//! Work is split by parameter range, never by update: the model is cut into tiles of [`TILE`]
//! parameters (the tile's sums, x and momentum fit a core's L2 cache), and each tile, on
//! whichever thread takes it, adds every update's entries in its range in batch order (the
//! indices of an update ascend, so its range is found by binary search) and then applies the
//! sum. Every parameter therefore sees exactly the operations, in exactly the order, of a
//! single thread: the result does not depend on the thread count. The broadcast's exact Top-k
//! estimates a threshold from a sample, collects the entries that reach it in one parallel
//! pass over x and x̂, and selects among those (all entries when the sample guessed too high).

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::{
    Aggregator, Broadcast, EngineError, EngineInfo, ModelState, OptimizerSettings, Selection, UpdateRef,
};
use crate::protocol::frame::{DeltaHeader, encode_delta};
use crate::protocol::model::SplitMix64;
use crate::protocol::numerics::{self, add, canon, mul};
use crate::protocol::select::{self, exact_topk};

/// Parameters per tile: 32,768 (128 KiB of sums, as much of x, of momentum).
pub const TILE: usize = 1 << 15;
/// Batches with fewer entries (and no momentum) run on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// The reference aggregation engine.
pub struct CpuAggregator {
    x: Vec<f32>,
    momentum: Vec<f32>,
    replica: Vec<f32>,
    acc: Vec<f32>,
    version: u64,
    replica_version: u64,
    opt: OptimizerSettings,
    /// The global index of `x[0]`: a shard holds the key range [offset, offset + len) and
    /// reads pushes with global indices (0 for a whole model).
    offset: usize,
    /// Worker threads (None: the calling thread does everything).
    pool: Option<rayon::ThreadPool>,
    threads: usize,
    // Reused scratch: magnitude keys, selection work space, selected indices, candidates.
    keys: Vec<u32>,
    scratch: Vec<u32>,
    selected: Vec<u32>,
    cand_idx: Vec<u32>,
    cand_keys: Vec<u32>,
    sample: Vec<u32>,
    rng: SplitMix64,
    encode_time: std::time::Duration,
    counters: super::EngineCounters,
}

/// The f32 value of entry e of a packed f16 array.
#[inline(always)]
fn value_at(values: &[u8], e: usize) -> f32 {
    f16::from_le_bytes([values[2 * e], values[2 * e + 1]]).to_f32()
}

#[inline(always)]
fn index_at(indices: &[u8], e: usize) -> u32 {
    u32::from_le_bytes([indices[4 * e], indices[4 * e + 1], indices[4 * e + 2], indices[4 * e + 3]])
}

/// The first entry of an update whose index is at least `bound`.
fn lower_bound(indices: &[u8], bound: usize) -> usize {
    let (mut lo, mut hi) = (0, indices.len() / 4);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if (index_at(indices, mid) as usize) < bound {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

#[inline(always)]
fn apply_one(x: &mut f32, u: f32, eta: f32) {
    if u != 0.0 {
        let step = if eta == 1.0 { u } else { mul(eta, u) };
        *x = add(*x, step);
    }
}

/// One tile's step: the batch's entries in [start, start + acc.len()) added into `acc` in
/// batch order, then applied to `x` (and `m`, which is empty when momentum is off). `values`
/// is scratch for widened f16 values.
fn step_tile(
    batch: &[UpdateRef<'_>],
    start: usize,
    acc: &mut [f32],
    x: &mut [f32],
    m: &mut [f32],
    opt: OptimizerSettings,
    values: &mut Vec<f32>,
) {
    let end = start + acc.len();
    let mut ranges = Vec::with_capacity(batch.len());
    let mut entries = 0;
    for u in batch {
        let (lo, hi) = (lower_bound(u.indices, start), lower_bound(u.indices, end));
        ranges.push((lo, hi));
        entries += hi - lo;
        if hi == lo {
            continue;
        }
        let (w_hi, w_lo) = numerics::split_weight(u.weight);
        // Widen the values in bulk (SIMD F16C where the CPU has it), then the loop is loads,
        // two multiplies and two adds.
        let raw = &u.values[2 * lo..2 * hi];
        values.clear();
        values.resize(hi - lo, 0.0);
        match bytemuck::try_cast_slice::<u8, f16>(raw) {
            Ok(h) => h.convert_to_f32_slice(values),
            Err(_) => values.iter_mut().enumerate().for_each(|(j, v)| *v = value_at(raw, j)),
        }
        let raw_idx = &u.indices[4 * lo..4 * hi];
        match bytemuck::try_cast_slice::<u8, u32>(raw_idx) {
            Ok(idx) if cfg!(target_endian = "little") => {
                for (&i, &v) in idx.iter().zip(values.iter()) {
                    let a = &mut acc[i as usize - start];
                    *a = numerics::accumulate(*a, w_hi, w_lo, v);
                }
            }
            _ => {
                for (e, &v) in values.iter().enumerate() {
                    let a = &mut acc[index_at(raw_idx, e) as usize - start];
                    *a = numerics::accumulate(*a, w_hi, w_lo, v);
                }
            }
        }
    }
    let eta = opt.server_lr;
    if !m.is_empty() {
        let mu = opt.momentum;
        for ((x, m), a) in x.iter_mut().zip(m.iter_mut()).zip(acc.iter_mut()) {
            let u = add(mul(mu, *m), std::mem::take(a));
            *m = u;
            apply_one(x, u, eta);
        }
    } else if entries * 8 > acc.len() {
        // Dense enough: one sweep of the tile (an entry's sum applies once; the others are 0),
        // branch-free so that it vectorises.
        apply_dense(x, acc, eta);
    } else {
        // Sparse: visit the touched entries through the batch's indices. An entry seen twice
        // has acc = 0 the second time, so it is applied once.
        for (u, &(lo, hi)) in batch.iter().zip(&ranges) {
            let raw_idx = &u.indices[4 * lo..4 * hi];
            let mut visit = |i: u32| {
                let i = i as usize - start;
                let g = std::mem::take(&mut acc[i]);
                apply_one(&mut x[i], g, eta);
            };
            match bytemuck::try_cast_slice::<u8, u32>(raw_idx) {
                Ok(idx) if cfg!(target_endian = "little") => idx.iter().for_each(|&i| visit(i)),
                _ => (0..hi - lo).for_each(|e| visit(index_at(raw_idx, e))),
            }
        }
    }
}

/// `apply_one` over a whole tile, every sum taken (set to 0): where the sum is 0, x keeps its
/// value, as in `apply_one`. Written without branches so that the compiler vectorises it.
fn apply_dense(x: &mut [f32], acc: &mut [f32], eta: f32) {
    if eta == 1.0 {
        for (x, a) in x.iter_mut().zip(acc.iter_mut()) {
            let g = std::mem::take(a);
            let moved = add(*x, g);
            *x = if g != 0.0 { moved } else { *x };
        }
    } else {
        for (x, a) in x.iter_mut().zip(acc.iter_mut()) {
            let g = std::mem::take(a);
            let moved = add(*x, mul(eta, g));
            *x = if g != 0.0 { moved } else { *x };
        }
    }
}

/// The magnitude key of d = x − x̂ for one parameter.
#[inline(always)]
fn d_key(x: f32, replica: f32) -> u32 {
    numerics::magnitude_key(canon(x - replica))
}

/// `keys[i] = d_key(x[i], replica[i])` over the whole model, tile by tile on `pool`.
fn fill_keys(pool: Option<&rayon::ThreadPool>, keys: &mut Vec<u32>, x: &[f32], replica: &[f32]) {
    keys.resize(x.len(), 0);
    let tile = |(k, (x, r)): (&mut [u32], (&[f32], &[f32]))| {
        k.iter_mut().zip(x).zip(r).for_each(|((k, &x), &r)| *k = d_key(x, r));
    };
    match pool {
        Some(p) => p.install(|| {
            keys.par_chunks_mut(TILE).zip(x.par_chunks(TILE).zip(replica.par_chunks(TILE))).for_each(tile)
        }),
        None => keys.chunks_mut(TILE).zip(x.chunks(TILE).zip(replica.chunks(TILE))).for_each(tile),
    }
}

/// The entries of one tile whose d = x − x̂ has a key of at least `t`: (indices, keys).
fn collect_tile(start: usize, x: &[f32], replica: &[f32], t: u32) -> (Vec<u32>, Vec<u32>) {
    let (mut idx, mut keys) = (Vec::new(), Vec::new());
    for (j, (&x, &r)) in x.iter().zip(replica).enumerate() {
        let key = d_key(x, r);
        if key >= t {
            idx.push((start + j) as u32);
            keys.push(key);
        }
    }
    (idx, keys)
}

/// A pool of `threads` workers named `name-i`, or None for one thread (or when the system
/// gives none; the caller then does the work itself).
pub(crate) fn worker_pool(threads: usize, name: &'static str) -> Option<rayon::ThreadPool> {
    if threads <= 1 {
        return None;
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .map_err(|e| tracing::warn!(error = %e, "no worker threads for {name}: running on one"))
        .ok()
}

/// Models smaller than this run on one thread by default (see [`CpuAggregator::default_threads`]).
pub const PARALLEL_MODEL_MIN: usize = 1 << 19;

impl CpuAggregator {
    /// An engine holding `x` (and x̂ = x) at version 0, on [`Self::default_threads`].
    pub fn new(initial: Vec<f32>, opt: OptimizerSettings) -> Self {
        let threads = Self::default_threads(initial.len());
        Self::with_threads(initial, opt, threads)
    }

    /// Threads for a model of `n` parameters: every core from [`PARALLEL_MODEL_MIN`] parameters on,
    /// else one. On a small model a pass takes tens of microseconds, less than waking the
    /// workers; on a machine whose cores are busy with clients (the demo: 9 client processes
    /// on 2 cores), the wake-ups waited for a time slice and a 101,770-parameter broadcast took
    /// ~2.4 ms instead of ~0.1 ms.
    pub fn default_threads(n: usize) -> usize {
        if n < PARALLEL_MODEL_MIN {
            1
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }

    /// An engine on `threads` threads (1: the calling thread alone). The results are the same
    /// for every thread count.
    pub fn with_threads(initial: Vec<f32>, opt: OptimizerSettings, threads: usize) -> Self {
        let x: Vec<f32> = initial.into_iter().map(canon).collect();
        let n = x.len();
        let threads = threads.max(1);
        let pool = worker_pool(threads, "sparsync-cpu");
        let threads = if pool.is_some() { threads } else { 1 };
        Self {
            replica: x.clone(),
            acc: vec![0.0; n],
            momentum: if opt.momentum != 0.0 { vec![0.0; n] } else { Vec::new() },
            x,
            version: 0,
            replica_version: 0,
            opt,
            offset: 0,
            pool,
            threads,
            keys: Vec::new(),
            scratch: Vec::new(),
            selected: Vec::new(),
            cand_idx: Vec::new(),
            cand_keys: Vec::new(),
            sample: Vec::new(),
            rng: SplitMix64::new(0x70C_5EED),
            encode_time: std::time::Duration::ZERO,
            counters: super::EngineCounters::default(),
        }
    }

    /// Threads the engine works on.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// This engine holds the key range [offset, offset + len) of a larger model: pushes keep
    /// their global indices, and only the entries in the range are applied (a shard of
    /// [`super::sharded::ShardedAggregator`]).
    /// Only the shard methods below know the offset: `Aggregator::broadcast` on such an
    /// engine would send local indices.
    pub(crate) fn at_offset(mut self, offset: usize) -> Self {
        self.offset = offset;
        self
    }

    /// The exact Top-k of |d| in this engine's range, as (magnitude key, global index), in
    /// ascending index order: a shard's candidates for the global selection.
    pub fn top_candidates(&mut self, k: usize) -> Vec<(u32, u32)> {
        let k = k.min(self.x.len());
        if k == 0 {
            return Vec::new();
        }
        self.exact_selection(k);
        self.selected
            .iter()
            .map(|&i| {
                (d_key(self.x[i as usize], self.replica[i as usize]), (self.offset + i as usize) as u32)
            })
            .collect()
    }

    /// Applies the broadcast of the given global indices (ascending, all in this engine's
    /// range) to x̂ and returns their f16 values: the second half of
    /// [`Aggregator::broadcast`], after a selection made across shards.
    pub fn apply_selection(&mut self, global: &[u32]) -> Vec<f16> {
        self.counters.broadcasts += 1;
        let mut values = Vec::with_capacity(global.len());
        for &g in global {
            let i = g as usize - self.offset;
            let h: f16 = numerics::to_f16_sat(self.d(i));
            let r = &mut self.replica[i];
            *r = numerics::apply_delta_entry(*r, h);
            values.push(h);
        }
        self.replica_version = self.version;
        values
    }

    fn d(&self, i: usize) -> f32 {
        canon(self.x[i] - self.replica[i])
    }

    /// The exact Top-k of |d| into `self.selected`: from the candidates that reach a sampled
    /// threshold (one pass over x and x̂), or from all keys when the sample guessed too high.
    fn exact_selection(&mut self, k: usize) {
        let n = self.x.len();
        let (x, r) = (&self.x, &self.replica);
        let t = select::sampled_threshold(n, k, &mut self.rng, &mut self.sample, &mut self.scratch, |i| {
            d_key(x[i], r[i])
        });
        if let Some(t) = t {
            let collect = |(i, (x, r)): (usize, (&[f32], &[f32]))| collect_tile(i * TILE, x, r, t);
            let parts: Vec<(Vec<u32>, Vec<u32>)> = match &self.pool {
                Some(p) => p.install(|| {
                    x.par_chunks(TILE).zip(r.par_chunks(TILE)).enumerate().map(collect).collect()
                }),
                None => x.chunks(TILE).zip(r.chunks(TILE)).enumerate().map(collect).collect(),
            };
            self.cand_idx.clear();
            self.cand_keys.clear();
            for (i, k) in parts {
                self.cand_idx.extend(i);
                self.cand_keys.extend(k);
            }
            self.counters.topk_input_passes += 1;
            if self.cand_idx.len() >= k {
                select::topk_of_candidates(
                    &self.cand_idx,
                    &self.cand_keys,
                    k,
                    &mut self.scratch,
                    &mut self.selected,
                );
                return;
            }
            self.counters.topk_misses += 1;
        }
        fill_keys(self.pool.as_ref(), &mut self.keys, x, r);
        exact_topk(&self.keys, k, &mut self.scratch, &mut self.selected);
        // d to keys, the histogram, the bucket's keys, the emitting pass.
        self.counters.topk_input_passes += 4;
    }
}

impl Aggregator for CpuAggregator {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            kind: "cpu".into(),
            adapter: "cpu".into(),
            backend: "native".into(),
            mode: format!(
                "deterministic, {} thread{}",
                self.threads,
                if self.threads == 1 { "" } else { "s" }
            ),
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
        let (opt, offset) = (self.opt, self.offset);
        let (acc, x, m) = (&mut self.acc, &mut self.x, &mut self.momentum);
        let tile = |(i, (acc, x)): (usize, (&mut [f32], &mut [f32])), m: &mut [f32], v: &mut Vec<f32>| {
            step_tile(batch, offset + i * TILE, acc, x, m, opt, v)
        };
        // A small batch is not worth waking the workers for.
        let entries: usize = batch.iter().map(|u| u.nnz()).sum();
        let pool = self.pool.as_ref().filter(|_| entries >= PARALLEL_MIN || !m.is_empty());
        match (pool, m.is_empty()) {
            (Some(p), true) => p.install(|| {
                acc.par_chunks_mut(TILE)
                    .zip(x.par_chunks_mut(TILE))
                    .enumerate()
                    .for_each_init(Vec::new, |v, t| tile(t, &mut [], v))
            }),
            (Some(p), false) => p.install(|| {
                acc.par_chunks_mut(TILE)
                    .zip(x.par_chunks_mut(TILE))
                    .enumerate()
                    .zip(m.par_chunks_mut(TILE))
                    .for_each_init(Vec::new, |v, (t, m)| tile(t, m, v))
            }),
            (None, _) => {
                let mut v = Vec::new();
                let mut ms = m.chunks_mut(TILE);
                for t in acc.chunks_mut(TILE).zip(x.chunks_mut(TILE)).enumerate() {
                    tile(t, ms.next().unwrap_or(&mut []), &mut v);
                }
            }
        }
        self.version += 1;
        self.counters.steps += 1;
        Ok(())
    }

    fn broadcast(&mut self, selection: Selection) -> Result<Broadcast, EngineError> {
        let n = self.x.len();
        let k = selection.k().min(n);
        self.counters.broadcasts += 1;
        let exact = match selection {
            Selection::Exact { .. } => {
                self.exact_selection(k);
                true
            }
            Selection::GaussianK { .. } => {
                self.selected.clear();
                fill_keys(self.pool.as_ref(), &mut self.keys, &self.x, &self.replica);
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

impl super::SelectProbe for CpuAggregator {
    fn select_only(&mut self, k: usize) -> usize {
        self.exact_selection(k.min(self.x.len()));
        self.selected.len()
    }
}
