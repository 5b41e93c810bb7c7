//! The CPU backend's KV cache: per layer, one row of K and one of V per position, stored as f16
//! (llama.cpp's default) or f32, and attention over it computed the way ggml's CPU flash
//! attention computes it. Invariant: rows `0..len` hold the keys/values of the tokens seen so far.

use crate::backend::{KvConfig, KvType};
use crate::ggml::{f16_to_f32, kernels};

/// Which keys and values one query attends to: kv head `kv_head` of `layer`, positions
/// `0..n_pos`.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub layer: usize,
    pub kv_head: usize,
    pub n_pos: usize,
}

/// Buffers one `attend` call reuses: the f16 value accumulator and the scores.
#[derive(Default)]
pub struct AttendScratch {
    acc16: Vec<u16>,
    scores: Vec<f32>,
}

pub struct KvCache {
    ty: KvType,
    n_ctx: usize,
    kv_dim: usize,
    head_dim: usize,
    /// Bytes of one head's row.
    head_bytes: usize,
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
}

impl KvCache {
    pub fn new(cfg: &KvConfig) -> KvCache {
        let KvConfig { ty, n_layer, n_ctx, n_head_kv, head_dim } = *cfg;
        let kv_dim = n_head_kv * head_dim;
        let elem = if ty == KvType::F16 { 2 } else { 4 };
        let bytes = n_ctx * kv_dim * elem;
        KvCache {
            ty,
            n_ctx,
            kv_dim,
            head_dim,
            head_bytes: head_dim * elem,
            k: (0..n_layer).map(|_| vec![0u8; bytes]).collect(),
            v: (0..n_layer).map(|_| vec![0u8; bytes]).collect(),
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn ty(&self) -> KvType {
        self.ty
    }

    /// Total bytes held.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.len()).sum()
    }

    /// Store the key and value rows of position `pos` in layer `l`.
    pub fn store(&mut self, l: usize, pos: usize, k: &[f32], v: &[f32]) {
        let row = self.kv_dim * self.head_bytes / self.head_dim;
        let kk = kernels(self.ty.ggml()).expect("kv kernels");
        kk.quantize_row_any(k, &mut self.k[l][pos * row..(pos + 1) * row]);
        kk.quantize_row_any(v, &mut self.v[l][pos * row..(pos + 1) * row]);
    }

    /// Head `h`'s key at `pos` in layer `l`, as raw bytes of the cache type.
    #[inline]
    pub fn k_head(&self, l: usize, pos: usize, h: usize) -> &[u8] {
        let off = pos * self.kv_dim * self.head_bytes / self.head_dim + h * self.head_bytes;
        &self.k[l][off..off + self.head_bytes]
    }

    /// Attention of one query head over positions `0..n_pos` of kv head `h` in layer `l`, the
    /// way ggml's CPU flash attention computes it: scores summed like the reference build's
    /// `vec_dot_f16` (`ops::dot_f16`, all positions' at once; ggml's `vec_dot` for an f32
    /// cache), an online softmax, and the value accumulator kept in the cache's own precision
    /// (f16 rounding after every step for an f16 cache). `q` is the query already converted to
    /// the cache type; `out` takes the head's output.
    pub fn attend(&self, head: Head, q: &[u8], scale: f32, out: &mut [f32], s: &mut AttendScratch) {
        let Head { layer: l, kv_head: h, n_pos } = head;
        let kk = kernels(self.ty.ggml()).expect("kv kernels");
        let hd = self.head_dim;
        let row = self.kv_dim * self.head_bytes / hd;
        let mut sum = 0f32;
        let mut max = f32::NEG_INFINITY;
        out.iter_mut().for_each(|v| *v = 0.0);
        s.acc16.clear();
        s.acc16.resize(hd, 0);
        let acc16 = &mut s.acc16;
        s.scores.resize(n_pos, 0.0);
        match self.ty {
            KvType::F16 => super::ops::dot_f16_strided(&self.k[l][h * self.head_bytes..], row, q, &mut s.scores),
            KvType::F32 => (0..n_pos).for_each(|p| s.scores[p] = kk.dot(hd, self.k_head(l, p, h), q)),
        }
        for p in 0..n_pos {
            let s = s.scores[p] * scale;
            let (mut ms, mut vs) = (1.0f32, 1.0f32);
            if s > max {
                let old = max;
                max = s;
                ms = (old - max).exp();
                if ms != 1.0 {
                    self.scale_acc(out, acc16, ms);
                }
            } else {
                vs = (s - max).exp();
            }
            let off = p * self.kv_dim * self.head_bytes / hd + h * self.head_bytes;
            let v = &self.v[l][off..off + self.head_bytes];
            match self.ty {
                KvType::F16 => super::ops::mad_f16(acc16, v, vs),
                KvType::F32 => {
                    for (a, b) in out.iter_mut().zip(v.chunks_exact(4)) {
                        *a += f32::from_ne_bytes([b[0], b[1], b[2], b[3]]) * vs;
                    }
                }
            }
            // ggml's `S = S*ms + vs`, which its compiler contracts to one fused multiply-add.
            sum = sum.mul_add(ms, vs);
        }
        if self.ty == KvType::F16 {
            out.iter_mut().zip(acc16.iter()).for_each(|(o, &a)| *o = f16_to_f32(a));
        }
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        out.iter_mut().for_each(|v| *v *= inv);
    }

    fn scale_acc(&self, out: &mut [f32], acc16: &mut [u16], ms: f32) {
        match self.ty {
            KvType::F16 => super::ops::scale_f16(acc16, ms),
            KvType::F32 => out.iter_mut().for_each(|a| *a *= ms),
        }
    }
}
