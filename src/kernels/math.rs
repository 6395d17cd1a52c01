//! Branch-free exp, tanh and erf for f32 that loops can vectorize (libm's scalar calls
//! cannot be), and `multiversion!`, which compiles a slice kernel for AVX-512, AVX2 + FMA
//! and the baseline and picks one at run time.
//!
//! Accuracy (tested below against f64): exp within 2.5e-7 relative, tanh within 3e-7 and
//! erf within 6e-7 absolute.

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two so that n * LN2_HI is exact (Cody and Waite's reduction).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x (0 below -87.3 is returned as ~1e-38; +inf is not produced below 88.3).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    // round(x / ln 2) with the 1.5 * 2^23 trick (round to nearest even, vectorizes)
    let n = (x * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r on [-ln2/2, ln2/2]: Cephes' expf polynomial
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from the bits of n + 127 + 2^23, whose low mantissa bits hold the integer n + 127
    // (1..=254 here): shifted by 23 they are the exponent field. Integer-only, so it stays
    // in vector registers (`n as i32` saturates and handles NaN, which LLVM did lane by lane).
    e * f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23)
}

/// tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let e = exp(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

/// erf(x), Abramowitz and Stegun 7.1.26.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    erf_with_exp(a, exp(-a * a)).copysign(x)
}

/// erf(a) for a >= 0 given e = exp(-a^2) (for callers that need that exponential too).
#[inline(always)]
pub fn erf_with_exp(a: f32, e: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_7) * t - 0.284_496_74) * t + 0.254_829_6) * t;
    1.0 - poly * e
}

/// Sum with 16 independent lanes (so that the loop vectorizes; the order of additions
/// differs from a left-to-right sum by rounding only).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let split = x.len() / 16 * 16;
    for c in x[..split].chunks_exact(16) {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + x[split..].iter().sum::<f32>()
}

/// Maximum with 16 lanes (NaN-free input assumed).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let split = x.len() / 16 * 16;
    for c in x[..split].chunks_exact(16) {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    x[split..].iter().fold(m, |a, &b| if b > a { b } else { a })
}

/// `multiversion!(fn name(args) => body)` defines `name`, which calls the
/// `#[inline(always)]` function `body` compiled for the best instruction set available.
macro_rules! multiversion {
    (fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    return unsafe { v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    #[test]
    fn exp_tanh_erf_are_accurate() {
        let mut worst = (0f64, 0f64, 0f64);
        for i in -200_000..=200_000 {
            let x = i as f32 / 2000.0; // -100 .. 100
            let xd = x as f64;
            if x > -87.0 && x < 88.0 {
                let e = xd.exp();
                worst.0 = worst.0.max(((super::exp(x) as f64) - e).abs() / e);
            }
            worst.1 = worst.1.max((super::tanh(x) as f64 - xd.tanh()).abs());
            worst.2 = worst.2.max((super::erf(x) as f64 - libm::erf(xd)).abs());
        }
        assert!(worst.0 < 2.5e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 3e-7, "tanh absolute error {}", worst.1);
        assert!(worst.2 < 6e-7, "erf absolute error {}", worst.2);
        assert_eq!(super::exp(0.0), 1.0);
        assert!(super::exp(-1000.0) < 1e-37 && super::exp(-1000.0) >= 0.0);
    }
}
