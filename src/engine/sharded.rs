//! A model split by key range across several engines (shards), as parameter servers have
//! split theirs since ps-lite: shard s owns the contiguous range [bᵢ, bᵢ₊₁) of the flat
//! parameter vector, with its own x, x̂ and momentum.
//!
//! A step hands every shard the whole batch: each finds its part of each push by binary search
//! on the push's ascending indices and applies it in batch order, so every entry gets the
//! additions, in the order, of the one-engine path. Shards run at once, on a pool of one
//! worker per shard.
//!
//! The broadcast's exact Top-k is split the same way. Each shard selects its own k best
//! entries of d = x − x̂ by the one total order of the selection (magnitude key descending,
//! index ascending); the global k best are among those, and the merge takes them in that
//! order. Each shard then applies the chosen entries of its range to x̂. The Delta is
//! bit-identical to the one a single engine sends (`tests/sharded.rs`). GaussianK's global
//! threshold cannot be split exactly; a sharded engine refuses it.

use half::f16;

use super::cpu::CpuAggregator;
use super::{
    Aggregator, Broadcast, EngineCounters, EngineError, EngineInfo, ModelState, Selection, UpdateRef,
};
use crate::protocol::frame::{DeltaHeader, encode_delta};

/// Shards hold whole tiles of the CPU engine where the model allows (any boundary gives the
/// same bits; aligned ones keep each tile's work in one shard).
const ALIGN: usize = super::cpu::TILE;

/// N CPU engines, each owning a contiguous key range.
pub struct ShardedAggregator {
    shards: Vec<CpuAggregator>,
    /// Shard s owns [bounds[s], bounds[s + 1]).
    bounds: Vec<usize>,
    version: u64,
    replica_version: u64,
    threads_per_shard: usize,
    /// One worker per shard, kept between steps (None: one shard, or no threads to be had).
    pool: Option<rayon::ThreadPool>,
    encode_time: std::time::Duration,
    /// Time spent merging the shards' candidates (a broadcast's only serial part).
    merge_time: std::time::Duration,
}

/// The range boundaries of `n` parameters over `shards` shards: the model's [`ALIGN`]-sized
/// tiles dealt out as evenly as whole tiles allow (some shards are empty when the model has
/// fewer tiles than shards).
pub fn bounds(n: usize, shards: usize) -> Vec<usize> {
    let shards = shards.max(1);
    let tiles = n.div_ceil(ALIGN);
    (0..=shards).map(|s| (s * tiles / shards * ALIGN).min(n)).collect()
}

impl ShardedAggregator {
    /// `shards` engines over `initial`, each on `threads_per_shard` threads.
    pub fn new(
        initial: Vec<f32>,
        opt: super::OptimizerSettings,
        shards: usize,
        threads_per_shard: usize,
    ) -> Self {
        let b = bounds(initial.len(), shards);
        let parts = b
            .windows(2)
            .map(|w| {
                CpuAggregator::with_threads(initial[w[0]..w[1]].to_vec(), opt, threads_per_shard)
                    .at_offset(w[0])
            })
            .collect();
        let pool = super::cpu::worker_pool(shards, "sparsync-shard");
        Self {
            shards: parts,
            pool,
            bounds: b,
            version: 0,
            replica_version: 0,
            threads_per_shard: threads_per_shard.max(1),
            encode_time: std::time::Duration::ZERO,
            merge_time: std::time::Duration::ZERO,
        }
    }

    /// The shards' key ranges.
    pub fn ranges(&self) -> Vec<std::ops::Range<usize>> {
        self.bounds.windows(2).map(|w| w[0]..w[1]).collect()
    }

    /// Runs `f` on every shard at once (on the shards' pool), results in shard order.
    fn each<T: Send>(&mut self, f: impl Fn(usize, &mut CpuAggregator) -> T + Sync) -> Vec<T> {
        use rayon::prelude::*;
        match &self.pool {
            Some(p) => p.install(|| self.shards.par_iter_mut().enumerate().map(|(i, s)| f(i, s)).collect()),
            None => self.shards.iter_mut().enumerate().map(|(i, s)| f(i, s)).collect(),
        }
    }
}

/// The global k best of the shards' candidates, by (key descending, index ascending), returned
/// per shard in ascending index order. Each shard's list is its own k best in index order:
/// the k-th best overall is found by selection, and each list keeps, in its order, the
/// entries that rank at or above it (the order is total, so exactly k do).
pub fn merge_top_k(candidates: &[Vec<(u32, u32)>], k: usize) -> Vec<Vec<u32>> {
    let total: usize = candidates.iter().map(Vec::len).sum();
    let k = k.min(total);
    if k == 0 {
        return vec![Vec::new(); candidates.len()];
    }
    // Rank order: a before b when a's key is larger, or equal with a lower index.
    let before = |a: &(u32, u32), b: &(u32, u32)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
    let mut all: Vec<(u32, u32)> = candidates.iter().flatten().copied().collect();
    let (_, kth, _) = all.select_nth_unstable_by(k - 1, before);
    let kth = *kth;
    candidates
        .iter()
        .map(|c| c.iter().filter(|e| before(e, &kth).is_le()).map(|&(_, idx)| idx).collect())
        .collect()
}

impl Aggregator for ShardedAggregator {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            kind: "cpu".into(),
            adapter: "cpu".into(),
            backend: "native".into(),
            mode: format!(
                "deterministic, {} shards × {} thread{}",
                self.shards.len(),
                self.threads_per_shard,
                if self.threads_per_shard == 1 { "" } else { "s" }
            ),
        }
    }

    fn num_params(&self) -> usize {
        self.bounds.last().copied().unwrap_or(0)
    }

    fn version(&self) -> u64 {
        self.version
    }

    fn replica_version(&self) -> u64 {
        self.replica_version
    }

    fn aggregate(&mut self, batch: &[UpdateRef<'_>]) -> Result<(), EngineError> {
        for r in self.each(|_, s| s.aggregate(batch)) {
            r?;
        }
        self.version += 1;
        Ok(())
    }

    fn broadcast(&mut self, selection: Selection) -> Result<Broadcast, EngineError> {
        let k = match selection {
            Selection::Exact { k } => k.min(self.num_params()),
            Selection::GaussianK { .. } => {
                return Err(EngineError::Unsupported(
                    "GaussianK selection with several shards: its global threshold cannot be split exactly \
                     (use --selection exact, or one shard)"
                        .into(),
                ));
            }
        };
        let candidates = self.each(|_, s| s.top_candidates(k));
        let t0 = std::time::Instant::now();
        let chosen = merge_top_k(&candidates, k);
        self.merge_time += t0.elapsed();
        let values: Vec<Vec<f16>> = self.each(|i, s| s.apply_selection(&chosen[i]));
        let indices: Vec<u32> = chosen.into_iter().flatten().collect();
        let header = DeltaHeader {
            version: self.version,
            base_version: self.replica_version,
            nnz: indices.len() as u32,
        };
        self.replica_version = self.version;
        let t1 = std::time::Instant::now();
        let values: Vec<f16> = values.into_iter().flatten().collect();
        let frame = encode_delta(&header, &indices, &values);
        self.encode_time += t1.elapsed();
        Ok(Broadcast { header, frame, exact: true })
    }

    fn read_replica(&mut self) -> Result<Vec<f32>, EngineError> {
        let mut out = Vec::with_capacity(self.num_params());
        for s in &mut self.shards {
            out.extend(s.read_replica()?);
        }
        Ok(out)
    }

    fn read_state(&mut self) -> Result<ModelState, EngineError> {
        let mut state = ModelState {
            x: Vec::with_capacity(self.num_params()),
            momentum: Vec::new(),
            replica: Vec::with_capacity(self.num_params()),
            version: self.version,
            replica_version: self.replica_version,
        };
        for s in &mut self.shards {
            let part = s.read_state()?;
            state.x.extend(part.x);
            state.momentum.extend(part.momentum);
            state.replica.extend(part.replica);
        }
        Ok(state)
    }

    fn load_state(&mut self, state: &ModelState) -> Result<(), EngineError> {
        let n = self.num_params();
        for len in [state.x.len(), state.replica.len()] {
            if len != n {
                return Err(EngineError::StateSize { expected: n, got: len });
            }
        }
        let ranges = self.ranges();
        for (s, r) in self.shards.iter_mut().zip(ranges) {
            let momentum =
                if state.momentum.len() == n { state.momentum[r.clone()].to_vec() } else { Vec::new() };
            s.load_state(&ModelState {
                x: state.x[r.clone()].to_vec(),
                momentum,
                replica: state.replica[r].to_vec(),
                version: state.version,
                replica_version: state.replica_version,
            })?;
        }
        self.version = state.version;
        self.replica_version = state.replica_version;
        Ok(())
    }

    fn take_stage_times(&mut self) -> super::StageTimes {
        for s in &mut self.shards {
            let _ = s.take_stage_times();
        }
        super::StageTimes {
            upload: std::time::Duration::ZERO,
            encode: std::mem::take(&mut self.encode_time) + std::mem::take(&mut self.merge_time),
        }
    }

    fn counters(&self) -> EngineCounters {
        let mut c = EngineCounters::default();
        for s in &self.shards {
            let p = s.counters();
            c.steps = c.steps.max(p.steps);
            c.broadcasts = c.broadcasts.max(p.broadcasts);
            c.topk_input_passes += p.topk_input_passes;
            c.topk_recollections += p.topk_recollections;
            c.topk_misses += p.topk_misses;
        }
        c
    }
}

impl super::SelectProbe for ShardedAggregator {
    /// The exact selection across shards (each shard's k best, then the merge), without
    /// applying it: what `bench topk` times.
    fn select_only(&mut self, k: usize) -> usize {
        let k = k.min(self.num_params());
        let candidates = self.each(|_, s| s.top_candidates(k));
        merge_top_k(&candidates, k).iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_cover_the_model_in_whole_tiles_and_leave_trailing_shards_empty() {
        assert_eq!(bounds(4 * ALIGN, 2), [0, 2 * ALIGN, 4 * ALIGN]);
        assert_eq!(bounds(3 * ALIGN + 5, 2), [0, 2 * ALIGN, 3 * ALIGN + 5]);
        // Six tiles (the last one short) over five shards: every shard owns keys.
        let n = 5 * ALIGN + 1_234;
        assert_eq!(bounds(n, 5), [0, ALIGN, 2 * ALIGN, 3 * ALIGN, 4 * ALIGN, n]);
        // Fewer tiles than shards: some shards own nothing.
        assert_eq!(bounds(100, 3), [0, 0, 0, 100]);
        assert_eq!(bounds(0, 2), [0, 0, 0]);
    }

    #[test]
    fn the_merge_takes_ties_to_the_lower_index_across_shards() {
        // Keys: shard 0 has (9 @ 5) and (7 @ 1); shard 1 has (9 @ 10), (7 @ 12), (7 @ 11).
        let c = vec![vec![(7, 1), (9, 5)], vec![(9, 10), (7, 11), (7, 12)], vec![]];
        assert_eq!(merge_top_k(&c, 2), [vec![5], vec![10], vec![]]);
        // Third place: a tie at key 7 between indices 1, 11 and 12 goes to 1, then 11.
        assert_eq!(merge_top_k(&c, 4), [vec![1, 5], vec![10, 11], vec![]]);
        // k beyond what there is: everything.
        assert_eq!(merge_top_k(&c, 99), [vec![1, 5], vec![10, 11, 12], vec![]]);
        assert!(merge_top_k(&c, 0).iter().all(Vec::is_empty));
    }
}
