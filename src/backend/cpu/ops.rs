//! Element-wise and small reduction ops on f32 rows, computed the way ggml's CPU backend computes
//! them (f64 accumulation where ggml uses `ggml_float`, iterative RoPE angles), so our numbers
//! track llama.cpp's closely.

use crate::arch::{Glu, RopeStyle};
use crate::backend::Rope;

/// `out = x / sqrt(mean(x²) + eps) * w` (ggml's `rms_norm` followed by `mul`).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = (v * scale) * g;
    }
}

/// In-place RMS norm with a weight (used for per-head q/k norms).
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = (*v * scale) * g;
    }
}

/// In-place softmax (ggml's `soft_max` with scale 1 and no mask), with ggml's own vector `expf`
/// and summation order.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let src = x.to_vec();
    let sum = crate::ggml::vec_soft_max(x, &src, max);
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) * up[i]`, with ggml's vector `silu` (bit-identical to its `swiglu`).
/// `gate = glu(gate, up)` element-wise, as ggml computes each kind (its vector `silu` for
/// SwiGLU; gpt-oss's clamped form in scalar f32 with libm `expf`, as ggml runs it).
pub fn glu_inplace(glu: Glu, gate: &mut [f32], up: &[f32]) {
    match glu {
        Glu::SwiGlu => swiglu_inplace(gate, up),
        Glu::SwiGluOai { alpha, limit } => {
            for (g, &u) in gate.iter_mut().zip(up) {
                let x = g.min(limit);
                let y = u.clamp(-limit, limit);
                *g = x / (1.0 + (alpha * -x).exp()) * (y + 1.0);
            }
        }
    }
}

pub fn swiglu_inplace(gate: &mut [f32], up: &[f32]) {
    let g = gate.to_vec();
    crate::ggml::vec_swiglu(gate, &g, up);
}

/// cos/sin for every pair at position `pos` (`cache` is `n_dims` long: cos, sin interleaved),
/// with ggml's iterative angles.
pub fn rope_angles(rope: &Rope, pos: usize, cache: &mut [f32]) {
    let theta_scale = rope.freq_base.powf(-2.0 / rope.n_dims as f32);
    let mut theta = pos as f32;
    let [low, high] = rope.corr_dims;
    for i in (0..rope.n_dims).step_by(2) {
        // ggml's rope_yarn, in its f32 order.
        let interp = rope.freq_scale * theta;
        let (mut t, mut mscale) = (interp, rope.attn_factor);
        if rope.ext_factor != 0.0 {
            let y = ((i / 2) as f32 - low) / 0.001f32.max(high - low);
            let mix = (1.0 - y.clamp(0.0, 1.0)) * rope.ext_factor;
            t = theta.mul_add(mix, interp * (1.0 - mix));
            mscale *= 0.1f32.mul_add((1.0 / rope.freq_scale).ln(), 1.0);
        }
        cache[i] = t.cos() * mscale;
        cache[i + 1] = t.sin() * mscale;
        theta *= theta_scale;
    }
}

/// Rotate one head vector in place with precomputed `angles`.
pub fn rope_apply(rope: &Rope, head: &mut [f32], angles: &[f32]) {
    let n = rope.n_dims;
    match rope.style {
        RopeStyle::Normal => {
            for i in (0..n).step_by(2) {
                let (c, s) = (angles[i], angles[i + 1]);
                let (x0, x1) = (head[i], head[i + 1]);
                head[i] = x0.mul_add(c, -(x1 * s));
                head[i + 1] = x0.mul_add(s, x1 * c);
            }
        }
        RopeStyle::Neox => {
            let half = n / 2;
            for i in (0..n).step_by(2) {
                let ic = i / 2;
                let (c, s) = (angles[i], angles[i + 1]);
                let (x0, x1) = (head[ic], head[ic + half]);
                head[ic] = x0.mul_add(c, -(x1 * s));
                head[ic + half] = x0.mul_add(s, x1 * c);
            }
        }
    }
}

/// Attention score `k · q` of two f16 rows (raw native-endian bytes, `2·n` each), summed the way
/// the reference llama.cpp's `ggml_vec_dot_f16` sums it. That build runs 512-bit vectors: blocks
/// of 64 elements go through four 16-lane f32 accumulators (fused multiply-adds, then a halving
/// tree), and everything past the last whole block, one product at a time, into an f64 sum. A
/// 32-wide head is all tail, so its score is the f64 sum of exact f16×f16 products, rounded
/// once. (An AVX2 ggml, like the one we link, does a 32-wide head in one 8-lane SIMD step instead;
/// the last-bit difference flips f16 roundings in the value accumulator and grew to 0.16 in
/// the logits of `rustdoc-moe`.)
pub fn dot_f16(k: &[u8], q: &[u8]) -> f32 {
    assert_eq!(k.len(), q.len());
    let n = k.len() / 2;
    let np = n & !63;
    let mut sum = 0f64;
    if np > 0 {
        let mut acc = [[0f32; 16]; 4];
        simd::fma_blocks_f16(&k[..2 * np], &q[..2 * np], &mut acc);
        sum = block_sum(&mut acc) as f64;
    }
    for e in np..n {
        sum += (f16_at(k, e) * f16_at(q, e)) as f64;
    }
    sum as f32
}

/// `out[r] = dot_f16(k[r·stride..][..q.len()], q)` for `r < out.len()`, bit-identical to
/// `dot_f16` row by row. The f64 tail of each score is a chain of dependent adds; here eight
/// rows' chains run side by side (each still in its own order), and the exact f16×f16 products
/// come from vector conversions of the query once and of each key row, instead of one scalar
/// conversion per element and row.
pub fn dot_f16_strided(k: &[u8], stride: usize, q: &[u8], out: &mut [f32]) {
    const LANES: usize = 8;
    let n = q.len() / 2;
    let np = n & !63;
    let tail = n - np;
    let row = |r: usize| &k[r * stride..r * stride + q.len()];
    // The whole blocks of each row, as `dot_f16` sums them.
    let mut head = [0f64; LANES];
    let mut qf = vec![0f32; tail];
    simd::f16_to_f32(&q[2 * np..], &mut qf);
    let mut prods = vec![0f32; LANES * tail];
    for (c, outs) in out.chunks_mut(LANES).enumerate() {
        let r0 = c * LANES;
        for (j, h) in head.iter_mut().enumerate().take(outs.len()) {
            *h = 0.0;
            if np > 0 {
                let kr = row(r0 + j);
                let mut acc = [[0f32; 16]; 4];
                simd::fma_blocks_f16(&kr[..2 * np], &q[..2 * np], &mut acc);
                *h = block_sum(&mut acc) as f64;
            }
        }
        if tail == 0 {
            outs.iter_mut().zip(&head).for_each(|(o, &h)| *o = h as f32);
            continue;
        }
        // Exact products (11-bit × 11-bit significands fit f32), row by row.
        for j in 0..outs.len() {
            let p = &mut prods[j * tail..(j + 1) * tail];
            simd::f16_to_f32(&row(r0 + j)[2 * np..], p);
            p.iter_mut().zip(&qf).for_each(|(p, &q)| *p *= q);
        }
        let mut sum = head;
        if outs.len() == LANES {
            for e in 0..tail {
                for (j, s) in sum.iter_mut().enumerate() {
                    *s += prods[j * tail + e] as f64;
                }
            }
        } else {
            for (j, s) in sum.iter_mut().enumerate().take(outs.len()) {
                for e in 0..tail {
                    *s += prods[j * tail + e] as f64;
                }
            }
        }
        outs.iter_mut().zip(&sum).for_each(|(o, &s)| *o = s as f32);
    }
}

/// The four 16-lane accumulators of a block reduced as ggml reduces them.
fn block_sum(acc: &mut [[f32; 16]; 4]) -> f32 {
    let [a0, a1, a2, a3] = acc;
    for l in 0..16 {
        a0[l] += a2[l];
        a1[l] += a3[l];
    }
    for l in 0..16 {
        a0[l] += a1[l];
    }
    lane_tree_sum(a0)
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    crate::ggml::f16_to_f32(u16::from_ne_bytes([b[2 * i], b[2 * i + 1]]))
}

/// `acc[i] = f16(v[i]·s + acc[i])` over f16 values (raw native-endian bytes for `v`): ggml's
/// `vec_mad_f16`, one fused multiply-add and one round-to-nearest-even per element.
pub fn mad_f16(acc: &mut [u16], v: &[u8], s: f32) {
    assert_eq!(2 * acc.len(), v.len());
    let done = simd::mad_f16(acc, v, s);
    for (i, a) in acc.iter_mut().enumerate().skip(done) {
        *a = crate::ggml::f32_to_f16(f16_at(v, i).mul_add(s, crate::ggml::f16_to_f32(*a)));
    }
}

/// `acc[i] = f16(acc[i]·s)`: ggml's `vec_scale_f16`.
pub fn scale_f16(acc: &mut [u16], s: f32) {
    let done = simd::scale_f16(acc, s);
    for a in &mut acc[done..] {
        *a = crate::ggml::f32_to_f16(crate::ggml::f16_to_f32(*a) * s);
    }
}

/// Vector forms of the f16 helpers. Each lane does exactly the scalar arithmetic (F16C
/// conversions are exact one way and round to nearest even the other, like `half`), so results
/// are bit-identical to the portable loops; those remain for targets without AVX2/FMA/F16C.
mod simd {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    mod imp {
        use std::arch::x86_64::*;

        /// Four 16-lane accumulators over whole blocks of 64 elements (`k.len() % 128 == 0`).
        pub fn fma_blocks_f16(k: &[u8], q: &[u8], acc: &mut [[f32; 16]; 4]) {
            debug_assert!(k.len() == q.len() && k.len().is_multiple_of(128));
            // SAFETY: the target features are enabled at compile time (cfg above); every load
            // reads 16 bytes inside `k`/`q` (i + 32·j + 16·h + 16 ≤ len), every store 32 bytes
            // inside one `[f32; 16]` half.
            unsafe {
                let mut r = [[_mm256_setzero_ps(); 2]; 4];
                for i in (0..k.len()).step_by(128) {
                    for (j, rj) in r.iter_mut().enumerate() {
                        for (hh, rh) in rj.iter_mut().enumerate() {
                            let o = i + 32 * j + 16 * hh;
                            let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(o) as *const __m128i));
                            let qv = _mm256_cvtph_ps(_mm_loadu_si128(q.as_ptr().add(o) as *const __m128i));
                            *rh = _mm256_fmadd_ps(kv, qv, *rh);
                        }
                    }
                }
                for (j, rj) in r.iter().enumerate() {
                    _mm256_storeu_ps(acc[j].as_mut_ptr(), rj[0]);
                    _mm256_storeu_ps(acc[j].as_mut_ptr().add(8), rj[1]);
                }
            }
        }

        /// f16 values (raw native-endian bytes) to f32, exactly.
        pub fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
            let n = dst.len();
            assert!(src.len() >= 2 * n);
            let whole = n & !7;
            // SAFETY: features as above; each load reads 16 bytes of `src[..2n]` and each store
            // writes 8 floats of `dst[..n]` (i + 8 <= whole <= n).
            unsafe {
                for i in (0..whole).step_by(8) {
                    let v = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i));
                    _mm256_storeu_ps(dst.as_mut_ptr().add(i), v);
                }
            }
            for i in whole..n {
                dst[i] = crate::ggml::f16_to_f32(u16::from_ne_bytes([src[2 * i], src[2 * i + 1]]));
            }
        }

        /// Whole groups of 8; returns how many elements were done.
        pub fn mad_f16(acc: &mut [u16], v: &[u8], s: f32) -> usize {
            let n = acc.len() & !7;
            // SAFETY: features as above; loads/stores of 8 u16 within `acc[..n]` and `v[..2n]`.
            unsafe {
                let sv = _mm256_set1_ps(s);
                for i in (0..n).step_by(8) {
                    let a = _mm256_cvtph_ps(_mm_loadu_si128(acc.as_ptr().add(i) as *const __m128i));
                    let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(2 * i) as *const __m128i));
                    let r = _mm256_fmadd_ps(x, sv, a);
                    _mm_storeu_si128(
                        acc.as_mut_ptr().add(i) as *mut __m128i,
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r),
                    );
                }
            }
            n
        }

        pub fn scale_f16(acc: &mut [u16], s: f32) -> usize {
            let n = acc.len() & !7;
            // SAFETY: features as above; loads/stores of 8 u16 within `acc[..n]`.
            unsafe {
                let sv = _mm256_set1_ps(s);
                for i in (0..n).step_by(8) {
                    let a = _mm256_cvtph_ps(_mm_loadu_si128(acc.as_ptr().add(i) as *const __m128i));
                    _mm_storeu_si128(
                        acc.as_mut_ptr().add(i) as *mut __m128i,
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(a, sv)),
                    );
                }
            }
            n
        }
    }

    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    mod imp {
        use super::super::f16_at;

        pub fn fma_blocks_f16(k: &[u8], q: &[u8], acc: &mut [[f32; 16]; 4]) {
            for i in (0..k.len() / 2).step_by(64) {
                for (j, a) in acc.iter_mut().enumerate() {
                    for (l, v) in a.iter_mut().enumerate() {
                        let e = i + 16 * j + l;
                        *v = f16_at(k, e).mul_add(f16_at(q, e), *v);
                    }
                }
            }
        }

        pub fn mad_f16(_acc: &mut [u16], _v: &[u8], _s: f32) -> usize {
            0
        }

        pub fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = f16_at(src, i);
            }
        }

        pub fn scale_f16(_acc: &mut [u16], _s: f32) -> usize {
            0
        }
    }

    pub use imp::*;
}

/// Sum of SIMD lanes by halving (`_mm512_reduce_add_ps`'s order); `a.len()` a power of two.
fn lane_tree_sum(a: &mut [f32]) -> f32 {
    let mut len = a.len();
    while len > 1 {
        len /= 2;
        for i in 0..len {
            a[i] += a[i + len];
        }
    }
    a[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x = vec![1.0, 3.0, -2.0, 0.5];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[0] && x[0] > x[3] && x[3] > x[2]);
    }

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 2.0, 0.5, 1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 1e-6, &mut out);
        let rms = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0f32 + 1e-6).sqrt();
        for i in 0..4 {
            assert!((out[i] - x[i] / rms * w[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_preserves_norm_and_position_zero_is_identity() {
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            let rope = Rope {
                style,
                n_dims: 8,
                freq_base: 10000.0,
                freq_scale: 1.0,
                ext_factor: 0.0,
                attn_factor: 1.0,
                corr_dims: [0.0, 7.0],
            };
            let mut ang = vec![0f32; 8];
            rope_angles(&rope, 0, &mut ang);
            let orig: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
            let mut h = orig.clone();
            rope_apply(&rope, &mut h, &ang);
            assert_eq!(h, orig);
            rope_angles(&rope, 17, &mut ang);
            rope_apply(&rope, &mut h, &ang);
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = h.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3);
        }
    }

    fn f16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|&x| crate::ggml::f32_to_f16(x).to_ne_bytes()).collect()
    }

    #[test]
    fn dot_f16_is_the_f64_sum_of_exact_products_below_64() {
        let a: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let b: Vec<f32> = (0..32).map(|i| (i as f32 * 0.11).cos() * 2.0).collect();
        let (ka, qb) = (f16_bytes(&a), f16_bytes(&b));
        let r = |x: f32| crate::ggml::f16_to_f32(crate::ggml::f32_to_f16(x)) as f64;
        let want: f64 = a.iter().zip(&b).map(|(&x, &y)| r(x) * r(y)).sum();
        assert_eq!(dot_f16(&ka, &qb), want as f32);
    }

    /// The vector f16 helpers give the portable loops' bits exactly.
    #[test]
    fn f16_helpers_match_scalar_bits() {
        use crate::ggml::{f16_to_f32, f32_to_f16};
        let a: Vec<f32> = (0..200).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let b: Vec<f32> = (0..200).map(|i| (i as f32 * 0.11).cos() * 2.0).collect();
        for n in [8, 64, 128, 133, 200] {
            let (ka, qb) = (f16_bytes(&a[..n]), f16_bytes(&b[..n]));
            let mut acc = [[0f32; 16]; 4];
            let np = n & !63;
            for i in (0..np).step_by(64) {
                for (j, r) in acc.iter_mut().enumerate() {
                    for (l, v) in r.iter_mut().enumerate() {
                        let e = i + 16 * j + l;
                        *v = f16_to_f32(f32_to_f16(a[e])).mul_add(f16_to_f32(f32_to_f16(b[e])), *v);
                    }
                }
            }
            let mut got = [[0f32; 16]; 4];
            simd::fma_blocks_f16(&ka[..2 * np], &qb[..2 * np], &mut got);
            assert_eq!(got, acc, "n = {n}");
            let mut acc16: Vec<u16> = a[..n].iter().map(|&x| f32_to_f16(x * 0.5)).collect();
            let mut want = acc16.clone();
            mad_f16(&mut acc16, &qb, 0.731);
            want.iter_mut()
                .zip(&b[..n])
                .for_each(|(w, &x)| *w = f32_to_f16(f16_to_f32(f32_to_f16(x)).mul_add(0.731, f16_to_f32(*w))));
            assert_eq!(acc16, want, "n = {n}");
            scale_f16(&mut acc16, 0.377);
            want.iter_mut().for_each(|w| *w = f32_to_f16(f16_to_f32(*w) * 0.377));
            assert_eq!(acc16, want, "n = {n}");
        }
    }

    /// Many rows at once give each row's `dot_f16` bits exactly, whatever the head size and the
    /// number of rows (whole groups of eight and a remainder).
    #[test]
    fn strided_scores_match_dot_f16_bits() {
        for n in [8, 32, 40, 64, 96, 128] {
            for rows in [1, 7, 8, 13, 24] {
                // Rows of n values with 3 more between them; values over a wide range.
                let stride = 2 * n + 6;
                let k: Vec<f32> =
                    (0..rows * stride / 2).map(|i| ((i as f32 * 0.731).sin() * 40.0).powi(3) * 1e-3).collect();
                let kb = f16_bytes(&k);
                let q: Vec<f32> = (0..n).map(|i| (i as f32 * 0.17).cos() * 3.0).collect();
                let qb = f16_bytes(&q);
                let mut got = vec![0f32; rows];
                dot_f16_strided(&kb, stride, &qb, &mut got);
                for (r, &g) in got.iter().enumerate() {
                    let want = dot_f16(&kb[r * stride..r * stride + 2 * n], &qb);
                    assert_eq!(g.to_bits(), want.to_bits(), "n {n}, rows {rows}, row {r}");
                }
            }
        }
    }

    #[test]
    fn dot_f16_blocks_of_64_stay_close_to_exact() {
        let a: Vec<f32> = (0..160).map(|i| (i as f32 * 0.29).sin()).collect();
        let b: Vec<f32> = (0..160).map(|i| (i as f32 * 0.07).cos()).collect();
        let r = |x: f32| crate::ggml::f16_to_f32(crate::ggml::f32_to_f16(x)) as f64;
        let want: f64 = a.iter().zip(&b).map(|(&x, &y)| r(x) * r(y)).sum();
        assert!((dot_f16(&f16_bytes(&a), &f16_bytes(&b)) as f64 - want).abs() < 1e-4);
    }
}
