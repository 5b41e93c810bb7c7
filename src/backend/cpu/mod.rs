//! The CPU backend: ggml's per-type kernels over borrowed weight views (the mapping, resident
//! copies, cache slots), a persistent thread pool, the KV cache and attention, and the
//! element-wise ops computed as ggml computes them. Never decides where a weight lives.

pub mod kv;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod repack;
pub mod resident;

use std::borrow::Cow;
use std::sync::Arc;

pub use kv::KvCache;
pub use matmul::{matmul, matmul_batch, MatJob, MatRef, QActs, SharedOut};
pub use pool::ThreadPool;
pub use resident::CpuWeights;

use super::{AttnShape, Backend, BackendError, ExpertJob, Heads, HostAct, KvConfig, Op, Rope};
use crate::ggml::kernels;
use crate::gguf::GgmlType;
use crate::model::{Model, Residency, Resident, VecRef, WeightDesc};
use repack::GEMM_TOKENS;

/// Whether ggml's CPU kernels can run `op` on weights of type `ty`.
pub fn supports(op: Op, ty: GgmlType) -> bool {
    kernels(ty).is_some_and(|k| match op {
        Op::MatMul => k.can_matmul(),
        Op::GetRows => k.can_dequantize(),
    })
}

/// The CPU backend: its thread pool and the scratch its kernels reuse between calls.
pub struct CpuBackend {
    pool: ThreadPool,
    /// One input converted once per activation type its weights need.
    set: ActSet,
    /// Per expert of a batch with enough tokens for the GEMM kernels: its tokens' gate/up inputs,
    /// gathered and converted.
    gathered: Vec<ActSet>,
    /// Per expert of a batch: its down inputs, converted.
    down_acts: Vec<ActSet>,
    gate_up: Vec<f32>,
    down: Vec<f32>,
    rows_tmp: Vec<f32>,
    angles: Vec<f32>,
    /// Per head of a `matmul_heads`: its columns, converted.
    heads: Vec<ActSet>,
}

impl CpuBackend {
    /// A backend computing on `threads` threads (the caller's included).
    pub fn new(threads: usize) -> CpuBackend {
        CpuBackend {
            pool: ThreadPool::new(threads),
            set: ActSet::default(),
            gathered: Vec::new(),
            down_acts: Vec::new(),
            gate_up: Vec::new(),
            down: Vec::new(),
            rows_tmp: Vec::new(),
            angles: Vec::new(),
            heads: Vec::new(),
        }
    }

    pub fn threads(&self) -> usize {
        self.pool.n_threads()
    }

    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }
}

impl Backend for CpuBackend {
    type Mat<'a> = MatRef<'a>;
    type Vector<'a> = &'a [f32];
    type Weights = CpuWeights;
    type Act = HostAct;
    type Kv = KvCache;
    type Hot = pool::Hot;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn hot(&self) -> pool::Hot {
        self.pool.hot()
    }

    fn supports(&self, op: Op, ty: GgmlType) -> bool {
        supports(op, ty)
    }

    fn take_weights(&mut self, model: &Arc<Model>, residency: Residency) -> Result<CpuWeights, BackendError> {
        model.check_support(self.name(), supports)?;
        CpuWeights::take(model, residency)
    }

    fn resident(weights: &CpuWeights) -> (Resident, u64) {
        weights.resident()
    }

    fn mat<'a>(weights: &'a CpuWeights, w: &WeightDesc) -> MatRef<'a> {
        weights.mat(w)
    }

    fn vector(weights: &CpuWeights, v: VecRef) -> &[f32] {
        weights.model().vector(v)
    }

    fn host_mat<'a>(w: &WeightDesc, bytes: &'a [u8]) -> MatRef<'a> {
        resident::plain(w, bytes)
    }

    fn prepares_host_mat(w: &WeightDesc) -> bool {
        repack::repackable(w.ty, w.rows, w.cols).is_some()
    }

    fn prepare_host_mat(w: &WeightDesc, bytes: &mut [u8]) {
        if let (Some(layout), true) = (repack::repackable(w.ty, w.rows, w.cols), bytes.len() as u64 == w.bytes) {
            thread_local! {
                static PLAIN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            PLAIN.with_borrow_mut(|plain| {
                plain.clear();
                plain.extend_from_slice(bytes);
                repack::repack(layout, plain, w.rows, w.cols, bytes);
            });
        }
    }

    fn host_mat_prepared<'a>(w: &WeightDesc, bytes: &'a [u8]) -> MatRef<'a> {
        match repack::repackable(w.ty, w.rows, w.cols) {
            Some(layout) => {
                MatRef::repacked(w.ty, w.rows, w.cols, bytes, layout).expect("prepared slot views are sized at load")
            }
            None => resident::plain(w, bytes),
        }
    }

    fn resize(&self, a: &mut HostAct, rows: usize, cols: usize) {
        a.resize(rows, cols);
    }

    fn read<'a>(&mut self, a: &'a HostAct) -> Cow<'a, [f32]> {
        Cow::Borrowed(a.values())
    }

    fn new_kv(&self, cfg: &KvConfig) -> Result<KvCache, BackendError> {
        Ok(KvCache::new(cfg))
    }

    fn copy_rows(&mut self, x: &HostAct, rows: std::ops::Range<usize>, out: &mut HostAct) {
        out.copy_rows(x, rows);
    }

    fn get_rows(&mut self, w: MatRef<'_>, ids: &[u32], out: &mut HostAct) {
        out.resize(ids.len(), w.cols);
        for (t, &id) in ids.iter().enumerate() {
            w.dequantize_row(id as usize, out.row_mut(t));
        }
    }

    fn rms_norm(&mut self, x: &HostAct, w: &[f32], eps: f32, out: &mut HostAct) {
        out.resize(x.rows, x.cols);
        for t in 0..x.rows {
            ops::rms_norm(x.row(t), w, eps, out.row_mut(t));
        }
    }

    fn rms_norm_heads(&mut self, x: &mut HostAct, col: usize, n_heads: usize, head_dim: usize, w: &[f32], eps: f32) {
        for t in 0..x.rows {
            let row = &mut x.row_mut(t)[col..col + n_heads * head_dim];
            row.chunks_exact_mut(head_dim).for_each(|h| ops::rms_norm_inplace(h, w, eps));
        }
    }

    fn matmul(&mut self, x: &HostAct, ws: &[MatRef<'_>], out: &mut HostAct) {
        let width: usize = ws.iter().map(|w| w.rows).sum();
        out.resize(x.rows, width);
        self.set.prepare(ws, &x.data, x.cols);
        let shared = SharedOut::new(&mut out.data);
        let mut off = 0;
        let jobs: Vec<MatJob> = ws
            .iter()
            .map(|&w| {
                let j = MatJob {
                    w,
                    act: self.set.get(&w),
                    tokens: None,
                    out: &shared,
                    out_stride: width,
                    out_offset: off,
                    mul_mat: true,
                };
                off += w.rows;
                j
            })
            .collect();
        // SAFETY: each job writes its own columns `off..off + rows` of every output row.
        unsafe { matmul_batch(&self.pool, &jobs) };
    }

    fn add_bias(&mut self, x: &mut HostAct, col: usize, b: &[f32]) {
        x.add_bias(col, b);
    }

    fn rope(&mut self, x: &mut HostAct, col: usize, n_heads: usize, head_dim: usize, pos0: usize, rope: &Rope) {
        self.angles.resize(rope.n_dims, 0.0);
        for t in 0..x.rows {
            ops::rope_angles(rope, pos0 + t, &mut self.angles);
            let row = x.row_mut(t);
            for h in 0..n_heads {
                let c = col + h * head_dim;
                ops::rope_apply(rope, &mut row[c..c + rope.n_dims], &self.angles);
            }
        }
    }

    fn attention(
        &mut self,
        kv: &mut KvCache,
        layer: usize,
        qkv: &HostAct,
        shape: &AttnShape,
        sinks: Option<&[f32]>,
        pos0: usize,
        out: &mut HostAct,
    ) {
        let (n, hd, qd, kvd) = (qkv.rows, shape.head_dim, shape.q_dim(), shape.kv_dim());
        let (dv, od, vc) = (shape.v_dim(), shape.out_dim(), shape.v_cols());
        for t in 0..n {
            let row = qkv.row(t);
            kv.store(layer, pos0 + t, &row[qd..qd + kvd], &row[qd + kvd..qd + kvd + vc]);
        }
        out.resize(n, od);
        let shared = SharedOut::new(&mut out.data);
        let group = shape.n_head / shape.n_head_kv;
        let kvr = &*kv;
        let sink = |h: usize| sinks.map(|s| s[h]);
        if n >= kv::TILE {
            // ggml's tiled path for prompt batches: per (head, tile of query rows), in parallel.
            let tiles = n.div_ceil(kv::TILE);
            self.pool.for_chunks(shape.n_head * tiles, 1, &|r| {
                let mut scratch = kv::TileScratch::default();
                let (mut q, mut acc) = (Vec::new(), Vec::new());
                for job in r {
                    let (h, tile) = (job / tiles, job % tiles);
                    let t0 = tile * kv::TILE;
                    let rows = kv::TILE.min(n - t0);
                    q.clear();
                    (t0..t0 + rows).for_each(|t| q.extend_from_slice(&qkv.row(t)[h * hd..(h + 1) * hd]));
                    acc.resize(rows * dv, 0.0);
                    let qt = kv::QTile { layer, kv_head: h / group, pos0: pos0 + t0, rows, window: shape.window };
                    kvr.attend_tile(qt, &q, shape.scale, sink(h), &mut acc, &mut scratch);
                    for (i, row) in acc.chunks_exact(dv).enumerate() {
                        for (d, &a) in row.iter().enumerate() {
                            // SAFETY: (h, tile) is handed to one thread; its rows' head-h columns are its own.
                            unsafe { shared.set((t0 + i) * od + h * dv + d, a) };
                        }
                    }
                }
            });
            return;
        }
        let kq = kernels(kvr.ty().ggml()).expect("ggml has kv-type kernels");
        // Per (token, head), in parallel.
        self.pool.for_chunks(n * shape.n_head, 1, &|r| {
            let mut qc = vec![0u8; kq.act_row_bytes(hd)];
            let mut acc = vec![0f32; dv];
            let mut scratch = kv::AttendScratch::default();
            for th in r {
                let (t, h) = (th / shape.n_head, th % shape.n_head);
                kq.quantize_act(&qkv.row(t)[h * hd..(h + 1) * hd], &mut qc);
                let n_pos = pos0 + t + 1;
                let start = if shape.window == 0 { 0 } else { n_pos.saturating_sub(shape.window) };
                let head = kv::Head { layer, kv_head: h / group, start, n_pos };
                kvr.attend(head, &qc, shape.scale, sink(h), &mut acc, &mut scratch);
                for (i, &a) in acc.iter().enumerate() {
                    // SAFETY: (t, h) is handed to one thread; its `dv` outputs are its own.
                    unsafe { shared.set(t * od + h * dv + i, a) };
                }
            }
        });
    }

    fn expert_ffn(&mut self, x: &HostAct, jobs: &[ExpertJob<'_, '_, Self>], y: &mut HostAct) {
        self.expert_ffn_impl(x, jobs, y);
    }

    fn combine(&mut self, y: &HostAct, assign: &[(u32, f32)], done: &[bool], n_tok: usize, out: &mut HostAct) {
        out.combine(y, assign, done, n_tok);
    }

    fn copy_heads(&mut self, x: &HostAct, from: Heads, out: &mut HostAct, to: Heads) {
        out.copy_heads(x, from, to);
    }

    fn matmul_heads(&mut self, x: &HostAct, from: Heads, ws: &[MatRef<'_>], out: &mut HostAct, to: Heads) {
        // Every head's product in one parallel job (as ggml's batched `mul_mat` over a 3-D
        // weight: one 2-D product per slice), each head's columns converted on their own.
        let n = from.n.min(ws.len());
        while self.heads.len() < n {
            self.heads.push(ActSet::default());
        }
        for (i, w) in ws.iter().enumerate().take(n) {
            self.rows_tmp.clear();
            for t in 0..x.rows {
                self.rows_tmp.extend_from_slice(&x.row(t)[from.cols(i)]);
            }
            self.heads[i].prepare(std::slice::from_ref(w), &self.rows_tmp, from.width);
        }
        let stride = out.cols;
        let shared = SharedOut::new(&mut out.data);
        let jobs: Vec<MatJob> = ws
            .iter()
            .enumerate()
            .take(n)
            .map(|(i, &w)| MatJob {
                w,
                act: self.heads[i].get(&w),
                tokens: None,
                out: &shared,
                out_stride: stride,
                out_offset: to.cols(i).start,
                mul_mat: true,
            })
            .collect();
        assert!(ws.iter().take(n).enumerate().all(|(i, w)| w.rows == to.cols(i).len()), "one output block per head");
        // SAFETY: job i writes the columns `to.cols(i)` of every row; the blocks do not overlap.
        unsafe { matmul_batch(&self.pool, &jobs) };
    }

    fn add(&mut self, x: &mut HostAct, y: &HostAct) {
        x.add(y);
    }
}

impl CpuBackend {
    /// Every job's assignments: gate and up of all of them as one parallel job, SwiGLU, then the
    /// down projections as another. An expert serving at least `GEMM_TOKENS` tokens gets its
    /// tokens' activations gathered, so the repacked GEMM reads its weights once per 4 tokens
    /// instead of once per token.
    fn expert_ffn_impl(&mut self, x: &HostAct, jobs: &[ExpertJob<'_, '_, Self>], y: &mut HostAct) {
        if jobs.is_empty() {
            return;
        }
        let d = x.cols;
        let mut starts = Vec::with_capacity(jobs.len() + 1);
        starts.push(0usize);
        for j in jobs {
            assert_eq!(j.tokens.len(), j.out_rows.len(), "one output row per token");
            starts.push(starts[starts.len() - 1] + j.tokens.len());
        }
        let na = starts[jobs.len()];
        let n_ff = jobs[0].mats[0].rows;
        assert!(jobs.iter().all(|j| j.mats[0].rows == n_ff && j.mats[2].rows == y.cols), "experts of one shape");
        let gathered = |i: usize| starts[i + 1] - starts[i] >= GEMM_TOKENS;
        while self.gathered.len() < jobs.len() {
            self.gathered.push(ActSet::default());
            self.down_acts.push(ActSet::default());
        }
        for (i, j) in jobs.iter().enumerate() {
            if gathered(i) {
                self.rows_tmp.clear();
                for &t in j.tokens {
                    self.rows_tmp.extend_from_slice(x.row(t as usize));
                }
                self.gathered[i].prepare(&[j.mats[0], j.mats[1]], &self.rows_tmp, d);
            }
        }
        // gate and up for every assignment: [na, 2·n_ff] (gate | up).
        self.gate_up.resize(na * 2 * n_ff, 0.0);
        let ws: Vec<MatRef> =
            jobs.iter().enumerate().filter(|&(i, _)| !gathered(i)).flat_map(|(_, j)| [j.mats[0], j.mats[1]]).collect();
        self.set.prepare(&ws, &x.data, d);
        {
            let out = SharedOut::new(&mut self.gate_up);
            let mut mj = Vec::with_capacity(jobs.len() * 2);
            for (i, j) in jobs.iter().enumerate() {
                for (m, off) in [(0usize, 0usize), (1, n_ff)] {
                    let w = j.mats[m];
                    let (act, tokens) =
                        if gathered(i) { (self.gathered[i].get(&w), None) } else { (self.set.get(&w), Some(j.tokens)) };
                    mj.push(MatJob {
                        w,
                        act,
                        tokens,
                        out: &out,
                        out_stride: 2 * n_ff,
                        out_offset: starts[i] * 2 * n_ff + off,
                        mul_mat: j.dense,
                    });
                }
            }
            // SAFETY: job (i, m) writes rows starts[i]..starts[i+1] of [na, 2·n_ff], columns m·n_ff..
            // (m+1)·n_ff: disjoint across jobs.
            unsafe { matmul_batch(&self.pool, &mj) };
        }
        for (i, j) in jobs.iter().enumerate() {
            let rows = &mut self.gate_up[starts[i] * 2 * n_ff..starts[i + 1] * 2 * n_ff];
            for row in rows.chunks_exact_mut(2 * n_ff) {
                let (g, u) = row.split_at_mut(n_ff);
                if let Some([bg, bu, _]) = j.bias {
                    g.iter_mut().zip(bg).for_each(|(x, b)| *x += b);
                    u.iter_mut().zip(bu).for_each(|(x, b)| *x += b);
                }
                ops::glu_inplace(j.glu, g, u);
            }
        }
        // Down projections: the activations differ per assignment and each expert's are one
        // contiguous segment, converted on their own (GEMM kernels wherever 4+ rows).
        self.rows_tmp.clear();
        self.rows_tmp.extend(self.gate_up.chunks_exact(2 * n_ff).flat_map(|r| r[..n_ff].iter().copied()));
        for (i, j) in jobs.iter().enumerate() {
            self.down_acts[i].prepare(&[j.mats[2]], &self.rows_tmp[starts[i] * n_ff..starts[i + 1] * n_ff], n_ff);
        }
        self.down.resize(na * d, 0.0);
        {
            let out = SharedOut::new(&mut self.down);
            let mj: Vec<MatJob> = jobs
                .iter()
                .enumerate()
                .map(|(i, j)| MatJob {
                    w: j.mats[2],
                    act: self.down_acts[i].get(&j.mats[2]),
                    tokens: None,
                    out: &out,
                    out_stride: d,
                    out_offset: starts[i] * d,
                    mul_mat: j.dense,
                })
                .collect();
            // SAFETY: job i writes rows starts[i]..starts[i+1] of [na, d]: disjoint across jobs.
            unsafe { matmul_batch(&self.pool, &mj) };
        }
        for (i, j) in jobs.iter().enumerate() {
            for (k, &r) in j.out_rows.iter().enumerate() {
                let src = &self.down[(starts[i] + k) * d..(starts[i] + k + 1) * d];
                let out = y.row_mut(r as usize);
                out.copy_from_slice(src);
                if let Some([_, _, bd]) = j.bias {
                    out.iter_mut().zip(bd).for_each(|(x, b)| *x += b);
                }
            }
        }
    }
}

/// One input converted once per distinct activation type its weights need.
#[derive(Default)]
pub struct ActSet {
    bufs: Vec<QActs>,
    used: usize,
}

impl ActSet {
    /// Convert `x` (rows of `cols`) for every weight in `ws`.
    pub fn prepare(&mut self, ws: &[MatRef], x: &[f32], cols: usize) {
        self.used = 0;
        for w in ws {
            let k = w.kernels();
            if self.bufs[..self.used].iter().any(|a| a.ty == k.vec_dot_type) {
                continue;
            }
            if self.bufs.len() == self.used {
                self.bufs.push(QActs::new());
            }
            self.bufs[self.used].quantize(k, x, cols);
            self.used += 1;
        }
    }

    /// The converted input for weight `w` (prepared by the last `prepare`).
    pub fn get(&self, w: &MatRef) -> &QActs {
        let ty = w.kernels().vec_dot_type;
        self.bufs[..self.used].iter().find(|a| a.ty == ty).expect("ActSet::get for a weight not prepared")
    }
}
