// aggregate_fast.wgsl — the whole batch's scatter-add for one chunk in one dispatch.
//
// Invocation g handles entry g of the chunk's concatenated segments (found by binary search
// over the segments' start offsets) and adds w * v into acc with an atomic: a native f32
// atomicAdd where the adapter has SHADER_FLOAT32_ATOMIC (FLOAT_ATOMIC), else a
// compare-exchange loop on the f32 bits. The order of additions is not fixed: results agree
// with the CPU engine within f32 summation error, not bit for bit.
//
// Variants: F16 reads values through an f16 view of the input (SHADER_F16); without it they
// are unpacked with unpack2x16float.
//
// Bindings (group 0):
//   0  uniform  FastParams (dynamic offset, one per chunk)   keep in sync: gpu/aggregate.rs
//   1  storage  input: array<u32>, read — update payloads as received
//   2  storage  acc: array<atomic<f32 or u32>>, read_write — this chunk's accumulator
//   3  storage  segs: array<FastSeg>, read — all segments, grouped by chunk
//   4  storage  input16: array<f16>, read — the same input buffer (F16 only)

struct FastParams {
    first: u32,        // first segment of this chunk in `segs`
    count: u32,        // segments of this chunk
    total: u32,        // entries over those segments
    chunk_base: u32,
}

struct FastSeg {
    start: u32,        // entries of this chunk before this segment
    input_word: u32,
    unit_nnz: u32,
    lo: u32,
    weight: f32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: FastParams;
@group(0) @binding(1) var<storage, read> input: array<u32>;
// #if FLOAT_ATOMIC
@group(0) @binding(2) var<storage, read_write> acc: array<atomic<f32>>;
// #else
@group(0) @binding(2) var<storage, read_write> acc: array<atomic<u32>>;
// #endif
@group(0) @binding(3) var<storage, read> segs: array<FastSeg>;
// #if F16
@group(0) @binding(4) var<storage, read> input16: array<f16>;
// #endif

fn value_at(s: FastSeg, e: u32) -> f32 {
// #if F16
    return f32(input16[2u * (s.input_word + s.unit_nnz) + e]);
// #else
    let w = input[s.input_word + s.unit_nnz + (e >> 1u)];
    return unpack2x16float(w)[e & 1u];
// #endif
}

fn add_to(i: u32, v: f32) {
// #if FLOAT_ATOMIC
    atomicAdd(&acc[i], v);
// #else
    var old = atomicLoad(&acc[i]);
    loop {
        let next = bitcast<u32>(bitcast<f32>(old) + v);
        let r = atomicCompareExchangeWeak(&acc[i], old, next);
        if (r.exchanged) {
            break;
        }
        old = r.old_value;
    }
// #endif
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = linear_index(wid, nwg, lid);
    if (g >= p.total) {
        return;
    }
    // The last segment whose start is <= g.
    var lo = p.first;
    var hi = p.first + p.count;
    while (hi - lo > 1u) {
        let mid = (lo + hi) / 2u;
        if (segs[mid].start <= g) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let s = segs[lo];
    let e = s.lo + (g - s.start);
    let index = input[s.input_word + e];
    add_to(index - p.chunk_base, s.weight * value_at(s, e));
}
