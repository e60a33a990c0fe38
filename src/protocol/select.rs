//! Selection of broadcast entries, shared by the engines and the clients: exact Top-k by magnitude
//! and GaussianK.
//!
//! Both return the selected indices in ascending order. The GPU kernels implement the same
//! definitions (`shaders/topk.wgsl`), and tests compare them.

/// Exact Top-k of `keys` (magnitude keys, see `numerics::magnitude_key`): the k largest, ties
/// resolved to the lower index, returned in index order. `scratch` is reused between calls.
pub fn exact_topk(keys: &[u32], k: usize, scratch: &mut Vec<u32>, out: &mut Vec<u32>) {
    out.clear();
    let n = keys.len();
    let k = k.min(n);
    if k == 0 {
        return;
    }
    if k == n {
        out.extend(0..n as u32);
        return;
    }
    let (threshold, take_equal) = kth_largest(keys, k, scratch);
    let mut taken_equal = 0usize;
    for (i, &key) in keys.iter().enumerate() {
        if key > threshold {
            out.push(i as u32);
        } else if key == threshold && taken_equal < take_equal {
            out.push(i as u32);
            taken_equal += 1;
        }
    }
    debug_assert_eq!(out.len(), k);
}

/// The k-th largest key T and how many keys equal to T belong to the Top-k (1 ≤ k < n).
///
/// Radix select, like the GPU kernel: a histogram of the top 11 key bits finds the bucket that
/// holds the k-th key, and only that bucket's keys are selected further (`scratch` holds them).
pub fn kth_largest(keys: &[u32], k: usize, scratch: &mut Vec<u32>) -> (u32, usize) {
    let mut hist = [0u32; 2048];
    for &key in keys {
        hist[(key >> 21) as usize] += 1;
    }
    let mut above = 0usize;
    let mut bucket = 0;
    for b in (0..2048).rev() {
        let c = hist[b] as usize;
        if above + c >= k {
            bucket = b;
            break;
        }
        above += c;
    }
    scratch.clear();
    scratch.extend(keys.iter().copied().filter(|&key| (key >> 21) as usize == bucket));
    let need = k - above;
    let (_, &mut t, _) = scratch.select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
    let above_t = above + scratch.iter().filter(|&&key| key > t).count();
    (t, k - above_t)
}

/// Below this many entries a sampled threshold does not pay for itself.
pub const SAMPLED_MIN: usize = 1 << 14;
/// Entries a threshold is estimated from.
pub const SAMPLE: usize = 4096;
/// Consecutive entries per stratum of the sample.
const SAMPLE_RUN: usize = 8;
/// The magnitude key of +∞ (every larger key is a NaN's).
pub const INF_KEY: u32 = 0x7F80_0000;

/// A magnitude-key threshold that about 1.05 k + 3 √k of n entries reach, estimated from a
/// stratified sample of [`SAMPLE`] keys: [`SAMPLE_RUN`] consecutive entries at a random place in
/// each of SAMPLE / SAMPLE_RUN equal strata (`key_at(i)` gives entry i's key). None when the
/// selection is too small or too large for a sample to help (n < [`SAMPLED_MIN`], k ≥ n / 8),
/// or when the threshold would let a large share through. The threshold is at least 1 (a
/// threshold of 0 would take every entry).
///
/// Used with [`topk_of_candidates`]: every entry of the exact Top-k has a key at least the
/// k-th largest, which is ≥ the threshold whenever k entries reach it, so the Top-k of the
/// entries that reach it is the exact Top-k of all of them.
pub fn sampled_threshold(
    n: usize,
    k: usize,
    rng: &mut crate::protocol::model::SplitMix64,
    sample: &mut Vec<u32>,
    scratch: &mut Vec<u32>,
    key_at: impl Fn(usize) -> u32,
) -> Option<u32> {
    if n < SAMPLED_MIN || k == 0 || k >= n / 8 {
        return None;
    }
    let strata = SAMPLE / SAMPLE_RUN;
    let stride = n / strata;
    sample.clear();
    for j in 0..strata {
        let offset = ((rng.next_u64() >> 32) * (stride - SAMPLE_RUN) as u64) >> 32;
        let at = j * stride + offset as usize;
        sample.extend((at..at + SAMPLE_RUN).map(&key_at));
    }
    let expected = k as f64 * SAMPLE as f64 / n as f64;
    let rank = (1.05 * expected + 3.0 * expected.sqrt() + 3.0).ceil() as usize;
    if rank >= SAMPLE / 8 {
        return None;
    }
    let (t, _) = kth_largest(sample, rank, scratch);
    // With that many zeros, take the nonzero entries and let the caller's exact pass settle
    // the rest if they are fewer than k. A NaN threshold (that many NaNs) is left to it too.
    (t <= INF_KEY).then_some(t.max(1))
}

/// The exact Top-k of entries given as candidates (their indices, ascending, and their keys):
/// `out` gets the chosen indices in ascending order (ties to the lower index). The candidates
/// must hold every entry whose key is at least the k-th largest of all entries.
pub fn topk_of_candidates(
    indices: &[u32],
    keys: &[u32],
    k: usize,
    scratch: &mut Vec<u32>,
    out: &mut Vec<u32>,
) {
    exact_topk(keys, k, scratch, out);
    for s in out.iter_mut() {
        *s = indices[*s as usize];
    }
}

/// The standard normal quantile Φ⁻¹(p), Acklam's rational approximation (relative error
/// below 1.2e-9 on (0, 1): far finer than any threshold needs).
pub fn normal_quantile(p: f64) -> f64 {
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
    let low = 0.024_25;
    if p < low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    }
}

/// Refinements GaussianK may make to its threshold (docs/algorithms.md §3).
pub const GAUSSIANK_MAX_REFINEMENTS: usize = 3;

/// Starting GaussianK threshold for density ρ = k / n from the mean and standard deviation of d.
pub fn gaussiank_threshold(mean: f64, std: f64, k: usize, n: usize) -> f64 {
    let rho = (k as f64 / n as f64).clamp(f64::MIN_POSITIVE, 1.0);
    (mean + std * normal_quantile(1.0 - rho / 2.0)).max(0.0)
}

/// Runs the GaussianK refinement given a way to count entries with |d| > threshold; returns
/// the final threshold.
pub fn gaussiank_refine(mut threshold: f64, k: usize, mut count_above: impl FnMut(f64) -> usize) -> f64 {
    for _ in 0..GAUSSIANK_MAX_REFINEMENTS {
        let c = count_above(threshold);
        if (c as f64) < 2.0 * k as f64 / 3.0 {
            threshold *= 0.5;
        } else if (c as f64) > 4.0 * k as f64 / 3.0 {
            threshold *= 1.5;
        } else {
            break;
        }
    }
    threshold
}

/// k = ⌈ρ · n⌉, clamped to n.
pub fn k_for_density(rho: f64, n: usize) -> usize {
    ((rho * n as f64).ceil() as usize).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(keys: &[u32], k: usize) -> Vec<u32> {
        let mut order: Vec<u32> = (0..keys.len() as u32).collect();
        order.sort_by(|&a, &b| keys[b as usize].cmp(&keys[a as usize]).then(a.cmp(&b)));
        let mut top: Vec<u32> = order[..k.min(keys.len())].to_vec();
        top.sort();
        top
    }

    #[test]
    fn exact_topk_matches_sort_with_ties() {
        let mut s = Vec::new();
        let mut out = Vec::new();
        let cases: Vec<Vec<u32>> = vec![
            vec![5, 5, 5, 5, 5],
            vec![0, 0, 0],
            vec![1, 9, 3, 9, 9, 2, 0, 9],
            (0..1000).map(|i| (i * 7919 % 101) as u32).collect(),
        ];
        for keys in &cases {
            for k in 0..=keys.len() + 1 {
                exact_topk(keys, k, &mut s, &mut out);
                assert_eq!(out, reference(keys, k), "keys {keys:?} k {k}");
            }
        }
    }

    #[test]
    fn quantile_is_accurate() {
        // Reference values from scipy.stats.norm.ppf; Acklam's relative error is below 1.2e-9.
        let close = |p: f64, want: f64| (normal_quantile(p) - want).abs() <= 1.2e-9 * want.abs().max(1e-3);
        assert!(close(0.975, 1.959_963_984_540_054));
        assert!(close(0.5, 0.0));
        assert!(close(0.9995, 3.290_526_731_491_926));
        assert!(close(0.01, -2.326_347_874_040_841));
        assert!(close(0.000_01, -4.264_890_793_922_825));
    }
}
