//! Generic against `dyn`: the same forward pass on the CPU backend called directly (`Forward<B>`
//! monomorphized, what the engine does) and through a vtable (every op a virtual call, what a
//! `dyn Backend` would cost). `Backend`'s weight views are generic associated types, which a
//! trait object cannot carry, so the `dyn` side is the CPU backend behind an object-safe trait of
//! the same ops with its concrete types. Decode of the bundled model, the two alternating run by
//! run; prints the median of the paired ratios. `cargo bench --bench dispatch`.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use moerun::backend::cpu::{CpuBackend, CpuWeights, KvCache, MatRef};
use moerun::backend::{AttnShape, Backend, BackendError, ExpertJob, Heads, HostAct, KvConfig, Op, Rope};
use moerun::engine::{argmax, Engine, EngineConfig};
use moerun::gguf::GgmlType;
use moerun::layers::Logits;
use moerun::model::{Model, Residency, Resident, VecRef, WeightDesc};

/// The ops the forward pass calls per token, object-safe.
trait Ops {
    fn copy_rows(&mut self, x: &HostAct, rows: std::ops::Range<usize>, out: &mut HostAct);
    fn get_rows(&mut self, w: MatRef<'_>, ids: &[u32], out: &mut HostAct);
    fn rms_norm(&mut self, x: &HostAct, w: &[f32], eps: f32, out: &mut HostAct);
    fn rms_norm_heads(&mut self, x: &mut HostAct, col: usize, n: usize, hd: usize, w: &[f32], eps: f32);
    fn matmul(&mut self, x: &HostAct, ws: &[MatRef<'_>], out: &mut HostAct);
    fn add_bias(&mut self, x: &mut HostAct, col: usize, b: &[f32]);
    fn rope(&mut self, x: &mut HostAct, col: usize, n: usize, hd: usize, pos0: usize, rope: &Rope);
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        kv: &mut KvCache,
        l: usize,
        qkv: &HostAct,
        s: &AttnShape,
        sinks: Option<&[f32]>,
        pos0: usize,
        out: &mut HostAct,
    );
    fn expert_ffn(&mut self, x: &HostAct, jobs: &[ExpertJob<'_, '_, CpuBackend>], y: &mut HostAct);
    fn combine(&mut self, y: &HostAct, assign: &[(u32, f32)], done: &[bool], n_tok: usize, out: &mut HostAct);
    fn copy_heads(&mut self, x: &HostAct, from: Heads, out: &mut HostAct, to: Heads);
    fn matmul_heads(&mut self, x: &HostAct, from: Heads, ws: &[MatRef<'_>], out: &mut HostAct, to: Heads);
    fn add(&mut self, x: &mut HostAct, y: &HostAct);
}

impl Ops for CpuBackend {
    fn copy_rows(&mut self, x: &HostAct, rows: std::ops::Range<usize>, out: &mut HostAct) {
        Backend::copy_rows(self, x, rows, out)
    }
    fn get_rows(&mut self, w: MatRef<'_>, ids: &[u32], out: &mut HostAct) {
        Backend::get_rows(self, w, ids, out)
    }
    fn rms_norm(&mut self, x: &HostAct, w: &[f32], eps: f32, out: &mut HostAct) {
        Backend::rms_norm(self, x, w, eps, out)
    }
    fn rms_norm_heads(&mut self, x: &mut HostAct, col: usize, n: usize, hd: usize, w: &[f32], eps: f32) {
        Backend::rms_norm_heads(self, x, col, n, hd, w, eps)
    }
    fn matmul(&mut self, x: &HostAct, ws: &[MatRef<'_>], out: &mut HostAct) {
        Backend::matmul(self, x, ws, out)
    }
    fn add_bias(&mut self, x: &mut HostAct, col: usize, b: &[f32]) {
        Backend::add_bias(self, x, col, b)
    }
    fn rope(&mut self, x: &mut HostAct, col: usize, n: usize, hd: usize, pos0: usize, rope: &Rope) {
        Backend::rope(self, x, col, n, hd, pos0, rope)
    }
    fn attention(
        &mut self,
        kv: &mut KvCache,
        l: usize,
        qkv: &HostAct,
        s: &AttnShape,
        sinks: Option<&[f32]>,
        pos0: usize,
        out: &mut HostAct,
    ) {
        Backend::attention(self, kv, l, qkv, s, sinks, pos0, out)
    }
    fn expert_ffn(&mut self, x: &HostAct, jobs: &[ExpertJob<'_, '_, CpuBackend>], y: &mut HostAct) {
        Backend::expert_ffn(self, x, jobs, y)
    }
    fn combine(&mut self, y: &HostAct, assign: &[(u32, f32)], done: &[bool], n_tok: usize, out: &mut HostAct) {
        Backend::combine(self, y, assign, done, n_tok, out)
    }
    fn copy_heads(&mut self, x: &HostAct, from: Heads, out: &mut HostAct, to: Heads) {
        Backend::copy_heads(self, x, from, out, to)
    }
    fn matmul_heads(&mut self, x: &HostAct, from: Heads, ws: &[MatRef<'_>], out: &mut HostAct, to: Heads) {
        Backend::matmul_heads(self, x, from, ws, out, to)
    }
    fn add(&mut self, x: &mut HostAct, y: &HostAct) {
        Backend::add(self, x, y)
    }
}

/// The CPU backend behind a vtable.
struct DynCpu {
    ops: Box<dyn Ops>,
    /// The same backend, for what is not per-token work (weights, KV, the thread pool).
    cpu: CpuBackend,
}

impl Backend for DynCpu {
    type Mat<'a> = MatRef<'a>;
    type Vector<'a> = &'a [f32];
    type Weights = CpuWeights;
    type Act = HostAct;
    type Kv = KvCache;
    type Hot = <CpuBackend as Backend>::Hot;

    fn name(&self) -> &'static str {
        "cpu behind dyn"
    }
    fn supports(&self, op: Op, ty: GgmlType) -> bool {
        self.cpu.supports(op, ty)
    }
    fn take_weights(&mut self, model: &Arc<Model>, residency: Residency) -> Result<CpuWeights, BackendError> {
        self.cpu.take_weights(model, residency)
    }
    fn resident(weights: &CpuWeights) -> (Resident, u64) {
        CpuBackend::resident(weights)
    }
    fn mat<'a>(weights: &'a CpuWeights, w: &WeightDesc) -> MatRef<'a> {
        CpuBackend::mat(weights, w)
    }
    fn vector(weights: &CpuWeights, v: VecRef) -> &[f32] {
        CpuBackend::vector(weights, v)
    }
    fn host_mat<'a>(w: &WeightDesc, bytes: &'a [u8]) -> MatRef<'a> {
        CpuBackend::host_mat(w, bytes)
    }
    fn hot(&self) -> Self::Hot {
        self.cpu.hot()
    }
    fn resize(&self, a: &mut HostAct, rows: usize, cols: usize) {
        a.resize(rows, cols)
    }
    fn read<'a>(&mut self, a: &'a HostAct) -> Cow<'a, [f32]> {
        Cow::Borrowed(a.values())
    }
    fn new_kv(&self, cfg: &KvConfig) -> Result<KvCache, BackendError> {
        self.cpu.new_kv(cfg)
    }
    fn copy_rows(&mut self, x: &HostAct, rows: std::ops::Range<usize>, out: &mut HostAct) {
        self.ops.copy_rows(x, rows, out)
    }
    fn get_rows(&mut self, w: MatRef<'_>, ids: &[u32], out: &mut HostAct) {
        self.ops.get_rows(w, ids, out)
    }
    fn rms_norm(&mut self, x: &HostAct, w: &[f32], eps: f32, out: &mut HostAct) {
        self.ops.rms_norm(x, w, eps, out)
    }
    fn rms_norm_heads(&mut self, x: &mut HostAct, col: usize, n: usize, hd: usize, w: &[f32], eps: f32) {
        self.ops.rms_norm_heads(x, col, n, hd, w, eps)
    }
    fn matmul(&mut self, x: &HostAct, ws: &[MatRef<'_>], out: &mut HostAct) {
        self.ops.matmul(x, ws, out)
    }
    fn add_bias(&mut self, x: &mut HostAct, col: usize, b: &[f32]) {
        self.ops.add_bias(x, col, b)
    }
    fn rope(&mut self, x: &mut HostAct, col: usize, n: usize, hd: usize, pos0: usize, rope: &Rope) {
        self.ops.rope(x, col, n, hd, pos0, rope)
    }
    fn attention(
        &mut self,
        kv: &mut KvCache,
        l: usize,
        qkv: &HostAct,
        s: &AttnShape,
        sinks: Option<&[f32]>,
        pos0: usize,
        out: &mut HostAct,
    ) {
        self.ops.attention(kv, l, qkv, s, sinks, pos0, out)
    }
    fn expert_ffn(&mut self, x: &HostAct, jobs: &[ExpertJob<'_, '_, Self>], y: &mut HostAct) {
        // The same views re-labelled for the CPU backend's ops (both backends' `Mat` is `MatRef`).
        let jobs: Vec<ExpertJob<CpuBackend>> = jobs
            .iter()
            .map(|j| ExpertJob {
                mats: j.mats,
                bias: j.bias,
                glu: j.glu,
                dense: j.dense,
                tokens: j.tokens,
                out_rows: j.out_rows,
            })
            .collect();
        self.ops.expert_ffn(x, &jobs, y)
    }
    fn combine(&mut self, y: &HostAct, assign: &[(u32, f32)], done: &[bool], n_tok: usize, out: &mut HostAct) {
        self.ops.combine(y, assign, done, n_tok, out)
    }
    fn copy_heads(&mut self, x: &HostAct, from: Heads, out: &mut HostAct, to: Heads) {
        self.ops.copy_heads(x, from, out, to)
    }
    fn matmul_heads(&mut self, x: &HostAct, from: Heads, ws: &[MatRef<'_>], out: &mut HostAct, to: Heads) {
        self.ops.matmul_heads(x, from, ws, out, to)
    }
    fn add(&mut self, x: &mut HostAct, y: &HostAct) {
        self.ops.add(x, y)
    }
}

/// Seconds for `n` greedy decode steps after a 4-token prompt.
fn decode_s<B: Backend>(eng: &mut Engine<B>, n: usize) -> f64 {
    let mut sess = eng.new_session().expect("session");
    let _hot = eng.backend().hot();
    let mut logits = eng.eval(&mut sess, &[1, 2, 3, 4], Logits::Last).expect("prefill");
    let t0 = Instant::now();
    for _ in 0..n {
        let id = argmax(&logits) as u32;
        logits = eng.eval(&mut sess, &[id], Logits::Last).expect("decode");
    }
    t0.elapsed().as_secs_f64()
}

fn main() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/rustdoc-moe-Q8_0.gguf");
    let model = Arc::new(Model::load(&path).expect("bundled model"));
    let cfg = || EngineConfig { threads: 2, residency: Residency::fixed(Resident::All), ..Default::default() };
    let mut generic = Engine::new(Arc::clone(&model), cfg()).expect("engine");
    let dyn_cpu = DynCpu { ops: Box::new(CpuBackend::new(2)), cpu: CpuBackend::new(1) };
    let mut dynamic = Engine::with_backend(Arc::clone(&model), dyn_cpu, cfg()).expect("engine");
    let (n, pairs) = (128, 15);
    decode_s(&mut generic, n);
    decode_s(&mut dynamic, n);
    let mut ratios = Vec::new();
    let (mut g_all, mut d_all) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        let (g, d) = if i % 2 == 0 {
            let g = decode_s(&mut generic, n);
            (g, decode_s(&mut dynamic, n))
        } else {
            let d = decode_s(&mut dynamic, n);
            (decode_s(&mut generic, n), d)
        };
        g_all.push(n as f64 / g);
        d_all.push(n as f64 / d);
        ratios.push(g / d);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "rustdoc-moe decode, 2 threads, {pairs} pairs of {n} tokens: generic {:.0} tok/s, dyn {:.0} tok/s; \
         paired time ratio generic/dyn median {:.3}",
        median(&mut g_all),
        median(&mut d_all),
        median(&mut ratios)
    );
}
