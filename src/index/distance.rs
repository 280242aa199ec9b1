//! Distance kernels, with AVX2+FMA chosen at run time where the CPU has them.
//!
//! The graph only ever compares distances, so each metric uses an order-preserving internal form
//! that is cheap and never negative (hnsw_rs asserts distances are >= 0):
//! - L2: the squared distance (reported as its square root);
//! - cosine: `1 - dot` on unit vectors, clamped at 0 against rounding (reported as is);
//! - dot: `1 - dot` may be negative for vectors that are not unit length, so it is mapped through
//!   `d + 1` for `d >= 0` and `exp(d)` below 0: strictly increasing and positive (reported after
//!   the inverse map).
//!
//! A NaN (possible only through overflow of huge finite values) becomes `f32::MAX`, never a panic.

use crate::model::Metric;

#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 16];
    let chunks = n / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s = 0.0f32;
    for i in chunks * 16..n {
        s = a[i].mul_add(b[i], s);
    }
    acc.iter().sum::<f32>() + s
}

#[inline(always)]
fn l2sq_generic(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 16];
    let chunks = n / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
        for i in 0..16 {
            let d = x[i] - y[i];
            acc[i] = d.mul_add(d, acc[i]);
        }
    }
    let mut s = 0.0f32;
    for i in chunks * 16..n {
        let d = a[i] - b[i];
        s = d.mul_add(d, s);
    }
    acc.iter().sum::<f32>() + s
}

// Plain versions without mul_add: on CPUs without FMA, mul_add is a slow library call.
#[inline(always)]
fn dot_plain(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += a[c * 8 + i] * b[c * 8 + i];
        }
    }
    let mut s = 0.0f32;
    for i in chunks * 8..n {
        s += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + s
}

#[inline(always)]
fn l2sq_plain(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        for i in 0..8 {
            let d = a[c * 8 + i] - b[c * 8 + i];
            acc[i] += d * d;
        }
    }
    let mut s = 0.0f32;
    for i in chunks * 8..n {
        let d = a[i] - b[i];
        s += d * d;
    }
    acc.iter().sum::<f32>() + s
}

/// The float kernels (the generic loops above) compiled for a set of CPU features: `avx`
/// (AVX2 and FMA) and `avx512` (AVX-512F as well). Both keep the same 16 running sums (two
/// registers or one), so they give the same results to the bit (test
/// `avx512_kernels_match_avx2_to_the_bit`).
macro_rules! float_kernels {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            #[target_feature(enable = $features)]
            pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
                super::dot_generic(a, b)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn l2sq(a: &[f32], b: &[f32]) -> f32 {
                super::l2sq_generic(a, b)
            }
            #[target_feature(enable = $features)]
            pub unsafe fn count_below(xs: &[f32], x: f32) -> usize {
                super::count_below_generic(xs, x)
            }
        }
    };
}
float_kernels!(avx, "avx2,fma");
float_kernels!(avx512, "avx512f,avx2,fma");

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// The dot product of two vectors of equal length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA, checked above.
        return unsafe { avx512::dot(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA, checked above.
        return unsafe { avx::dot(a, b) };
    }
    dot_plain(a, b)
}

/// The squared Euclidean distance of two vectors of equal length.
#[inline]
pub fn l2sq(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA, checked above.
        return unsafe { avx512::l2sq(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA, checked above.
        return unsafe { avx::l2sq(a, b) };
    }
    l2sq_plain(a, b)
}

/// How many of `xs` are below `x`: where `x` goes in a sorted list, counted in one pass the
/// CPU runs many compares of at once, instead of a binary search's chain of dependent loads
/// (a beam's pool of ef 200 distances: 13 AVX-512 compares).
#[inline]
pub fn count_below(xs: &[f32], x: f32) -> usize {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA, checked above.
        return unsafe { avx512::count_below(xs, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA, checked above.
        return unsafe { avx::count_below(xs, x) };
    }
    count_below_generic(xs, x)
}

#[inline(always)]
fn count_below_generic(xs: &[f32], x: f32) -> usize {
    xs.iter().map(|&v| u32::from(v < x)).sum::<u32>() as usize
}

/// A float as an IEEE half (binary16), rounded to nearest; values beyond the half range
/// (|x| > 65504) are clamped to it rather than made infinite.
#[inline]
pub fn to_half(x: f32) -> u16 {
    half::f16::from_f32(x.clamp(-65504.0, 65504.0)).to_bits()
}

#[inline(always)]
fn from_half(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// Vector elements kept in a compact form (IEEE half bits, or 8-bit codes), which the kernels
/// widen to floats.
pub trait Code: Copy {
    fn to_f32(self) -> f32;
    /// Eight elements from `p`, as floats.
    ///
    /// # Safety
    /// Eight elements from `p` must be readable, and the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen elements from `p`, as floats.
    ///
    /// # Safety
    /// Sixteen elements from `p` must be readable, and the CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Code for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        from_half(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

impl Code for i8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
}

fn dot_codes_plain<T: Code>(a: &[f32], b: &[T]) -> f32 {
    a.iter().zip(b).map(|(x, &y)| x * y.to_f32()).sum()
}

fn l2sq_codes_plain<T: Code>(a: &[f32], b: &[T], scale: f32) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, &y)| {
            let d = x - scale * y.to_f32();
            d * d
        })
        .sum()
}

fn l2sq_code_pair_plain<T: Code>(a: &[T], sa: f32, b: &[T], sb: f32) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = sa * x.to_f32() - sb * y.to_f32();
            d * d
        })
        .sum()
}

/// The squared distance of `sa` times compact vector `a` and `sb` times `b` (two stored
/// vectors as the neighbour heuristic compares them).
#[inline]
pub fn l2sq_code_pair<T: Code>(a: &[T], sa: f32, b: &[T], sb: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C, checked above.
        return unsafe { avx512_codes::l2sq_pair(a, sa, b, sb) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C, checked above.
        return unsafe { avx_codes::l2sq_pair(a, sa, b, sb) };
    }
    l2sq_code_pair_plain(a, sa, b, sb)
}

#[cfg(target_arch = "x86_64")]
mod avx_codes {
    use super::Code;
    use std::arch::x86_64::*;

    /// Sixteen floats of `a` from `i` and the sixteen elements of `b` from `i`, as floats.
    #[inline(always)]
    unsafe fn load16<T: Code>(a: &[f32], b: &[T], i: usize) -> [(__m256, __m256); 2] {
        let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
        [
            (_mm256_loadu_ps(pa), T::load8(pb)),
            (_mm256_loadu_ps(pa.add(8)), T::load8(pb.add(8))),
        ]
    }

    #[inline(always)]
    pub(super) unsafe fn sum(v: __m256) -> f32 {
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        lanes.iter().sum()
    }

    /// SAFETY (both kernels): the CPU must have AVX2, FMA and F16C; every load stays within
    /// the first `min(a.len(), b.len())` elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot<T: Code>(a: &[f32], b: &[T]) -> f32 {
        let n = a.len().min(b.len());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            let [(a0, b0), (a1, b1)] = load16(a, b, i);
            s0 = _mm256_fmadd_ps(a0, b0, s0);
            s1 = _mm256_fmadd_ps(a1, b1, s1);
            i += 16;
        }
        sum(_mm256_add_ps(s0, s1)) + super::dot_codes_plain(&a[i..n], &b[i..n])
    }

    /// The squared distance of `a` and `scale * b`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn l2sq<T: Code>(a: &[f32], b: &[T], scale: f32) -> f32 {
        let n = a.len().min(b.len());
        let sv = _mm256_set1_ps(scale);
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            let [(a0, b0), (a1, b1)] = load16(a, b, i);
            // a - scale * b
            let (d0, d1) = (_mm256_fnmadd_ps(sv, b0, a0), _mm256_fnmadd_ps(sv, b1, a1));
            s0 = _mm256_fmadd_ps(d0, d0, s0);
            s1 = _mm256_fmadd_ps(d1, d1, s1);
            i += 16;
        }
        sum(_mm256_add_ps(s0, s1)) + super::l2sq_codes_plain(&a[i..n], &b[i..n], scale)
    }

    /// The squared distance of `sa * a` and `sb * b`. SAFETY: as the kernels above.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn l2sq_pair<T: Code>(a: &[T], sa: f32, b: &[T], sb: f32) -> f32 {
        let n = a.len().min(b.len());
        let (va, vb) = (_mm256_set1_ps(sa), _mm256_set1_ps(sb));
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            let (a0, a1) = (T::load8(pa), T::load8(pa.add(8)));
            let (b0, b1) = (T::load8(pb), T::load8(pb.add(8)));
            // sa * a - sb * b
            let d0 = _mm256_fmsub_ps(va, a0, _mm256_mul_ps(vb, b0));
            let d1 = _mm256_fmsub_ps(va, a1, _mm256_mul_ps(vb, b1));
            s0 = _mm256_fmadd_ps(d0, d0, s0);
            s1 = _mm256_fmadd_ps(d1, d1, s1);
            i += 16;
        }
        sum(_mm256_add_ps(s0, s1)) + super::l2sq_code_pair_plain(&a[i..n], sa, &b[i..n], sb)
    }
}

/// The kernels of `avx_codes` on 16 lanes: one AVX-512 register holds what the AVX2 kernels
/// keep in two (lanes 0-7 their first accumulator, 8-15 their second), and its halves are
/// added and summed as theirs are, so every result is the same to the bit: only the number of
/// instructions changes (test `avx512_kernels_match_avx2_to_the_bit`).
#[cfg(target_arch = "x86_64")]
mod avx512_codes {
    use super::Code;
    use std::arch::x86_64::*;

    /// Sixteen floats of `a` from `i` and the sixteen elements of `b` from `i`, as floats.
    #[inline(always)]
    unsafe fn load16<T: Code>(a: &[f32], b: &[T], i: usize) -> (__m512, __m512) {
        (
            _mm512_loadu_ps(a.as_ptr().add(i)),
            T::load16(b.as_ptr().add(i)),
        )
    }

    /// The AVX2 kernels' final sum of a 16-lane accumulator: its halves added, then the lanes.
    #[inline(always)]
    unsafe fn sum(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        super::avx_codes::sum(_mm256_add_ps(lo, hi))
    }

    /// SAFETY (both kernels): the CPU must have AVX-512F, AVX2, FMA and F16C; every load stays
    /// within the first `min(a.len(), b.len())` elements.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn dot<T: Code>(a: &[f32], b: &[T]) -> f32 {
        let n = a.len().min(b.len());
        let mut s = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let (a0, b0) = load16(a, b, i);
            s = _mm512_fmadd_ps(a0, b0, s);
            i += 16;
        }
        sum(s) + super::dot_codes_plain(&a[i..n], &b[i..n])
    }

    /// The squared distance of `a` and `scale * b`.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn l2sq<T: Code>(a: &[f32], b: &[T], scale: f32) -> f32 {
        let n = a.len().min(b.len());
        let sv = _mm512_set1_ps(scale);
        let mut s = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let (a0, b0) = load16(a, b, i);
            // a - scale * b
            let d = _mm512_fnmadd_ps(sv, b0, a0);
            s = _mm512_fmadd_ps(d, d, s);
            i += 16;
        }
        sum(s) + super::l2sq_codes_plain(&a[i..n], &b[i..n], scale)
    }

    /// The squared distance of `sa * a` and `sb * b`.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn l2sq_pair<T: Code>(a: &[T], sa: f32, b: &[T], sb: f32) -> f32 {
        let n = a.len().min(b.len());
        let (va, vb) = (_mm512_set1_ps(sa), _mm512_set1_ps(sb));
        let mut s = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let (a0, b0) = (T::load16(a.as_ptr().add(i)), T::load16(b.as_ptr().add(i)));
            // sa * a - sb * b
            let d = _mm512_fmsub_ps(va, a0, _mm512_mul_ps(vb, b0));
            s = _mm512_fmadd_ps(d, d, s);
            i += 16;
        }
        sum(s) + super::l2sq_code_pair_plain(&a[i..n], sa, &b[i..n], sb)
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| has_f16c() && is_x86_feature_detected!("avx512f"))
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| has_avx2_fma() && is_x86_feature_detected!("f16c"))
}

/// The dot product of a float vector and a compact vector of equal length (8-bit codes before
/// their scale is applied).
#[inline]
pub fn dot_codes<T: Code>(a: &[f32], b: &[T]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C, checked above.
        return unsafe { avx512_codes::dot(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C, checked above.
        return unsafe { avx_codes::dot(a, b) };
    }
    dot_codes_plain(a, b)
}

/// The squared Euclidean distance of a float vector and `scale` times a compact vector.
#[inline]
pub fn l2sq_codes<T: Code>(a: &[f32], b: &[T], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C, checked above.
        return unsafe { avx512_codes::l2sq(a, b, scale) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C, checked above.
        return unsafe { avx_codes::l2sq(a, b, scale) };
    }
    l2sq_codes_plain(a, b, scale)
}

/// The largest `|x[i]|`, if it is positive and finite (the scale of a compact form needs one).
fn largest_magnitude(x: &[f32]) -> Option<f32> {
    let max = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    (max > 0.0 && max.is_finite()).then_some(max)
}

/// A vector as 8-bit codes with one scale: `x[i] ~ scale * codes[i]`, the scale chosen so the
/// largest `|x[i]|` maps to 127 (symmetric, per vector, so no training data is needed and any
/// range works). Writes `x.len()` codes into `codes` and returns the scale (0 for a zero vector).
pub fn to_i8(x: &[f32], codes: &mut [i8]) -> f32 {
    let Some(max) = largest_magnitude(x) else {
        // Zero (or, never from validated input, not finite): all codes 0.
        codes.iter_mut().for_each(|c| *c = 0);
        return 0.0;
    };
    let scale = max / 127.0;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (v / scale).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// A query ready to be compared with 8-bit codes from [`to_i8`] by [`FixedQuery::bounds`]: its
/// 16-bit fixed-point form ([`to_i16`]), so a comparison is one integer dot product.
pub struct FixedQuery {
    metric: Metric,
    fixed: Vec<i16>,
    /// The fixed-point form's scale and squared length (of `scale * fixed`).
    scale: f64,
    sq_norm: f64,
    /// A bound on the fixed-point form's distance from the query (half a step a component).
    err: f64,
    /// The query's length.
    norm: f64,
    sqrt_d: f64,
}

impl FixedQuery {
    /// Rounding in the float kernels, relative: far below this for sums of a few thousand terms.
    const ROUNDING: f64 = 1e-3;

    /// None for a zero query (or one too long for fixed point: [`to_i16`]).
    pub fn new(metric: Metric, q: &[f32]) -> Option<FixedQuery> {
        let mut fixed = Vec::with_capacity(q.len());
        let scale = f64::from(to_i16(q, &mut fixed)?);
        let sq: i64 = fixed.iter().map(|&v| i64::from(v) * i64::from(v)).sum();
        let sqrt_d = (q.len() as f64).sqrt();
        Some(FixedQuery {
            metric,
            scale,
            sq_norm: scale * scale * sq as f64,
            err: scale * 0.5 * sqrt_d,
            norm: f64::from(dot(q, q).max(0.0)).sqrt(),
            sqrt_d,
            fixed,
        })
    }

    /// Bounds `(lower, upper)` on the internal distance ([`internal`]) between the query and a
    /// vector `x` whose 8-bit codes are `codes` with `scale`, `Σ codes²` = `codes_sq` and
    /// `sqrt(Σ codes²)` = `codes_norm`; None, sooner, when the lower bound is above `beyond`.
    /// Each component of `x` is within `scale / 2` of `scale * code`, so `x` is within `scale /
    /// 2 * sqrt(d)` of that, and the query within `err` of its fixed-point form; the distance
    /// of the two forms is exact (an integer dot product, combined in f64). The bounds follow
    /// by the triangle inequality (L2) or Cauchy-Schwarz (dot products), widened for the float
    /// kernels' rounding in [`internal`].
    #[inline]
    pub fn bounds(
        &self,
        codes: &[i8],
        scale: f32,
        codes_sq: f64,
        codes_norm: f64,
        beyond: f32,
    ) -> Option<(f32, f32)> {
        let r = Self::ROUNDING;
        let s = f64::from(scale);
        let ex = s * 0.5 * self.sqrt_d;
        let dot_forms = self.scale * s * f64::from(dot_i16_i8(&self.fixed, codes));
        match self.metric {
            Metric::L2 => {
                let d2 = (self.sq_norm + s * s * codes_sq - 2.0 * dot_forms).max(0.0);
                let e = self.err + ex;
                // lower > beyond, without a square root: d (1 - r) - e > sqrt(beyond).
                let far = (f64::from(beyond).sqrt() + e) / (1.0 - r);
                if d2 > far * far {
                    return None;
                }
                let d = d2.sqrt();
                let lower = (d * (1.0 - r) - e).max(0.0);
                let upper = d * (1.0 + r) + e;
                Some(((lower * lower) as f32, (upper * upper) as f32))
            }
            Metric::Cosine | Metric::Dot => {
                let x_norm = s * codes_norm;
                let e = self.norm * ex + self.err * x_norm + r * self.norm * (x_norm + ex);
                // Both metrics' internal distance falls as the dot product grows.
                let lower = finish(self.metric, (dot_forms + e) as f32);
                if lower > beyond {
                    return None;
                }
                Some((lower, finish(self.metric, (dot_forms - e) as f32)))
            }
        }
    }
}

/// A query as 16-bit fixed point for [`dot_i16_i8`]: `x[i] ~ scale * out[i]`, the scale chosen
/// so the largest `|x[i]|` maps to the largest value for which no sum of `x.len()` products with
/// 8-bit codes can overflow an i32 (32767 up to about 4,000 dimensions; fewer bits above).
/// Returns the scale, or `None` when the vector is zero or too long for fixed point.
pub fn to_i16(x: &[f32], out: &mut Vec<i16>) -> Option<f32> {
    out.clear();
    let limit = (i32::MAX as usize / (127 * x.len().max(1))).min(i16::MAX as usize);
    let max = largest_magnitude(x)?;
    if limit < 127 {
        return None;
    }
    let scale = max / limit as f32;
    let top = limit as f32;
    out.extend(
        x.iter()
            .map(|&v| (v / scale).round().clamp(-top, top) as i16),
    );
    Some(scale)
}

fn dot_i16_i8_plain(a: &[i16], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &c)| x as i32 * c as i32).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx_fixed {
    use std::arch::x86_64::*;

    /// SAFETY: the CPU must have AVX2; every load stays within the first
    /// `min(a.len(), b.len())` elements. No lane overflows for a query from [`super::to_i16`].
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot(a: &[i16], b: &[i8]) -> i32 {
        let n = a.len().min(b.len());
        let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let mut i = 0;
        while i + 32 <= n {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            let c0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb as *const __m128i));
            let c1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb.add(16) as *const __m128i));
            let q0 = _mm256_loadu_si256(pa as *const __m256i);
            let q1 = _mm256_loadu_si256(pa.add(16) as *const __m256i);
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(q0, c0));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(q1, c1));
            i += 32;
        }
        let mut lanes = [0i32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, _mm256_add_epi32(s0, s1));
        lanes.iter().sum::<i32>() + super::dot_i16_i8_plain(&a[i..n], &b[i..n])
    }
}

/// `avx_fixed` on 512-bit registers (AVX-512BW: 32 multiply-adds an instruction). Integer sums
/// are exact (and wrap alike in any order), so every kernel gives the same value.
#[cfg(target_arch = "x86_64")]
mod avx512_fixed {
    use std::arch::x86_64::*;

    /// SAFETY: the CPU must have AVX-512F and AVX-512BW; every load stays within the first
    /// `min(a.len(), b.len())` elements.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot(a: &[i16], b: &[i8]) -> i32 {
        let n = a.len().min(b.len());
        let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let mut i = 0;
        while i + 64 <= n {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            let c0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(pb as *const __m256i));
            let c1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(pb.add(32) as *const __m256i));
            let q0 = _mm512_loadu_si512(pa as *const __m512i);
            let q1 = _mm512_loadu_si512(pa.add(32) as *const __m512i);
            s0 = _mm512_add_epi32(s0, _mm512_madd_epi16(q0, c0));
            s1 = _mm512_add_epi32(s1, _mm512_madd_epi16(q1, c1));
            i += 64;
        }
        if i + 32 <= n {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            let c = _mm512_cvtepi8_epi16(_mm256_loadu_si256(pb as *const __m256i));
            let q = _mm512_loadu_si512(pa as *const __m512i);
            s0 = _mm512_add_epi32(s0, _mm512_madd_epi16(q, c));
            i += 32;
        }
        _mm512_reduce_add_epi32(_mm512_add_epi32(s0, s1))
            .wrapping_add(super::dot_i16_i8_plain(&a[i..n], &b[i..n]))
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512bw() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| has_avx512() && is_x86_feature_detected!("avx512bw"))
}

/// The dot product of a fixed-point query ([`to_i16`]) and 8-bit codes ([`to_i8`]), before
/// either scale is applied: integer multiply-adds, twice the work per instruction of the float
/// kernels.
#[inline]
pub fn dot_i16_i8(a: &[i16], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512bw() {
        // SAFETY: the CPU has AVX-512F and AVX-512BW, checked above.
        return unsafe { avx512_fixed::dot(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2, checked above.
        return unsafe { avx_fixed::dot(a, b) };
    }
    dot_i16_i8_plain(a, b)
}

#[inline]
fn sanitize(d: f32) -> f32 {
    if d.is_nan() {
        f32::MAX
    } else {
        d
    }
}

thread_local! {
    static EVALS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Internal distances computed on this thread so far (graph inserts and searches): the work of
/// a search, counted by taking the difference around it. A deterministic cost, unlike time.
pub fn evals_on_this_thread() -> u64 {
    EVALS.with(std::cell::Cell::get)
}

/// The internal (graph) distance of a metric; see the module docs.
#[inline]
pub fn internal(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    EVALS.with(|c| c.set(c.get().wrapping_add(1)));
    match metric {
        Metric::L2 => finish(metric, l2sq(a, b)),
        Metric::Cosine | Metric::Dot => finish(metric, dot(a, b)),
    }
}

/// The internal distance from a raw result computed elsewhere (the squared distance for L2, the
/// dot product otherwise), counted as one distance evaluation: the native engine's compact
/// storages combine the kernels above with their center and scales, then finish here.
#[inline]
pub fn internal_from(metric: Metric, raw: f32) -> f32 {
    EVALS.with(|c| c.set(c.get().wrapping_add(1)));
    finish(metric, raw)
}

/// The internal distance from a kernel's result: the squared distance (L2) or the dot product.
#[inline(always)]
fn finish(metric: Metric, raw: f32) -> f32 {
    match metric {
        Metric::L2 => sanitize(raw),
        Metric::Cosine => sanitize((1.0 - raw).max(0.0)),
        Metric::Dot => {
            let d = 1.0 - raw;
            sanitize(if d >= 0.0 { d + 1.0 } else { d.exp() })
        }
    }
}

/// The distance reported to users, from the internal one.
#[inline]
pub fn reported(metric: Metric, internal: f32) -> f32 {
    match metric {
        Metric::L2 => internal.sqrt(),
        Metric::Cosine => internal,
        Metric::Dot => {
            if internal >= 1.0 {
                internal - 1.0
            } else {
                internal.ln()
            }
        }
    }
}

/// The distance reported to users, computed exactly (brute force uses this).
#[inline]
pub fn exact(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::L2 => l2sq(a, b).sqrt(),
        Metric::Cosine => (1.0 - dot(a, b)).max(0.0),
        Metric::Dot => 1.0 - dot(a, b),
    }
}

macro_rules! hnsw_distance {
    ($name:ident, $metric:expr) => {
        #[derive(Clone, Copy, Default)]
        pub struct $name;
        impl anndists::dist::Distance<f32> for $name {
            #[inline]
            fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
                internal($metric, a, b)
            }
        }
    };
}

hnsw_distance!(L2Internal, Metric::L2);
hnsw_distance!(CosineInternal, Metric::Cosine);
hnsw_distance!(DotInternal, Metric::Dot);

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn kernels_match_naive_for_all_lengths() {
        for n in [1usize, 3, 8, 15, 16, 17, 33, 384] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let l2: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
            assert!((dot(&a, &b) - naive_dot(&a, &b)).abs() < 1e-3, "n={n}");
            assert!((l2sq(&a, &b) - l2).abs() < 1e-3, "n={n}");
            assert!((dot_plain(&a, &b) - naive_dot(&a, &b)).abs() < 1e-3);
            assert!((l2sq_plain(&a, &b) - l2).abs() < 1e-3);
        }
    }

    /// `count_below` (on this CPU's kernel, and each kernel the CPU has) is the place a binary
    /// search over a sorted list gives, for lists of every length up to 300 with repeated
    /// values, and values below, among and above them.
    #[test]
    fn count_below_is_the_sorted_place() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for n in 0..300usize {
            let mut xs: Vec<f32> = (0..n).map(|_| rng.gen_range(0..50) as f32 * 0.5).collect();
            xs.sort_by(f32::total_cmp);
            for x in [-1.0, 0.0, 0.25, 3.0, 12.5, 24.5, 25.0, 100.0] {
                let want = xs.partition_point(|&v| v < x);
                assert_eq!(count_below(&xs, x), want, "n={n} x={x}");
                assert_eq!(count_below_generic(&xs, x), want, "n={n} x={x}");
                #[cfg(target_arch = "x86_64")]
                {
                    if has_avx2_fma() {
                        // SAFETY: the CPU has AVX2 and FMA, checked above.
                        assert_eq!(unsafe { avx::count_below(&xs, x) }, want);
                    }
                    if has_avx512() {
                        // SAFETY: the CPU has AVX-512F, AVX2 and FMA, checked above.
                        assert_eq!(unsafe { avx512::count_below(&xs, x) }, want);
                    }
                }
            }
        }
    }

    /// The AVX-512 kernels give what the AVX2 ones give to the bit (so a graph built on a CPU
    /// with AVX-512 is the one built without it), on floats, 8-bit codes and halves of every
    /// length up to 400 and scales small and large. Skipped (said so) on a CPU without AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_kernels_match_avx2_to_the_bit() {
        if !has_avx512() {
            eprintln!("no AVX-512F on this CPU: nothing to compare");
            return;
        }
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for n in 0..400usize {
            let a: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0..3.0)).collect();
            let codes: Vec<i8> = (0..n).map(|_| rng.gen_range(-127..=127)).collect();
            let halves: Vec<u16> = (0..n).map(|_| to_half(rng.gen_range(-3.0..3.0))).collect();
            for scale in [1.0f32, 0.013, 7.5e-5, 31.0] {
                // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (checked above).
                let (wide, narrow) = unsafe {
                    (
                        avx512_codes::l2sq(&a, &codes, scale),
                        avx_codes::l2sq(&a, &codes, scale),
                    )
                };
                assert_eq!(
                    wide.to_bits(),
                    narrow.to_bits(),
                    "i8 l2sq n={n} scale={scale}"
                );
                let other: Vec<i8> = codes.iter().rev().copied().collect();
                // SAFETY: as above.
                let (wide, narrow) = unsafe {
                    (
                        avx512_codes::l2sq_pair(&codes, scale, &other, 0.02),
                        avx_codes::l2sq_pair(&codes, scale, &other, 0.02),
                    )
                };
                assert_eq!(
                    wide.to_bits(),
                    narrow.to_bits(),
                    "i8 pair n={n} scale={scale}"
                );
                let plain = l2sq_code_pair_plain(&codes, scale, &other, 0.02);
                assert!(
                    (wide - plain).abs() <= 1e-4 * plain.max(1.0),
                    "pair n={n}: {wide} {plain}"
                );
            }
            // SAFETY: as above.
            let pairs = unsafe {
                [
                    (avx512_codes::dot(&a, &codes), avx_codes::dot(&a, &codes)),
                    (avx512_codes::dot(&a, &halves), avx_codes::dot(&a, &halves)),
                    (
                        avx512_codes::l2sq(&a, &halves, 1.0),
                        avx_codes::l2sq(&a, &halves, 1.0),
                    ),
                ]
            };
            let b: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0..3.0)).collect();
            // SAFETY: as above.
            let floats = unsafe {
                [
                    (avx512::dot(&a, &b), avx::dot(&a, &b)),
                    (avx512::l2sq(&a, &b), avx::l2sq(&a, &b)),
                ]
            };
            for (i, (wide, narrow)) in pairs.into_iter().chain(floats).enumerate() {
                assert_eq!(wide.to_bits(), narrow.to_bits(), "kernel {i} n={n}");
            }
            if has_avx512bw() {
                let mut fixed = Vec::new();
                if to_i16(&a, &mut fixed).is_some() {
                    // SAFETY: the CPU has AVX-512F, AVX-512BW and AVX2 (checked above).
                    let (wide, narrow) = unsafe {
                        (
                            avx512_fixed::dot(&fixed, &codes),
                            avx_fixed::dot(&fixed, &codes),
                        )
                    };
                    assert_eq!(wide, narrow, "fixed n={n}");
                    assert_eq!(wide, dot_i16_i8_plain(&fixed, &codes), "fixed n={n}");
                }
            }
        }
    }

    #[test]
    fn half_kernels_match_naive_on_the_rounded_vector() {
        for n in [1usize, 3, 8, 15, 16, 17, 33, 384] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let h: Vec<u16> = b.iter().map(|&x| to_half(x)).collect();
            let rounded: Vec<f32> = h.iter().map(|&x| from_half(x)).collect();
            assert!(rounded
                .iter()
                .zip(&b)
                .all(|(r, x)| (r - x).abs() <= x.abs() / 1024.0));
            let l2: f32 = a.iter().zip(&rounded).map(|(x, y)| (x - y) * (x - y)).sum();
            assert!(
                (dot_codes(&a, &h) - naive_dot(&a, &rounded)).abs() < 1e-3,
                "n={n}"
            );
            assert!((l2sq_codes(&a, &h, 1.0) - l2).abs() < 1e-3, "n={n}");
            assert!((dot_codes_plain(&a, &h) - naive_dot(&a, &rounded)).abs() < 1e-3);
            assert!((l2sq_codes_plain(&a, &h, 1.0) - l2).abs() < 1e-3);
        }
        // Out of the half range: clamped, never infinite.
        assert_eq!(from_half(to_half(1e9)), 65504.0);
        assert_eq!(from_half(to_half(-1e9)), -65504.0);
        let big = [1e9f32, 0.0];
        let hb: Vec<u16> = big.iter().map(|&x| to_half(x)).collect();
        assert!(internal_from(Metric::L2, l2sq_codes(&big, &hb, 1.0)).is_finite());
    }

    #[test]
    fn i8_kernels_match_naive_on_the_decoded_vector() {
        for n in [1usize, 3, 8, 15, 16, 17, 33, 384] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
            let mut c = vec![0i8; n];
            let scale = to_i8(&b, &mut c);
            let decoded: Vec<f32> = c.iter().map(|&x| scale * x as f32).collect();
            // Each value within half a step of the original; the largest maps to +-127.
            assert!(decoded
                .iter()
                .zip(&b)
                .all(|(d, x)| (d - x).abs() <= scale * 0.5 + 1e-6));
            assert!(c.iter().any(|&x| x.abs() == 127), "n={n}");
            let l2: f32 = a.iter().zip(&decoded).map(|(x, y)| (x - y) * (x - y)).sum();
            let dot_d = naive_dot(&a, &decoded);
            assert!((scale * dot_codes(&a, &c) - dot_d).abs() < 1e-3, "n={n}");
            assert!((l2sq_codes(&a, &c, scale) - l2).abs() < 1e-3, "n={n}");
            assert!((scale * dot_codes_plain(&a, &c) - dot_d).abs() < 1e-3);
            assert!((l2sq_codes_plain(&a, &c, scale) - l2).abs() < 1e-3);
        }
        // A zero vector: scale 0, codes 0, distances finite.
        let mut c = [5i8; 4];
        assert_eq!(to_i8(&[0.0; 4], &mut c), 0.0);
        assert_eq!(c, [0; 4]);
        assert_eq!(
            internal_from(Metric::L2, l2sq_codes(&[1.0, 0.0, 0.0, 0.0], &c, 0.0)),
            1.0
        );
        // Huge values keep a finite scale and finite distances.
        let big = [3e38f32, -3e38, 1.0];
        let mut c = [0i8; 3];
        let s = to_i8(&big, &mut c);
        assert!(s.is_finite() && c[0] == 127 && c[1] == -127);
        assert!(internal_from(Metric::L2, l2sq_codes(&big, &c, s)).is_finite());
    }

    #[test]
    fn fixed_point_kernel_is_exact_integer_math_and_never_overflows() {
        for n in [1usize, 3, 15, 16, 31, 32, 33, 384, 1000] {
            let a: Vec<f32> = (0..n).map(|i| ((i + 1) as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut q = Vec::new();
            let qs = to_i16(&a, &mut q).unwrap();
            assert!(q.iter().all(|&x| x != i16::MIN) && q.len() == n);
            let mut c = vec![0i8; n];
            let s = to_i8(&b, &mut c);
            let want: i64 = q.iter().zip(&c).map(|(&x, &y)| x as i64 * y as i64).sum();
            assert_eq!(dot_i16_i8(&q, &c) as i64, want, "n={n}");
            assert_eq!(dot_i16_i8_plain(&q, &c) as i64, want, "n={n}");
            // Close to the float dot of the decoded codes.
            let decoded: Vec<f32> = c.iter().map(|&x| s * x as f32).collect();
            let f = qs * s * dot_i16_i8(&q, &c) as f32;
            assert!((f - naive_dot(&a, &decoded)).abs() < 1e-3, "n={n}");
        }
        // The worst case: every product at its largest, in a long vector.
        for n in [384usize, 5000, 70000] {
            let mut q = Vec::new();
            to_i16(&vec![1.0f32; n], &mut q).unwrap();
            let c = vec![127i8; n];
            let want: i64 = q.iter().map(|&x| x as i64 * 127).sum();
            assert!(want <= i32::MAX as i64, "n={n}");
            assert_eq!(dot_i16_i8(&q, &c) as i64, want, "n={n}");
            let neg = vec![-127i8; n];
            assert_eq!(dot_i16_i8(&q, &neg) as i64, -want, "n={n}");
        }
        assert_eq!(to_i16(&[0.0; 8], &mut Vec::new()), None);
    }

    #[test]
    fn unit_vectors_whose_dot_is_one_never_go_negative() {
        // Rounding can make dot(x, x) slightly above 1 for unit vectors: the scalar DistDot of
        // hnsw_rs asserts on this; ours clamps (cosine) or maps (dot) it.
        for n in [3usize, 384, 1000] {
            let mut v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 101) as f32 + 0.5).collect();
            crate::model::normalize("v", &mut v).unwrap();
            let c = internal(Metric::Cosine, &v, &v);
            let d = internal(Metric::Dot, &v, &v);
            assert!((0.0..1e-5).contains(&c));
            let h: Vec<u16> = v.iter().map(|&x| to_half(x)).collect();
            let ch = internal_from(Metric::Cosine, dot_codes(&v, &h));
            let dh = internal_from(Metric::Dot, dot_codes(&v, &h));
            assert!((0.0..1e-3).contains(&ch), "{ch}");
            assert!(dh >= 0.0 && reported(Metric::Dot, dh).abs() < 1e-3, "{dh}");
            assert!(d >= 0.0 && (reported(Metric::Dot, d)).abs() < 1e-5);
            let mut codes = vec![0i8; n];
            let scale = to_i8(&v, &mut codes);
            let ci = internal_from(Metric::Cosine, scale * dot_codes(&v, &codes));
            let di = internal_from(Metric::Dot, scale * dot_codes(&v, &codes));
            assert!((0.0..1e-2).contains(&ci), "{ci}");
            assert!(di >= 0.0 && reported(Metric::Dot, di).abs() < 1e-2, "{di}");
            let mut q = Vec::new();
            let qs = to_i16(&v, &mut q).unwrap();
            let cf = internal_from(Metric::Cosine, qs * scale * dot_i16_i8(&q, &codes) as f32);
            let df = internal_from(Metric::Dot, qs * scale * dot_i16_i8(&q, &codes) as f32);
            assert!((0.0..1e-2).contains(&cf), "{cf}");
            assert!(df >= 0.0 && reported(Metric::Dot, df).abs() < 1e-2, "{df}");
        }
    }

    #[test]
    fn dot_internal_preserves_order_across_zero() {
        let q = [2.0f32, 0.0];
        let far = [0.1f32, 0.0]; // dot 0.2 -> d 0.8
        let near = [1.0f32, 0.0]; // dot 2 -> d -1
        let nearer = [3.0f32, 0.0]; // dot 6 -> d -5
        let (a, b, c) = (
            internal(Metric::Dot, &q, &far),
            internal(Metric::Dot, &q, &near),
            internal(Metric::Dot, &q, &nearer),
        );
        assert!(a > b && b > c && c >= 0.0);
        assert!((reported(Metric::Dot, b) - (-1.0)).abs() < 1e-5);
        assert!((reported(Metric::Dot, a) - 0.8).abs() < 1e-5);
    }
}
