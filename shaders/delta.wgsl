// delta.wgsl — recompute d = x − x̂ for a whole chunk, one invocation per parameter.
//
// The engine keeps d exact incrementally (the aggregation step writes it where x changes, the
// broadcast where x̂ changes); this dense pass is only needed after the state is replaced
// (a load or a resume).
//
//   d[i] = canon(x[i] - xhat[i])
//
// Bindings (group 0):
//   0  uniform  DeltaParams (dynamic offset, one per chunk)   keep in sync: gpu/mod.rs
//   1  storage  x: array<f32>, read
//   2  storage  xhat: array<f32>, read
//   3  storage  d: array<f32>, read_write (written)

struct DeltaParams {
    n: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: DeltaParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> xhat: array<f32>;
@group(0) @binding(3) var<storage, read_write> d: array<f32>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) {
        d[i] = canon(x[i] - xhat[i]);
    }
}
