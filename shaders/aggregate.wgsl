// aggregate.wgsl — one aggregation step over a model chunk (docs/algorithms.md §2): the weighted
// sparse sum of a batch of updates, then the dense apply, in one pass over the chunk.
//
// The chunk is cut into blocks of BLOCK parameters, one workgroup each. `bounds_main` first
// finds, for every (unit, block), where the unit's entries for that block start (a binary
// search on the unit's ascending indices; one invocation each). `main` then, per block:
//   1. loads the block's partial sum into workgroup memory (zero, or `acc` when an earlier
//      sub-batch of the same step left one there);
//   2. reads the block's entries of all units, flattened so that neighbouring invocations
//      read neighbouring words (coalesced, all loads in flight at once), and adds them:
//      - deterministic (default): the entries are staged in workgroup memory (STAGE at a
//        time), then added unit by unit in batch order, a barrier between units; indices are
//        unique within a unit, so no two invocations touch the same slot, and each slot sees
//        the CPU engine's order. The weight arrives split (w = w_hi + w_lo, 13 significant
//        bits each) so both products with an f16 value are exact and the sum does not depend
//        on FMA contraction: bit-identical to the CPU engine.
//      - FAST: each entry is added as it is read, with a compare-exchange in workgroup
//        memory; the order of additions is not fixed (within f32 summation error of the CPU
//        engine);
//   3. writes back: the partial sum to `acc` when more sub-batches follow, else the apply
//      (momentum, x += eta*u, d = x - xhat; see `apply_one`) for every parameter of the block
//      whose sum is not zero (the others keep x and d), or for all of them when momentum is
//      on (m decays everywhere).
// Memory: the payload once, the bounds, and x/xhat/d (and m) once where the sum is not zero;
// no atomics in device memory; two dispatches per chunk.
//
// Variants: FAST (unordered, see above); F16 (FAST only: values read through an f16 view of
// the input, SHADER_F16); BIG_BLOCK (4096-parameter blocks and stages where the device has
// 39 KiB of workgroup memory; else 1024, which fits WebGPU's 16 KiB minimum).
//
// Bindings (group 0):                                keep in sync: gpu/aggregate.rs
//   0  uniform  Params (dynamic offset, one per chunk and sub-batch)
//   1  storage  input: array<u32>, read — update payloads as received: nnz u32 indices, then
//                nnz f16 values packed two per word
//   2  storage  units_meta: array<u32>, read_write — units (4 words each: input word, nnz, w_hi,
//                w_lo as f32 bits), then each chunk's bounds table [unit][block 0..=blocks]
//   3  storage  acc: array<f32>, read_write — this chunk's partial sums between sub-batches
//   4  storage  x: array<f32>, read_write
//   5  storage  xhat: array<f32>, read
//   6  storage  d: array<f32>, read_write (written)
//   7  storage  m: array<f32>, read_write (a 4-byte placeholder when momentum is off)
// #if F16
//   8  storage  input16: array<f16>, read — the same input buffer
// #endif

struct Params {
    units: u32,        // units of this sub-batch (at most MAX_UNITS)
    blocks: u32,       // blocks of this chunk
    chunk_len: u32,    // parameters of this chunk
    chunk_base: u32,   // global index of its first parameter
    bounds_base: u32,  // first word of this chunk's bounds table in `units_meta`
    flags: u32,        // bit 0: acc holds a partial sum; bit 1: last sub-batch (apply);
                       // bit 2: momentum on; bit 3: eta != 1
    mu: f32,
    eta: f32,
}

// #if BIG_BLOCK
const BLOCK: u32 = 4096u;
const STAGE: u32 = 4096u;
// #else
const BLOCK: u32 = 1024u;
const STAGE: u32 = 1024u;
// #endif
const MAX_UNITS: u32 = 256u;
const PER_LANE: u32 = BLOCK / WG;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> input: array<u32>;
@group(0) @binding(2) var<storage, read_write> units_meta: array<u32>;
@group(0) @binding(3) var<storage, read_write> acc: array<f32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;
@group(0) @binding(5) var<storage, read> xhat: array<f32>;
@group(0) @binding(6) var<storage, read_write> d: array<f32>;
@group(0) @binding(7) var<storage, read_write> m: array<f32>;
// #if F16
@group(0) @binding(8) var<storage, read> input16: array<f16>;
// #endif

// The block's sums (as f32 bits in FAST, where they are added with compare-exchange).
// #if FAST
var<workgroup> sums: array<atomic<u32>, BLOCK>;
// #else
var<workgroup> sums: array<f32, BLOCK>;
// The entries of one stage: (slot in the block << 16) | f16 bits.
var<workgroup> staged: array<u32, STAGE>;
// #endif
// Per unit: its first entry in this block, the end of its entries in the flattened order
// (an inclusive prefix of the counts), and its table row.
var<workgroup> unit_first: array<u32, MAX_UNITS>;
var<workgroup> unit_end: array<u32, MAX_UNITS>;
var<workgroup> unit_row: array<vec4<u32>, MAX_UNITS>;

fn unit_word(u: u32) -> u32 {
    return units_meta[4u * u];
}

fn unit_nnz(u: u32) -> u32 {
    return units_meta[4u * u + 1u];
}

// One invocation per (unit, block boundary): the first entry of the unit whose index is at
// least the boundary's first parameter.
@compute @workgroup_size(256)
fn bounds_main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = linear_index(wid, nwg, lid);
    let per_unit = p.blocks + 1u;
    if (t >= p.units * per_unit) {
        return;
    }
    let u = t / per_unit;
    let b = t % per_unit;
    let target_index = p.chunk_base + min(b * BLOCK, p.chunk_len);
    let word = unit_word(u);
    var lo = 0u;
    var hi = unit_nnz(u);
    while (lo < hi) {
        let mid = lo + (hi - lo) / 2u;
        if (input[word + mid] < target_index) {
            lo = mid + 1u;
        } else {
            hi = mid;
        }
    }
    units_meta[p.bounds_base + t] = lo;
}

// The value of entry e of the unit whose table row is `row` (word, nnz, w_hi, w_lo).
fn value_of(row: vec4<u32>, e: u32) -> f32 {
// #if F16
    return f32(input16[2u * (row.x + row.y) + e]);
// #else
    return f16_bits_to_f32(packed_half(input[row.x + row.y + (e >> 1u)], e));
// #endif
}

// The unit of flattened entry g (the first unit whose prefix end is past g).
fn unit_of(g: u32, units: u32) -> u32 {
    var lo = 0u;
    var hi = units;
    while (lo < hi) {
        let mid = (lo + hi) / 2u;
        if (unit_end[mid] <= g) {
            lo = mid + 1u;
        } else {
            hi = mid;
        }
    }
    return lo;
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let block = linear_group(wid, nwg);
    // Every invocation reaches every barrier: a workgroup past the end (grid padding) does no
    // memory work but runs the same control flow.
    let in_range = block < p.blocks;
    let start = block * BLOCK;
    let len = select(0u, min(BLOCK, p.chunk_len - min(start, p.chunk_len)), in_range);
    let carry = (p.flags & 1u) != 0u;
    for (var j = 0u; j < PER_LANE; j = j + 1u) {
        let i = j * WG + lid;
        var v = 0.0;
        if (carry && i < len) {
            v = acc[start + i];
        }
// #if FAST
        atomicStore(&sums[i], bitcast<u32>(v));
// #else
        sums[i] = v;
// #endif
    }
    // Units: this block's entries of each (one lane per unit; units <= MAX_UNITS = WG).
    let units = p.units;
    var count = 0u;
    if (lid < units) {
        let per_unit = p.blocks + 1u;
        var s = 0u;
        var e = 0u;
        if (in_range) {
            s = units_meta[p.bounds_base + lid * per_unit + block];
            e = units_meta[p.bounds_base + lid * per_unit + block + 1u];
        }
        count = e - s;
        unit_first[lid] = s;
        unit_row[lid] = vec4<u32>(units_meta[4u * lid], units_meta[4u * lid + 1u], units_meta[4u * lid + 2u], units_meta[4u * lid + 3u]);
    }
    let through = scan_inclusive(lid, count);
    if (lid < units) {
        unit_end[lid] = through;
    }
    let total = workgroupUniformLoad(&scan_buf[WG - 1u]);
    let block_first = p.chunk_base + start;
    for (var base = 0u; base < total; base = base + STAGE) {
        let span = min(STAGE, total - base);
        // Read this stage's entries: neighbouring lanes, neighbouring words.
        for (var f = lid; f < span; f = f + WG) {
            let g = base + f;
            let u = unit_of(g, units);
            let row = unit_row[u];
            let u_start = select(0u, unit_end[max(u, 1u) - 1u], u > 0u);
            let e = unit_first[u] + g - u_start;
            let slot = input[row.x + e] - block_first;
// #if FAST
            let add = bitcast<f32>(row.z) * value_of(row, e);
            var old = atomicLoad(&sums[slot]);
            loop {
                let r = atomicCompareExchangeWeak(&sums[slot], old, bitcast<u32>(bitcast<f32>(old) + add));
                if (r.exchanged) {
                    break;
                }
                old = r.old_value;
            }
// #else
            staged[f] = (slot << 16u) | packed_half(input[row.x + row.y + (e >> 1u)], e);
// #endif
        }
// #if FAST
// #else
        workgroupBarrier();
        // Add them unit by unit in batch order (a unit's slots are distinct).
        for (var u = 0u; u < units; u = u + 1u) {
            let u_start = select(0u, unit_end[max(u, 1u) - 1u], u > 0u);
            // This unit's part of the stage (empty when it lies wholly before or after).
            let a = max(u_start, base) - base;
            let b = max(min(unit_end[u], base + span), base) - base;
            let w_hi = bitcast<f32>(unit_row[u].z);
            let w_lo = bitcast<f32>(unit_row[u].w);
            for (var j = a + lid; j < b; j = j + WG) {
                let packed = staged[j];
                let slot = packed >> 16u;
                let v = f16_bits_to_f32(packed & 0xffffu);
                sums[slot] = add_c(add_c(sums[slot], canon(w_hi * v)), canon(w_lo * v));
            }
            workgroupBarrier();
        }
// #endif
    }
    workgroupBarrier();
    let apply = (p.flags & 2u) != 0u;
    // With momentum every parameter moves (m decays). Without, only those with a nonzero sum
    // can: a sum of exactly zero leaves x and d as they are.
    let dense = !apply || (p.flags & 4u) != 0u;
    for (var j = 0u; j < PER_LANE; j = j + 1u) {
        let i = j * WG + lid;
// #if FAST
        let g = bitcast<f32>(atomicLoad(&sums[i]));
// #else
        let g = sums[i];
// #endif
        if (i < len && (dense || bitcast<u32>(canon(g)) != 0u)) {
            if (apply) {
                apply_one(start + i, canon(g));
            } else {
                // More sub-batches follow: every slot, so the next one can carry the block.
                acc[start + i] = g;
            }
        }
    }
}

// The apply of one parameter (docs/algorithms.md §2), the CPU engine's rounding bit for bit:
//   u = g                 (momentum off)   or   u = canon(mu*m[i] + g); m[i] = u
//   x[i] = canon(x[i] + eta*u)  and  d[i] = canon(x[i] - xhat[i])   where u != 0
// (eta == 1 skips the multiply). Where u == 0, x and so d keep their values.
fn apply_one(i: u32, g: f32) {
    var u = g;
    if ((p.flags & 4u) != 0u) {
        u = add_c(mul_rn(p.mu, m[i]), u);
        m[i] = u;
    }
    if (bitcast<u32>(u) != 0u) {
        var step = u;
        if ((p.flags & 8u) != 0u) {
            step = mul_rn(p.eta, u);
        }
        let xv = add_c(x[i], step);
        x[i] = xv;
        d[i] = canon(xv - xhat[i]);
    }
}
