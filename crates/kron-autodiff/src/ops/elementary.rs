//! `exp` and `ln(1 + y)` in `f32` as straight-line arithmetic, so that the elementwise loops
//! that call them (sigmoid, softplus, the binary cross-entropy) compile to vector code.
//!
//! The C library's `expf` and `log1pf` are calls the compiler cannot vectorize; on the
//! autoencoder benchmark they were a tenth of the work outside the GEMMs (`log1pf` alone about
//! 13 ns a value). These take a few nanoseconds for four values, use only additions,
//! multiplications, divisions and bit moves (no fused multiply-add), and so give the same bits
//! on every x86-64 and every thread count. Their errors are tested against `f64` over the whole
//! range: at most 1 ulp for [`exp`], 2 ulp for [`ln_1p_unit`].

/// `e^x`, within 1 ulp, with IEEE behaviour at the edges: `+inf` past
/// 88.72, gradual underflow to subnormals and then `0` below -87.34, `NaN` for `NaN`.
///
/// `x = n ln 2 + r` with `n` the nearest integer to `x / ln 2` and `|r| <= ln(2) / 2`, `ln 2` split
/// in two parts so that `n ln 2` is exact (Cody and Waite); `e^r` by the degree-7 polynomial
/// of Cephes' `expf`; `2^n` as two powers of two made from bits, so that the result underflows
/// and overflows with a single rounding.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5 * 2^23 rounds to an integer (to nearest) and leaves it in the low bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Below -104, e^x rounds to 0; above 89, to infinity. Clamping keeps 2^n's exponent
    // in range; `clamp` keeps a NaN.
    let x = x.clamp(-104.0, 89.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    // n in -150..=128 from the bits of t (no float-to-int conversion, which would not
    // vectorize), split as n1 + n2 with both halves' powers of two normal.
    let n = t.to_bits() as i32 - 0x4B40_0000;
    let (n1, n2) = (n >> 1, n - (n >> 1));
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    p * pow2(n1) * pow2(n2)
}

/// `ln(1 + y)` for `0 <= y <= 1` (the range softplus needs), within 2 ulp (1.94 measured),
/// exact at 0 and accurate for the tiniest `y`.
///
/// `ln(1 + y) = 2 atanh(s)` with `s = y / (2 + y)` in `[0, 1/3]`, by its series to `s^15`
/// (the first term left out is below `2^-25` of the sum).
#[inline(always)]
pub(crate) fn ln_1p_unit(y: f32) -> f32 {
    let s = y / (2.0 + y);
    let z = s * s;
    let tail = ((((((z * (1.0 / 15.0) + 1.0 / 13.0) * z + 1.0 / 11.0) * z + 1.0 / 9.0) * z
        + 1.0 / 7.0)
        * z
        + 1.0 / 5.0)
        * z
        + 1.0 / 3.0)
        * z;
    2.0 * s + 2.0 * s * tail
}

/// `got - want` in units of the last place of `want` rounded to `f32` (subnormal units below
/// the normal range): the error measure of the accuracy tests.
#[cfg(test)]
pub(super) fn ulps(got: f32, want: f64) -> f64 {
    let w = (want as f32).abs();
    let ulp = if w < f32::MIN_POSITIVE {
        f32::from_bits(1) as f64
    } else {
        (f32::from_bits(w.to_bits() + 1) - w) as f64
    };
    (got as f64 - want).abs() / ulp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 4099th `f32` from -104 to 89: exp within 1 ulp of the `f64` exponential.
    #[test]
    fn exp_is_within_one_ulp_over_its_whole_range() {
        let mut worst = (0.0f64, 0.0f32);
        let mut checked = 0;
        let negative = (0x8000_0000..=(-104.0f32).to_bits()).step_by(4099);
        for bits in negative.chain((0..=89.0f32.to_bits()).step_by(4099)) {
            let x = f32::from_bits(bits);
            let want = (x as f64).exp();
            let got = exp(x);
            let e = if want > f32::MAX as f64 {
                assert_eq!(got, f32::INFINITY, "exp({x})");
                0.0
            } else {
                ulps(got, want)
            };
            if e > worst.0 {
                worst = (e, x);
            }
            checked += 1;
        }
        assert!(checked > 500_000, "{checked}");
        assert!(worst.0 <= 1.0, "{} ulp at {}", worst.0, worst.1);
    }

    #[test]
    fn exp_at_the_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(1e30), f32::INFINITY);
        assert_eq!(exp(-1e30), 0.0);
        assert!(exp(88.72).is_finite() && exp(88.73) == f32::INFINITY);
        // The subnormal range and the last subnormal.
        let tiny = exp(-100.0);
        assert!(tiny > 0.0 && tiny < f32::MIN_POSITIVE);
        assert!(ulps(tiny, (-100.0f64).exp()) <= 1.0);
        assert_eq!(exp(-103.3), f32::from_bits(1));
        assert_eq!(exp(-104.0), 0.0);
        // Across the cut points of the range reduction, where n changes.
        for k in -149..=127 {
            let x0 = (k as f64 + 0.5) * std::f64::consts::LN_2;
            for x in [(x0 as f32).next_down(), x0 as f32, (x0 as f32).next_up()] {
                if x < 88.72 {
                    assert!(ulps(exp(x), (x as f64).exp()) <= 1.0, "exp({x})");
                }
            }
        }
    }

    #[test]
    fn ln_1p_unit_is_within_two_ulp_on_zero_to_one() {
        let mut worst = (0.0f64, 0.0f32);
        for bits in (0..=1.0f32.to_bits()).step_by(1009) {
            let y = f32::from_bits(bits);
            let e = ulps(ln_1p_unit(y), (y as f64).ln_1p());
            if e > worst.0 {
                worst = (e, y);
            }
        }
        assert!(worst.0 <= 2.0, "{} ulp at {}", worst.0, worst.1);
        assert_eq!(ln_1p_unit(0.0), 0.0);
        assert_eq!(ln_1p_unit(1e-30), 1e-30);
        assert!(ulps(ln_1p_unit(1.0), std::f64::consts::LN_2) <= 2.0);
    }
}
