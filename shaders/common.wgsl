// common.wgsl — numerics every sparsync kernel shares; prepended to each kernel file.
//
// Computes nothing by itself and has no bindings. It implements the rounding rules of
// `src/protocol/numerics.rs` (keep in sync) with integer operations where the hardware may
// differ: a GPU may fuse a multiply into the following add, or flush subnormals; these
// functions give the same bits on every adapter and as the CPU engine.
//
//   canon(v)        subnormals and -0.0 become +0.0
//   add_c(a, b)     canon(a + b)
//   mul_rn(a, b)    a * b rounded to nearest even in integer arithmetic; an exact product
//                   below 2^-126 gives +0.0 (inputs canonical and finite)
//   f16_bits_to_f32 exact conversion of binary16 bits, subnormals included
//   f32_to_f16_sat  round to nearest even, saturating at +-65504 (never infinity)
//   scan_inclusive  a workgroup-wide inclusive prefix sum (its buffer, `scan_buf`, is
//                   workgroup memory only of the kernels that call it)

const WG: u32 = 256u;

// The linear index of an invocation in a 2-D grid of 256-wide workgroups (a dispatch may
// need more than 65535 workgroups in x).
fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

fn linear_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

fn canon(v: f32) -> f32 {
    // Exponent bits zero: a zero or a subnormal. Decided on bits, not on a float compare, so a
    // GPU that flushes subnormals on input still takes the same branch.
    return select(v, 0.0, (bitcast<u32>(v) & 0x7f800000u) == 0u);
}

fn add_c(a: f32, b: f32) -> f32 {
    return canon(a + b);
}

fn mul_rn(a: f32, b: f32) -> f32 {
    let ua = bitcast<u32>(a);
    let ub = bitcast<u32>(b);
    let ea = (ua >> 23u) & 0xffu;
    let eb = (ub >> 23u) & 0xffu;
    if (ea == 0u || eb == 0u) {
        return 0.0;
    }
    let sign = (ua ^ ub) & 0x80000000u;
    let ma = (ua & 0x7fffffu) | 0x800000u;
    let mb = (ub & 0x7fffffu) | 0x800000u;
    // 48-bit product P = hi * 2^24 + lo from 12-bit limbs.
    let a1 = ma >> 12u;
    let a0 = ma & 0xfffu;
    let b1 = mb >> 12u;
    let b0 = mb & 0xfffu;
    let mid = a1 * b0 + a0 * b1;
    var lo = a0 * b0 + ((mid & 0xfffu) << 12u);
    let hi = a1 * b1 + (mid >> 12u) + (lo >> 24u);
    lo = lo & 0xffffffu;
    var e: i32;
    var m: u32;
    var rest: u32;
    var half: u32;
    if (hi >= 0x800000u) {
        e = i32(ea) + i32(eb) - 126;
        m = hi;
        rest = lo;
        half = 0x800000u;
    } else {
        e = i32(ea) + i32(eb) - 127;
        m = (hi << 1u) | (lo >> 23u);
        rest = lo & 0x7fffffu;
        half = 0x400000u;
    }
    if (e <= 0) {
        return 0.0;
    }
    if (rest > half || (rest == half && (m & 1u) == 1u)) {
        m = m + 1u;
        if (m == 0x1000000u) {
            m = 0x800000u;
            e = e + 1;
        }
    }
    if (e >= 255) {
        return bitcast<f32>(sign | 0x7f800000u);
    }
    return bitcast<f32>(sign | (u32(e) << 23u) | (m & 0x7fffffu));
}

fn f16_bits_to_f32(h: u32) -> f32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        if (m == 0u) {
            return bitcast<f32>(s);
        }
        // Subnormal: m * 2^-24, normalised.
        let p = 31u - countLeadingZeros(m);
        return bitcast<f32>(s | ((p + 103u) << 23u) | ((m << (23u - p)) & 0x7fffffu));
    }
    if (e == 31u) {
        return bitcast<f32>(s | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(s | ((e + 112u) << 23u) | (m << 13u));
}

fn f32_to_f16_sat(v: f32) -> u32 {
    let u = bitcast<u32>(v);
    let s = (u >> 16u) & 0x8000u;
    let a = u & 0x7fffffffu;
    if (a >= 0x477ff000u) {
        // |v| >= 65520 would round to infinity: saturate.
        return s | 0x7bffu;
    }
    if (a >= 0x38800000u) {
        // Normal f16: rebias the exponent, round 13 mantissa bits away.
        var h = (((a >> 23u) - 112u) << 10u) | ((a & 0x7fffffu) >> 13u);
        let rem = a & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u)) {
            h = h + 1u;
        }
        return s | h;
    }
    if (a < 0x33000000u) {
        // Below 2^-25: rounds to zero.
        return s;
    }
    // Subnormal f16 (units of 2^-24).
    let mm = (a & 0x7fffffu) | 0x800000u;
    let shift = 126u - (a >> 23u);
    var h = mm >> shift;
    let rem = mm & ((1u << shift) - 1u);
    let half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u) == 1u)) {
        h = h + 1u;
    }
    return s | h;
}

// Reads the f16 value `e` of a packed array starting at word `base` (two values per word,
// the lower index in the low half).
fn packed_half(word: u32, e: u32) -> u32 {
    return (word >> ((e & 1u) * 16u)) & 0xffffu;
}

var<workgroup> scan_buf: array<u32, 256>;

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
