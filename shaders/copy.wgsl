// copy.wgsl — a plain device copy, dst[i] = src[i] in 16-byte words: the bandwidth reference
// the benchmarks divide by (sparsync bench).
//
// Bindings (group 0):
//   0  uniform  CopyParams { n: u32 (vec4 words), 3 × u32 padding }
//   1  storage  src: array<vec4<u32>>, read
//   2  storage  dst: array<vec4<u32>>, read_write

struct CopyParams {
    n: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: CopyParams;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) {
        dst[i] = src[i];
    }
}
