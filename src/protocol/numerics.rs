//! The exact floating-point rules that the server engines and every client share.
//!
//! Bit-exact replicas need every party to round the same way. These functions are the
//! definition; `shaders/common.wgsl` implements the same rules with integer operations so that
//! a GPU's own choices (fused multiply-add, flushing subnormals) cannot change a result.
//!
//! * Stored values are *canonical*: finite, and either zero (`+0.0`) or normal. [`canon`] maps
//!   every subnormal and `-0.0` to `+0.0`.
//! * [`add`] and [`mul`] are IEEE round-to-nearest-even operations followed by [`canon`]; [`mul`]
//!   decides on the exact product, so that "tiny before rounding" is flushed everywhere.
//! * Values leave the server as f16 through [`to_f16_sat`]: round to nearest even, saturating at
//!   ±65504 instead of overflowing to infinity.

use half::f16;

/// Smallest positive normal f32, 2^-126.
pub const MIN_NORMAL: f32 = f32::MIN_POSITIVE;

/// Largest finite f16 magnitude.
pub const F16_MAX: f32 = 65504.0;

/// Canonical form: subnormals and `-0.0` become `+0.0`; everything else is unchanged.
#[inline(always)]
pub fn canon(v: f32) -> f32 {
    if v.abs() < MIN_NORMAL { 0.0 } else { v }
}

/// `canon(a + b)`: the sum as every engine and client computes it.
#[inline(always)]
pub fn add(a: f32, b: f32) -> f32 {
    canon(a + b)
}

/// `a * b` rounded to nearest even, with an exact product below 2^-126 flushed to `+0.0`.
#[inline(always)]
pub fn mul(a: f32, b: f32) -> f32 {
    // The product of two f32 significands has at most 48 bits: exact in f64.
    let p = a as f64 * b as f64;
    if p.abs() < MIN_NORMAL as f64 { 0.0 } else { p as f32 }
}

/// f32 to f16, round to nearest even, saturating at ±65504 (never infinity).
#[inline(always)]
pub fn to_f16_sat(v: f32) -> f16 {
    f16::from_f32(v.clamp(-F16_MAX, F16_MAX))
}

/// Splits an aggregation weight into `hi + lo`, each with at most 13 significant bits, so that
/// `hi * v` and `lo * v` are exact for every f16 value `v` (11 significant bits): a GPU that
/// fuses the multiply into the following add computes the same bits as one that does not.
#[inline]
pub fn split_weight(w: f32) -> (f32, f32) {
    if !w.is_finite() || w.abs() < MIN_NORMAL {
        return (0.0, 0.0);
    }
    let hi = f32::from_bits(w.to_bits() & 0xFFFF_F800); // keep 1 + 12 explicit mantissa bits
    let lo = canon(w - hi); // exact: the low 11 mantissa bits of w
    (hi, lo)
}

/// Adds `weight * value` into `acc` the way both engines do: two exact products, two adds.
#[inline(always)]
pub fn accumulate(acc: f32, hi: f32, lo: f32, value: f32) -> f32 {
    let a = add(acc, canon(hi * value));
    add(a, canon(lo * value))
}

/// Applies one Delta entry to a replica value: `canon(x + f32(h))`.
#[inline(always)]
pub fn apply_delta_entry(x: f32, h: f16) -> f32 {
    add(x, h.to_f32())
}

/// Magnitude key used by Top-k: the f32 bits without the sign. Ordering keys as unsigned
/// integers orders values by magnitude.
#[inline(always)]
pub fn magnitude_key(v: f32) -> u32 {
    v.to_bits() & 0x7FFF_FFFF
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canon_flushes_subnormals_and_negative_zero() {
        assert_eq!(canon(-0.0).to_bits(), 0);
        assert_eq!(canon(f32::from_bits(1)).to_bits(), 0);
        assert_eq!(canon(-f32::from_bits(0x007F_FFFF)).to_bits(), 0);
        assert_eq!(canon(MIN_NORMAL), MIN_NORMAL);
        assert_eq!(canon(-1.5), -1.5);
    }

    #[test]
    fn split_weight_products_are_exact() {
        let weights = [1.0f32, 0.1, 0.333_333_34, 1.0 / 64.0 * 0.7, 3.1e-5, 0.999_999_9];
        let values = [f16::MAX, f16::MIN_POSITIVE_SUBNORMAL, f16::from_f32(0.1), f16::from_f32(-3.7)];
        for &w in &weights {
            let (hi, lo) = split_weight(w);
            assert_eq!(hi + lo, w, "split of {w} must be exact");
            for &v in &values {
                let v = v.to_f32();
                for part in [hi, lo] {
                    let exact = part as f64 * v as f64;
                    assert_eq!((part * v) as f64, exact, "{part} * {v} must be exact");
                }
            }
        }
    }

    #[test]
    fn mul_flushes_on_exact_product() {
        assert_eq!(mul(MIN_NORMAL, 0.5).to_bits(), 0);
        assert_eq!(mul(MIN_NORMAL, 1.0), MIN_NORMAL);
        assert_eq!(mul(0.9, 1.1), 0.9f32 * 1.1f32);
        assert_eq!(mul(-2.0, 3.0), -6.0);
    }

    #[test]
    fn f16_saturates() {
        assert_eq!(to_f16_sat(1e9), f16::MAX);
        assert_eq!(to_f16_sat(-1e9), f16::MIN);
        assert_eq!(to_f16_sat(65519.0), f16::MAX);
        assert_eq!(to_f16_sat(0.1), f16::from_f32(0.1));
    }
}
