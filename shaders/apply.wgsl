// apply.wgsl — the dense part of an aggregation step, one invocation per parameter.
//
//   g = acc[i]; acc[i] = 0
//   u = g                       (momentum off)   or   u = canon(mu*m[i] + g); m[i] = u
//   x[i] = canon(x[i] + eta*u)  where u != 0     (eta == 1 skips the multiply)
//   d[i] = canon(x[i] - xhat[i])                 (what the broadcast selects from)
//
// Products use mul_rn, so the result is the CPU engine's bit for bit on any adapter.
//
// Bindings (group 0):
//   0  uniform  ApplyParams (dynamic offset, one per chunk)   keep in sync: gpu/mod.rs
//   1  storage  acc: array<f32>, read_write
//   2  storage  x: array<f32>, read_write
//   3  storage  xhat: array<f32>, read
//   4  storage  d: array<f32>, read_write (written)
//   5  storage  m: array<f32>, read_write (a 4-byte placeholder when momentum is off)

struct ApplyParams {
    n: u32,
    mu: f32,
    eta: f32,
    flags: u32,   // bit 0: momentum on; bit 1: eta != 1
}

@group(0) @binding(0) var<uniform> p: ApplyParams;
@group(0) @binding(1) var<storage, read_write> acc: array<f32>;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
@group(0) @binding(3) var<storage, read> xhat: array<f32>;
@group(0) @binding(4) var<storage, read_write> d: array<f32>;
@group(0) @binding(5) var<storage, read_write> m: array<f32>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let g = acc[i];
    if (bitcast<u32>(g) != 0u) {
        acc[i] = 0.0;
    }
    var u = canon(g);
    if ((p.flags & 1u) != 0u) {
        u = add_c(mul_rn(p.mu, m[i]), u);
        m[i] = u;
    }
    var xv = x[i];
    if (bitcast<u32>(u) != 0u) {
        var step = u;
        if ((p.flags & 2u) != 0u) {
            step = mul_rn(p.eta, u);
        }
        xv = add_c(xv, step);
        x[i] = xv;
    }
    d[i] = canon(xv - xhat[i]);
}
