//! Architecture knowledge as data: one `ArchSpec` per model family (hyper-parameter keys, tensor
//! names, router config, norms, shared experts). Never calls a backend; adding a family is one
//! entry in `SPECS`.

mod hparams;
mod tensors;

pub use hparams::{HParams, Mla};
pub use tensors::{tn, tn_expert, TensorKind};

/// How router logits become expert probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Gating {
    Softmax,
    Sigmoid,
    /// Top-k on the raw logits, then a softmax over the k selected (gpt-oss).
    SoftmaxWeight,
}

/// Group-limited routing (DeepSeek-V3): the experts form `n_group` contiguous groups, each
/// scored by the sum of its two best selection scores; only the `n_used` best groups compete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GroupLimit {
    pub n_group: usize,
    pub n_used: usize,
}

/// Routing is data, not code: every MoE family runs the same top-k loop with its own config.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RouterConfig {
    pub gating: Gating,
    /// Divide the selected experts' weights by their sum (Mixtral, Qwen3-MoE).
    pub renormalize: bool,
    /// Multiply the final weights by this (1.0 = none).
    pub scale: f32,
    /// `{arch}.expert_group_count` / `expert_group_used_count` (DeepSeek), when more than one group.
    pub groups: Option<GroupLimit>,
}

/// How a layer computes its queries, keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Attention {
    /// `attn_q`, `attn_k`, `attn_v`: multi-head (grouped-query) attention.
    Mha,
    /// DeepSeek's multi-head latent attention in its absorbed form: queries through an optional
    /// LoRA (`attn_q_a` → norm → `attn_q_b`), one shared KV head `[latent | k_pe]` from
    /// `attn_kv_a_mqa`, per-head `attn_k_b` / `attn_v_b` on the query and the output.
    Mla,
}

/// How RoPE pairs dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): llama.
    Normal,
    /// Halves (i, i + d/2): GPT-NeoX, Qwen, OLMoE.
    Neox,
}

/// Where q/k RMS norms apply, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum QkNorm {
    None,
    /// One weight of `head_dim`, applied to every head (Qwen3).
    PerHead,
    /// `PerHead` where the file has the weights (GLM-4.5 has them, GLM-4.5-Air does not).
    PerHeadIfPresent,
    /// One weight over the whole projection (OLMoE).
    Full,
}

/// Where the routed experts' FFN width comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ExpertWidth {
    /// `{arch}.feed_forward_length` (Mixtral, OLMoE).
    FeedForward,
    /// `{arch}.expert_feed_forward_length` (Qwen MoE; when absent, `feed_forward_length /
    /// expert_used_count`). Any family's file may carry that key; this says which it needs.
    ExpertKey,
}

/// The gated activation of the expert FFNs: `down(act(gate·x) ⊙ up·x)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Glu {
    /// `silu(g) · u`.
    SwiGlu,
    /// gpt-oss: `g' · sigmoid(alpha·g') · (u' + 1)` with `g' = min(g, limit)` and `u'` clamped to
    /// `±limit` (llama.cpp hard-codes alpha 1.702 and limit 7).
    SwiGluOai { alpha: f32, limit: f32 },
}

/// Which layers attend through a sliding window (`{arch}.attention.sliding_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SlidingWindow {
    None,
    /// Layers 0, 2, 4, … (gpt-oss: llama.cpp's pattern 2, not read from the file).
    EvenLayers,
}

impl SlidingWindow {
    pub fn applies(self, layer: usize) -> bool {
        match self {
            SlidingWindow::None => false,
            SlidingWindow::EvenLayers => layer.is_multiple_of(2),
        }
    }
}

/// One model family.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ArchSpec {
    /// `general.architecture` value.
    pub name: &'static str,
    pub rope: RopeStyle,
    pub qk_norm: QkNorm,
    /// The family's files carry q/k/v biases (Qwen2, gpt-oss, GLM-4.5): what `synth` writes. The
    /// loader takes them from any MHA file that has them, as llama.cpp does.
    pub attn_bias: bool,
    /// Default router config; `{arch}.expert_weights_norm` / `_scale` override it.
    pub router: RouterConfig,
    /// Has a shared expert with a sigmoid gate (Qwen2-MoE).
    pub shared_expert: bool,
    /// `output.weight` may be absent and tied to the token embedding.
    pub tied_output_allowed: bool,
    pub expert_width: ExpertWidth,
    /// The norm before the FFN: `ffn_norm` (llama) or `post_attention_norm` (gpt-oss).
    pub ffn_norm: TensorKind,
    /// The attention output projection has a bias (gpt-oss).
    pub attn_out_bias: bool,
    /// One attention-sink logit per head (gpt-oss).
    pub sinks: bool,
    pub sliding_window: SlidingWindow,
    /// The router has a bias (gpt-oss).
    pub router_bias: bool,
    /// Each expert's gate, up and down have biases (gpt-oss).
    pub expert_bias: bool,
    pub glu: Glu,
    pub attention: Attention,
    /// The shared expert's output is scaled by `sigmoid(ffn_gate_inp_shexp · x)` (Qwen2-MoE);
    /// without, it is added as it is (DeepSeek).
    pub shared_gate: bool,
    /// Routers may carry a selection-only bias `exp_probs_b.bias` (DeepSeek-V3); the file's
    /// `expert_gating_func` then picks the gating (absent: the spec's).
    pub selection_bias: bool,
    /// `{arch}.expert_weights_norm` decides the renormalization (llama.cpp ignores it for the
    /// first DeepSeek-MoE, never renormalized, and for ERNIE 4.5, always).
    pub weights_norm_key: bool,
    /// `{arch}.expert_weights_scale` scales the weights (llama.cpp does not read it for ERNIE).
    pub weights_scale_key: bool,
    /// An ungated shared expert's width is `expert_shared_feed_forward_length` (none without
    /// it: ERNIE 4.5), not `expert_shared_count` experts of the routed width (DeepSeek).
    pub shared_width_key: bool,
}

/// What most families share; a spec spells out only where it differs.
const BASE: ArchSpec = ArchSpec {
    name: "",
    rope: RopeStyle::Normal,
    qk_norm: QkNorm::None,
    attn_bias: false,
    router: SOFTMAX_RENORM,
    shared_expert: false,
    tied_output_allowed: true,
    expert_width: ExpertWidth::FeedForward,
    ffn_norm: TensorKind::FfnNorm,
    attn_out_bias: false,
    sinks: false,
    sliding_window: SlidingWindow::None,
    router_bias: false,
    expert_bias: false,
    glu: Glu::SwiGlu,
    attention: Attention::Mha,
    shared_gate: true,
    selection_bias: false,
    weights_norm_key: true,
    weights_scale_key: true,
    shared_width_key: false,
};

const SOFTMAX_RENORM: RouterConfig =
    RouterConfig { gating: Gating::Softmax, renormalize: true, scale: 1.0, groups: None };
const SOFTMAX_PLAIN: RouterConfig =
    RouterConfig { gating: Gating::Softmax, renormalize: false, scale: 1.0, groups: None };

/// Every family moerun runs.
pub static SPECS: &[ArchSpec] = &[
    ArchSpec { name: "llama", ..BASE },
    ArchSpec {
        name: "qwen2moe",
        rope: RopeStyle::Neox,
        qk_norm: QkNorm::None,
        attn_bias: true,
        router: SOFTMAX_PLAIN,
        shared_expert: true,
        tied_output_allowed: true,
        expert_width: ExpertWidth::ExpertKey,
        ..BASE
    },
    ArchSpec {
        name: "qwen3moe",
        rope: RopeStyle::Neox,
        qk_norm: QkNorm::PerHead,
        attn_bias: false,
        router: SOFTMAX_RENORM,
        shared_expert: false,
        tied_output_allowed: true,
        expert_width: ExpertWidth::ExpertKey,
        ..BASE
    },
    ArchSpec {
        name: "olmoe",
        rope: RopeStyle::Neox,
        qk_norm: QkNorm::Full,
        attn_bias: false,
        router: SOFTMAX_PLAIN,
        shared_expert: false,
        tied_output_allowed: false,
        expert_width: ExpertWidth::FeedForward,
        ..BASE
    },
    ArchSpec {
        name: "gpt-oss",
        rope: RopeStyle::Neox,
        attn_bias: true,
        router: RouterConfig { gating: Gating::SoftmaxWeight, renormalize: false, scale: 1.0, groups: None },
        tied_output_allowed: false,
        expert_width: ExpertWidth::ExpertKey,
        ffn_norm: TensorKind::AttnPostNorm,
        attn_out_bias: true,
        sinks: true,
        sliding_window: SlidingWindow::EvenLayers,
        router_bias: true,
        expert_bias: true,
        glu: Glu::SwiGluOai { alpha: 1.702, limit: 7.0 },
        ..BASE
    },
    // DeepSeek-V2/V3/R1, Kimi K2, Moonlight. The gating function, group limit, weight norm and
    // scale come from the file (`expert_gating_func` absent means softmax, as in llama.cpp).
    ArchSpec {
        name: "deepseek2",
        rope: RopeStyle::Normal,
        router: SOFTMAX_PLAIN,
        shared_expert: true,
        shared_gate: false,
        tied_output_allowed: true,
        expert_width: ExpertWidth::ExpertKey,
        attention: Attention::Mla,
        selection_bias: true,
        ..BASE
    },
    // DeepSeek-MoE 16B (the first DeepSeek MoE): llama attention, a leading dense layer, softmax
    // routing never renormalized (whatever the file says, as llama.cpp), the weights scaled by
    // `expert_weights_scale` where the file has it, and ungated shared experts.
    ArchSpec {
        name: "deepseek",
        router: SOFTMAX_PLAIN,
        shared_expert: true,
        shared_gate: false,
        expert_width: ExpertWidth::ExpertKey,
        weights_norm_key: false,
        ..BASE
    },
    // ERNIE 4.5 MoE (21B-A3B, 300B-A47B): llama attention (q/k/v biases where the file has them;
    // its `attn_output.bias` is not applied, as in llama.cpp), leading dense layers, softmax
    // routing with the selection bias, always renormalized and never scaled, and an ungated shared
    // expert of `expert_shared_feed_forward_length` where the file has one.
    ArchSpec {
        name: "ernie4_5-moe",
        attn_bias: true,
        router: SOFTMAX_RENORM,
        shared_expert: true,
        shared_gate: false,
        shared_width_key: true,
        expert_width: ExpertWidth::ExpertKey,
        selection_bias: true,
        weights_norm_key: false,
        weights_scale_key: false,
        ..BASE
    },
    // GLM-4.5, GLM-4.5-Air, GLM-4.6: DeepSeek-V3's FFN (leading dense layers, sigmoid routing
    // with the selection bias, an ungated shared expert; weight norm and scale from the file)
    // behind grouped-query attention with q/k/v biases, NEOX RoPE over part of each head
    // (`rope.dimension_count`) and per-head q/k norms where the file has them. The FFN norm is
    // `post_attention_norm`. The file's trailing multi-token-prediction block
    // (`nextn_predict_layers`) is not run, as llama.cpp does not run it for plain decoding.
    ArchSpec {
        name: "glm4moe",
        rope: RopeStyle::Neox,
        qk_norm: QkNorm::PerHeadIfPresent,
        attn_bias: true,
        router: RouterConfig { gating: Gating::Sigmoid, renormalize: false, scale: 1.0, groups: None },
        shared_expert: true,
        shared_gate: false,
        tied_output_allowed: true,
        expert_width: ExpertWidth::ExpertKey,
        ffn_norm: TensorKind::AttnPostNorm,
        selection_bias: true,
        ..BASE
    },
];

/// The spec for a `general.architecture` value.
pub fn spec(name: &str) -> Option<&'static ArchSpec> {
    SPECS.iter().find(|s| s.name == name)
}

/// Errors from reading a model's architecture.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("{path}: unknown architecture '{arch}' (moerun runs: {known})")]
    UnknownArch { path: String, arch: String, known: String },
    #[error("{path}: missing metadata key '{key}'")]
    MissingKey { path: String, key: String },
    #[error("{path}: metadata '{key}' has a bad value: {reason}")]
    BadValue { path: String, key: String, reason: String },
    #[error("{path}: missing tensor '{tensor}'")]
    MissingTensor { path: String, tensor: String },
    #[error("{path}: tensor '{tensor}' has shape {found:?}, expected {expected:?}")]
    BadTensorShape { path: String, tensor: String, found: Vec<u64>, expected: Vec<u64> },
    #[error("{path}: tensor '{tensor}' has type {ty}, on which the {backend} backend has no {op}")]
    UnsupportedType { path: String, tensor: String, ty: &'static str, op: crate::backend::Op, backend: &'static str },
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
}
