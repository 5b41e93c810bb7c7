//! Matrix × activation products over quantized weights with ggml's kernels: `vec_dot` per row for
//! plain layouts, the repacked GEMV/GEMM for interleaved ones. Weights are borrowed views (of the
//! mmap, a resident copy or a cache slot); nothing here copies a weight.

use std::cell::UnsafeCell;

use super::pool::ThreadPool;
use super::repack::{self, Layout, GEMM_TOKENS};
use crate::ggml::{kernels, Kernels};
use crate::gguf::GgmlType;

/// A row-major weight matrix view: `rows` rows of `cols` elements of `ty` (ggml's `[cols, rows]`).
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
    pub row_bytes: usize,
    pub layout: Layout,
    k: &'static Kernels,
}

impl<'a> MatRef<'a> {
    /// A view over `data`, which must hold exactly `rows` rows of `cols` elements of `ty`.
    /// Returns `None` if the sizes disagree or ggml has no matmul kernel for `ty`.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Option<MatRef<'a>> {
        let row_bytes = ty.row_bytes(cols as u64)? as usize;
        if data.len() != row_bytes.checked_mul(rows)? {
            return None;
        }
        let k = kernels(ty)?;
        Some(MatRef { ty, rows, cols, data, row_bytes, layout: Layout::Plain, k })
    }

    /// A view over bytes already repacked into `layout` (see [`repack`]); `None` if the shape
    /// cannot be in that layout or the sizes disagree.
    pub fn repacked(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8], layout: Layout) -> Option<MatRef<'a>> {
        if repack::repackable(ty, rows, cols) != Some(layout) {
            return None;
        }
        let m = MatRef::new(ty, rows, cols, data)?;
        Some(MatRef { layout, ..m })
    }

    pub fn kernels(&self) -> &'static Kernels {
        self.k
    }

    /// Row `r` in ggml's plain layout.
    #[inline]
    pub fn row(&self, r: usize) -> &'a [u8] {
        debug_assert_eq!(self.layout, Layout::Plain);
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Dequantize row `r` into `out` (`cols` long). Plain layout only.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(self.layout, Layout::Plain, "dequantize_row on a repacked weight");
        self.k.dequantize(self.row(r), out);
    }
}

/// Activations of `n_tok` tokens converted once to a weight type's `vec_dot_type`.
pub struct QActs {
    pub ty: GgmlType,
    pub n_tok: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub data: Vec<u8>,
    /// Whole groups of 4 tokens in the interleaved Q8_0×4 layout the repacked GEMM reads
    /// (Q8_0 activations only).
    pub grouped: Vec<u8>,
}

impl QActs {
    pub fn new() -> QActs {
        QActs { ty: GgmlType::F32, n_tok: 0, cols: 0, row_bytes: 0, data: Vec::new(), grouped: Vec::new() }
    }

    /// Convert `x` (`n_tok` rows of `cols` floats) for multiplication with weights using `k`.
    pub fn quantize(&mut self, k: &Kernels, x: &[f32], cols: usize) {
        let n_tok = x.len() / cols;
        self.ty = k.vec_dot_type;
        self.n_tok = n_tok;
        self.cols = cols;
        self.row_bytes = k.act_row_bytes(cols);
        self.data.resize(self.row_bytes * n_tok, 0);
        for (t, xs) in x.chunks_exact(cols).enumerate() {
            k.quantize_act(xs, &mut self.data[t * self.row_bytes..(t + 1) * self.row_bytes]);
        }
        let groups = if self.ty == GgmlType::Q8_0 { n_tok / GEMM_TOKENS } else { 0 };
        let gb = GEMM_TOKENS * self.row_bytes;
        self.grouped.resize(groups * gb, 0);
        for g in 0..groups {
            let xs = &x[g * GEMM_TOKENS * cols..(g + 1) * GEMM_TOKENS * cols];
            repack::quantize_4x8(xs, cols, &mut self.grouped[g * gb..(g + 1) * gb]);
        }
    }

    #[inline]
    pub fn row(&self, t: usize) -> &[u8] {
        &self.data[t * self.row_bytes..(t + 1) * self.row_bytes]
    }
}

impl Default for QActs {
    fn default() -> Self {
        QActs::new()
    }
}

/// An output buffer that threads fill at disjoint indices: it borrows the buffer uniquely for its
/// lifetime, so nothing reads the values until the writers are done; `set` is `unsafe` because
/// only its callers can know that no two threads write one index.
pub struct SharedOut<'a> {
    cells: &'a [UnsafeCell<f32>],
}

// SAFETY: shared across the pool's threads only to call `set`/`span`, whose callers guarantee
// (their `# Safety`) that each index is written by one thread during a job; nothing reads the
// cells through a `SharedOut`.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub fn new(out: &'a mut [f32]) -> SharedOut<'a> {
        let len = out.len();
        let ptr = out.as_mut_ptr() as *const UnsafeCell<f32>;
        // SAFETY: UnsafeCell<f32> has the same layout as f32, and we hold the unique borrow.
        SharedOut { cells: unsafe { std::slice::from_raw_parts(ptr, len) } }
    }

    /// Write `v` at index `i` (bounds-checked).
    ///
    /// # Safety
    /// No other thread may write index `i` while this `SharedOut` is shared.
    #[inline]
    pub unsafe fn set(&self, i: usize, v: f32) {
        // SAFETY: the caller guarantees no other thread touches index `i`; `cells` is borrowed
        // from a unique `&mut [f32]`, so nobody reads it meanwhile.
        unsafe { *self.cells[i].get() = v }
    }

    /// Pointer to element `i` for a kernel that writes `len` floats from there.
    #[inline]
    fn span(&self, i: usize, len: usize) -> *mut f32 {
        assert!(i + len <= self.cells.len(), "output span out of bounds");
        self.cells[i].get()
    }
}

/// One product in a batch: `out[t * out_stride + out_offset + r] = w.row(r) · act.row(t)`.
pub struct MatJob<'a> {
    pub w: MatRef<'a>,
    pub act: &'a QActs,
    /// Only these tokens of `act` (all if `None`).
    pub tokens: Option<&'a [u32]>,
    pub out: &'a SharedOut<'a>,
    pub out_stride: usize,
    pub out_offset: usize,
    /// A ggml `mul_mat` (attention, router, output, dense FFN), not a routed expert's
    /// `mul_mat_id`: where llama.cpp hands such a batch to llamafile's tinyBLAS, sum as it does
    /// (see [`llamafile_dot`]).
    pub mul_mat: bool,
}

/// Smallest chunk of rows handed to a thread (a multiple of the repacked layouts' 8-row groups).
const ROW_CHUNK: usize = 16;

/// Run all products as one parallel job over the concatenated rows (see `ThreadPool::for_each_affine`).
///
/// # Safety
/// No two jobs may write the same output index (the indices `t * out_stride + out_offset + r` of
/// different jobs sharing a `SharedOut` are disjoint); each job's indices are in bounds (checked).
pub unsafe fn matmul_batch(pool: &ThreadPool, jobs: &[MatJob<'_>]) {
    // Each thread walks its own contiguous stretch of the batch's rows in 16-row chunks and
    // then steals the others' leftovers. Measured on 2 cores, decode of a 12-layer Qwen3-MoE
    // Q4_0 against llama.cpp in paired runs: chunks handed out in global order 0.96–0.98×; a
    // static half per thread 1.05–1.10×, but idle at every join when the host slows one core;
    // this 1.06–1.13×.
    let mut starts = Vec::with_capacity(jobs.len() + 1);
    let mut total = 0usize;
    for j in jobs {
        assert!(j.act.ty == j.w.k.vec_dot_type && j.act.cols == j.w.cols, "activations converted for another weight");
        starts.push(total);
        total += j.w.rows.div_ceil(ROW_CHUNK);
    }
    starts.push(total);
    pool.for_each_affine(total, &|c| {
        let ji = starts.partition_point(|&s| s <= c) - 1;
        let j = &jobs[ji];
        let r0 = (c - starts[ji]) * ROW_CHUNK;
        run_rows(j, r0..(r0 + ROW_CHUNK).min(j.w.rows));
    });
}

/// Whether llama.cpp's CPU `mul_mat` gives this product to llamafile's tinyBLAS (float
/// kernels): F32 or F16 weights (F16 activations after conversion), a batch of 2+ rows, the
/// inner dimension a multiple of 16 (one AVX-512 vector) and the output rows of 4.
fn llamafile_float(j: &MatJob<'_>, n_tok: usize) -> bool {
    j.mul_mat
        && n_tok >= 2
        && matches!(j.w.ty, GgmlType::F32 | GgmlType::F16)
        && j.w.cols.is_multiple_of(16)
        && j.w.rows.is_multiple_of(4)
}

/// One output of tinyBLAS's float GEMM: sixteen lanes, each a fused multiply-add chain over
/// every sixteenth element in order, then summed as `_mm512_reduce_add_ps` sums (halving).
/// `ty` is F32 or F16 (both operands in it).
pub fn llamafile_dot(ty: GgmlType, n: usize, w: &[u8], x: &[u8]) -> f32 {
    let f16 = ty == GgmlType::F16;
    let es = if f16 { 2 } else { 4 };
    assert!(n.is_multiple_of(16) && w.len() >= n * es && x.len() >= n * es);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    {
        use std::arch::x86_64::*;
        // SAFETY: AVX2, FMA and F16C are enabled for this build (the cfg); every load reads 16
        // elements at element 16·l < n of `w` or `x`, which hold n elements (asserted).
        unsafe {
            let load = |p: &[u8], l: usize| -> (__m256, __m256) {
                if f16 {
                    let q = p.as_ptr().add(l * 32).cast::<__m128i>();
                    (_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q.add(1))))
                } else {
                    let q = p.as_ptr().add(l * 64).cast::<f32>();
                    (_mm256_loadu_ps(q), _mm256_loadu_ps(q.add(8)))
                }
            };
            // Lanes 0–7 and 8–15 of the sixteen.
            let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for l in 0..n / 16 {
                let ((a0, a1), (b0, b1)) = (load(w, l), load(x, l));
                lo = _mm256_fmadd_ps(a0, b0, lo);
                hi = _mm256_fmadd_ps(a1, b1, hi);
            }
            // Halving: lane i += lane i + 8, then + 4, + 2, + 1.
            let s8 = _mm256_add_ps(lo, hi);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
            _mm_cvtss_f32(s1)
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    {
        let mut acc = [0f32; 16];
        let at = |p: &[u8], i: usize| {
            if f16 {
                crate::ggml::f16_to_f32(u16::from_ne_bytes([p[2 * i], p[2 * i + 1]]))
            } else {
                f32::from_ne_bytes([p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]])
            }
        };
        for l in 0..n / 16 {
            for (t, a) in acc.iter_mut().enumerate() {
                *a = at(w, 16 * l + t).mul_add(at(x, 16 * l + t), *a);
            }
        }
        let mut len = 16;
        while len > 1 {
            len /= 2;
            for i in 0..len {
                acc[i] += acc[i + len];
            }
        }
        acc[0]
    }
}

#[inline]
fn run_rows(j: &MatJob<'_>, rows: std::ops::Range<usize>) {
    if j.w.layout != Layout::Plain {
        return run_rows_repacked(j, rows);
    }
    let k = j.w.k;
    let n = j.w.cols;
    let n_tok = j.tokens.map_or(j.act.n_tok, |t| t.len());
    let tiny = llamafile_float(j, n_tok);
    let dot = |wr: &[u8], x: &[u8]| if tiny { llamafile_dot(j.w.ty, n, wr, x) } else { k.dot(n, wr, x) };
    match j.tokens {
        None => {
            for r in rows {
                let wr = j.w.row(r);
                for t in 0..j.act.n_tok {
                    // SAFETY: output (t, r) belongs to this chunk of rows, which one thread runs.
                    unsafe { j.out.set(t * j.out_stride + j.out_offset + r, dot(wr, j.act.row(t))) };
                }
            }
        }
        Some(toks) => {
            for r in rows {
                let wr = j.w.row(r);
                for (i, &t) in toks.iter().enumerate() {
                    // SAFETY: output (i, r) belongs to this chunk of rows, which one thread runs.
                    unsafe { j.out.set(i * j.out_stride + j.out_offset + r, dot(wr, j.act.row(t as usize))) };
                }
            }
        }
    }
}

/// The repacked path: rows come in groups of 8 (chunks are multiples of 16, weights of 8 rows).
fn run_rows_repacked(j: &MatJob<'_>, rows: std::ops::Range<usize>) {
    let layout = j.w.layout;
    let (r0, nc) = (rows.start, rows.len());
    debug_assert!(r0 % 8 == 0 && nc % 8 == 0);
    let w = j.w.data[r0 * j.w.row_bytes..].as_ptr();
    let gemv = |act: &[u8], i: usize| {
        let out = j.out.span(i * j.out_stride + j.out_offset + r0, nc);
        // SAFETY: `w` starts at repacked row r0 (a multiple of 8) with `nc` rows after it, `act`
        // is one Q8_0 row of `cols`, and `out` has `nc` floats (checked by `span`); no other
        // thread writes these outputs.
        unsafe { repack::gemv(layout, j.w.cols, w, act.as_ptr(), out, nc) };
    };
    match j.tokens {
        None => {
            let groups = j.act.grouped.len() / (GEMM_TOKENS * j.act.row_bytes).max(1);
            if groups > 0 {
                let n_tok = groups * GEMM_TOKENS;
                let out = j.out.span(j.out_offset + r0, (n_tok - 1) * j.out_stride + nc);
                // SAFETY: as for gemv, with every group's interleaved activations (`grouped`
                // holds exactly `groups` of them) and `n_tok` output rows of `out_stride` floats,
                // of which we write columns r0..r0+nc.
                unsafe { repack::gemm(layout, j.w.cols, w, j.act.grouped.as_ptr(), n_tok, out, j.out_stride, nc) };
            }
            for t in groups * GEMM_TOKENS..j.act.n_tok {
                gemv(j.act.row(t), t);
            }
        }
        Some(toks) => {
            for (i, &t) in toks.iter().enumerate() {
                gemv(j.act.row(t as usize), i);
            }
        }
    }
}

/// `out[t][r] = w.row(r) · x[t]` for every token `t` of `x` (`n_tok × cols`, row-major).
pub fn matmul(pool: &ThreadPool, w: MatRef<'_>, x: &[f32], acts: &mut QActs, out: &mut [f32]) {
    acts.quantize(w.k, x, w.cols);
    let n_tok = acts.n_tok;
    assert_eq!(out.len(), n_tok * w.rows);
    let shared = SharedOut::new(out);
    // SAFETY: one job.
    unsafe {
        matmul_batch(
            pool,
            &[MatJob { w, act: acts, tokens: None, out: &shared, out_stride: w.rows, out_offset: 0, mul_mat: true }],
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let n_tok = x.len() / cols;
        let mut out = vec![0f32; n_tok * rows];
        for t in 0..n_tok {
            for r in 0..rows {
                out[t * rows + r] = (0..cols).map(|c| w[r * cols + c] * x[t * cols + c]).sum();
            }
        }
        out
    }

    fn quantize_weights(ty: GgmlType, w: &[f32], cols: usize) -> Vec<u8> {
        let k = kernels(ty).expect("kernels");
        let rb = ty.row_bytes(cols as u64).expect("row bytes") as usize;
        let mut out = vec![0u8; rb * (w.len() / cols)];
        for (i, row) in w.chunks_exact(cols).enumerate() {
            k.quantize_row(row, &mut out[i * rb..(i + 1) * rb]);
        }
        out
    }

    /// `llamafile_dot` is tinyBLAS's sum: sixteen fused multiply-add lanes, then halving.
    #[test]
    fn llamafile_dot_sums_as_sixteen_lanes_then_halves() {
        let n = 256;
        let w: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 / 333.0 - 1.5) * 1.7).collect();
        let x: Vec<f32> = (0..n).map(|i| ((i * 104729 % 997) as f32 / 498.5 - 1.0) * 0.3).collect();
        let lanes = |w: &[f32], x: &[f32]| {
            let mut acc = [0f32; 16];
            for l in 0..n / 16 {
                for t in 0..16 {
                    acc[t] = w[16 * l + t].mul_add(x[16 * l + t], acc[t]);
                }
            }
            for len in [8, 4, 2, 1] {
                for i in 0..len {
                    acc[i] += acc[i + len];
                }
            }
            acc[0]
        };
        let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_ne_bytes()).collect::<Vec<u8>>();
        assert_eq!(llamafile_dot(GgmlType::F32, n, &bytes(&w), &bytes(&x)), lanes(&w, &x));
        let h =
            |v: &[f32]| v.iter().map(|&f| crate::ggml::f16_to_f32(crate::ggml::f32_to_f16(f))).collect::<Vec<f32>>();
        let h16 = |v: &[f32]| v.iter().flat_map(|&f| crate::ggml::f32_to_f16(f).to_ne_bytes()).collect::<Vec<u8>>();
        assert_eq!(llamafile_dot(GgmlType::F16, n, &h16(&w), &h16(&x)), lanes(&h(&w), &h(&x)));
    }

    /// Every type's mat-mul agrees with a scalar f32 product within the type's error bound (NMSE).
    #[test]
    fn matmul_matches_f32_reference() {
        let (rows, cols, n_tok) = (37, 512, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5).collect();
        let x: Vec<f32> = (0..n_tok * cols).map(|i| (i * 104729 % 997) as f32 / 498.5 - 1.0).collect();
        let want = reference(&w, &x, rows, cols);
        let pool = ThreadPool::new(2);
        for (ty, tol) in [
            (GgmlType::F32, 1e-10),
            (GgmlType::F16, 1e-6),
            (GgmlType::Q8_0, 5e-4),
            (GgmlType::Q4_0, 2e-2),
            (GgmlType::Q4_K, 2e-2),
            (GgmlType::Q6_K, 2e-3),
            (GgmlType::Q2_K, 3e-1),
        ] {
            let data = if ty == GgmlType::F32 {
                w.iter().flat_map(|v| v.to_ne_bytes()).collect()
            } else {
                quantize_weights(ty, &w, cols)
            };
            let m = MatRef::new(ty, rows, cols, &data).expect("matref");
            let mut out = vec![0f32; n_tok * rows];
            matmul(&pool, m, &x, &mut QActs::new(), &mut out);
            // Normalized mean squared error, as llama.cpp's test-backend-ops measures it.
            let num: f64 = out.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
            let nmse = num / den;
            eprintln!("{ty:?}: nmse {nmse:e}");
            assert!(nmse < tol, "{ty:?}: NMSE {nmse:e} ≥ {tol:e}");
        }
    }
}
