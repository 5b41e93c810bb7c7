//! Row-interleaved weight layouts for ggml's repacked kernels: Q4_0 and MXFP4 rows in groups of
//! 8, interleaved 8 bytes at a time (`block_q4_0x8`, `block_mxfp4x8`), multiplied by
//! `ggml_gemv_*_8x8_q8_0` / `ggml_gemm_*_8x8_q8_0` — the kernels llama.cpp itself picks for these
//! types on AVX2 and AVX-512. Layout knowledge only; where repacked copies live is the model's
//! business.

use std::ffi::{c_int, c_void};

use crate::gguf::GgmlType;

// SAFETY (for the declarations): these are exported C functions of the ggml-cpu library we link
// (see repack.h); the signatures match their definitions.
extern "C" {
    fn ggml_gemv_q4_0_8x8_q8_0(
        n: c_int,
        s: *mut f32,
        bs: usize,
        vx: *const c_void,
        vy: *const c_void,
        nr: c_int,
        nc: c_int,
    );
    fn ggml_gemm_q4_0_8x8_q8_0(
        n: c_int,
        s: *mut f32,
        bs: usize,
        vx: *const c_void,
        vy: *const c_void,
        nr: c_int,
        nc: c_int,
    );
    fn ggml_gemv_mxfp4_8x8_q8_0(
        n: c_int,
        s: *mut f32,
        bs: usize,
        vx: *const c_void,
        vy: *const c_void,
        nr: c_int,
        nc: c_int,
    );
    fn ggml_gemm_mxfp4_8x8_q8_0(
        n: c_int,
        s: *mut f32,
        bs: usize,
        vx: *const c_void,
        vy: *const c_void,
        nr: c_int,
        nc: c_int,
    );
    fn ggml_quantize_mat_q8_0_4x8(x: *const f32, vy: *mut c_void, k: i64);
}

/// How a weight's bytes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// ggml's row-major blocks, as in the GGUF file.
    Plain,
    /// Q4_0 in groups of 8 rows, 8-byte interleave.
    Q4_0x8,
    /// MXFP4 in groups of 8 rows: the 8 scales of a block column, then the nibbles, 8-byte
    /// interleave.
    Mxfp4x8,
}

const Q4_0_BLOCK: usize = 18;
const Q4_0_GROUP: usize = 8;
const MXFP4_BLOCK: usize = 17;
/// Rows of activations `gemm` takes at once.
pub const GEMM_TOKENS: usize = 4;

/// Whether a `rows × cols` weight of type `ty` can be repacked (and into what).
pub fn repackable(ty: GgmlType, rows: usize, cols: usize) -> Option<Layout> {
    if !rows.is_multiple_of(Q4_0_GROUP) || !cols.is_multiple_of(32) {
        return None;
    }
    match ty {
        GgmlType::Q4_0 => Some(Layout::Q4_0x8),
        GgmlType::MXFP4 => Some(Layout::Mxfp4x8),
        _ => None,
    }
}

/// Repack plain rows of `layout`'s type into it (`src` and `dst` of the same length).
pub fn repack(layout: Layout, src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    match layout {
        Layout::Plain => dst.copy_from_slice(src),
        Layout::Q4_0x8 => repack_q4_0x8(src, rows, cols, dst),
        Layout::Mxfp4x8 => repack_mxfp4x8(src, rows, cols, dst),
    }
}

/// Repack plain MXFP4 rows (`src`, `rows × cols`) into `dst` (same length) as `Mxfp4x8`: per
/// group of 8 rows and block column, the 8 rows' scale bytes, then the nibbles as is.
pub fn repack_mxfp4x8(src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    interleave_8x8(src, rows, cols, MXFP4_BLOCK, 1, 0, dst);
}

/// Repack plain Q4_0 rows (`src`, `rows × cols`) into `dst` (same length) as `Q4_0x8`: the 8
/// rows' f16 scales, then the nibbles flipped to unsigned by xor 0x88 (what the kernel's lookup
/// expects).
pub fn repack_q4_0x8(src: &[u8], rows: usize, cols: usize, dst: &mut [u8]) {
    interleave_8x8(src, rows, cols, Q4_0_BLOCK, 2, 0x88, dst);
}

/// ggml's 8x8 interleave of blocks of 32 values (`block` bytes, a `scale`-byte scale first, 16
/// bytes of nibbles after): per group of 8 rows and block column, the 8 scales in row order,
/// then 16 chunks of 8 bytes, chunk i being bytes (i/8)·8.. of row i%8's nibbles, each xor `flip`.
fn interleave_8x8(src: &[u8], rows: usize, cols: usize, block: usize, scale: usize, flip: u8, dst: &mut [u8]) {
    let nb = cols / 32;
    let row_bytes = nb * block;
    assert_eq!(src.len(), rows * row_bytes);
    assert_eq!(dst.len(), src.len());
    assert_eq!(rows % Q4_0_GROUP, 0);
    // Eight bytes at a time (this runs on every expert a cache slot receives).
    let flip8 = u64::from_ne_bytes([flip; 8]);
    for g in 0..rows / Q4_0_GROUP {
        let rows8 = &src[g * Q4_0_GROUP * row_bytes..][..Q4_0_GROUP * row_bytes];
        for b in 0..nb {
            let out = &mut dst[(g * nb + b) * block * Q4_0_GROUP..][..block * Q4_0_GROUP];
            let (scales, nibbles) = out.split_at_mut(scale * Q4_0_GROUP);
            for (i, sc) in scales.chunks_exact_mut(scale).enumerate() {
                sc.copy_from_slice(&rows8[i * row_bytes + b * block..][..scale]);
            }
            for (i, chunk) in nibbles.chunks_exact_mut(8).enumerate() {
                let at = (i % 8) * row_bytes + b * block + scale + (i / 8) * 8;
                let mut v = [0u8; 8];
                v.copy_from_slice(&rows8[at..at + 8]);
                chunk.copy_from_slice(&(u64::from_ne_bytes(v) ^ flip8).to_ne_bytes());
            }
        }
    }
}

/// `out[r] = w.row(r) · act` for rows `r0..r0+nc` of a weight repacked in `layout`; `act` is one
/// Q8_0 row.
///
/// # Safety
/// `w` holds the repacked rows `r0..r0+nc` (`nc` and `r0` multiples of 8) of `cols` columns, `act`
/// one Q8_0 row of `cols`, and `out` has room for `nc` floats; `layout` is not `Plain`.
pub unsafe fn gemv(layout: Layout, cols: usize, w: *const u8, act: *const u8, out: *mut f32, nc: usize) {
    let f = match layout {
        Layout::Mxfp4x8 => ggml_gemv_mxfp4_8x8_q8_0,
        _ => ggml_gemv_q4_0_8x8_q8_0,
    };
    // SAFETY: forwarded to the caller's contract.
    unsafe { f(cols as c_int, out, nc, w.cast(), act.cast(), 1, nc as c_int) }
}

/// `n_tok` tokens (a multiple of 4) at once: `out[t * out_stride + r]` for t in 0..n_tok; `act4`
/// holds their groups of four from [`quantize_4x8`], one after another. One call for all of them,
/// as llama.cpp makes it: ggml's AVX-512 kernel takes 16 tokens × 16 rows at a time, and only
/// when it is given at least 16 tokens.
///
/// # Safety
/// As [`gemv`], with `act4` holding `n_tok / 4` groups and `out` covering `n_tok` rows of
/// `out_stride` floats.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    layout: Layout,
    cols: usize,
    w: *const u8,
    act4: *const u8,
    n_tok: usize,
    out: *mut f32,
    out_stride: usize,
    nc: usize,
) {
    debug_assert!(n_tok.is_multiple_of(GEMM_TOKENS));
    let f = match layout {
        Layout::Mxfp4x8 => ggml_gemm_mxfp4_8x8_q8_0,
        _ => ggml_gemm_q4_0_8x8_q8_0,
    };
    // SAFETY: forwarded to the caller's contract.
    unsafe { f(cols as c_int, out, out_stride, w.cast(), act4.cast(), n_tok as c_int, nc as c_int) }
}

/// Quantize 4 rows of `cols` floats (contiguous) into the interleaved Q8_0×4 layout `gemm` reads.
pub fn quantize_4x8(x: &[f32], cols: usize, out: &mut [u8]) {
    assert_eq!(x.len(), GEMM_TOKENS * cols);
    assert_eq!(out.len(), GEMM_TOKENS * (cols / 32) * 34);
    // SAFETY: sizes checked above: 4 rows in, 4 Q8_0 rows' worth of bytes out.
    unsafe { ggml_quantize_mat_q8_0_4x8(x.as_ptr(), out.as_mut_ptr().cast(), cols as i64) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::kernels;
    use crate::rng::SplitMix64;

    /// The repacked kernels give the same products as ggml's plain `vec_dot` (to rounding).
    #[test]
    fn repacked_gemv_and_gemm_match_vec_dot() {
        repacked_matches_vec_dot(GgmlType::Q4_0);
        repacked_matches_vec_dot(GgmlType::MXFP4);
    }

    fn repacked_matches_vec_dot(ty: GgmlType) {
        let (rows, cols) = (64, 512);
        let layout = repackable(ty, rows, cols).expect("repackable");
        let k = kernels(ty).expect("kernels");
        let q8 = kernels(GgmlType::Q8_0).expect("q8_0");
        let mut rng = SplitMix64::new(3);
        let rb = ty.row_bytes(cols as u64).expect("rb") as usize;
        let mut plain = vec![0u8; rows * rb];
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            row.iter_mut().for_each(|v| *v = rng.next_normal(1.0));
            k.quantize_row(&row, &mut plain[r * rb..(r + 1) * rb]);
        }
        let mut packed = vec![0u8; plain.len()];
        repack(layout, &plain, rows, cols, &mut packed);
        // 20 tokens: one call takes the AVX-512 path for 16 and the 4-token path for the rest.
        let n_tok = 20;
        let x: Vec<f32> = (0..n_tok * cols).map(|_| rng.next_normal(1.0)).collect();
        let arb = q8.act_row_bytes(cols);
        let mut acts = vec![0u8; n_tok * arb];
        for t in 0..n_tok {
            q8.quantize_row(&x[t * cols..(t + 1) * cols], &mut acts[t * arb..(t + 1) * arb]);
        }
        let want: Vec<f32> = (0..n_tok)
            .flat_map(|t| {
                (0..rows)
                    .map(|r| k.dot(cols, &plain[r * rb..(r + 1) * rb], &acts[t * arb..(t + 1) * arb]))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut got = vec![0f32; rows];
        // SAFETY: 64 repacked rows of 512, one Q8_0 row, room for 64 outputs.
        unsafe { gemv(layout, cols, packed.as_ptr(), acts.as_ptr(), got.as_mut_ptr(), rows) };
        for r in 0..rows {
            assert!(
                (got[r] - want[r]).abs() <= 1e-3 * want[r].abs().max(1.0),
                "{ty:?} gemv row {r}: {} vs {}",
                got[r],
                want[r]
            );
        }
        let mut a4 = vec![0u8; n_tok * arb];
        for g in 0..n_tok / GEMM_TOKENS {
            let (xs, out) = (&x[g * 4 * cols..(g + 1) * 4 * cols], &mut a4[g * 4 * arb..(g + 1) * 4 * arb]);
            quantize_4x8(xs, cols, out);
        }
        let mut got4 = vec![0f32; n_tok * rows];
        // SAFETY: as above, all groups of four, `n_tok` output rows of `rows` floats.
        unsafe { gemm(layout, cols, packed.as_ptr(), a4.as_ptr(), n_tok, got4.as_mut_ptr(), rows, rows) };
        for i in 0..n_tok * rows {
            let (g, w) = (got4[i], want[i]);
            assert!((g - w).abs() <= 1e-3 * w.abs().max(1.0), "{ty:?} gemm {i}: {g} vs {w}");
        }
    }
}
