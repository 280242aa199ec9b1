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

#[cfg(target_arch = "x86_64")]
mod avx {
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        super::dot_generic(a, b)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn l2sq(a: &[f32], b: &[f32]) -> f32 {
        super::l2sq_generic(a, b)
    }
}

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
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA, checked above.
        return unsafe { avx::l2sq(a, b) };
    }
    l2sq_plain(a, b)
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
        Metric::L2 => sanitize(l2sq(a, b)),
        Metric::Cosine => sanitize((1.0 - dot(a, b)).max(0.0)),
        Metric::Dot => {
            let d = 1.0 - dot(a, b);
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
            assert!(d >= 0.0 && (reported(Metric::Dot, d)).abs() < 1e-5);
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
