// topk.wgsl — select the broadcast entries of d = x − x̂ and apply them to x̂ (algorithms.md §3).
//
// Exact Top-k by magnitude is a radix select over key = bits(d) & 0x7fffffff (unsigned order of
// keys is the order of magnitudes): three digit passes (11, 11 and 9 bits) histogram the keys
// that share the resolved prefix (`hist`), and after each a single workgroup (`select`) finds
// the bucket that holds the k-th key. The result is a threshold T and how many keys equal to T
// to take (the lowest indices: ties go to the lower index). Then `count` counts per tile the
// keys above and equal to T, `scan` turns those counts into offsets, and `write` emits the
// selected (index, f16 value) pairs in index order, already laid out as a Delta body (indices,
// then values packed two per word), and adds each sent f16 value to x̂.
//
// No pass waits on another workgroup: every cross-workgroup step is a separate dispatch, so
// it is correct without forward-progress guarantees (lavapipe, NVIDIA, AMD, Intel, Apple).
//
// GaussianK (approximate): `stats` writes per-workgroup sums of d and d², `gauss_resolve`
// turns them into the starting threshold t0 = mean + std·z and `gauss_count` counts |d| above
// each threshold the refinement may try (t0·0.5^a·1.5^b, a + b ≤ 2); `gauss_final` replays the
// refinement and leaves "key > T, take none equal" for the same count/scan/write passes.
//
// Bindings (group 0), shared by every entry point:      keep in sync: gpu/topk.rs
//   0  uniform  ChunkParams (dynamic offset, one per chunk)
//   1  storage  d: array<f32>, read — this chunk's d
//   2  storage  xhat: array<f32>, read_write — this chunk's replica (written by `write`)
//   3  storage  hist: array<atomic<u32>>, read_write — 2048 buckets (GaussianK: 6 counters)
//   4  storage  state: State, read_write
//   5  storage  tiles: array<u32>, read_write — per tile: [gt counts | eq counts], then offsets;
//                GaussianK stats reuse it for per-workgroup partial sums
//   6  storage  out: array<atomic<u32>>, read_write — indices (k words), then values (⌈k/2⌉ words)

struct ChunkParams {
    n: u32,            // elements of this chunk
    base: u32,         // global index of its first element
    tile_base: u32,    // global number of its first tile
    flags: u32,        // bit 0: update x̂ in `write`
    digit: u32,        // radix digit of this pass: 0, 1 or 2
    total_tiles: u32,  // tiles over all chunks
    z: f32,            // GaussianK: Φ⁻¹(1 − ρ/2)
    k: u32,            // GaussianK: the k it aims at
}

struct State {
    prefix: u32,       // resolved high bits of the k-th key
    mask: u32,         // which bits are resolved
    k_rem: u32,        // keys still to find below the resolved prefix
    threshold: u32,    // T: every key > T is selected
    take_eq: u32,      // and the first take_eq keys == T (in index order)
    done: u32,         // T is final
    selected: u32,     // number of entries selected (after `scan`)
    partials: u32,     // GaussianK: number of partial sums in `tiles`
    mean: f32,
    stdev: f32,
    _p0: u32,
    _p1: u32,
}

const TILE_ROWS: u32 = 16u;                  // a tile is 16 rows of 256 elements
const TILE: u32 = 4096u;
const HIST_ROWS: u32 = 32u;                  // a histogram workgroup reads 32 rows
const BUCKETS: u32 = 2048u;

@group(0) @binding(0) var<uniform> p: ChunkParams;
@group(0) @binding(1) var<storage, read> d: array<f32>;
@group(0) @binding(2) var<storage, read_write> xhat: array<f32>;
@group(0) @binding(3) var<storage, read_write> hist: array<atomic<u32>>;
@group(0) @binding(4) var<storage, read_write> state: State;
@group(0) @binding(5) var<storage, read_write> tiles: array<u32>;
@group(0) @binding(6) var<storage, read_write> out: array<atomic<u32>>;

var<workgroup> local_hist: array<atomic<u32>, 2048>;
var<workgroup> flag: u32;
var<workgroup> scan_buf: array<u32, 256>;
var<workgroup> fsum: array<f32, 256>;
var<workgroup> fsum2: array<f32, 256>;

fn key_of(v: f32) -> u32 {
    return bitcast<u32>(v) & 0x7fffffffu;
}

fn digit_shift(digit: u32) -> u32 {
    return select(select(0u, 9u, digit == 1u), 20u, digit == 0u);
}

fn digit_mask(digit: u32) -> u32 {
    return select(0x7ffu, 0x1ffu, digit == 2u);
}

// Loads state.done for the whole workgroup (uniform, so barriers may follow a return on it).
fn workgroup_done(lid: u32) -> bool {
    if (lid == 0u) {
        flag = state.done;
    }
    return workgroupUniformLoad(&flag) != 0u;
}

// Inclusive scan of scan_buf over the workgroup (Hillis–Steele); returns this lane's value.
fn scan_inclusive(lid: u32, v: u32) -> u32 {
    scan_buf[lid] = v;
    workgroupBarrier();
    for (var off = 1u; off < WG; off = off * 2u) {
        var add = 0u;
        if (lid >= off) {
            add = scan_buf[lid - off];
        }
        workgroupBarrier();
        scan_buf[lid] = scan_buf[lid] + add;
        workgroupBarrier();
    }
    return scan_buf[lid];
}

@compute @workgroup_size(256)
fn hist_pass(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (workgroup_done(lid)) {
        return;
    }
    for (var b = lid; b < BUCKETS; b = b + WG) {
        atomicStore(&local_hist[b], 0u);
    }
    workgroupBarrier();
    let shift = digit_shift(p.digit);
    let dmask = digit_mask(p.digit);
    let prefix = state.prefix;
    let mask = state.mask;
    let start = linear_group(wid, nwg) * HIST_ROWS * WG;
    for (var r = 0u; r < HIST_ROWS; r = r + 1u) {
        let i = start + r * WG + lid;
        if (i < p.n) {
            let key = key_of(d[i]);
            if ((key & mask) == prefix) {
                atomicAdd(&local_hist[(key >> shift) & dmask], 1u);
            }
        }
    }
    workgroupBarrier();
    for (var b = lid; b < BUCKETS; b = b + WG) {
        let c = atomicLoad(&local_hist[b]);
        if (c != 0u) {
            atomicAdd(&hist[b], c);
        }
    }
}

// One workgroup: find the bucket holding the k_rem-th largest key of this digit.
@compute @workgroup_size(256)
fn select_pass(@builtin(local_invocation_index) lid: u32) {
    if (workgroup_done(lid)) {
        return;
    }
    let digit = p.digit;
    let nb = select(BUCKETS, 512u, digit == 2u);
    let per = nb / WG;
    let k_rem = state.k_rem;
    let prefix = state.prefix;
    let mask = state.mask;
    // Lane t owns buckets nb-1-t*per down to nb-(t+1)*per: lane 0 the largest keys.
    var own = 0u;
    for (var j = 0u; j < per; j = j + 1u) {
        own = own + atomicLoad(&hist[nb - 1u - (lid * per + j)]);
    }
    let through = scan_inclusive(lid, own);
    let before = through - own;
    if (before < k_rem && k_rem <= through) {
        var above = before;
        for (var j = 0u; j < per; j = j + 1u) {
            let b = nb - 1u - (lid * per + j);
            let c = atomicLoad(&hist[b]);
            if (above + c >= k_rem) {
                let shift = digit_shift(digit);
                let new_prefix = prefix | (b << shift);
                let need = k_rem - above;
                if (need == c) {
                    // The whole bucket is taken: every key >= new_prefix.
                    if (new_prefix == 0u) {
                        state.threshold = 0u;
                        state.take_eq = 0xffffffffu;
                    } else {
                        state.threshold = new_prefix - 1u;
                        state.take_eq = 0u;
                    }
                    state.done = 1u;
                } else if (digit == 2u) {
                    state.threshold = new_prefix;
                    state.take_eq = need;
                    state.done = 1u;
                } else {
                    state.prefix = new_prefix;
                    state.mask = mask | (digit_mask(digit) << shift);
                    state.k_rem = need;
                }
                break;
            }
            above = above + c;
        }
    }
    workgroupBarrier();
    for (var b = lid; b < BUCKETS; b = b + WG) {
        atomicStore(&hist[b], 0u);
    }
}

// Per tile: keys above T, and keys equal to T.
@compute @workgroup_size(256)
fn count_pass(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = linear_group(wid, nwg);
    let start = tile * TILE;
    if (start >= p.n) {
        return;
    }
    let t = state.threshold;
    var gt = 0u;
    var eq = 0u;
    for (var r = 0u; r < TILE_ROWS; r = r + 1u) {
        let i = start + r * WG + lid;
        if (i < p.n) {
            let key = key_of(d[i]);
            gt = gt + select(0u, 1u, key > t);
            eq = eq + select(0u, 1u, key == t);
        }
    }
    let g = scan_inclusive(lid, gt);
    workgroupBarrier();
    let e = scan_inclusive(lid, eq);
    if (lid == WG - 1u) {
        tiles[p.tile_base + tile] = g;
        tiles[p.total_tiles + p.tile_base + tile] = e;
    }
}

// One workgroup: exclusive offsets of every tile, over all chunks; the number selected.
@compute @workgroup_size(256)
fn scan_pass(@builtin(local_invocation_index) lid: u32) {
    let n = p.total_tiles;
    let per = (n + WG - 1u) / WG;
    let first = min(lid * per, n);
    let last = min(first + per, n);
    var gt = 0u;
    var eq = 0u;
    for (var i = first; i < last; i = i + 1u) {
        gt = gt + tiles[i];
        eq = eq + tiles[n + i];
    }
    let g_through = scan_inclusive(lid, gt);
    let gt_total = workgroupUniformLoad(&scan_buf[WG - 1u]);
    // Every lane has read the total before the next scan overwrites it.
    workgroupBarrier();
    let e_through = scan_inclusive(lid, eq);
    let eq_total = workgroupUniformLoad(&scan_buf[WG - 1u]);
    var g_off = g_through - gt;
    var e_off = e_through - eq;
    for (var i = first; i < last; i = i + 1u) {
        let cg = tiles[i];
        let ce = tiles[n + i];
        tiles[i] = g_off;
        tiles[n + i] = e_off;
        g_off = g_off + cg;
        e_off = e_off + ce;
    }
    if (lid == 0u) {
        state.selected = gt_total + min(eq_total, state.take_eq);
    }
}

// Emits the selected entries in index order and applies them to x̂.
@compute @workgroup_size(256)
fn write_pass(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = linear_group(wid, nwg);
    let start = tile * TILE;
    if (start >= p.n) {
        return;
    }
    let t = state.threshold;
    let take_eq = state.take_eq;
    let k = state.selected;
    let gt_off = tiles[p.tile_base + tile];
    let eq_off = tiles[p.total_tiles + p.tile_base + tile];
    var run_gt = 0u;
    var run_eq = 0u;
    for (var r = 0u; r < TILE_ROWS; r = r + 1u) {
        let i = start + r * WG + lid;
        var key = 0u;
        var v = 0.0;
        if (i < p.n) {
            v = d[i];
            key = key_of(v);
        }
        let is_gt = i < p.n && key > t;
        let is_eq = i < p.n && key == t;
        // Pack both flags: greater in the low 16 bits, equal in the high 16 bits.
        let own = select(0u, 1u, is_gt) | select(0u, 0x10000u, is_eq);
        let through = scan_inclusive(lid, own);
        let total = workgroupUniformLoad(&scan_buf[WG - 1u]);
        let before = through - own;
        let eq_rank = eq_off + run_eq + (before >> 16u);
        let take = is_gt || (is_eq && eq_rank < take_eq);
        if (take) {
            let pos = gt_off + run_gt + (before & 0xffffu) + min(eq_rank, take_eq);
            atomicStore(&out[pos], p.base + i);
            let h = f32_to_f16_sat(v);
            atomicOr(&out[k + (pos >> 1u)], h << ((pos & 1u) * 16u));
            if ((p.flags & 1u) != 0u) {
                xhat[i] = add_c(xhat[i], f16_bits_to_f32(h));
            }
        }
        run_gt = run_gt + (total & 0xffffu);
        run_eq = run_eq + (total >> 16u);
        workgroupBarrier();
    }
}

// GaussianK: per-workgroup sums of d and d² (f32) into tiles[2 * group], tiles[2 * group + 1].
@compute @workgroup_size(256)
fn stats_pass(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = linear_group(wid, nwg);
    let start = group * HIST_ROWS * WG;
    var s = 0.0;
    var s2 = 0.0;
    for (var r = 0u; r < HIST_ROWS; r = r + 1u) {
        let i = start + r * WG + lid;
        if (i < p.n) {
            let v = d[i];
            s = s + v;
            s2 = s2 + v * v;
        }
    }
    fsum[lid] = s;
    fsum2[lid] = s2;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off / 2u) {
        if (lid < off) {
            fsum[lid] = fsum[lid] + fsum[lid + off];
            fsum2[lid] = fsum2[lid] + fsum2[lid + off];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let slot = p.tile_base + group;
        tiles[2u * slot] = bitcast<u32>(fsum[0]);
        tiles[2u * slot + 1u] = bitcast<u32>(fsum2[0]);
    }
}

// GaussianK: mean and deviation over all partial sums (p.total_tiles of them), n elements in
// all (p.n here is the whole model).
@compute @workgroup_size(256)
fn gauss_resolve(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    var s2 = 0.0;
    for (var j = lid; j < p.total_tiles; j = j + WG) {
        s = s + bitcast<f32>(tiles[2u * j]);
        s2 = s2 + bitcast<f32>(tiles[2u * j + 1u]);
    }
    fsum[lid] = s;
    fsum2[lid] = s2;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off = off / 2u) {
        if (lid < off) {
            fsum[lid] = fsum[lid] + fsum[lid + off];
            fsum2[lid] = fsum2[lid] + fsum2[lid + off];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let n = f32(p.n);
        let mean = fsum[0] / n;
        state.mean = mean;
        state.stdev = sqrt(max(fsum2[0] / n - mean * mean, 0.0));
    }
    if (lid < 6u) {
        atomicStore(&hist[lid], 0u);
    }
}

// The thresholds the refinement may count: t0·0.5^a·1.5^b for (a, b) in this order.
fn gauss_candidate(j: u32) -> f32 {
    let t0 = max(state.mean + state.stdev * p.z, 0.0);
    switch j {
        case 0u: { return t0; }
        case 1u: { return t0 * 0.5; }
        case 2u: { return t0 * 1.5; }
        case 3u: { return t0 * 0.5 * 0.5; }
        case 4u: { return t0 * 0.5 * 1.5; }
        default: { return t0 * 1.5 * 1.5; }
    }
}

@compute @workgroup_size(256)
fn gauss_count(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (lid < 6u) {
        atomicStore(&local_hist[lid], 0u);
    }
    workgroupBarrier();
    var c: array<f32, 6>;
    for (var j = 0u; j < 6u; j = j + 1u) {
        c[j] = gauss_candidate(j);
    }
    var counts: array<u32, 6>;
    let start = linear_group(wid, nwg) * HIST_ROWS * WG;
    for (var r = 0u; r < HIST_ROWS; r = r + 1u) {
        let i = start + r * WG + lid;
        if (i < p.n) {
            let a = abs(d[i]);
            for (var j = 0u; j < 6u; j = j + 1u) {
                counts[j] = counts[j] + select(0u, 1u, a > c[j]);
            }
        }
    }
    for (var j = 0u; j < 6u; j = j + 1u) {
        if (counts[j] != 0u) {
            atomicAdd(&local_hist[j], counts[j]);
        }
    }
    workgroupBarrier();
    if (lid < 6u) {
        let v = atomicLoad(&local_hist[lid]);
        if (v != 0u) {
            atomicAdd(&hist[lid], v);
        }
    }
}

// Replays the refinement (up to 3 times: ×0.5 below 2k/3, ×1.5 above 4k/3) on the counts.
@compute @workgroup_size(1)
fn gauss_final() {
    let k = f32(p.k);
    var a = 0u;
    var b = 0u;
    var t = gauss_candidate(0u);
    for (var step = 0u; step < 3u; step = step + 1u) {
        var j = 0u;
        if (a + b == 1u) {
            j = select(2u, 1u, a == 1u);
        } else if (a + b == 2u) {
            j = select(select(5u, 4u, a == 1u), 3u, a == 2u);
        }
        let c = f32(atomicLoad(&hist[j]));
        if (c < 2.0 * k / 3.0) {
            t = t * 0.5;
            a = a + 1u;
        } else if (c > 4.0 * k / 3.0) {
            t = t * 1.5;
            b = b + 1u;
        } else {
            break;
        }
    }
    state.threshold = bitcast<u32>(t);
    state.take_eq = 0u;
    state.done = 1u;
    for (var j = 0u; j < 6u; j = j + 1u) {
        atomicStore(&hist[j], 0u);
    }
}
