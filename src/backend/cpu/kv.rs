//! The CPU backend's KV cache: per layer, one row of K and one of V per position (or K alone when
//! each value is a prefix of its key, DeepSeek's MLA), stored as f16 (llama.cpp's default) or f32, and attention over it computed the way ggml's CPU flash
//! attention computes it. Invariant: rows `0..len` hold the keys/values of the tokens seen so far.

use crate::backend::{KvConfig, KvType, Values};
use crate::ggml::{f16_to_f32, kernels};

/// Which keys and values one query attends to: kv head `kv_head` of `layer`, positions
/// `start..n_pos` (`start` > 0 under a sliding window).
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub layer: usize,
    pub kv_head: usize,
    pub start: usize,
    pub n_pos: usize,
}

/// Query rows (and key positions) per tile of the tiled attention path: ggml's CPU flash
/// attention takes it for batches of at least this many query rows, in tiles of this size
/// from key position 0.
pub const TILE: usize = 64;

/// A tile of query rows of one head for [`KvCache::attend_tile`]: rows sit at positions
/// `pos0..pos0 + rows`; each sees the keys at or before its own position and, with a sliding
/// `window` (0: none), fewer than `window` positions back.
#[derive(Debug, Clone, Copy)]
pub struct QTile {
    pub layer: usize,
    pub kv_head: usize,
    pub pos0: usize,
    pub rows: usize,
    pub window: usize,
}

impl QTile {
    fn sees(&self, row: usize, pos: usize) -> bool {
        let q = self.pos0 + row;
        pos <= q && (self.window == 0 || q - pos < self.window)
    }
}

/// Buffers one `attend_tile` call reuses (all f32): a key tile transposed, a value tile, the
/// scores, and per row the running max, sum and output accumulator.
#[derive(Default)]
pub struct TileScratch {
    kt: Vec<f32>,
    vt: Vec<f32>,
    kq: Vec<f32>,
    p: Vec<f32>,
    m: Vec<f32>,
    s: Vec<f32>,
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
    /// Bytes of one head's key.
    head_bytes: usize,
    /// Elements of one head's value.
    v_dim: usize,
    /// Bytes of one head's value.
    v_head_bytes: usize,
    /// Values are the first `v_dim` elements of the keys (`v` is empty).
    v_in_k: bool,
    /// Positions each layer holds: `n_ctx`, or a sliding-window layer's ring length (position p
    /// lives in row `p % len`).
    lens: Vec<usize>,
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
}

impl KvCache {
    pub fn new(cfg: &KvConfig) -> KvCache {
        let KvConfig { ty, n_layer, n_ctx, n_head_kv, head_dim, values, .. } = *cfg;
        let kv_dim = n_head_kv * head_dim;
        let elem = if ty == KvType::F16 { 2 } else { 4 };
        let lens: Vec<usize> = (0..n_layer).map(|l| cfg.layer_len(l).max(1)).collect();
        let v_in_k = matches!(values, Values::KeyPrefix(_));
        let v_dim = values.dim(head_dim);
        KvCache {
            ty,
            n_ctx,
            kv_dim,
            head_dim,
            head_bytes: head_dim * elem,
            v_dim,
            v_head_bytes: v_dim * elem,
            v_in_k,
            k: lens.iter().map(|&n| vec![0u8; n * kv_dim * elem]).collect(),
            v: lens.iter().map(|&n| if v_in_k { Vec::new() } else { vec![0u8; n * kv_dim * elem] }).collect(),
            lens,
        }
    }

    /// The row of layer `l` that holds position `pos`.
    #[inline]
    fn slot(&self, l: usize, pos: usize) -> usize {
        pos % self.lens[l]
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

    /// Store the key and value rows of position `pos` in layer `l` (`v` is ignored when the
    /// values are key prefixes).
    pub fn store(&mut self, l: usize, pos: usize, k: &[f32], v: &[f32]) {
        let row = self.kv_dim * self.head_bytes / self.head_dim;
        let kk = kernels(self.ty.ggml()).expect("kv kernels");
        let r = self.slot(l, pos);
        kk.quantize_row_any(k, &mut self.k[l][r * row..(r + 1) * row]);
        if !self.v_in_k {
            kk.quantize_row_any(v, &mut self.v[l][r * row..(r + 1) * row]);
        }
    }

    /// Head `h`'s value at `pos` in layer `l`, as raw bytes of the cache type.
    #[inline]
    fn v_head(&self, l: usize, pos: usize, h: usize) -> &[u8] {
        if self.v_in_k {
            &self.k_head(l, pos, h)[..self.v_head_bytes]
        } else {
            let off = self.slot(l, pos) * self.kv_dim * self.head_bytes / self.head_dim + h * self.head_bytes;
            &self.v[l][off..off + self.head_bytes]
        }
    }

    /// Head `h`'s key at `pos` in layer `l`, as raw bytes of the cache type.
    #[inline]
    pub fn k_head(&self, l: usize, pos: usize, h: usize) -> &[u8] {
        let off = self.slot(l, pos) * self.kv_dim * self.head_bytes / self.head_dim + h * self.head_bytes;
        &self.k[l][off..off + self.head_bytes]
    }

    /// Attention of one query head over positions `0..n_pos` of kv head `h` in layer `l`, the
    /// way ggml's CPU flash attention computes it: scores summed like the reference build's
    /// `vec_dot_f16` (`ops::dot_f16`, all positions' at once; ggml's `vec_dot` for an f32
    /// cache), an online softmax, and the value accumulator kept in the cache's own precision
    /// (f16 rounding after every step for an f16 cache). `q` is the query already converted to
    /// the cache type; `out` takes the head's output.
    pub fn attend(&self, head: Head, q: &[u8], scale: f32, sink: Option<f32>, out: &mut [f32], s: &mut AttendScratch) {
        let Head { layer: l, kv_head: h, start, n_pos } = head;
        let kk = kernels(self.ty.ggml()).expect("kv kernels");
        let hd = self.head_dim;
        let row = self.kv_dim * self.head_bytes / hd;
        let mut sum = 0f32;
        let mut max = f32::NEG_INFINITY;
        out.iter_mut().for_each(|v| *v = 0.0);
        s.acc16.clear();
        s.acc16.resize(self.v_dim, 0);
        let acc16 = &mut s.acc16;
        s.scores.resize(n_pos - start, 0.0);
        match self.ty {
            KvType::F16 => {
                // Contiguous runs of rows (a ring wraps at most once over a window).
                let mut p = start;
                while p < n_pos {
                    let r = self.slot(l, p);
                    let run = (n_pos - p).min(self.lens[l] - r);
                    let k0 = r * row + h * self.head_bytes;
                    super::ops::dot_f16_strided(&self.k[l][k0..], row, q, &mut s.scores[p - start..p - start + run]);
                    p += run;
                }
            }
            KvType::F32 => (start..n_pos).for_each(|p| s.scores[p - start] = kk.dot(hd, self.k_head(l, p, h), q)),
        }
        for p in start..n_pos {
            let s = s.scores[p - start] * scale;
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
            let v = self.v_head(l, p, h);
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
        if let Some(sink) = sink {
            merge_sink(sink, max, &mut sum, out);
        }
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        out.iter_mut().for_each(|v| *v *= inv);
    }

    /// Attention of a tile of query rows (f32, `rows × head_dim`) of one head, the way ggml's
    /// tiled CPU flash attention computes it for prompt batches of [`TILE`]+ rows: keys and
    /// values widened to f32 a tile of [`TILE`] positions at a time (tiles from position 0),
    /// every score one fused multiply-add chain over the head (the query stays f32), one
    /// rescale per key tile, ggml's vector `exp` with its f64 sum per tile, and the values
    /// accumulated in f32 (one fused multiply-add per key, in order). Rows are independent:
    /// which tile a row lands in changes nothing. `out` takes `rows × v_dim`.
    pub fn attend_tile(
        &self,
        t: QTile,
        q: &[f32],
        scale: f32,
        sink: Option<f32>,
        out: &mut [f32],
        s: &mut TileScratch,
    ) {
        let (hd, dv) = (self.head_dim, self.v_dim);
        let (rows, l, h) = (t.rows, t.layer, t.kv_head);
        assert!(q.len() == rows * hd && out.len() == rows * dv);
        let elem = self.head_bytes / hd;
        let row_bytes = self.kv_dim * elem;
        s.kt.resize(hd * TILE, 0.0);
        s.vt.resize(TILE * dv, 0.0);
        s.kq.resize(rows * TILE, 0.0);
        s.p.resize(TILE, 0.0);
        s.m.clear();
        s.m.resize(rows, f32::NEG_INFINITY);
        s.s.clear();
        s.s.resize(rows, 0.0);
        out.iter_mut().for_each(|v| *v = 0.0);
        let widen = |src: &[u8], dst: &mut [f32]| match self.ty {
            KvType::F16 => dst.iter_mut().zip(src.chunks_exact(2)).for_each(|(d, b)| {
                *d = f16_to_f32(u16::from_ne_bytes([b[0], b[1]]));
            }),
            KvType::F32 => dst.iter_mut().zip(src.chunks_exact(4)).for_each(|(d, b)| {
                *d = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            }),
        };
        let last = t.pos0 + rows; // one past the last key any row sees
        let mut kbuf = vec![0f32; hd];
        for c in (0..last).step_by(TILE) {
            let n = TILE.min(last - c);
            if !(0..rows).any(|r| (c..c + n).any(|p| t.sees(r, p))) {
                continue;
            }
            // Keys transposed ([dim][position], positions contiguous), zero past the last.
            s.kt.iter_mut().for_each(|v| *v = 0.0);
            for j in 0..n {
                let off = self.slot(l, c + j) * row_bytes + h * self.head_bytes;
                widen(&self.k[l][off..off + self.head_bytes], &mut kbuf);
                for (d, &k) in kbuf.iter().enumerate() {
                    s.kt[d * TILE + j] = k;
                }
            }
            s.vt.iter_mut().for_each(|v| *v = 0.0);
            for j in 0..n {
                widen(self.v_head(l, c + j, h), &mut s.vt[j * dv..(j + 1) * dv]);
            }
            for r in 0..rows {
                let kq = &mut s.kq[r * TILE..(r + 1) * TILE];
                kq.iter_mut().for_each(|v| *v = 0.0);
                for (d, &qd) in q[r * hd..(r + 1) * hd].iter().enumerate() {
                    let kt = &s.kt[d * TILE..(d + 1) * TILE];
                    kq.iter_mut().zip(kt).for_each(|(a, &k)| *a = qd.mul_add(k, *a));
                }
                let mut tile_max = f32::NEG_INFINITY;
                for (j, v) in kq.iter_mut().enumerate() {
                    *v = if t.sees(r, c + j) && j < n { *v * scale } else { f32::NEG_INFINITY };
                    tile_max = tile_max.max(*v);
                }
                if tile_max == f32::NEG_INFINITY {
                    continue;
                }
                let acc = &mut out[r * dv..(r + 1) * dv];
                let m_new = s.m[r].max(tile_max);
                if m_new > s.m[r] {
                    let ms = (s.m[r] - m_new).exp();
                    acc.iter_mut().for_each(|a| *a *= ms);
                    s.s[r] *= ms;
                }
                s.m[r] = m_new;
                s.s[r] = (s.s[r] as f64 + crate::ggml::vec_soft_max(&mut s.p, kq, m_new)) as f32;
                for (j, &p) in s.p.iter().enumerate() {
                    let v = &s.vt[j * dv..(j + 1) * dv];
                    acc.iter_mut().zip(v).for_each(|(a, &v)| *a = p.mul_add(v, *a));
                }
            }
        }
        for r in 0..rows {
            let acc = &mut out[r * dv..(r + 1) * dv];
            if let Some(sink) = sink {
                merge_sink(sink, s.m[r], &mut s.s[r], acc);
            }
            let inv = if s.s[r] == 0.0 { 0.0 } else { 1.0 / s.s[r] };
            acc.iter_mut().for_each(|v| *v *= inv);
        }
    }

    fn scale_acc(&self, out: &mut [f32], acc16: &mut [u16], ms: f32) {
        match self.ty {
            KvType::F16 => super::ops::scale_f16(acc16, ms),
            KvType::F32 => out.iter_mut().for_each(|a| *a *= ms),
        }
    }
}

/// An attention sink (one logit per head with no value, gpt-oss) joins the softmax after the last
/// key, as ggml merges it: the accumulator rescaled if it raises the max, the sum grown by its
/// share (one fused multiply-add).
fn merge_sink(sink: f32, max: f32, sum: &mut f32, acc: &mut [f32]) {
    let (mut ms, mut vs) = (1.0f32, 1.0f32);
    if sink > max {
        ms = (max - sink).exp();
        acc.iter_mut().for_each(|a| *a *= ms);
    } else {
        vs = (sink - max).exp();
    }
    *sum = sum.mul_add(ms, vs);
}
