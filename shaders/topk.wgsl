// topk.wgsl — select the broadcast entries of d = x − x̂ and apply them to x̂ (docs/algorithms.md §3).
//
// Exact Top-k by magnitude (key = bits(d) & 0x7fffffff: unsigned order of keys is the order
// of magnitudes; ties go to the lower index) has two paths:
//
// * Candidates (one pass over d in the steady state). Between two steps d moves little, so
//   the previous selection leaves a starting threshold t0 (`next_t0`). `cand_collect` reads d
//   once, compacts every entry with key >= t0 into `cand` (index, value), tile by tile in
//   index order, each tile's block at an atomically reserved place, and histograms the top
//   11 bits of every key. `cand_check` accepts the candidates when their number is in
//   [k, cap]: then every Top-k entry, and every entry equal to the k-th key, is one. When it
//   misses (or there is no t0 yet), the histogram names the k-th key's bucket and a second
//   collection from that bucket's lower edge follows (a second pass). A radix select runs on
//   the candidates only (`hist_pass` on them + `select_pass`, digits of 11, 11 and 9 bits) and gives
//   the threshold T and how many keys equal to T to take (the lowest indices); `cand_count`,
//   `scan_pass` and `cand_write` emit the result. The histogram also gives the next t0: the
//   bucket of the `k_next`-th largest key (about 3k), so that after this broadcast removes
//   the top k, the next step's candidates still bracket its k.
// * Full (when even the second collection misses: a bucket holding far more than the
//   candidate space, such as many equal keys). The radix select over d itself (`hist_pass`,
//   3 passes), then `cand_collect` with the exact T (1 pass) and the candidate passes; if the
//   entries equal to T overflow the candidate space (mode DENSE), `count_pass` and
//   `write_pass` emit from d directly (2 more passes).
//
// Emitting: the selected (index, f16 value) pairs in index order, laid out as a Delta body
// (indices, then values packed two per word). Once the engine has read them back, checked
// them and is about to send them, `replica_pass` adds each sent value to x̂ and sets d to
// x − x̂ there, so d stays exact without a dense pass, and a failed selection changes nothing.
//
// No pass waits on another workgroup: every cross-workgroup step is a separate dispatch, so it
// is correct without forward-progress guarantees. No invocation returns before a barrier
// (FXC rejects that): inactive workgroups run the same control flow and skip the memory work.
// State that every lane of `select_pass` needs is loaded by one lane and shared through
// workgroup memory (storage reads are not ordered against a later storage write by
// `workgroupBarrier`).
//
// GaussianK (approximate): `stats` writes per-workgroup sums of d and d², `gauss_resolve`
// turns them into the starting threshold t0 = mean + std·z and `gauss_count` counts |d| above
// each threshold the refinement may try (t0·0.5^a·1.5^b, a + b ≤ 2); `gauss_final` replays the
// refinement and leaves "key > T, take none equal" for the dense count/scan/write passes.
//
// Bindings (group 0), shared by every entry point:      keep in sync: gpu/topk.rs
//   0  uniform  ChunkParams (dynamic offset, one per chunk)
//   1  storage  d: array<f32>, read_write — this chunk's d (written where values are sent)
//   2  storage  xhat: array<f32>, read_write — this chunk's replica (written where sent)
//   3  storage  x: array<f32>, read — this chunk's model (to set d = x − x̂ where sent)
//   4  storage  hist: array<atomic<u32>>, read_write — 2048 buckets, then the candidate
//                counter (GaussianK: 6 counters)
//   5  storage  work: Work, read_write — State, then per tile: [gt counts | eq counts]
//                (offsets after `scan_pass`), [candidate block start | candidate count];
//                GaussianK stats reuse the front for per-workgroup partial sums
//   6  storage  out: array<atomic<u32>>, read_write — indices (k words), then values (⌈k/2⌉)
//   7  storage  cand: array<u32>, read_write — candidates: (global index, f32 bits) pairs

struct ChunkParams {
    n: u32,            // elements of this chunk (the whole model for single-workgroup passes)
    base: u32,         // global index of its first element
    tile_base: u32,    // global number of its first tile
    flags: u32,        // see FLAG_*
    digit: u32,        // radix digit of this pass: 0, 1 or 2
    total_tiles: u32,  // tiles over all chunks
    z: f32,            // GaussianK: Φ⁻¹(1 − ρ/2)
    k: u32,            // entries to select
    cap: u32,          // candidate capacity (entries)
    k_next: u32,       // the rank whose key bucket becomes the next t0
    _p0: u32,
    _p1: u32,
}

const FLAG_EXACT: u32 = 2u;     // cand_collect / cand_check: collect against the exact T
const FLAG_STEADY: u32 = 4u;    // init_pass: start from next_t0
const FLAG_ALL: u32 = 8u;       // init_pass: k == n, everything is selected
const FLAG_DENSE: u32 = 16u;    // init_pass: emit from d (GaussianK, large k)
const FLAG_HIST: u32 = 32u;     // cand_collect: also histogram every key's top 11 bits
                                // cand_check: the first check (see there)
const FLAG_RECOLLECT: u32 = 64u; // cand_collect / cand_check: the second try
const FLAG_NEXT: u32 = 128u;    // select_pass (digit 0 over d): also set next_t0
const FLAG_COLD: u32 = 256u;    // init_pass: no t0 yet (the first collection takes nothing)
const FLAG_CAND: u32 = 512u;    // hist_pass: histogram the candidates, not d

const MODE_MISS: u32 = 0u;
const MODE_CAND: u32 = 1u;
const MODE_DENSE: u32 = 2u;

struct State {
    prefix: u32,       // resolved high bits of the k-th key
    mask: u32,         // which bits are resolved
    k_rem: u32,        // keys still to find below the resolved prefix
    threshold: u32,    // T: every key > T is selected
    take_eq: u32,      // and the first take_eq keys == T (in index order)
    done: u32,         // T is final
    selected: u32,     // number of entries selected (after `scan_pass`)
    partials: u32,     // GaussianK: number of partial sums in `tiles`
    mean: f32,
    stdev: f32,
    mode: u32,         // MODE_*: how the result is emitted, or MISS
    next_t0: u32,      // the starting threshold for the next selection
    t0: u32,           // this selection's starting threshold
    cand_count: u32,   // candidates collected
    recollect: u32,    // the first collection missed: collect again from t0 (the k-th key's bucket)
    _p1: u32,
}

struct Work {
    st: State,
    tiles: array<u32>,
}

const TILE: u32 = 4096u;                     // a tile is 16 rows of 256 elements
const TILE_ROWS: u32 = 16u;
const HIST_ROWS: u32 = 32u;                  // a histogram workgroup reads 32 rows
const BUCKETS: u32 = 2048u;
const CAND_COUNTER: u32 = 2048u;             // hist[CAND_COUNTER]: candidates reserved

@group(0) @binding(0) var<uniform> p: ChunkParams;
@group(0) @binding(1) var<storage, read_write> d: array<f32>;
@group(0) @binding(2) var<storage, read_write> xhat: array<f32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> hist: array<atomic<u32>>;
@group(0) @binding(5) var<storage, read_write> work: Work;
@group(0) @binding(6) var<storage, read_write> out: array<atomic<u32>>;
@group(0) @binding(7) var<storage, read_write> cand: array<u32>;

var<workgroup> local_hist: array<atomic<u32>, 2048>;
var<workgroup> flag: u32;
var<workgroup> shared_u32: array<u32, 4>;
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

// One lane reads a state word, every lane gets it (uniform, so it may decide barriers).
fn uniform_state(lid: u32, v: u32) -> u32 {
    if (lid == 0u) {
        flag = v;
    }
    return workgroupUniformLoad(&flag);
}

// Sets up the state of one selection (one invocation).
@compute @workgroup_size(1)
fn init_pass() {
    let f = p.flags;
    work.st.t0 = select(0u, work.st.next_t0, (f & FLAG_STEADY) != 0u);
    if ((f & FLAG_COLD) != 0u) {
        // Above every key: the first collection only builds the histogram.
        work.st.t0 = 0x80000000u;
    }
    work.st.prefix = 0u;
    work.st.mask = 0u;
    work.st.k_rem = p.k;
    work.st.threshold = 0u;
    work.st.take_eq = 0u;
    work.st.done = 0u;
    work.st.selected = 0u;
    work.st.cand_count = 0u;
    work.st.recollect = 0u;
    work.st.mode = select(MODE_CAND, MODE_DENSE, (f & FLAG_DENSE) != 0u);
    if ((f & FLAG_ALL) != 0u) {
        work.st.take_eq = 0xffffffffu;
        work.st.done = 1u;
    }
}

// Radix histogram of the keys that share the resolved prefix: of d (the full path), or of the
// candidates (FLAG_CAND, when the candidates are accepted).
@compute @workgroup_size(256)
fn hist_pass(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let from_cand = (p.flags & FLAG_CAND) != 0u;
    let wanted = work.st.done == 0u && (!from_cand || work.st.mode == MODE_CAND);
    let live = uniform_state(lid, select(0u, 1u, wanted)) != 0u;
    for (var b = lid; b < BUCKETS; b = b + WG) {
        atomicStore(&local_hist[b], 0u);
    }
    workgroupBarrier();
    if (live) {
        let shift = digit_shift(p.digit);
        let dmask = digit_mask(p.digit);
        let prefix = work.st.prefix;
        let mask = work.st.mask;
        let count = select(p.n, work.st.cand_count, from_cand);
        let start = linear_group(wid, nwg) * HIST_ROWS * WG;
        for (var r = 0u; r < HIST_ROWS; r = r + 1u) {
            let i = start + r * WG + lid;
            if (i < count) {
                var key = 0u;
                if (from_cand) {
                    key = cand[2u * i + 1u] & 0x7fffffffu;
                } else {
                    key = key_of(d[i]);
                }
                if ((key & mask) == prefix) {
                    atomicAdd(&local_hist[(key >> shift) & dmask], 1u);
                }
            }
        }
    }
    workgroupBarrier();
    if (live) {
        for (var b = lid; b < BUCKETS; b = b + WG) {
            let c = atomicLoad(&local_hist[b]);
            if (c != 0u) {
                atomicAdd(&hist[b], c);
            }
        }
    }
}

// One workgroup: find the bucket holding the k_rem-th largest key of this digit; on digit 0
// also the bucket of the k_next-th (the next selection's t0). Clears the histogram.
@compute @workgroup_size(256)
fn select_pass(@builtin(local_invocation_index) lid: u32) {
    if (lid == 0u) {
        shared_u32[0] = work.st.done;
        shared_u32[1] = work.st.k_rem;
        shared_u32[2] = work.st.prefix;
        shared_u32[3] = work.st.mask;
    }
    let live = workgroupUniformLoad(&shared_u32[0]) == 0u;
    let k_rem = shared_u32[1];
    let prefix = shared_u32[2];
    let mask = shared_u32[3];
    let digit = p.digit;
    let nb = select(BUCKETS, 512u, digit == 2u);
    let per = nb / WG;
    // Lane t owns buckets nb-1-t*per down to nb-(t+1)*per: lane 0 the largest keys.
    var own = 0u;
    if (live) {
        for (var j = 0u; j < per; j = j + 1u) {
            own = own + atomicLoad(&hist[nb - 1u - (lid * per + j)]);
        }
    }
    let through = scan_inclusive(lid, own);
    let total = workgroupUniformLoad(&scan_buf[WG - 1u]);
    let before = through - own;
    if (live && before < k_rem && k_rem <= through) {
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
                        work.st.threshold = 0u;
                        work.st.take_eq = 0xffffffffu;
                    } else {
                        work.st.threshold = new_prefix - 1u;
                        work.st.take_eq = 0u;
                    }
                    work.st.done = 1u;
                } else if (digit == 2u) {
                    work.st.threshold = new_prefix;
                    work.st.take_eq = need;
                    work.st.done = 1u;
                } else {
                    work.st.prefix = new_prefix;
                    work.st.mask = mask | (digit_mask(digit) << shift);
                    work.st.k_rem = need;
                }
                break;
            }
            above = above + c;
        }
    }
    if (live && digit == 0u && (p.flags & FLAG_NEXT) != 0u) {
        // The next t0: the lower edge of the bucket holding the k_next-th largest key.
        let r = min(p.k_next, total);
        if (r > 0u && before < r && r <= through) {
            var above = before;
            for (var j = 0u; j < per; j = j + 1u) {
                let b = nb - 1u - (lid * per + j);
                above = above + atomicLoad(&hist[b]);
                if (above >= r) {
                    work.st.next_t0 = b << 20u;
                    break;
                }
            }
        }
    }
    // Every lane's reads of `hist` above happen before any lane clears it.
    storageBarrier();
    for (var b = lid; b < BUCKETS; b = b + WG) {
        atomicStore(&hist[b], 0u);
    }
}

// The lowest bucket the first collection histograms: 8 buckets (an octave) below t0's, or
// every bucket when there is no t0 (0x80000000, above every key).
fn hist_floor(t0: u32) -> u32 {
    let b = t0 >> 20u;
    return select(select(0u, b - 8u, b >= 8u), 0u, t0 >= 0x80000000u);
}

// The highest bucket it keeps apart: keys above count in it, so that the counts from the top
// stay right for every bucket in the window (an octave above t0's; all with no t0).
fn hist_ceiling(t0: u32) -> u32 {
    return select(min((t0 >> 20u) + 7u, BUCKETS - 1u), BUCKETS - 1u, t0 >= 0x80000000u);
}

// Compacts the entries of d to select from into `cand`, per tile in index order: key >= t0
// (steady), or the exact selection (FLAG_EXACT: key > T, and key == T when some are taken).
// FLAG_HIST: also histograms every key's top 11 bits (so `cand_check` can place the k-th key
// when t0 missed); FLAG_RECOLLECT: the second try, only when the first one missed.
@compute @workgroup_size(256)
fn cand_collect(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = linear_group(wid, nwg);
    let start = tile * TILE;
    let exact = (p.flags & FLAG_EXACT) != 0u;
    let with_hist = (p.flags & FLAG_HIST) != 0u;
    var live = true;
    if ((p.flags & FLAG_RECOLLECT) != 0u) {
        live = uniform_state(lid, work.st.recollect) != 0u;
    }
    let t = select(work.st.t0, work.st.threshold, exact);
    let with_eq = !exact || work.st.take_eq != 0u;
    // Only keys within an octave of t0 are counted (all of them when there is no t0): the
    // k-th and k_next-th keys lie there unless d moved by more than that since the last step,
    // and the mass of small keys below would cost atomics on a few hot buckets.
    let floor = hist_floor(work.st.t0);
    let ceiling = hist_ceiling(work.st.t0);
    if (with_hist) {
        for (var b = lid; b < BUCKETS; b = b + WG) {
            atomicStore(&local_hist[b], 0u);
        }
        workgroupBarrier();
    }
    // Lane l takes the 16 consecutive elements [start + 16 l, start + 16 l + 16).
    let first = start + lid * TILE_ROWS;
    var count = 0u;
    if (live) {
        for (var j = 0u; j < TILE_ROWS; j = j + 1u) {
            let i = first + j;
            if (i < p.n) {
                let key = key_of(d[i]);
                count = count + select(0u, 1u, key > t || (with_eq && key == t));
                if (with_hist && (key >> 20u) >= floor) {
                    atomicAdd(&local_hist[min(key >> 20u, ceiling)], 1u);
                }
            }
        }
    }
    let through = scan_inclusive(lid, count);
    if (lid == WG - 1u) {
        shared_u32[0] = select(0u, atomicAdd(&hist[CAND_COUNTER], through), through != 0u);
    }
    let block = workgroupUniformLoad(&shared_u32[0]);
    let total = scan_buf[WG - 1u];
    if (with_hist) {
        for (var b = lid; b < BUCKETS; b = b + WG) {
            let c = atomicLoad(&local_hist[b]);
            if (c != 0u) {
                atomicAdd(&hist[b], c);
            }
        }
    }
    let gtile = p.tile_base + tile;
    if (live && start < p.n && lid == 0u) {
        work.tiles[2u * p.total_tiles + gtile] = block;
        work.tiles[3u * p.total_tiles + gtile] = total;
    }
    if (live && block + total <= p.cap) {
        var at = block + through - count;
        for (var j = 0u; j < TILE_ROWS; j = j + 1u) {
            let i = first + j;
            if (i < p.n) {
                let v = d[i];
                let key = key_of(v);
                if (key > t || (with_eq && key == t)) {
                    cand[2u * at] = p.base + i;
                    cand[2u * at + 1u] = bitcast<u32>(v);
                    at = at + 1u;
                }
            }
        }
    }
}

// Decides how to go on after a collection (one workgroup):
// * FLAG_EXACT (after the full radix select): the candidates are the selection when they fit;
//   else the dense passes emit it.
// * FLAG_HIST (after the first collection): accept the candidates when their number is in
//   [k, cap] (then every Top-k entry, and every entry equal to the k-th key, is one). From
//   the histogram of all keys, set next_t0 to the bucket of the k_next-th key and, when the
//   candidates missed, t0 to the k-th key's bucket and ask for a second collection. Clears
//   the histogram for the radix passes.
// * FLAG_RECOLLECT (after the second collection, if there was one): accept, or MISS.
@compute @workgroup_size(256)
fn cand_check(@builtin(local_invocation_index) lid: u32) {
    if (lid == 0u) {
        shared_u32[0] = atomicLoad(&hist[CAND_COUNTER]);
        shared_u32[1] = work.st.recollect;
        shared_u32[2] = hist_floor(work.st.t0);
    }
    let c = workgroupUniformLoad(&shared_u32[0]);
    let again = shared_u32[1] != 0u;
    let floor = shared_u32[2];
    let fits = c >= p.k && c <= p.cap;
    let first = (p.flags & FLAG_HIST) != 0u;
    // Lane t owns buckets 2047-8t down to 2040-8t (lane 0 the largest keys).
    var own = 0u;
    if (first) {
        for (var j = 0u; j < 8u; j = j + 1u) {
            own = own + atomicLoad(&hist[BUCKETS - 1u - (lid * 8u + j)]);
        }
    }
    let through = scan_inclusive(lid, own);
    let counted = workgroupUniformLoad(&scan_buf[WG - 1u]);
    let before = through - own;
    if (first) {
        // The buckets of the k-th and the k_next-th largest keys.
        var above = before;
        for (var j = 0u; j < 8u; j = j + 1u) {
            let b = BUCKETS - 1u - (lid * 8u + j);
            let h = atomicLoad(&hist[b]);
            if (above < p.k && p.k <= above + h && !fits) {
                work.st.t0 = b << 20u;
            }
            if (above < p.k_next && p.k_next <= above + h) {
                work.st.next_t0 = b << 20u;
            }
            above = above + h;
        }
    }
    // Every lane's reads of `hist` happen before it is cleared.
    storageBarrier();
    if (first) {
        for (var b = lid; b < BUCKETS; b = b + WG) {
            atomicStore(&hist[b], 0u);
        }
    }
    if (lid == 0u) {
        if ((p.flags & FLAG_EXACT) != 0u) {
            work.st.cand_count = c;
            work.st.mode = select(MODE_DENSE, MODE_CAND, c <= p.cap);
            atomicStore(&hist[CAND_COUNTER], 0u);
        } else if (first) {
            if (counted < p.k_next) {
                // Fewer keys than that in the window: start lower next time.
                work.st.next_t0 = floor << 20u;
            }
            if (fits) {
                work.st.cand_count = c;
            } else if (counted < p.k) {
                // The k-th key is below the window: the full radix select.
                work.st.mode = MODE_MISS;
                work.st.done = 1u;
            } else {
                work.st.recollect = 1u;
                atomicStore(&hist[CAND_COUNTER], 0u);
            }
        } else if (again) {
            work.st.cand_count = c;
            if (!fits) {
                work.st.mode = MODE_MISS;
                work.st.done = 1u;
            }
        }
    }
}

// Per tile, among its candidates: keys above T, and keys equal to T (one dispatch over all
// tiles of all chunks).
@compute @workgroup_size(256)
fn cand_count(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = linear_group(wid, nwg);
    let live = uniform_state(lid, work.st.mode) == MODE_CAND && tile < p.total_tiles;
    var gt = 0u;
    var eq = 0u;
    if (live) {
        let t = work.st.threshold;
        let block = work.tiles[2u * p.total_tiles + tile];
        let total = work.tiles[3u * p.total_tiles + tile];
        for (var j = lid; j < total; j = j + WG) {
            let key = cand[2u * (block + j) + 1u] & 0x7fffffffu;
            gt = gt + select(0u, 1u, key > t);
            eq = eq + select(0u, 1u, key == t);
        }
    }
    let g = scan_inclusive(lid, gt);
    workgroupBarrier();
    let e = scan_inclusive(lid, eq);
    if (live && lid == WG - 1u) {
        work.tiles[tile] = g;
        work.tiles[p.total_tiles + tile] = e;
    }
}

// Per tile of d: keys above T, and keys equal to T (the dense path).
@compute @workgroup_size(256)
fn count_pass(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = linear_group(wid, nwg);
    let start = tile * TILE;
    let live = uniform_state(lid, work.st.mode) == MODE_DENSE && start < p.n;
    var gt = 0u;
    var eq = 0u;
    if (live) {
        let t = work.st.threshold;
        for (var r = 0u; r < TILE_ROWS; r = r + 1u) {
            let i = start + r * WG + lid;
            if (i < p.n) {
                let key = key_of(d[i]);
                gt = gt + select(0u, 1u, key > t);
                eq = eq + select(0u, 1u, key == t);
            }
        }
    }
    let g = scan_inclusive(lid, gt);
    workgroupBarrier();
    let e = scan_inclusive(lid, eq);
    if (live && lid == WG - 1u) {
        work.tiles[p.tile_base + tile] = g;
        work.tiles[p.total_tiles + p.tile_base + tile] = e;
    }
}

// One workgroup: exclusive offsets of every tile, over all chunks; the number selected.
@compute @workgroup_size(256)
fn scan_pass(@builtin(local_invocation_index) lid: u32) {
    let live = uniform_state(lid, work.st.mode) != MODE_MISS;
    let n = select(0u, p.total_tiles, live);
    let per = (n + WG - 1u) / WG;
    let first = min(lid * per, n);
    let last = min(first + per, n);
    var gt = 0u;
    var eq = 0u;
    for (var i = first; i < last; i = i + 1u) {
        gt = gt + work.tiles[i];
        eq = eq + work.tiles[n + i];
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
        let cg = work.tiles[i];
        let ce = work.tiles[n + i];
        work.tiles[i] = g_off;
        work.tiles[n + i] = e_off;
        g_off = g_off + cg;
        e_off = e_off + ce;
    }
    if (live && lid == 0u) {
        work.st.selected = gt_total + min(eq_total, work.st.take_eq);
    }
}

// Writes one selected entry at position `pos` and applies it to x̂ and d (local index i).
fn emit(pos: u32, k: u32, global: u32, v: f32) {
    atomicStore(&out[pos], global);
    let h = f32_to_f16_sat(v);
    atomicOr(&out[k + (pos >> 1u)], h << ((pos & 1u) * 16u));
}

// Applies the emitted entries that fall in this chunk to x̂ and sets d = x − x̂ there (one
// invocation per entry). A separate submission, made once the engine has read the result
// back and checked it: a selection that fails leaves x̂ as it was.
@compute @workgroup_size(256)
fn replica_pass(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = linear_index(wid, nwg, lid);
    let k = work.st.selected;
    if (j >= k) {
        return;
    }
    let global = atomicLoad(&out[j]);
    if (global < p.base || global - p.base >= p.n) {
        return;
    }
    let i = global - p.base;
    let h = (atomicLoad(&out[k + (j >> 1u)]) >> ((j & 1u) * 16u)) & 0xffffu;
    let xh = add_c(xhat[i], f16_bits_to_f32(h));
    xhat[i] = xh;
    d[i] = canon(x[i] - xh);
}

// Emits the selected candidates of this chunk's tiles in index order. Lane l takes a
// contiguous share of the tile's candidate block.
@compute @workgroup_size(256)
fn cand_write(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = linear_group(wid, nwg);
    let gtile = p.tile_base + tile;
    let live = uniform_state(lid, work.st.mode) == MODE_CAND && tile * TILE < p.n;
    var block = 0u;
    var total = 0u;
    if (live) {
        block = work.tiles[2u * p.total_tiles + gtile];
        total = work.tiles[3u * p.total_tiles + gtile];
    }
    let t = work.st.threshold;
    let take_eq = work.st.take_eq;
    let per = (total + WG - 1u) / WG;
    let first = min(lid * per, total);
    let last = min(first + per, total);
    // This lane's counts, greater in the low 16 bits and equal in the high (per <= 16).
    var own = 0u;
    for (var j = first; j < last; j = j + 1u) {
        let key = cand[2u * (block + j) + 1u] & 0x7fffffffu;
        own = own + select(0u, 1u, key > t) + select(0u, 0x10000u, key == t);
    }
    let through = scan_inclusive(lid, own);
    if (live) {
        let k = work.st.selected;
        var gt_at = work.tiles[gtile] + ((through - own) & 0xffffu);
        var eq_at = work.tiles[p.total_tiles + gtile] + ((through - own) >> 16u);
        for (var j = first; j < last; j = j + 1u) {
            let global = cand[2u * (block + j)];
            let v = bitcast<f32>(cand[2u * (block + j) + 1u]);
            let key = key_of(v);
            if (key > t) {
                emit(gt_at + min(eq_at, take_eq), k, global, v);
                gt_at = gt_at + 1u;
            } else if (key == t) {
                if (eq_at < take_eq) {
                    emit(gt_at + eq_at, k, global, v);
                }
                eq_at = eq_at + 1u;
            }
        }
    }
}

// Emits the selected entries of d in index order (the dense path).
@compute @workgroup_size(256)
fn write_pass(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tile = linear_group(wid, nwg);
    let start = tile * TILE;
    let live = uniform_state(lid, work.st.mode) == MODE_DENSE && start < p.n;
    let t = work.st.threshold;
    let take_eq = work.st.take_eq;
    let k = work.st.selected;
    var gt_off = 0u;
    var eq_off = 0u;
    if (live) {
        gt_off = work.tiles[p.tile_base + tile];
        eq_off = work.tiles[p.total_tiles + p.tile_base + tile];
    }
    var run_gt = 0u;
    var run_eq = 0u;
    for (var r = 0u; r < TILE_ROWS; r = r + 1u) {
        let i = start + r * WG + lid;
        var key = 0u;
        var v = 0.0;
        let inside = live && i < p.n;
        if (inside) {
            v = d[i];
            key = key_of(v);
        }
        let is_gt = inside && key > t;
        let is_eq = inside && key == t;
        // Pack both flags: greater in the low 16 bits, equal in the high 16 bits.
        let own = select(0u, 1u, is_gt) | select(0u, 0x10000u, is_eq);
        let through = scan_inclusive(lid, own);
        let total = workgroupUniformLoad(&scan_buf[WG - 1u]);
        let before = through - own;
        let eq_rank = eq_off + run_eq + (before >> 16u);
        if (is_gt || (is_eq && eq_rank < take_eq)) {
            let pos = gt_off + run_gt + (before & 0xffffu) + min(eq_rank, take_eq);
            emit(pos, k, p.base + i, v);
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
    if (lid == 0u && start < p.n) {
        let slot = p.tile_base + group;
        work.tiles[2u * slot] = bitcast<u32>(fsum[0]);
        work.tiles[2u * slot + 1u] = bitcast<u32>(fsum2[0]);
    }
}

// GaussianK: mean and deviation over all partial sums (p.total_tiles of them), n elements in
// all (p.n here is the whole model).
@compute @workgroup_size(256)
fn gauss_resolve(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    var s2 = 0.0;
    for (var j = lid; j < p.total_tiles; j = j + WG) {
        s = s + bitcast<f32>(work.tiles[2u * j]);
        s2 = s2 + bitcast<f32>(work.tiles[2u * j + 1u]);
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
        work.st.mean = mean;
        work.st.stdev = sqrt(max(fsum2[0] / n - mean * mean, 0.0));
    }
    if (lid < 6u) {
        atomicStore(&hist[lid], 0u);
    }
}

// The thresholds the refinement may count: t0·0.5^a·1.5^b for (a, b) in this order.
fn gauss_candidate(j: u32) -> f32 {
    let t0 = max(work.st.mean + work.st.stdev * p.z, 0.0);
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
    work.st.threshold = bitcast<u32>(t);
    work.st.take_eq = 0u;
    work.st.done = 1u;
    work.st.mode = MODE_DENSE;
    for (var j = 0u; j < 6u; j = j + 1u) {
        atomicStore(&hist[j], 0u);
    }
}
