//! Sessions, prefill and decode, and sampling, over any [`Backend`] (the CPU one by default).
//! Knows nothing of HTTP or terminals; front doors drive it through `Engine` and `Session`.
//! Talks to the backend through the trait only; the KV cache is the backend's.

pub mod offload;
pub mod sampler;

use std::sync::Arc;
use std::time::Instant;

pub use crate::backend::KvType;
use crate::backend::{cpu::CpuBackend, Backend, BackendError, KvConfig};
use crate::experts::trace::TraceError;
use crate::layers::{ExpertProvider, Forward, Logits, ModelExperts, ProviderError, RouteObserver, Scratch};
use crate::model::{Model, Residency, Resident};
pub use sampler::{argmax, Sampler, SamplerConfig};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub threads: usize,
    /// Context length (0 = the model's, capped at `DEFAULT_MAX_CTX`).
    pub n_ctx: usize,
    pub kv_type: KvType,
    /// Prompt tokens per forward pass during prefill.
    pub n_batch: usize,
    /// Which weights the backend copies out of the file mapping.
    pub residency: Residency,
    /// Keep sliding-window layers' KV full length instead of a ring of window + batch positions
    /// (llama.cpp's `--swa-full`).
    pub swa_full: bool,
}

/// The default context cap when the model's own is larger (keeps the KV cache modest).
pub const DEFAULT_MAX_CTX: usize = 4096;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            threads: default_threads(),
            n_ctx: 0,
            kv_type: KvType::F16,
            n_batch: 512,
            residency: Residency::default(),
            swa_full: false,
        }
    }
}

/// Physical cores available to us (what llama.cpp defaults to, roughly).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8)
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the context is full: {used} + {new} tokens exceed the context length {n_ctx}")]
    ContextFull { used: usize, new: usize, n_ctx: usize },
    #[error("token id {id} is outside the vocabulary ({n_vocab} tokens)")]
    BadToken { id: u32, n_vocab: usize },
    #[error("nothing to evaluate: the prompt is empty")]
    EmptyInput,
    #[error(transparent)]
    Experts(#[from] ProviderError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    ModelFile(#[from] crate::gguf::GgufError),
}

/// One conversation's state: its KV cache (the backend's) and the tokens in it.
pub struct Session<B: Backend = CpuBackend> {
    pub kv: B::Kv,
    pub tokens: Vec<u32>,
    /// The cache's shape (which layers are rings decides what a cut can keep).
    pub kv_config: KvConfig,
}

impl<B: Backend> Session<B> {
    pub fn n_past(&self) -> usize {
        self.tokens.len()
    }

    /// Forget everything after the first `n` tokens (the KV rows past `n` become unused). When a
    /// sliding-window ring no longer holds the window before `n`, everything is forgotten (the
    /// prompt is evaluated again, as llama.cpp does then).
    pub fn truncate(&mut self, n: usize) {
        let n = if self.kv_config.can_keep(self.tokens.len(), n) { n } else { 0 };
        self.tokens.truncate(n);
    }
}

/// A model on a backend: its weights as the backend took them, scratch, and the expert cache.
pub struct Engine<B: Backend = CpuBackend> {
    model: Arc<Model>,
    backend: B,
    weights: B::Weights,
    scratch: Scratch<B>,
    cfg: EngineConfig,
    n_ctx: usize,
    offload: Option<offload::Offload>,
    predictor: Option<crate::predict::Predictor>,
    trace: Option<TraceObserver>,
}

/// Writes every routing decision to a trace file (`--trace`).
struct TraceObserver {
    writer: crate::experts::trace::TraceWriter,
    /// The first write error (reported by `finish_trace`).
    error: Option<TraceError>,
}

impl RouteObserver for TraceObserver {
    fn route(&mut self, layer: usize, token: usize, route: &crate::layers::Route) {
        let experts: Vec<u16> = route.experts.iter().map(|&e| e as u16).collect();
        if let Err(e) = self.writer.record(token as u64, layer as u16, &experts, &route.weights) {
            self.error.get_or_insert(e);
        }
    }
}

/// Timing of one `generate` call.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    pub generated_tokens: usize,
    pub decode_s: f64,
}

impl Timings {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_s)
    }
    pub fn decode_tok_s(&self) -> f64 {
        // The first generated token comes from the prefill logits; decode steps are the rest.
        rate(self.generated_tokens.saturating_sub(1), self.decode_s)
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-generation token.
    Eog,
    /// `max_tokens` reached.
    Length,
    /// The caller asked to stop (stop string, cancel).
    Stopped,
    /// The context filled up.
    ContextFull,
}

/// What the token callback tells the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

pub struct GenerateOptions<'a> {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Token ids that end generation (EOS/EOT); the stop token is not emitted.
    pub is_eog: &'a dyn Fn(u32) -> bool,
}

pub struct Generation {
    pub ids: Vec<u32>,
    /// Logits after the last prompt token.
    pub first_logits: Vec<f32>,
    pub stop: StopReason,
    pub timings: Timings,
}

/// The context length an engine with `cfg` uses for `model`.
pub fn context_length(model: &Model, cfg: &EngineConfig) -> usize {
    match cfg.n_ctx {
        0 => model.hp.n_ctx_train.min(DEFAULT_MAX_CTX),
        n => n,
    }
}

/// The shape of one session's KV cache for `model` under `cfg`.
pub fn kv_config(model: &Model, cfg: &EngineConfig) -> KvConfig {
    let hp = &model.hp;
    KvConfig {
        ty: cfg.kv_type,
        n_layer: hp.n_layer,
        n_ctx: context_length(model, cfg),
        n_head_kv: hp.n_head_kv,
        head_dim: hp.head_dim,
        // MLA stores the latent once, as the first `kv_lora` elements of each key.
        values: hp.mla.map_or(crate::backend::Values::Separate, |m| crate::backend::Values::KeyPrefix(m.kv_lora)),
        ring: (model.spec.sliding_window != crate::arch::SlidingWindow::None && hp.n_swa > 0 && !cfg.swa_full).then(
            || crate::backend::KvRing {
                layers: model.spec.sliding_window,
                len: hp.n_swa + cfg.n_batch.max(1),
                window: hp.n_swa,
            },
        ),
    }
}

/// Bytes of one session's KV cache for `model` under `cfg`.
pub fn session_kv_bytes(model: &Model, cfg: &EngineConfig) -> u64 {
    kv_config(model, cfg).bytes()
}

impl Engine<CpuBackend> {
    /// `model` on the CPU backend with `cfg.threads` threads.
    pub fn new(model: Arc<Model>, cfg: EngineConfig) -> Result<Engine, EngineError> {
        Engine::with_backend(model, CpuBackend::new(cfg.threads), cfg)
    }
}

impl<B: Backend> Engine<B> {
    /// `model` on `backend`, which takes the weights `cfg.residency` selects.
    pub fn with_backend(model: Arc<Model>, mut backend: B, cfg: EngineConfig) -> Result<Engine<B>, EngineError> {
        let n_ctx = context_length(&model, &cfg);
        let weights = backend.take_weights(&model, cfg.residency)?;
        Ok(Engine {
            model,
            backend,
            weights,
            scratch: Scratch::default(),
            cfg,
            n_ctx,
            offload: None,
            predictor: None,
            trace: None,
        })
    }

    /// What the backend copied (`Auto` resolved) and the bytes those copies hold.
    pub fn resident(&self) -> (Resident, u64) {
        B::resident(&self.weights)
    }

    /// Whether passes read the model file (through its mapping or the expert cache), not only
    /// copies made at load.
    pub fn reads_file(&self) -> bool {
        self.offload.is_some() || self.resident().0 != Resident::All
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Serve routed experts from a budgeted cache instead of the model's memory.
    pub fn set_offload(&mut self, mut off: offload::Offload) {
        off.attach::<B>();
        self.backend.use_host_memory(&off.host_regions());
        self.offload = Some(off);
    }

    /// Predict the next layers' experts and prefetch them (`None`: off). Without an expert
    /// cache the predictions are only scored (the experts are all in place).
    pub fn set_predictor(&mut self, cfg: Option<crate::predict::PredictConfig>) {
        self.predictor = cfg.map(crate::predict::Predictor::new);
    }

    pub fn predictor(&self) -> Option<&crate::predict::Predictor> {
        self.predictor.as_ref()
    }

    /// The expert cache's figures with the predictor's (None without a cache).
    /// The device backend's memory and copy counters (`None` on the CPU).
    pub fn device_stats(&self) -> Option<crate::backend::DeviceStats> {
        self.backend.device_stats()
    }

    pub fn offload_stats(&self) -> Option<offload::OffloadStats> {
        let o = self.offload.as_ref()?;
        let mut st = o.stats();
        st.predictor = self.predictor.as_ref().map(|p| p.stats(o.wasted_prefetch_bytes()));
        Some(st)
    }

    pub fn offload(&self) -> Option<&offload::Offload> {
        self.offload.as_ref()
    }

    pub fn offload_mut(&mut self) -> Option<&mut offload::Offload> {
        self.offload.as_mut()
    }

    /// Record every routing decision to `path` (JSON lines, see `experts::trace`).
    pub fn trace_to(&mut self, path: &std::path::Path) -> Result<(), crate::experts::trace::TraceError> {
        let m = &self.model;
        let experts_bytes =
            (0..m.hp.n_layer).filter_map(|l| m.experts(l)).flatten().map(|e| e.bytes()).max().unwrap_or(0);
        let header = crate::experts::trace::TraceHeader {
            model: m.file.path().display().to_string(),
            n_layers: m.hp.n_layer,
            n_experts: m.hp.n_expert,
            top_k: m.hp.n_expert_used,
            expert_bytes_high: experts_bytes,
            expert_bytes_low: 0,
        };
        let writer = crate::experts::trace::TraceWriter::create(path, &header)?;
        self.trace = Some(TraceObserver { writer, error: None });
        Ok(())
    }

    /// Flush and close the trace, if one is being written.
    pub fn finish_trace(&mut self) -> Result<(), TraceError> {
        match self.trace.take() {
            Some(t) => match t.error {
                Some(e) => Err(e),
                None => t.writer.commit(),
            },
            None => Ok(()),
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn threads(&self) -> usize {
        self.cfg.threads
    }

    /// A new session, with a KV cache of the engine's context length in the backend's memory.
    pub fn new_session(&self) -> Result<Session<B>, EngineError> {
        let kv_config = kv_config(&self.model, &self.cfg);
        Ok(Session { kv: self.backend.new_kv(&kv_config)?, tokens: Vec::new(), kv_config })
    }

    /// Bytes one session's KV cache holds.
    pub fn session_kv_bytes(&self) -> u64 {
        session_kv_bytes(&self.model, &self.cfg)
    }

    /// Evaluate `tokens` after what `sess` holds; returns the requested logits.
    pub fn eval(&mut self, sess: &mut Session<B>, tokens: &[u32], want: Logits) -> Result<Vec<f32>, EngineError> {
        let mut off = self.offload.take();
        let mut trace = self.trace.take();
        let obs: &mut dyn RouteObserver = match trace.as_mut() {
            Some(t) => t,
            None => &mut (),
        };
        let r = match off.as_mut() {
            Some(o) => self.eval_with(sess, tokens, want, Provider::Cache(o), obs),
            None => self.eval_with(sess, tokens, want, Provider::Model, obs),
        };
        self.offload = off;
        self.trace = trace;
        r
    }

    /// `eval` with an explicit expert source and routing observer.
    pub fn eval_with(
        &mut self,
        sess: &mut Session<B>,
        tokens: &[u32],
        want: Logits,
        experts: Provider<'_, B>,
        obs: &mut dyn RouteObserver,
    ) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        let n_vocab = self.model.hp.n_vocab;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= n_vocab) {
            return Err(EngineError::BadToken { id, n_vocab });
        }
        if sess.n_past() + tokens.len() > self.n_ctx {
            return Err(EngineError::ContextFull { used: sess.n_past(), new: tokens.len(), n_ctx: self.n_ctx });
        }
        let mut model_experts = ModelExperts::<B> { model: &self.model, weights: &self.weights };
        let experts: &mut dyn ExpertProvider<B> = match experts {
            Provider::Model => &mut model_experts,
            Provider::Cache(p) => p,
        };
        let mut predictor = self.predictor.take();
        let mut fwd = Forward {
            model: &self.model,
            backend: &mut self.backend,
            weights: &self.weights,
            experts,
            predictor: predictor.as_mut(),
        };
        let r = Self::eval_chunks(&mut fwd, sess, tokens, want, self.cfg.n_batch, &mut self.scratch, obs);
        self.predictor = predictor;
        r
    }

    fn eval_chunks(
        fwd: &mut Forward<'_, B>,
        sess: &mut Session<B>,
        tokens: &[u32],
        want: Logits,
        n_batch: usize,
        scratch: &mut Scratch<B>,
        obs: &mut dyn RouteObserver,
    ) -> Result<Vec<f32>, EngineError> {
        let mut out = Vec::new();
        let batch = n_batch.max(1);
        let n_chunks = tokens.len().div_ceil(batch);
        for (i, chunk) in tokens.chunks(batch).enumerate() {
            let last = i + 1 == n_chunks;
            let w = if want == Logits::All { Logits::All } else { Logits::Last };
            let logits = fwd.run(chunk, sess.n_past(), &mut sess.kv, scratch, w, obs)?;
            sess.tokens.extend_from_slice(chunk);
            if want == Logits::All || last {
                out.extend(logits);
            }
        }
        Ok(out)
    }

    /// Prefill `prompt`, then sample up to `max_tokens`, calling `on_token` for each.
    pub fn generate(
        &mut self,
        sess: &mut Session<B>,
        prompt: &[u32],
        opts: &GenerateOptions<'_>,
        on_token: &mut dyn FnMut(u32) -> Flow,
    ) -> Result<Generation, EngineError> {
        // A file changed since it was loaded fails this generation before any of it is read.
        if self.reads_file() {
            self.model.file.check_unchanged()?;
        }
        // Sampling and the caller's streaming sit between the forward passes: keep the
        // backend's threads spinning through them.
        let _hot = self.backend.hot();
        let mut sampler = Sampler::new(opts.sampler.clone());
        let mut timings = Timings { prompt_tokens: prompt.len(), ..Default::default() };
        let t0 = Instant::now();
        let mut logits = self.eval(sess, prompt, Logits::Last)?;
        timings.prefill_s = t0.elapsed().as_secs_f64();
        let first_logits = logits.clone();
        let mut ids = Vec::new();
        let t1 = Instant::now();
        let stop = loop {
            if ids.len() >= opts.max_tokens {
                break StopReason::Length;
            }
            let id = sampler.sample(&logits, &sess.tokens);
            if (opts.is_eog)(id) {
                break StopReason::Eog;
            }
            ids.push(id);
            if on_token(id) == Flow::Stop {
                break StopReason::Stopped;
            }
            if ids.len() >= opts.max_tokens {
                break StopReason::Length;
            }
            if sess.n_past() + 1 > self.n_ctx {
                break StopReason::ContextFull;
            }
            logits = self.eval(sess, &[id], Logits::Last)?;
        };
        timings.decode_s = t1.elapsed().as_secs_f64();
        timings.generated_tokens = ids.len();
        Ok(Generation { ids, first_logits, stop, timings })
    }
}

/// Where a forward pass takes routed experts from.
pub enum Provider<'a, B: Backend> {
    /// The model's weights as the backend took them (all resident).
    Model,
    /// Any other provider: the expert cache, a test's.
    Cache(&'a mut dyn ExpertProvider<B>),
}
