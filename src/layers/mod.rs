//! The transformer layers, written once for every architecture and every backend: attention (GQA,
//! optional q/k norm and biases, RoPE), the router (`RouterConfig` data), the SwiGLU expert FFN
//! and the weighted combine, as calls to a [`Backend`]. Never copies a routing loop per family,
//! never touches a device buffer itself.

mod provider;

pub use provider::{
    confident, used_experts, Candidate, ExpertProvider, ExpertState, ModelExperts, PrefetchId, Priority, ProviderError,
};

use crate::arch::{Gating, GroupLimit, QkNorm, RouterConfig};
use crate::backend::{AttnShape, Backend, ExpertJob, Heads, Values};
use crate::model::{AttnWeights, ExpertDesc, Ffn, Layer, MlaWeights, Model};

/// One token's routing decision in one layer: experts by rank and their final weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Softmax/sigmoid over router logits, top-k, optional renormalization and scale; or (gpt-oss)
/// top-k on the raw logits with a softmax over the k selected. A `selection_bias` (DeepSeek-V3's
/// `exp_probs_b`) and a group limit change which experts are chosen, never their weights.
pub fn route(logits: &mut [f32], k: usize, cfg: &RouterConfig, selection_bias: Option<&[f32]>) -> Route {
    match cfg.gating {
        Gating::Softmax => crate::backend::cpu::ops::softmax(logits),
        Gating::Sigmoid => logits.iter_mut().for_each(|v| *v = crate::backend::cpu::ops::sigmoid(*v)),
        Gating::SoftmaxWeight => {}
    }
    let mut sel: std::borrow::Cow<[f32]> = match selection_bias {
        Some(b) => logits.iter().zip(b).map(|(p, b)| p + b).collect::<Vec<f32>>().into(),
        None => (&*logits).into(),
    };
    if let Some(g) = cfg.groups {
        limit_groups(sel.to_mut(), g);
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    // Descending by selection score; ties keep the lower index first.
    idx.sort_by(|&a, &b| sel[b as usize].total_cmp(&sel[a as usize]).then(a.cmp(&b)));
    idx.truncate(k);
    let mut weights: Vec<f32> = idx.iter().map(|&e| logits[e as usize]).collect();
    if cfg.gating == Gating::SoftmaxWeight {
        crate::backend::cpu::ops::softmax(&mut weights);
    }
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

/// Group-limited selection as llama.cpp does it: each contiguous group of experts scores the sum
/// of its two best `sel`; every expert outside the `n_used` best groups drops to -inf.
fn limit_groups(sel: &mut [f32], g: GroupLimit) {
    let per = sel.len() / g.n_group;
    let score = |grp: &[f32]| {
        let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for &v in grp {
            if v > a {
                (a, b) = (v, a);
            } else if v > b {
                b = v;
            }
        }
        a + b
    };
    let scores: Vec<f32> = sel.chunks_exact(per).map(score).collect();
    let mut order: Vec<usize> = (0..g.n_group).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    for &grp in &order[g.n_used.min(g.n_group)..] {
        sel[grp * per..(grp + 1) * per].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
    }
}

/// Reusable buffers of one forward pass, in the backend's memory.
pub struct Scratch<B: Backend> {
    x: B::Act,
    h: B::Act,
    qkv: B::Act,
    attn: B::Act,
    o: B::Act,
    /// MLA: the query LoRA's output (raw, normed), the queries, the compressed KV, the heads'
    /// outputs after `attn_v_b`.
    q_lora: B::Act,
    q_lora_n: B::Act,
    q: B::Act,
    kv_a: B::Act,
    heads: B::Act,
    logits_r: B::Act,
    /// The next layers' router scores for the predictor.
    pred: B::Act,
    pred_h: B::Act,
    /// Per assignment (token, expert): the expert's output.
    ydown: B::Act,
    moe: B::Act,
    shared: B::Act,
    gate: B::Act,
    logits: B::Act,
    /// Router probabilities on the host.
    probs: Vec<f32>,
}

impl<B: Backend> Default for Scratch<B> {
    fn default() -> Self {
        Scratch {
            x: B::Act::default(),
            h: B::Act::default(),
            qkv: B::Act::default(),
            attn: B::Act::default(),
            o: B::Act::default(),
            q_lora: B::Act::default(),
            q_lora_n: B::Act::default(),
            q: B::Act::default(),
            kv_a: B::Act::default(),
            heads: B::Act::default(),
            logits_r: B::Act::default(),
            pred: B::Act::default(),
            pred_h: B::Act::default(),
            ydown: B::Act::default(),
            moe: B::Act::default(),
            shared: B::Act::default(),
            gate: B::Act::default(),
            logits: B::Act::default(),
            probs: Vec::new(),
        }
    }
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
pub struct Forward<'a, B: Backend> {
    pub model: &'a Model,
    pub backend: &'a mut B,
    pub weights: &'a B::Weights,
    pub experts: &'a mut dyn ExpertProvider<B>,
    /// Cross-layer prediction: for one-token passes, layer l's router input goes through the
    /// next layers' routers and their experts are prefetched.
    pub predictor: Option<&'a mut crate::predict::Predictor>,
}

impl<B: Backend> Forward<'_, B> {
    /// Run `tokens` at positions `pos0..` through the model, appending to `kv`; returns logits
    /// `[n_out × n_vocab]`.
    pub fn run(
        &mut self,
        tokens: &[u32],
        pos0: usize,
        kv: &mut B::Kv,
        s: &mut Scratch<B>,
        want: Logits,
        obs: &mut dyn RouteObserver,
    ) -> Result<Vec<f32>, ProviderError> {
        let m = self.model;
        let w = self.weights;
        let hp = &m.hp;
        let n = tokens.len();
        // [n, d] embeddings
        self.backend.get_rows(B::mat(w, &m.tok_embd), tokens, &mut s.x);
        if n == 1 {
            if let Some(p) = self.predictor.as_deref_mut() {
                p.begin_token();
            }
        }
        for (l, layer) in m.layers.iter().enumerate() {
            let ahead = if n == 1 && !self.predicts_from_router_input() { self.predict(l, s) } else { Vec::new() };
            self.attention(l, layer, pos0, n, kv, s);
            // Behind the attention just queued: a device with its own expert cache moves the
            // predicted experts it lacks while that runs.
            self.prefetch_to_backend(&ahead);
            self.ffn(l, layer, pos0, n, s, obs)?;
        }
        // Final norm and head over the requested rows.
        let x = match want {
            Logits::Last if n > 1 => {
                self.backend.copy_rows(&s.x, n - 1..n, &mut s.o);
                &s.o
            }
            _ => &s.x,
        };
        self.backend.rms_norm(x, B::vector(w, m.output_norm), hp.rms_eps, &mut s.h);
        self.backend.matmul(&s.h, &[B::mat(w, &m.output)], &mut s.logits);
        let logits = self.backend.read(&s.logits).into_owned();
        match self.backend.take_error() {
            Some(e) => Err(e.into()),
            None => Ok(logits),
        }
    }

    fn attention(&mut self, l: usize, layer: &Layer, pos0: usize, n: usize, kv: &mut B::Kv, s: &mut Scratch<B>) {
        let (m, w) = (self.model, self.weights);
        let hp = &m.hp;
        self.backend.rms_norm(&s.x, B::vector(w, layer.attn_norm), hp.rms_eps, &mut s.h);
        let (shape, mla) = match &layer.attn {
            AttnWeights::Mha { wq, wk, wv } => (self.mha_qkv(layer, [wq, wk, wv], pos0, s), None),
            AttnWeights::Mla(a) => (self.mla_qkv(a, pos0, n, s), Some(a)),
        };
        let b = &mut *self.backend;
        let sinks = layer.sinks.map(|v| B::vector(w, v));
        b.attention(kv, l, &s.qkv, &shape, sinks, pos0, &mut s.attn);
        match (mla, hp.mla) {
            (Some(a), Some(dims)) => {
                // [n, n_head·v_head]: each head's latent output through its `attn_v_b`.
                let v_b: Vec<B::Mat<'_>> = a.v_b.iter().map(|v| B::mat(w, v)).collect();
                let (h, lat, vh) = (hp.n_head, dims.kv_lora, dims.v_head);
                b.resize(&mut s.heads, n, h * vh);
                let from = Heads { n: h, col: 0, stride: lat, width: lat };
                let to = Heads { n: h, col: 0, stride: vh, width: vh };
                b.matmul_heads(&s.attn, from, &v_b, &mut s.heads, to);
                b.matmul(&s.heads, &[B::mat(w, &layer.wo)], &mut s.o);
            }
            _ => b.matmul(&s.attn, &[B::mat(w, &layer.wo)], &mut s.o),
        }
        if let Some(bo) = layer.bo {
            b.add_bias(&mut s.o, 0, B::vector(w, bo));
        }
        // The residual `x += o` is added by `ffn`, with its norm.
    }

    /// MLA's fused attention input `[n, n_head·(kv_lora + rope) | kv_lora + rope]`: per head the
    /// query's nope part absorbed through `attn_k_b` into the latent space, then its roped part;
    /// then the one shared key `[normed latent | roped k_pe]`, whose latent is also the value.
    fn mla_qkv(&mut self, a: &MlaWeights, pos0: usize, n: usize, s: &mut Scratch<B>) -> AttnShape {
        let (m, w, b) = (self.model, self.weights, &mut *self.backend);
        let hp = &m.hp;
        let dims = hp.mla.expect("an MLA layer comes with MLA dimensions");
        let (h, r, nope, lat) = (hp.n_head, hp.n_rot, dims.nope, dims.kv_lora);
        // [n, n_head·(nope + rope)]
        match a.q_a {
            Some((q_a, q_a_norm)) => {
                b.matmul(&s.h, &[B::mat(w, &q_a)], &mut s.q_lora);
                b.rms_norm(&s.q_lora, B::vector(w, q_a_norm), hp.rms_eps, &mut s.q_lora_n);
                b.matmul(&s.q_lora_n, &[B::mat(w, &a.q)], &mut s.q);
            }
            None => b.matmul(&s.h, &[B::mat(w, &a.q)], &mut s.q),
        }
        // [n, kv_lora + rope]: the latent normed, k_pe roped as a single head.
        b.matmul(&s.h, &[B::mat(w, &a.kv_a)], &mut s.kv_a);
        b.rms_norm_heads(&mut s.kv_a, 0, 1, lat, B::vector(w, a.kv_a_norm), hp.rms_eps);
        let rope = hp.rope(m.spec.rope);
        b.rope(&mut s.kv_a, lat, 1, r, pos0, &rope);
        b.rope(&mut s.q, nope, h, nope + r, pos0, &rope);
        let row = lat + r;
        b.resize(&mut s.qkv, n, (h + 1) * row);
        let k_b: Vec<B::Mat<'_>> = a.k_b.iter().map(|k| B::mat(w, k)).collect();
        let nope_in = Heads { n: h, col: 0, stride: nope + r, width: nope };
        b.matmul_heads(&s.q, nope_in, &k_b, &mut s.qkv, Heads { n: h, col: 0, stride: row, width: lat });
        let pe_in = Heads { n: h, col: nope, stride: nope + r, width: r };
        b.copy_heads(&s.q, pe_in, &mut s.qkv, Heads { n: h, col: lat, stride: row, width: r });
        let kv_in = Heads { n: 1, col: 0, stride: row, width: row };
        b.copy_heads(&s.kv_a, kv_in, &mut s.qkv, Heads { n: 1, col: h * row, stride: row, width: row });
        AttnShape {
            n_head: h,
            n_head_kv: 1,
            head_dim: row,
            values: Values::KeyPrefix(lat),
            scale: hp.attn_scale,
            window: 0,
        }
    }

    /// Multi-head attention's fused `[q | k | v]` rows in `s.qkv`: projections, biases, q/k
    /// norms and RoPE as the family has them.
    fn mha_qkv(
        &mut self,
        layer: &Layer,
        [wq, wk, wv]: [&crate::model::WeightDesc; 3],
        pos0: usize,
        s: &mut Scratch<B>,
    ) -> AttnShape {
        let (m, w, b) = (self.model, self.weights, &mut *self.backend);
        let hp = &m.hp;
        let (qd, kvd, hd) = (hp.q_dim(), hp.kv_dim(), hp.head_dim);
        // [n, q + 2·kv]: q, k and v side by side, computed in one parallel job.
        b.matmul(&s.h, &[B::mat(w, wq), B::mat(w, wk), B::mat(w, wv)], &mut s.qkv);
        for (bias, col) in [(layer.bq, 0), (layer.bk, qd), (layer.bv, qd + kvd)] {
            if let Some(bias) = bias {
                b.add_bias(&mut s.qkv, col, B::vector(w, bias));
            }
        }
        match (m.spec.qk_norm, layer.q_norm, layer.k_norm) {
            (QkNorm::PerHead | QkNorm::PerHeadIfPresent, Some(qn), Some(kn)) => {
                b.rms_norm_heads(&mut s.qkv, 0, hp.n_head, hd, B::vector(w, qn), hp.rms_eps);
                b.rms_norm_heads(&mut s.qkv, qd, hp.n_head_kv, hd, B::vector(w, kn), hp.rms_eps);
            }
            (QkNorm::Full, Some(qn), Some(kn)) => {
                b.rms_norm_heads(&mut s.qkv, 0, 1, qd, B::vector(w, qn), hp.rms_eps);
                b.rms_norm_heads(&mut s.qkv, qd, 1, kvd, B::vector(w, kn), hp.rms_eps);
            }
            _ => {}
        }
        let rope = hp.rope(m.spec.rope);
        if qd == hp.n_head * hd {
            // k's heads follow q's: one pass over both (each head is rotated on its own).
            b.rope(&mut s.qkv, 0, hp.n_head + hp.n_head_kv, hd, pos0, &rope);
        } else {
            b.rope(&mut s.qkv, 0, hp.n_head, hd, pos0, &rope);
            b.rope(&mut s.qkv, qd, hp.n_head_kv, hd, pos0, &rope);
        }
        AttnShape {
            n_head: hp.n_head,
            n_head_kv: hp.n_head_kv,
            head_dim: hd,
            values: Values::Separate,
            scale: hp.attn_scale,
            window: layer.window,
        }
    }

    fn ffn(
        &mut self,
        l: usize,
        layer: &Layer,
        pos0: usize,
        n: usize,
        s: &mut Scratch<B>,
        obs: &mut dyn RouteObserver,
    ) -> Result<(), ProviderError> {
        let (m, w) = (self.model, self.weights);
        let hp = &m.hp;
        let d = hp.n_embd;
        // The attention's residual, and the norm of the sum.
        self.backend.add_rms_norm(&mut s.x, &s.o, B::vector(w, layer.ffn_norm), hp.rms_eps, &mut s.h);
        match &layer.ffn {
            Ffn::Dense(e) => self.dense_expert(e, n, None, s, true),
            Ffn::Moe { router, router_bias, selection_bias, shared, .. } => {
                let k = hp.n_expert_used;
                let ne = hp.n_expert;
                // Fate: the next MoE layers' routers on this router input, in the same mat-mul
                // and the same read.
                let targets = match (n, self.predicts_from_router_input(), self.predictor.as_deref()) {
                    (1, true, Some(p)) => p.targets_after(l, m.layers.len(), |t| m.experts(t).is_some()),
                    _ => Vec::new(),
                };
                let mut mats = vec![B::mat(w, router)];
                let mut biases = vec![*router_bias];
                for &(t, _) in &targets {
                    if let Ffn::Moe { router, router_bias, .. } = &m.layers[t].ffn {
                        mats.push(B::mat(w, router));
                        biases.push(*router_bias);
                    }
                }
                let targets = &targets[..mats.len() - 1];
                self.backend.matmul(&s.h, &mats, &mut s.logits_r);
                for (i, bias) in biases.iter().enumerate() {
                    if let Some(bias) = bias {
                        self.backend.add_bias(&mut s.logits_r, i * ne, B::vector(w, *bias));
                    }
                }
                s.probs.clear();
                s.probs.extend_from_slice(&self.backend.read(&s.logits_r));
                let width = mats.len() * ne;
                let routes: Vec<Route> = s
                    .probs
                    .chunks_exact_mut(width)
                    .enumerate()
                    .map(|(t, logits)| {
                        let r = route(&mut logits[..ne], k, &hp.router, selection_bias.map(|v| m.vector(v)));
                        obs.route(l, pos0 + t, &r);
                        r
                    })
                    .collect();
                if let (Some(p), [r]) = (self.predictor.as_deref_mut(), routes.as_slice()) {
                    p.observe(l, r, self.experts);
                }
                let ahead = match self.predictor.as_deref_mut() {
                    Some(p) if !targets.is_empty() => {
                        // The provider's prefetches may refill expert slots the device still reads.
                        self.backend.release_host_bytes();
                        p.predict(targets, &mut s.probs[ne..], hp, |t| m.selection_bias(t), self.experts)
                    }
                    _ => Vec::new(),
                };
                // Assignments (token, weight) in token-major, rank order, and their experts.
                let assign: Vec<(u32, f32)> = routes
                    .iter()
                    .enumerate()
                    .flat_map(|(t, r)| r.weights.iter().map(move |&w| (t as u32, w)))
                    .collect();
                let expert_of: Vec<u16> = routes.iter().flat_map(|r| r.experts.iter().map(|&e| e as u16)).collect();
                let mut done = vec![false; assign.len()];
                self.backend.resize(&mut s.ydown, assign.len(), d);
                for wave in self.experts.schedule(l, &routes) {
                    // The fetch may refill expert slots the device still reads from.
                    self.backend.release_host_bytes();
                    self.experts.fetch(l, &wave, &routes)?;
                    // Experts already in place are computed while the misses load.
                    // Then each miss as it lands (reads go out most-shared first), until the
                    // wave is done.
                    let mut rest: Vec<u16> = wave.clone();
                    let mut waited: Vec<u16> = Vec::new();
                    while !rest.is_empty() {
                        let (ready, waiting): (Vec<u16>, Vec<u16>) =
                            rest.iter().partition(|&&e| self.experts.state(l, e) == ExpertState::Ready);
                        if ready.is_empty() {
                            // Skipped or absent experts never land; one waited for already
                            // and still loading means its reads are not tracked alone.
                            let next = waiting
                                .iter()
                                .copied()
                                .find(|&e| self.experts.state(l, e) == ExpertState::Loading && !waited.contains(&e));
                            match next {
                                Some(e) => {
                                    self.experts.wait_for(l, e)?;
                                    waited.push(e);
                                }
                                None => break,
                            }
                            continue;
                        }
                        self.wave_outputs(l, &ready, &expert_of, &assign, &mut done, s);
                        rest = waiting;
                    }
                    self.experts.wait(l)?;
                    self.wave_outputs(l, &rest, &expert_of, &assign, &mut done, s);
                }
                // Behind this layer's experts: the predicted ones of the next layers.
                self.prefetch_to_backend(&ahead);
                self.backend.combine(&s.ydown, &assign, &done, n, &mut s.moe);
                if let Some(sh) = shared {
                    // The shared expert's output, scaled per token by sigmoid(gate · h) if gated.
                    let gates: Option<Vec<f32>> = sh.gate_inp.map(|g| {
                        self.backend.matmul(&s.h, &[B::mat(w, &g)], &mut s.gate);
                        self.backend.read(&s.gate).iter().map(|&g| crate::backend::cpu::ops::sigmoid(g)).collect()
                    });
                    self.dense_expert(&sh.ffn, n, gates.as_deref(), s, false);
                    self.backend.add(&mut s.moe, &s.shared);
                }
            }
        }
        self.backend.add(&mut s.x, &s.moe);
        Ok(())
    }

    /// Predict the experts of the next MoE layers from layer `l`'s input (`s.x`, one token,
    /// before attention): for each target layer, that state normed as the target's router input
    /// is normed, through the target's router; then prefetch them. Returns the confident
    /// predictions per target layer.
    fn predict(&mut self, l: usize, s: &mut Scratch<B>) -> Vec<(usize, Vec<u16>)> {
        let (m, w) = (self.model, self.weights);
        let Some(p) = self.predictor.as_deref_mut() else { return Vec::new() };
        let targets = p.targets(l, m.layers.len(), |t| m.experts(t).is_some());
        let ne = m.hp.n_expert;
        let mut scores = Vec::with_capacity(targets.len() * ne);
        for &(t, _) in &targets {
            let layer = &m.layers[t];
            let Ffn::Moe { router, router_bias, .. } = &layer.ffn else { return Vec::new() };
            self.backend.rms_norm(&s.x, B::vector(w, layer.ffn_norm), m.hp.rms_eps, &mut s.pred_h);
            self.backend.matmul(&s.pred_h, &[B::mat(w, router)], &mut s.pred);
            if let Some(b) = router_bias {
                self.backend.add_bias(&mut s.pred, 0, B::vector(w, *b));
            }
            scores.extend_from_slice(&self.backend.read(&s.pred));
        }
        // The provider's prefetches may refill expert slots the device still reads from.
        self.backend.release_host_bytes();
        p.predict(&targets, &mut scores, &m.hp, |t| m.selection_bias(t), self.experts)
    }

    fn predicts_from_router_input(&self) -> bool {
        self.predictor.as_deref().is_some_and(|p| p.config().from_router_input)
    }

    /// Hand the backend's own expert cache the predicted experts whose bytes the provider holds
    /// (`Backend::prefetch`; a backend without one has nothing to do).
    fn prefetch_to_backend(&mut self, ahead: &[(usize, Vec<u16>)]) {
        if ahead.is_empty() || !self.backend.caches_experts() {
            return;
        }
        let mut mats = Vec::new();
        for (t, experts) in ahead {
            for &e in experts {
                if self.experts.state(*t, e) == ExpertState::Ready {
                    if let Some(v) = self.experts.view(*t, e) {
                        mats.extend(v);
                    }
                }
            }
        }
        self.backend.prefetch(&mats);
    }

    /// A dense FFN (all tokens, one expert): into `s.moe` when `into_moe`, else into `s.shared`,
    /// each token's output scaled by `gates[t]` (1 without).
    fn dense_expert(&mut self, e: &ExpertDesc, n: usize, gates: Option<&[f32]>, s: &mut Scratch<B>, into_moe: bool) {
        let w = self.weights;
        let rows: Vec<u32> = (0..n as u32).collect();
        let mats = [B::mat(w, &e.gate), B::mat(w, &e.up), B::mat(w, &e.down)];
        let bias = e.bias.map(|b| b.map(|v| B::vector(w, v)));
        self.backend.resize(&mut s.ydown, n, self.model.hp.n_embd);
        let job = ExpertJob { mats, bias, glu: self.model.spec.glu, dense: true, tokens: &rows, out_rows: &rows };
        self.backend.expert_ffn(&s.h, &[job], &mut s.ydown);
        let assign: Vec<(u32, f32)> = (0..n).map(|t| (t as u32, gates.map_or(1.0, |g| g[t]))).collect();
        let out = if into_moe { &mut s.moe } else { &mut s.shared };
        self.backend.combine(&s.ydown, &assign, &vec![true; n], n, out);
    }

    /// Outputs of the assignments served by `experts` into their rows of `s.ydown`; experts the
    /// provider has no view of (skipped) leave their assignments undone.
    fn wave_outputs(
        &mut self,
        l: usize,
        experts: &[u16],
        expert_of: &[u16],
        assign: &[(u32, f32)],
        done: &mut [bool],
        s: &mut Scratch<B>,
    ) {
        let (w, glu) = (self.weights, self.model.spec.glu);
        let descs = self.model.experts(l).unwrap_or_default();
        let mut views = Vec::with_capacity(experts.len());
        // Per expert: its tokens, its output rows, its biases.
        type Group<'w, B> = (Vec<u32>, Vec<u32>, Option<[<B as Backend>::Vector<'w>; 3]>);
        let mut groups: Vec<Group<B>> = Vec::with_capacity(experts.len());
        for &e in experts {
            if let Some(v) = self.experts.view(l, e) {
                let bias = descs.get(e as usize).and_then(|d| d.bias).map(|b| b.map(|v| B::vector(w, v)));
                let rows: Vec<u32> = (0..assign.len() as u32).filter(|&a| expert_of[a as usize] == e).collect();
                rows.iter().for_each(|&a| done[a as usize] = true);
                let tokens = rows.iter().map(|&a| assign[a as usize].0).collect();
                views.push(v);
                groups.push((tokens, rows, bias));
            }
        }
        if views.is_empty() {
            return;
        }
        let jobs: Vec<ExpertJob<B>> = views
            .iter()
            .zip(&groups)
            .map(|(&mats, (tokens, rows, bias))| ExpertJob {
                mats,
                bias: *bias,
                glu,
                dense: false,
                tokens,
                out_rows: rows,
            })
            .collect();
        self.backend.expert_ffn(&s.h, &jobs, &mut s.ydown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEEPSEEK: RouterConfig = RouterConfig {
        gating: Gating::Sigmoid,
        renormalize: true,
        scale: 2.5,
        groups: Some(GroupLimit { n_group: 2, n_used: 1 }),
    };

    /// Group 0 holds the single best expert, group 1 the better pair: the top-2 sum picks group 1.
    /// The selection bias chooses, the unbiased sigmoid weighs.
    #[test]
    fn group_limit_scores_the_top_two_and_bias_only_selects() {
        let mut logits = vec![3.0, -3.0, -3.0, -3.0, 1.0, 1.0, 0.5, -3.0];
        let r = route(&mut logits.clone(), 2, &DEEPSEEK, None);
        assert_eq!(r.experts, vec![4, 5]);
        assert!((r.weights[0] - 1.25).abs() < 1e-6 && (r.weights[1] - 1.25).abs() < 1e-6);
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0];
        let r = route(&mut logits, 2, &DEEPSEEK, Some(&bias));
        assert_eq!(r.experts, vec![6, 4], "the bias lifts expert 6 to the top");
        let (p6, p4) = (crate::backend::cpu::ops::sigmoid(0.5), crate::backend::cpu::ops::sigmoid(1.0));
        assert!((r.weights[0] - 2.5 * p6 / (p6 + p4)).abs() < 1e-6, "{:?}", r.weights);
    }
}
