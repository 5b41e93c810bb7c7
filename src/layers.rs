//! The transformer layers, written once for every architecture: attention (GQA, optional q/k
//! norm and biases, RoPE), the router (`RouterConfig` data), the SwiGLU expert FFN and the
//! weighted combine. Never copies a routing loop per family.

use crate::arch::{Gating, QkNorm, RouterConfig};
use crate::backend::cpu::ops::{self, Rope};
use crate::backend::cpu::repack::GEMM_TOKENS;
use crate::backend::cpu::{kernels, matmul_batch, MatJob, MatRef, QActs, SharedOut, ThreadPool};
use crate::engine::kv::KvCache;
use crate::model::{Ffn, Layer, Model};

/// One token's routing decision in one layer: experts by rank and their final weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Softmax/sigmoid over router logits, top-k, optional renormalization and scale.
pub fn route(logits: &mut [f32], k: usize, cfg: &RouterConfig) -> Route {
    match cfg.gating {
        Gating::Softmax => ops::softmax(logits),
        Gating::Sigmoid => logits.iter_mut().for_each(|v| *v = ops::sigmoid(*v)),
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    // Descending by probability; ties keep the lower index first.
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    idx.truncate(k);
    let mut weights: Vec<f32> = idx.iter().map(|&e| logits[e as usize]).collect();
    if cfg.renormalize {
        // llama.cpp clamps the sum to the smallest normal f16 before dividing.
        let sum = weights.iter().sum::<f32>().max(6.103_515_6e-5);
        weights.iter_mut().for_each(|w| *w /= sum);
    }
    if cfg.scale != 1.0 {
        weights.iter_mut().for_each(|w| *w *= cfg.scale);
    }
    Route { experts: idx, weights }
}

/// Errors raised while making experts available (the expert cache's I/O).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProviderError(pub String);

/// Where routed experts come from: the model itself (mapping or resident copies), or the expert
/// cache. Per MoE layer the forward pass calls `schedule` once, then for each wave `fetch`,
/// computes the experts that are `ready`, `wait`s, and computes the rest; `view` returning `None`
/// means the expert is skipped for this token (mixed precision).
pub trait ExpertProvider {
    /// Split the experts the batch needs in layer `l` into waves that fit in memory at once.
    fn schedule(&mut self, l: usize, routes: &[Route]) -> Vec<Vec<u16>>;
    /// Start making `wave` available (hits stay, misses start loading); returns at once.
    fn fetch(&mut self, l: usize, wave: &[u16], routes: &[Route]) -> Result<(), ProviderError>;
    /// Whether expert `e` of layer `l` can be viewed now, before `wait`.
    fn ready(&self, l: usize, e: u16) -> bool;
    /// Block until the last `fetch` of layer `l` has landed.
    fn wait(&mut self, l: usize) -> Result<(), ProviderError>;
    /// The expert's matrices (gate, up, down), or `None` if it is skipped.
    fn view(&self, l: usize, e: u16) -> Option<[MatRef<'_>; 3]>;
}

/// Experts as the model holds them (all resident): one wave, nothing to load.
pub struct ModelExperts<'a>(pub &'a Model);

/// The distinct experts of `routes`, in first-use order.
pub fn used_experts(routes: &[Route]) -> Vec<u16> {
    let mut used: Vec<u16> = Vec::new();
    for r in routes {
        for &e in &r.experts {
            if !used.contains(&(e as u16)) {
                used.push(e as u16);
            }
        }
    }
    used
}

impl ExpertProvider for ModelExperts<'_> {
    fn schedule(&mut self, _l: usize, routes: &[Route]) -> Vec<Vec<u16>> {
        vec![used_experts(routes)]
    }
    fn fetch(&mut self, _l: usize, _wave: &[u16], _routes: &[Route]) -> Result<(), ProviderError> {
        Ok(())
    }
    fn ready(&self, _l: usize, _e: u16) -> bool {
        true
    }
    fn wait(&mut self, _l: usize) -> Result<(), ProviderError> {
        Ok(())
    }
    fn view(&self, l: usize, e: u16) -> Option<[MatRef<'_>; 3]> {
        let ex = &self.0.experts(l)?[e as usize];
        Some([self.0.mat(&ex.gate), self.0.mat(&ex.up), self.0.mat(&ex.down)])
    }
}

/// Reusable buffers of one forward pass.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    logits_r: Vec<f32>,
    gate_up: Vec<f32>,
    down: Vec<f32>,
    moe: Vec<f32>,
    acts: QActs,
    set: ActSet,
    /// Per expert of a wave with enough tokens for the GEMM kernels: its tokens' gate/up inputs,
    /// gathered and converted.
    gathered: Vec<ActSet>,
    /// Per expert of a wave: its down inputs, converted.
    down_acts: Vec<ActSet>,
    rows_tmp: Vec<f32>,
    angles: Vec<f32>,
}

/// What the caller wants back from a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Logits of the last token only.
    Last,
    /// Logits of every token of the batch.
    All,
}

/// Observes routing decisions (statistics, traces, the expert cache).
pub trait RouteObserver {
    /// `token` is the absolute position of the token in its session.
    fn route(&mut self, layer: usize, token: usize, route: &Route);
}

impl RouteObserver for () {
    fn route(&mut self, _: usize, _: usize, _: &Route) {}
}

/// Everything a forward pass borrows.
pub struct Forward<'a> {
    pub model: &'a Model,
    pub pool: &'a ThreadPool,
    pub experts: &'a mut dyn ExpertProvider,
}

impl Forward<'_> {
    /// Run `tokens` at positions `pos0..` through the model, appending to `kv`; returns logits
    /// `[n_out × n_vocab]`.
    pub fn run(
        &mut self,
        tokens: &[u32],
        pos0: usize,
        kv: &mut KvCache,
        s: &mut Scratch,
        want: Logits,
        obs: &mut dyn RouteObserver,
    ) -> Result<Vec<f32>, ProviderError> {
        let m = self.model;
        let hp = &m.hp;
        let (n, d) = (tokens.len(), hp.n_embd);
        // [n, d] embeddings
        s.x.resize(n * d, 0.0);
        let embd = m.plain_mat(&m.tok_embd);
        for (t, &id) in tokens.iter().enumerate() {
            embd.dequantize_row(id as usize, &mut s.x[t * d..(t + 1) * d]);
        }
        for (l, layer) in m.layers.iter().enumerate() {
            self.attention(l, layer, pos0, n, kv, s);
            self.ffn(l, layer, pos0, n, s, obs)?;
        }
        // Final norm and head over the requested rows.
        let rows: Vec<usize> = match want {
            Logits::Last => vec![n - 1],
            Logits::All => (0..n).collect(),
        };
        s.h.resize(rows.len() * d, 0.0);
        for (i, &t) in rows.iter().enumerate() {
            ops::rms_norm(&s.x[t * d..(t + 1) * d], &m.output_norm, hp.rms_eps, &mut s.h[i * d..(i + 1) * d]);
        }
        let head = m.mat(&m.output);
        let mut logits = vec![0f32; rows.len() * head.rows];
        crate::backend::cpu::matmul(self.pool, head, &s.h, &mut s.acts, &mut logits);
        Ok(logits)
    }

    fn attention(&self, l: usize, layer: &Layer, pos0: usize, n: usize, kv: &mut KvCache, s: &mut Scratch) {
        let m = self.model;
        let hp = &m.hp;
        let (d, qd, kvd, hd) = (hp.n_embd, hp.q_dim(), hp.kv_dim(), hp.head_dim);
        s.h.resize(n * d, 0.0);
        for t in 0..n {
            ops::rms_norm(&s.x[t * d..(t + 1) * d], &layer.attn_norm, hp.rms_eps, &mut s.h[t * d..(t + 1) * d]);
        }
        // [n, q + 2·kv]: q, k and v side by side, computed in one parallel job.
        let width = qd + 2 * kvd;
        s.qkv.resize(n * width, 0.0);
        let (wq, wk, wv) = (m.mat(&layer.wq), m.mat(&layer.wk), m.mat(&layer.wv));
        s.set.prepare(&[wq, wk, wv], &s.h, d);
        {
            let out = SharedOut::new(&mut s.qkv);
            let set = &s.set;
            let jobs: Vec<MatJob> = [wq, wk, wv]
                .iter()
                .zip([0, qd, qd + kvd])
                .map(|(&w, off)| MatJob {
                    w,
                    act: set.get(&w),
                    tokens: None,
                    out: &out,
                    out_stride: width,
                    out_offset: off,
                })
                .collect();
            matmul_batch(self.pool, &jobs);
        }
        let rope =
            Rope { style: m.spec.rope, n_dims: hp.n_rot, freq_base: hp.rope_freq_base, freq_scale: hp.rope_freq_scale };
        s.angles.resize(hp.n_rot, 0.0);
        for t in 0..n {
            let row = &mut s.qkv[t * width..(t + 1) * width];
            let (q, rest) = row.split_at_mut(qd);
            let (k, v) = rest.split_at_mut(kvd);
            for (b, x) in [(&layer.bq, &mut *q), (&layer.bk, &mut *k), (&layer.bv, &mut *v)] {
                if let Some(b) = b {
                    x.iter_mut().zip(b).for_each(|(x, b)| *x += b);
                }
            }
            match (m.spec.qk_norm, &layer.q_norm, &layer.k_norm) {
                (QkNorm::PerHead, Some(qn), Some(kn)) => {
                    q.chunks_exact_mut(hd).for_each(|h| ops::rms_norm_inplace(h, qn, hp.rms_eps));
                    k.chunks_exact_mut(hd).for_each(|h| ops::rms_norm_inplace(h, kn, hp.rms_eps));
                }
                (QkNorm::Full, Some(qn), Some(kn)) => {
                    ops::rms_norm_inplace(q, qn, hp.rms_eps);
                    ops::rms_norm_inplace(k, kn, hp.rms_eps);
                }
                _ => {}
            }
            rope.angles(pos0 + t, &mut s.angles);
            q.chunks_exact_mut(hd).for_each(|h| rope.apply(&mut h[..], &s.angles));
            k.chunks_exact_mut(hd).for_each(|h| rope.apply(&mut h[..], &s.angles));
            kv.store(l, pos0 + t, k, v);
        }
        // Attention per (token, head), in parallel.
        s.attn.resize(n * qd, 0.0);
        {
            let out = SharedOut::new(&mut s.attn);
            let group = hp.n_head / hp.n_head_kv;
            let qkv = &s.qkv;
            let kvr = &*kv;
            let kq = kernels(kvr.ty().ggml()).expect("ggml has kv-type kernels");
            self.pool.for_chunks(n * hp.n_head, 1, &|r| {
                let mut qc = vec![0u8; kq.act_row_bytes(hd)];
                let mut acc = vec![0f32; hd];
                let mut acc16 = vec![0u16; hd];
                for th in r {
                    let (t, h) = (th / hp.n_head, th % hp.n_head);
                    let q = &qkv[t * width + h * hd..t * width + (h + 1) * hd];
                    kq.quantize_act(q, &mut qc);
                    kvr.attend(l, h / group, pos0 + t + 1, &qc, hp.attn_scale, &mut acc, &mut acc16);
                    for (i, &a) in acc.iter().enumerate() {
                        out.set(t * qd + h * hd + i, a);
                    }
                }
            });
        }
        s.o.resize(n * d, 0.0);
        crate::backend::cpu::matmul(self.pool, m.mat(&layer.wo), &s.attn, &mut s.acts, &mut s.o);
        s.x.iter_mut().zip(&s.o).for_each(|(x, o)| *x += o);
    }

    fn ffn(
        &mut self,
        l: usize,
        layer: &Layer,
        pos0: usize,
        n: usize,
        s: &mut Scratch,
        obs: &mut dyn RouteObserver,
    ) -> Result<(), ProviderError> {
        let m = self.model;
        let hp = &m.hp;
        let d = hp.n_embd;
        s.h.resize(n * d, 0.0);
        for t in 0..n {
            ops::rms_norm(&s.x[t * d..(t + 1) * d], &layer.ffn_norm, hp.rms_eps, &mut s.h[t * d..(t + 1) * d]);
        }
        s.moe.resize(n * d, 0.0);
        match &layer.ffn {
            Ffn::Dense(e) => {
                let views = [m.mat(&e.gate), m.mat(&e.up), m.mat(&e.down)];
                let assign: Vec<(usize, f32)> = (0..n).map(|t| (t, 1.0)).collect();
                self.expert_outputs(&[views], &[(0..n).collect()], &assign, s);
                combine(&assign, &vec![true; n], d, &s.down, &mut s.moe[..n * d]);
            }
            Ffn::Moe { router, shared, .. } => {
                let k = hp.n_expert_used;
                s.logits_r.resize(n * hp.n_expert, 0.0);
                crate::backend::cpu::matmul(self.pool, m.mat(router), &s.h, &mut s.acts, &mut s.logits_r);
                let routes: Vec<Route> = (0..n)
                    .map(|t| {
                        let r = route(&mut s.logits_r[t * hp.n_expert..(t + 1) * hp.n_expert], k, &hp.router);
                        obs.route(l, pos0 + t, &r);
                        r
                    })
                    .collect();
                // Assignments (token, weight) in token-major, rank order, and their experts.
                let assign: Vec<(usize, f32)> =
                    routes.iter().enumerate().flat_map(|(t, r)| r.weights.iter().map(move |&w| (t, w))).collect();
                let expert_of: Vec<u16> = routes.iter().flat_map(|r| r.experts.iter().map(|&e| e as u16)).collect();
                let mut done = vec![false; assign.len()];
                s.down.resize(assign.len() * d, 0.0);
                let mut ydown = std::mem::take(&mut s.down);
                for wave in self.experts.schedule(l, &routes) {
                    self.experts.fetch(l, &wave, &routes)?;
                    // Experts already resident are computed while the misses load.
                    let (hits, misses): (Vec<u16>, Vec<u16>) = wave.iter().partition(|&&e| self.experts.ready(l, e));
                    self.wave_outputs(l, &hits, &expert_of, &assign, &mut done, &mut ydown, s);
                    self.experts.wait(l)?;
                    self.wave_outputs(l, &misses, &expert_of, &assign, &mut done, &mut ydown, s);
                }
                combine(&assign, &done, d, &ydown, &mut s.moe[..n * d]);
                s.down = ydown;
                if let Some(sh) = shared {
                    self.shared_expert(sh, n, s);
                }
            }
        }
        s.x.iter_mut().zip(&s.moe).for_each(|(x, y)| *x += y);
        Ok(())
    }

    /// Outputs of the assignments served by `experts` into their rows of `ydown`; skipped experts
    /// (no view) leave their assignments undone.
    #[allow(clippy::too_many_arguments)]
    fn wave_outputs(
        &self,
        l: usize,
        experts: &[u16],
        expert_of: &[u16],
        assign: &[(usize, f32)],
        done: &mut [bool],
        ydown: &mut [f32],
        s: &mut Scratch,
    ) {
        let mut views = Vec::with_capacity(experts.len());
        let mut groups = Vec::with_capacity(experts.len());
        for &e in experts {
            if let Some(v) = self.experts.view(l, e) {
                let g: Vec<usize> = (0..assign.len()).filter(|&a| expert_of[a] == e).collect();
                g.iter().for_each(|&a| done[a] = true);
                views.push(v);
                groups.push(g);
            }
        }
        if views.is_empty() {
            return;
        }
        let d = self.model.hp.n_embd;
        let mut rows = vec![0f32; groups.iter().map(|g| g.len()).sum::<usize>() * d];
        std::mem::swap(&mut s.down, &mut rows);
        self.expert_outputs(&views, &groups, assign, s);
        std::mem::swap(&mut s.down, &mut rows);
        for (i, &a) in groups.iter().flatten().enumerate() {
            ydown[a * d..(a + 1) * d].copy_from_slice(&rows[i * d..(i + 1) * d]);
        }
    }

    /// `s.down` row i = down(silu(gate·h[t]) ⊙ up·h[t]) for the i-th assignment of `groups`
    /// (flattened in order), where `groups[j]` lists the assignments served by `views[j]`.
    fn expert_outputs(&self, views: &[[MatRef; 3]], groups: &[Vec<usize>], assign: &[(usize, f32)], s: &mut Scratch) {
        let d = self.model.hp.n_embd;
        let mut starts = Vec::with_capacity(groups.len() + 1);
        starts.push(0usize);
        for g in groups {
            starts.push(starts[starts.len() - 1] + g.len());
        }
        let na = starts[groups.len()];
        let tokens: Vec<usize> = groups.iter().flatten().map(|&a| assign[a].0).collect();
        let n_ff = views[0][0].rows;
        // An expert serving at least GEMM_TOKENS tokens gets its own activations, gathered, so
        // its weights are read once per 4 tokens (the GEMM kernels) instead of once per token.
        let gathered = |i: usize| starts[i + 1] - starts[i] >= GEMM_TOKENS;
        while s.gathered.len() < views.len() {
            s.gathered.push(ActSet::default());
            s.down_acts.push(ActSet::default());
        }
        for (i, v) in views.iter().enumerate() {
            if gathered(i) {
                s.rows_tmp.clear();
                for &t in &tokens[starts[i]..starts[i + 1]] {
                    s.rows_tmp.extend_from_slice(&s.h[t * d..(t + 1) * d]);
                }
                s.gathered[i].prepare(&[v[0], v[1]], &s.rows_tmp, d);
            }
        }
        // gate and up for every assignment: [na, 2·n_ff] (gate | up).
        s.gate_up.resize(na * 2 * n_ff, 0.0);
        let gate_up_ws: Vec<MatRef> =
            views.iter().enumerate().filter(|&(i, _)| !gathered(i)).flat_map(|(_, v)| [v[0], v[1]]).collect();
        s.set.prepare(&gate_up_ws, &s.h, d);
        {
            let out = SharedOut::new(&mut s.gate_up);
            let set = &s.set;
            let mut jobs = Vec::with_capacity(views.len() * 2);
            for (i, v) in views.iter().enumerate() {
                let toks = &tokens[starts[i]..starts[i + 1]];
                for (j, off) in [(0usize, 0usize), (1, n_ff)] {
                    let (act, tokens) =
                        if gathered(i) { (s.gathered[i].get(&v[j]), None) } else { (set.get(&v[j]), Some(toks)) };
                    jobs.push(MatJob {
                        w: v[j],
                        act,
                        tokens,
                        out: &out,
                        out_stride: 2 * n_ff,
                        out_offset: starts[i] * 2 * n_ff + off,
                    });
                }
            }
            matmul_batch(self.pool, &jobs);
        }
        for row in s.gate_up.chunks_exact_mut(2 * n_ff) {
            let (g, u) = row.split_at_mut(n_ff);
            ops::swiglu_inplace(g, u);
        }
        // Down projections: the activations differ per assignment and each expert's are one
        // contiguous segment, converted on their own (GEMM kernels wherever 4+ rows).
        let par: Vec<f32> = s.gate_up.chunks_exact(2 * n_ff).flat_map(|r| r[..n_ff].iter().copied()).collect();
        for (i, v) in views.iter().enumerate() {
            s.down_acts[i].prepare(&[v[2]], &par[starts[i] * n_ff..starts[i + 1] * n_ff], n_ff);
        }
        s.down.resize(na * d, 0.0);
        let out = SharedOut::new(&mut s.down);
        let jobs: Vec<MatJob> = views
            .iter()
            .enumerate()
            .map(|(i, v)| MatJob {
                w: v[2],
                act: s.down_acts[i].get(&v[2]),
                tokens: None,
                out: &out,
                out_stride: d,
                out_offset: starts[i] * d,
            })
            .collect();
        matmul_batch(self.pool, &jobs);
    }

    fn shared_expert(&self, sh: &crate::model::SharedExpert, n: usize, s: &mut Scratch) {
        let m = self.model;
        let d = m.hp.n_embd;
        let assign: Vec<(usize, f32)> = (0..n)
            .map(|t| {
                let g: f32 = s.h[t * d..(t + 1) * d].iter().zip(&sh.gate_inp).map(|(a, b)| a * b).sum();
                (t, ops::sigmoid(g))
            })
            .collect();
        let views = [m.mat(&sh.ffn.gate), m.mat(&sh.ffn.up), m.mat(&sh.ffn.down)];
        self.expert_outputs(&[views], &[(0..n).collect()], &assign, s);
        let mut shared_out = vec![0f32; n * d];
        combine(&assign, &vec![true; n], d, &s.down, &mut shared_out);
        s.moe.iter_mut().zip(&shared_out).for_each(|(o, y)| *o += y);
    }
}

/// `out[t] = Σ w · y[a]` over the done assignments `a = (t, w)`, per token in assignment (rank)
/// order — the order llama.cpp sums experts in, whatever order they were computed in.
fn combine(assign: &[(usize, f32)], done: &[bool], d: usize, y: &[f32], out: &mut [f32]) {
    out.iter_mut().for_each(|v| *v = 0.0);
    for (a, &(t, w)) in assign.iter().enumerate() {
        if done[a] {
            let ya = &y[a * d..(a + 1) * d];
            out[t * d..(t + 1) * d].iter_mut().zip(ya).for_each(|(o, &y)| *o += y * w);
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
    fn prepare(&mut self, ws: &[MatRef], x: &[f32], cols: usize) {
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
    fn get(&self, w: &MatRef) -> &QActs {
        let ty = w.kernels().vec_dot_type;
        self.bufs[..self.used].iter().find(|a| a.ty == ty).expect("ActSet::get for a weight not prepared")
    }
}
