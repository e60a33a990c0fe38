// aggregate.wgsl — deterministic weighted sparse scatter-add (algorithms.md §2).
//
// One dispatch per (update, chunk) segment, in batch order: acc[i] += w * v for the segment's
// entries. Indices are unique within an update, so no two invocations of a dispatch touch the
// same slot and no atomics are needed; dispatches run in order, so the sum has the CPU
// engine's order. The weight arrives split (w = w_hi + w_lo, 13 significant bits each) so both
// products with an f16 value are exact and the result does not depend on FMA contraction.
//
// Bindings (group 0):
//   0  uniform  Segment (dynamic offset, one per dispatch)   keep in sync: gpu/aggregate.rs Segment
//   1  storage  input: array<u32>, read — update payloads as received: nnz u32 indices, then
//                nnz f16 values packed two per word
//   2  storage  acc: array<f32>, read_write — this chunk's accumulator

struct Segment {
    input_word: u32,   // first word of the unit's payload in `input`
    unit_nnz: u32,     // entries in the unit (its values start at input_word + unit_nnz)
    lo: u32,           // first entry of this segment
    count: u32,        // entries in this segment
    chunk_base: u32,   // global index of the chunk's first element
    w_hi: f32,
    w_lo: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> seg: Segment;
@group(0) @binding(1) var<storage, read> input: array<u32>;
@group(0) @binding(2) var<storage, read_write> acc: array<f32>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = linear_index(wid, nwg, lid);
    if (j >= seg.count) {
        return;
    }
    let e = seg.lo + j;
    let index = input[seg.input_word + e];
    let h = packed_half(input[seg.input_word + seg.unit_nnz + (e >> 1u)], e);
    let v = f16_bits_to_f32(h);
    let i = index - seg.chunk_base;
    var a = acc[i];
    a = add_c(a, canon(seg.w_hi * v));
    a = add_c(a, canon(seg.w_lo * v));
    acc[i] = a;
}
