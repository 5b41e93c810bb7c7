//! A deliberately plain backend: every weight row dequantized to f32 through ggml's `to_float`,
//! naive loops with f64 sums, one thread. It exists to prove the `Backend` seam and to be the
//! comparator other backends' kernels are checked against; it is not meant to be fast.
//!
//! It keeps llama.cpp's data types, not its arithmetic: an activation multiplied by a weight
//! takes the weight's `vec_dot_type` first (Q8_0 for Q4_0 weights, Q8_K for K-quants, …) and
//! K, V and the query take the KV cache's type, because those roundings are part of what the
//! model computes in llama.cpp (leaving them out flips a random-weight model's argmax); every
//! sum is then exact to f64. Invariant: no value is rounded anywhere else.

use std::borrow::Cow;
use std::sync::Arc;

use super::{AttnShape, Backend, BackendError, ExpertJob, Heads, HostAct, KvConfig, KvType, Op, Rope, Values};
use crate::arch::{Glu, RopeStyle};
use crate::ggml::{kernels, Kernels};
use crate::gguf::GgmlType;
use crate::model::{Model, Residency, Resident, VecRef, WeightDesc};

/// A weight's plain ggml bytes, wherever the host holds them.
#[derive(Clone, Copy)]
pub struct PlainMat<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    data: &'a [u8],
    row_bytes: usize,
    k: &'static Kernels,
}

impl PlainMat<'_> {
    /// Row `r` as f32 into `out` (`cols` long).
    fn row_f32(&self, r: usize, out: &mut [f32]) {
        self.k.dequantize(&self.data[r * self.row_bytes..(r + 1) * self.row_bytes], out);
    }
}

/// The plain backend reads every weight from the model's mapping.
pub struct PlainWeights(Arc<Model>);

/// Keys and values (rounded to the cache type, held as f32), per layer `[n_ctx, kv_dim]`; no
/// values when they are key prefixes.
pub struct PlainKv {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    kv_dim: usize,
    ty: KvType,
}

impl PlainKv {
    /// Element `i` of kv head column offset `kh`'s value at `pos`.
    fn value(&self, values: Values, layer: usize, pos: usize, kh: usize, i: usize) -> f32 {
        let at = pos * self.kv_dim + kh + i;
        match values {
            Values::Separate => self.v[layer][at],
            Values::KeyPrefix(_) => self.k[layer][at],
        }
    }
}

#[derive(Default)]
pub struct PlainBackend {
    row: Vec<f32>,
    act: Vec<f32>,
}

impl PlainBackend {
    pub fn new() -> PlainBackend {
        PlainBackend::default()
    }
}

fn supports(op: Op, ty: GgmlType) -> bool {
    // Both ops only dequantize rows.
    let _ = op;
    kernels(ty).is_some_and(|k| k.can_dequantize())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() as f32
}

/// `x` as ggml hands it to `w`'s kernels: converted to `w`'s `vec_dot_type`, back in f32.
fn as_vec_dot_type(w: &PlainMat<'_>, x: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.extend_from_slice(x);
    let vt = w.k.vec_dot_type;
    if vt == GgmlType::F32 {
        return;
    }
    let mut q = vec![0u8; w.k.act_row_bytes(x.len())];
    w.k.quantize_act(x, &mut q);
    match kernels(vt).filter(|k| k.can_dequantize()) {
        Some(k) => k.dequantize(&q, out),
        None => dequantize_q8(vt, &q, out),
    }
}

/// The 8-bit activation types ggml has no `to_float` for: Q8_1 (`d`, `s` as f16, 32 × i8) and
/// Q8_K (`d` as f32, 256 × i8, 16 × i16 sums).
fn dequantize_q8(ty: GgmlType, q: &[u8], out: &mut [f32]) {
    let (block, head, n) = match ty {
        GgmlType::Q8_1 => (36, 4, 32),
        GgmlType::Q8_K => (292, 4, 256),
        _ => panic!("no dequantization for activations of type {}", ty.name()),
    };
    for (b, o) in q.chunks_exact(block).zip(out.chunks_mut(n)) {
        let d = match ty {
            GgmlType::Q8_K => f32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            _ => crate::ggml::f16_to_f32(u16::from_ne_bytes([b[0], b[1]])),
        };
        for (o, &v) in o.iter_mut().zip(&b[head..head + n]) {
            *o = d * v as i8 as f32;
        }
    }
}

/// `v` rounded to the KV cache's type.
fn kv_round(ty: KvType, v: f32) -> f32 {
    match ty {
        KvType::F16 => half::f16::from_f32(v).to_f32(),
        KvType::F32 => v,
    }
}

impl Backend for PlainBackend {
    type Mat<'a> = PlainMat<'a>;
    type Vector<'a> = &'a [f32];
    type Weights = PlainWeights;
    type Act = HostAct;
    type Kv = PlainKv;
    type Hot = ();

    fn name(&self) -> &'static str {
        "plain f32"
    }

    fn supports(&self, op: Op, ty: GgmlType) -> bool {
        supports(op, ty)
    }

    fn take_weights(&mut self, model: &Arc<Model>, _residency: Residency) -> Result<PlainWeights, BackendError> {
        model.check_support(self.name(), supports)?;
        Ok(PlainWeights(Arc::clone(model)))
    }

    fn resident(_weights: &PlainWeights) -> (Resident, u64) {
        (Resident::None, 0)
    }

    fn mat<'a>(weights: &'a PlainWeights, w: &WeightDesc) -> PlainMat<'a> {
        Self::host_mat(w, weights.0.bytes_of(w))
    }

    fn vector(weights: &PlainWeights, v: VecRef) -> &[f32] {
        weights.0.vector(v)
    }

    fn host_mat<'a>(w: &WeightDesc, bytes: &'a [u8]) -> PlainMat<'a> {
        let k = kernels(w.ty).expect("weight types are checked when the weights are taken");
        let row_bytes = w.ty.row_bytes(w.cols as u64).expect("row size") as usize;
        assert_eq!(bytes.len(), row_bytes * w.rows, "a weight view of the wrong size");
        PlainMat { ty: w.ty, rows: w.rows, cols: w.cols, data: bytes, row_bytes, k }
    }

    fn hot(&self) {}

    fn resize(&self, a: &mut HostAct, rows: usize, cols: usize) {
        a.resize(rows, cols);
    }

    fn read<'a>(&mut self, a: &'a HostAct) -> Cow<'a, [f32]> {
        Cow::Borrowed(a.values())
    }

    fn new_kv(&self, cfg: &KvConfig) -> Result<PlainKv, BackendError> {
        let kv_dim = cfg.n_head_kv * cfg.head_dim;
        let per = cfg.n_ctx * kv_dim;
        let v_per = if cfg.values == Values::Separate { per } else { 0 };
        Ok(PlainKv { k: vec![vec![0.0; per]; cfg.n_layer], v: vec![vec![0.0; v_per]; cfg.n_layer], kv_dim, ty: cfg.ty })
    }

    fn copy_rows(&mut self, x: &HostAct, rows: std::ops::Range<usize>, out: &mut HostAct) {
        out.copy_rows(x, rows);
    }

    fn get_rows(&mut self, w: PlainMat<'_>, ids: &[u32], out: &mut HostAct) {
        out.resize(ids.len(), w.cols);
        for (t, &id) in ids.iter().enumerate() {
            w.row_f32(id as usize, out.row_mut(t));
        }
    }

    fn rms_norm(&mut self, x: &HostAct, w: &[f32], eps: f32, out: &mut HostAct) {
        out.resize(x.rows, x.cols);
        for t in 0..x.rows {
            norm(x.row(t), w, eps, out.row_mut(t));
        }
    }

    fn rms_norm_heads(&mut self, x: &mut HostAct, col: usize, n_heads: usize, head_dim: usize, w: &[f32], eps: f32) {
        for t in 0..x.rows {
            for h in x.row_mut(t)[col..col + n_heads * head_dim].chunks_exact_mut(head_dim) {
                let src = h.to_vec();
                norm(&src, w, eps, h);
            }
        }
    }

    fn matmul(&mut self, x: &HostAct, ws: &[PlainMat<'_>], out: &mut HostAct) {
        let width: usize = ws.iter().map(|w| w.rows).sum();
        out.resize(x.rows, width);
        let mut off = 0;
        for w in ws {
            self.row.resize(w.cols, 0.0);
            let xs: Vec<Vec<f32>> = (0..x.rows)
                .map(|t| {
                    as_vec_dot_type(w, x.row(t), &mut self.act);
                    self.act.clone()
                })
                .collect();
            for r in 0..w.rows {
                w.row_f32(r, &mut self.row);
                for (t, xt) in xs.iter().enumerate() {
                    out.data[t * width + off + r] = dot(&self.row, xt);
                }
            }
            off += w.rows;
        }
    }

    fn add_bias(&mut self, x: &mut HostAct, col: usize, b: &[f32]) {
        x.add_bias(col, b);
    }

    fn rope(&mut self, x: &mut HostAct, col: usize, n_heads: usize, head_dim: usize, pos0: usize, rope: &Rope) {
        let n = rope.n_dims;
        for t in 0..x.rows {
            let pos = (pos0 + t) as f64;
            let row = x.row_mut(t);
            for hi in 0..n_heads {
                let h = &mut row[col + hi * head_dim..col + hi * head_dim + n];
                for i in 0..n / 2 {
                    let extrap = pos * (rope.freq_base as f64).powf(-2.0 * i as f64 / n as f64);
                    let interp = extrap * rope.freq_scale as f64;
                    let (mut theta, mut mscale) = (interp, rope.attn_factor as f64);
                    if rope.ext_factor != 0.0 {
                        // YaRN: extrapolated below the correction range, interpolated above.
                        let [low, high] = rope.corr_dims.map(f64::from);
                        let y = (i as f64 - low) / (high - low).max(0.001);
                        let mix = (1.0 - y.clamp(0.0, 1.0)) * rope.ext_factor as f64;
                        theta = interp * (1.0 - mix) + extrap * mix;
                        mscale *= 1.0 + 0.1 * (1.0 / rope.freq_scale as f64).ln();
                    }
                    let (s, c) = theta.sin_cos();
                    let (s, c) = (s * mscale, c * mscale);
                    let (a, b) = match rope.style {
                        RopeStyle::Normal => (2 * i, 2 * i + 1),
                        RopeStyle::Neox => (i, i + n / 2),
                    };
                    let (x0, x1) = (h[a] as f64, h[b] as f64);
                    h[a] = (x0 * c - x1 * s) as f32;
                    h[b] = (x0 * s + x1 * c) as f32;
                }
            }
        }
    }

    fn attention(
        &mut self,
        kv: &mut PlainKv,
        layer: usize,
        qkv: &HostAct,
        shape: &AttnShape,
        sinks: Option<&[f32]>,
        pos0: usize,
        out: &mut HostAct,
    ) {
        let (n, hd, qd, kvd) = (qkv.rows, shape.head_dim, shape.q_dim(), shape.kv_dim());
        let (dv, od, separate) = (shape.v_dim(), shape.out_dim(), shape.values == Values::Separate);
        // llama.cpp converts the query to the cache type for short batches and keeps it f32 on
        // its tiled path (batches of 64+ rows).
        let q_ty = if n >= super::cpu::kv::TILE { KvType::F32 } else { kv.ty };
        for t in 0..n {
            let row = qkv.row(t);
            let at = (pos0 + t) * kv.kv_dim;
            for i in 0..kvd {
                kv.k[layer][at + i] = kv_round(kv.ty, row[qd + i]);
                if separate {
                    kv.v[layer][at + i] = kv_round(kv.ty, row[qd + kvd + i]);
                }
            }
        }
        out.resize(n, od);
        let group = shape.n_head / shape.n_head_kv;
        for t in 0..n {
            let n_pos = pos0 + t + 1;
            let start = if shape.window == 0 { 0 } else { n_pos.saturating_sub(shape.window) };
            for h in 0..shape.n_head {
                let q: Vec<f32> = qkv.row(t)[h * hd..(h + 1) * hd].iter().map(|&v| kv_round(q_ty, v)).collect();
                let kh = (h / group) * hd;
                let scores: Vec<f64> = (start..n_pos)
                    .map(|p| {
                        dot(&q, &kv.k[layer][p * kv.kv_dim + kh..p * kv.kv_dim + kh + hd]) as f64 * shape.scale as f64
                    })
                    .collect();
                // Softmax and the weighted sum of values in f64 (ggml accumulates the values in
                // f16, rounding after every position: arithmetic, not a data type, so not here).
                // A sink joins the softmax with no value.
                let sink = sinks.map(|s| s[h] as f64);
                let max = scores.iter().copied().chain(sink).fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum::<f64>() + sink.map_or(0.0, |s| (s - max).exp());
                let o = &mut out.row_mut(t)[h * dv..(h + 1) * dv];
                for (i, o) in o.iter_mut().enumerate() {
                    let acc: f64 =
                        (start..n_pos).map(|p| e[p - start] * kv.value(shape.values, layer, p, kh, i) as f64).sum();
                    *o = (acc / sum) as f32;
                }
            }
        }
    }

    fn expert_ffn(&mut self, x: &HostAct, jobs: &[ExpertJob<'_, '_, Self>], y: &mut HostAct) {
        for j in jobs {
            let [gate, up, down] = j.mats;
            let mut row = vec![0f32; gate.cols];
            let mut g = vec![0f32; gate.rows];
            let mut u = vec![0f32; gate.rows];
            let (mut xg, mut xu, mut xd) = (Vec::new(), Vec::new(), Vec::new());
            for (&t, &r) in j.tokens.iter().zip(j.out_rows) {
                as_vec_dot_type(&gate, x.row(t as usize), &mut xg);
                as_vec_dot_type(&up, x.row(t as usize), &mut xu);
                for i in 0..gate.rows {
                    gate.row_f32(i, &mut row);
                    g[i] = dot(&row, &xg);
                    up.row_f32(i, &mut row);
                    u[i] = dot(&row, &xu);
                }
                if let Some([bg, bu, _]) = j.bias {
                    g.iter_mut().zip(bg).for_each(|(x, b)| *x += b);
                    u.iter_mut().zip(bu).for_each(|(x, b)| *x += b);
                }
                let act: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(&g, &u)| {
                        let (g, u) = (g as f64, u as f64);
                        (match j.glu {
                            Glu::SwiGlu => g / (1.0 + (-g).exp()) * u,
                            Glu::SwiGluOai { alpha, limit } => {
                                let (g, lim) = (g.min(limit as f64), limit as f64);
                                g / (1.0 + (-(alpha as f64) * g).exp()) * (u.clamp(-lim, lim) + 1.0)
                            }
                        }) as f32
                    })
                    .collect();
                as_vec_dot_type(&down, &act, &mut xd);
                let mut drow = vec![0f32; down.cols];
                for i in 0..down.rows {
                    down.row_f32(i, &mut drow);
                    y.row_mut(r as usize)[i] = dot(&drow, &xd) + j.bias.map_or(0.0, |b| b[2][i]);
                }
            }
        }
    }

    fn combine(&mut self, y: &HostAct, assign: &[(u32, f32)], done: &[bool], n_tok: usize, out: &mut HostAct) {
        out.combine(y, assign, done, n_tok);
    }

    fn copy_heads(&mut self, x: &HostAct, from: Heads, out: &mut HostAct, to: Heads) {
        out.copy_heads(x, from, to);
    }

    fn matmul_heads(&mut self, x: &HostAct, from: Heads, ws: &[PlainMat<'_>], out: &mut HostAct, to: Heads) {
        let mut xi = Vec::new();
        for (i, w) in ws.iter().enumerate().take(from.n) {
            self.row.resize(w.cols, 0.0);
            for t in 0..x.rows {
                as_vec_dot_type(w, &x.row(t)[from.cols(i)], &mut xi);
                for r in 0..w.rows {
                    w.row_f32(r, &mut self.row);
                    out.row_mut(t)[to.col + i * to.stride + r] = dot(&self.row, &xi);
                }
            }
        }
    }

    fn add(&mut self, x: &mut HostAct, y: &HostAct) {
        x.add(y);
    }
}

/// `out = x / sqrt(mean(x²) + eps) · w` with an f64 sum.
fn norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mean = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let scale = 1.0 / (mean + eps as f64).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = (v as f64 * scale * g as f64) as f32;
    }
}
