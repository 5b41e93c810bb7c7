//! Deterministic random-weight MoE models at any shape and weight type, written as GGUF files
//! that moerun and llama.cpp both load: for speed runs at real shapes (`moerun synth`) and for
//! tests that need a model of a given family. Knows the families only through `arch` names.
//!
//! Big matrices are built from a bank of random quantized rows picked by a hash of (tensor, row),
//! so writing gigabytes costs little more than the disk; routers, norms and biases are fully
//! random so routing varies like a real model's.

use std::path::Path;

use crate::arch::{self, tn, ArchSpec, Attention, ExpertWidth, QkNorm, TensorKind};
use crate::ggml::kernels;
use crate::gguf::{GgmlType, GgufError, GgufStreamWriter, Value};
use crate::rng::SplitMix64;

/// The shape of a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// `llama` (Mixtral-style), `qwen2moe`, `qwen3moe` or `olmoe`.
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Routed-expert FFN width; with `n_expert` 0, the width of every layer's dense FFN.
    pub n_ff_exp: usize,
    /// Shared-expert width (qwen2moe only).
    pub n_ff_shexp: usize,
    /// 0: dense FFN layers (`ffn_gate`/`ffn_up`/`ffn_down`, no router), as plain llama models have.
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    /// Type of the big matrices (attention, experts, embeddings, output).
    pub weight_type: GgmlType,
    /// Type of the routed experts when it differs from `weight_type` (gpt-oss ships MXFP4
    /// experts and Q8_0 elsewhere).
    pub expert_type: Option<GgmlType>,
    /// Sliding attention window, written for families that use one (0: 128).
    pub n_swa: usize,
    /// YaRN scaling `(factor, original context)`, as gpt-oss files carry it.
    pub yarn: Option<(f32, usize)>,
    /// DeepSeek-style families (deepseek, deepseek2, glm4moe): a real model's dense FFN width and
    /// shared-expert count (and deepseek2's MLA ranks) instead of the routed width, one shared
    /// expert and the ranks derived from the head size (`mla_dims`).
    pub deepseek: Option<SynthDeepseek>,
    /// No `output.weight`: the output projection is the token embedding (tied), for families
    /// whose loaders allow it.
    pub tied_output: bool,
    /// Write q/k/v biases even where the family's files have none (any MHA file may).
    pub qkv_bias: bool,
    pub seed: u64,
}

/// A real model's DeepSeek-style FFN widths, and for deepseek2 its MLA ranks.
#[derive(Debug, Clone, Copy)]
pub struct SynthDeepseek {
    /// 0: no q LoRA (a plain `attn_q`, as DeepSeek-V2-Lite). MLA only, as `kv_lora`.
    pub q_lora: usize,
    pub kv_lora: usize,
    /// Width of the leading dense layer's FFN.
    pub n_ff_dense: usize,
    /// Shared experts, written as one of `n_shared × n_ff_exp`.
    pub n_shared: usize,
    /// Expert groups and how many are used (1 and 1: no group limit).
    pub groups: (usize, usize),
}

/// Named shapes of real models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Mixtral-8x7B layers: hidden 4096, 32/8 heads, 8 experts of FFN 14336, top-2, vocab 32000.
    Mixtral,
    /// Qwen3-30B-A3B layers: hidden 2048, 32/4 heads of 128, 128 experts of FFN 768, top-8, vocab 151936.
    Qwen3moe,
    /// Qwen1.5-MoE-A2.7B layers: hidden 2048, 16 heads, 60 experts of FFN 1408 top-4, shared 5632.
    Qwen2moe,
    /// OLMoE-1B-7B layers: hidden 2048, 16 heads, 64 experts of FFN 1024, top-8, vocab 50304.
    Olmoe,
    /// gpt-oss-20b layers: hidden 2880, 64/8 heads of 64, 32 experts of FFN 2880, top-4, vocab
    /// 201088, sliding window 128 on even layers, YaRN ×32 from 4096; MXFP4 experts (the
    /// `--type` applies to the rest).
    GptOss,
    /// DeepSeek-V2-Lite layers: hidden 2048, 16 heads, MLA (kv LoRA 512, no q LoRA, nope 128 +
    /// rope 64, v 128), 64 experts of FFN 1408 top-6 plus 2 shared, layer 0 dense (FFN 10944),
    /// vocab 102400.
    Deepseek2,
    /// GLM-4.5-Air layers: hidden 4096, 96/8 heads of 128 (64 rotated), 128 experts of FFN 1408
    /// top-8 plus 1 shared, layer 0 dense (FFN 10944), vocab 151552.
    Glm4moe,
}

impl Preset {
    pub fn config(self, n_layer: usize, weight_type: GgmlType, seed: u64) -> SynthConfig {
        let base = |arch: &str| SynthConfig {
            arch: arch.into(),
            n_layer,
            n_embd: 0,
            n_head: 0,
            n_head_kv: 0,
            head_dim: 0,
            n_ff_exp: 0,
            n_ff_shexp: 0,
            n_expert: 0,
            n_expert_used: 0,
            n_vocab: 0,
            n_ctx: 4096,
            rope_freq_base: 1_000_000.0,
            rms_eps: 1e-6,
            weight_type,
            expert_type: None,
            n_swa: 0,
            yarn: None,
            deepseek: None,
            tied_output: false,
            qkv_bias: false,
            seed,
        };
        match self {
            Preset::Mixtral => SynthConfig {
                n_embd: 4096,
                n_head: 32,
                n_head_kv: 8,
                head_dim: 128,
                n_ff_exp: 14336,
                n_expert: 8,
                n_expert_used: 2,
                n_vocab: 32000,
                rms_eps: 1e-5,
                ..base("llama")
            },
            Preset::Qwen3moe => SynthConfig {
                n_embd: 2048,
                n_head: 32,
                n_head_kv: 4,
                head_dim: 128,
                n_ff_exp: 768,
                n_expert: 128,
                n_expert_used: 8,
                n_vocab: 151936,
                ..base("qwen3moe")
            },
            Preset::Qwen2moe => SynthConfig {
                n_embd: 2048,
                n_head: 16,
                n_head_kv: 16,
                head_dim: 128,
                n_ff_exp: 1408,
                n_ff_shexp: 5632,
                n_expert: 60,
                n_expert_used: 4,
                n_vocab: 151936,
                ..base("qwen2moe")
            },
            Preset::Olmoe => SynthConfig {
                n_embd: 2048,
                n_head: 16,
                n_head_kv: 16,
                head_dim: 128,
                n_ff_exp: 1024,
                n_expert: 64,
                n_expert_used: 8,
                n_vocab: 50304,
                rope_freq_base: 10000.0,
                rms_eps: 1e-5,
                ..base("olmoe")
            },
            Preset::GptOss => SynthConfig {
                n_embd: 2880,
                n_head: 64,
                n_head_kv: 8,
                head_dim: 64,
                n_ff_exp: 2880,
                n_expert: 32,
                n_expert_used: 4,
                n_vocab: 201088,
                rope_freq_base: 150000.0,
                rms_eps: 1e-5,
                expert_type: Some(GgmlType::MXFP4),
                n_swa: 128,
                yarn: Some((32.0, 4096)),
                ..base("gpt-oss")
            },
            Preset::Deepseek2 => SynthConfig {
                n_embd: 2048,
                n_head: 16,
                n_head_kv: 16,
                head_dim: 128,
                n_ff_exp: 1408,
                n_expert: 64,
                n_expert_used: 6,
                n_vocab: 102400,
                rope_freq_base: 10000.0,
                deepseek: Some(SynthDeepseek {
                    q_lora: 0,
                    kv_lora: 512,
                    n_ff_dense: 10944,
                    n_shared: 2,
                    groups: (1, 1),
                }),
                ..base("deepseek2")
            },
            Preset::Glm4moe => SynthConfig {
                n_embd: 4096,
                n_head: 96,
                n_head_kv: 8,
                head_dim: 128,
                n_ff_exp: 1408,
                n_expert: 128,
                n_expert_used: 8,
                n_vocab: 151552,
                rope_freq_base: 1_000_000.0,
                deepseek: Some(SynthDeepseek { q_lora: 0, kv_lora: 0, n_ff_dense: 10944, n_shared: 1, groups: (1, 1) }),
                ..base("glm4moe")
            },
        }
    }
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Rows from a bank of random rows with this standard deviation.
    Banked(f32),
    /// Every value random (routers, biases, small tensors).
    Random(f32),
    /// Around 1.0 (norm weights).
    Norm,
}

struct Planned {
    name: String,
    ty: GgmlType,
    shape: Vec<u64>,
    fill: Fill,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("synth: unknown architecture '{arch}' (moerun runs: {known})")]
    UnknownArch { arch: String, known: String },
    #[error("synth: {ty} cannot hold rows of {cols} values (block size {block})")]
    BadShape { ty: &'static str, cols: usize, block: u64 },
    #[error("synth: ggml cannot quantize to {0}")]
    Unsupported(&'static str),
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

impl SynthConfig {
    /// A small model of `arch` for tests: 2 layers, hidden 256, 8 heads of 32 (4 kv), 4 experts
    /// of width 512 (shared expert 512), top-2, vocabulary 512, context 256. Rows are whole
    /// K-quant blocks, so every type fits. Override fields with struct-update syntax.
    pub fn small(arch: &str, weight_type: GgmlType) -> SynthConfig {
        SynthConfig {
            arch: arch.into(),
            n_layer: 2,
            n_embd: 256,
            n_head: 8,
            n_head_kv: 4,
            head_dim: 32,
            n_ff_exp: 512,
            n_ff_shexp: 512,
            n_expert: 4,
            n_expert_used: 2,
            n_vocab: 512,
            n_ctx: 256,
            rope_freq_base: 10000.0,
            rms_eps: 1e-5,
            weight_type,
            expert_type: None,
            n_swa: 16,
            yarn: None,
            deepseek: None,
            tied_output: false,
            qkv_bias: false,
            seed: 7,
        }
    }

    /// The smallest MoE worth the name: one layer of two experts (one used), rows of 64, a
    /// 64-token vocabulary; a file of a few KB to rewrite per case (fuzzing, damaged-file tests).
    pub fn minimal(arch: &str, weight_type: GgmlType) -> SynthConfig {
        SynthConfig {
            n_layer: 1,
            n_embd: 64,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 32,
            n_ff_exp: 64,
            n_ff_shexp: 0,
            n_expert: 2,
            n_expert_used: 1,
            n_vocab: 64,
            n_ctx: 32,
            ..SynthConfig::small(arch, weight_type)
        }
    }

    /// The width of dense FFN layers: a DeepSeek-style model's leading ones, else the routed width.
    fn dense_width(&self, spec: &ArchSpec) -> usize {
        match deepseek_ffn(spec) {
            true => self.deepseek.map_or(self.n_ff_exp, |m| m.n_ff_dense),
            false => self.n_ff_exp,
        }
    }

    fn spec(&self) -> Result<&'static ArchSpec, SynthError> {
        arch::spec(&self.arch).ok_or_else(|| SynthError::UnknownArch {
            arch: self.arch.clone(),
            known: arch::SPECS.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
        })
    }

    fn plan(&self) -> Result<Vec<Planned>, SynthError> {
        let spec = self.spec()?;
        let (d, q, kv, hd) = (
            self.n_embd as u64,
            (self.n_head * self.head_dim) as u64,
            (self.n_head_kv * self.head_dim) as u64,
            self.head_dim as u64,
        );
        let (f, e, v) = (self.n_ff_exp as u64, self.n_expert as u64, self.n_vocab as u64);
        let w = self.weight_type;
        let we = self.expert_type.unwrap_or(w);
        let std = 0.02f32;
        let mut out = Vec::new();
        let mut push = |kind, layer, ty, shape: &[u64], fill| {
            out.push(Planned { name: tn(kind, layer), ty, shape: shape.to_vec(), fill });
        };
        // A tied embedding is also the output projection: drawn at the output's scale, so logits
        // are as large as an untied model's.
        let embd_std = if self.tied_output { std } else { 1.0 };
        push(TensorKind::TokenEmbd, None, w, &[d, v], Fill::Banked(embd_std));
        push(TensorKind::OutputNorm, None, GgmlType::F32, &[d], Fill::Norm);
        if !self.tied_output {
            push(TensorKind::Output, None, w, &[d, v], Fill::Banked(std));
        }
        for l in 0..self.n_layer {
            if spec.attention == Attention::Mla {
                self.plan_mla_layer(l, &mut push);
                continue;
            }
            let l = Some(l);
            push(TensorKind::AttnNorm, l, GgmlType::F32, &[d], Fill::Norm);
            push(TensorKind::AttnQ, l, w, &[d, q], Fill::Banked(std * 4.0));
            push(TensorKind::AttnK, l, w, &[d, kv], Fill::Banked(std * 4.0));
            push(TensorKind::AttnV, l, w, &[d, kv], Fill::Banked(std * 4.0));
            push(TensorKind::AttnOut, l, w, &[q, d], Fill::Banked(std));
            if spec.attn_out_bias {
                push(TensorKind::AttnOutBias, l, GgmlType::F32, &[d], Fill::Random(std));
            }
            if spec.sinks {
                push(TensorKind::AttnSinks, l, GgmlType::F32, &[self.n_head as u64], Fill::Random(1.0));
            }
            if spec.attn_bias || self.qkv_bias {
                push(TensorKind::AttnQBias, l, GgmlType::F32, &[q], Fill::Random(std));
                push(TensorKind::AttnKBias, l, GgmlType::F32, &[kv], Fill::Random(std));
                push(TensorKind::AttnVBias, l, GgmlType::F32, &[kv], Fill::Random(std));
            }
            match spec.qk_norm {
                // GLM-4.5-Air's files have none (GLM-4.5's have per-head ones, as Qwen3's).
                QkNorm::PerHeadIfPresent | QkNorm::None => {}
                QkNorm::PerHead => {
                    push(TensorKind::AttnQNorm, l, GgmlType::F32, &[hd], Fill::Norm);
                    push(TensorKind::AttnKNorm, l, GgmlType::F32, &[hd], Fill::Norm);
                }
                QkNorm::Full => {
                    push(TensorKind::AttnQNorm, l, GgmlType::F32, &[q], Fill::Norm);
                    push(TensorKind::AttnKNorm, l, GgmlType::F32, &[kv], Fill::Norm);
                }
            }
            push(spec.ffn_norm, l, GgmlType::F32, &[d], Fill::Norm);
            if e == 0 || (deepseek_ffn(spec) && l == Some(0) && self.n_layer > 1) {
                let f = self.dense_width(spec) as u64;
                push(TensorKind::FfnGate, l, w, &[d, f], Fill::Banked(std * 2.0));
                push(TensorKind::FfnUp, l, w, &[d, f], Fill::Banked(std * 2.0));
                push(TensorKind::FfnDown, l, w, &[f, d], Fill::Banked(std * 2.0));
                continue;
            }
            push(TensorKind::FfnGateInp, l, GgmlType::F32, &[d, e], Fill::Random(0.1));
            if spec.router_bias {
                push(TensorKind::FfnGateInpBias, l, GgmlType::F32, &[e], Fill::Random(0.1));
            }
            if spec.selection_bias {
                push(TensorKind::ExpProbsB, l, GgmlType::F32, &[e], Fill::Random(0.1));
            }
            push(TensorKind::FfnGateExps, l, we, &[d, f, e], Fill::Banked(std * 2.0));
            push(TensorKind::FfnUpExps, l, we, &[d, f, e], Fill::Banked(std * 2.0));
            push(TensorKind::FfnDownExps, l, we, &[f, d, e], Fill::Banked(std * 2.0));
            if spec.expert_bias {
                push(TensorKind::FfnGateExpsBias, l, GgmlType::F32, &[f, e], Fill::Random(std));
                push(TensorKind::FfnUpExpsBias, l, GgmlType::F32, &[f, e], Fill::Random(std));
                push(TensorKind::FfnDownExpsBias, l, GgmlType::F32, &[d, e], Fill::Random(std));
            }
            if spec.shared_expert {
                // Ungated (DeepSeek-style) shared experts are written as one of their summed width.
                let fs = match spec.shared_gate || spec.shared_width_key {
                    true => self.n_ff_shexp as u64,
                    false => f * self.deepseek.map_or(1, |m| m.n_shared as u64),
                };
                if spec.shared_gate {
                    push(TensorKind::FfnGateInpShexp, l, GgmlType::F32, &[d], Fill::Random(0.1));
                }
                push(TensorKind::FfnGateShexp, l, w, &[d, fs], Fill::Banked(std * 2.0));
                push(TensorKind::FfnUpShexp, l, w, &[d, fs], Fill::Banked(std * 2.0));
                push(TensorKind::FfnDownShexp, l, w, &[fs, d], Fill::Banked(std * 2.0));
            }
        }
        for p in &out {
            if p.shape[0] % p.ty.block_size() != 0 {
                return Err(SynthError::BadShape {
                    ty: p.ty.name(),
                    cols: p.shape[0] as usize,
                    block: p.ty.block_size(),
                });
            }
            if !kernels(p.ty).is_some_and(|k| k.can_dequantize()) && p.ty != GgmlType::F32 {
                return Err(SynthError::Unsupported(p.ty.name()));
            }
        }
        Ok(out)
    }

    fn metadata(&self, spec: &ArchSpec) -> Vec<(String, Value)> {
        let a = &self.arch;
        let u = |v: usize| Value::U32(v as u32);
        let mut m: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(a.clone())),
            ("general.name".into(), Value::String(format!("synth-{a}-{}L-{}", self.n_layer, self.weight_type.name()))),
            ("general.alignment".into(), Value::U32(32)),
            (format!("{a}.block_count"), u(self.n_layer)),
            (format!("{a}.context_length"), u(self.n_ctx)),
            (format!("{a}.embedding_length"), u(self.n_embd)),
            (format!("{a}.feed_forward_length"), u(self.dense_width(spec))),
            (format!("{a}.attention.head_count"), u(self.n_head)),
            (format!("{a}.attention.head_count_kv"), u(self.n_head_kv)),
            (format!("{a}.attention.key_length"), u(self.head_dim)),
            (format!("{a}.attention.value_length"), u(self.head_dim)),
            // GLM-4.5 rotates half of each head.
            (
                format!("{a}.rope.dimension_count"),
                u(if spec.name == "glm4moe" { self.head_dim / 2 } else { self.head_dim }),
            ),
            (format!("{a}.rope.freq_base"), Value::F32(self.rope_freq_base)),
            (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(self.rms_eps)),
            (format!("{a}.vocab_size"), u(self.n_vocab)),
        ];
        if spec.sliding_window != arch::SlidingWindow::None {
            m.push((format!("{a}.attention.sliding_window"), u(if self.n_swa == 0 { 128 } else { self.n_swa })));
        }
        if let Some((factor, orig)) = self.yarn {
            m.push((format!("{a}.rope.scaling.type"), Value::String("yarn".into())));
            m.push((format!("{a}.rope.scaling.factor"), Value::F32(factor)));
            m.push((format!("{a}.rope.scaling.original_context_length"), u(orig)));
        }
        // Dense layers (no experts) carry no expert keys, as plain llama files do.
        if self.n_expert > 0 {
            m.push((format!("{a}.expert_count"), u(self.n_expert)));
            m.push((format!("{a}.expert_used_count"), u(self.n_expert_used)));
            if spec.expert_width == ExpertWidth::ExpertKey {
                m.push((format!("{a}.expert_feed_forward_length"), u(self.n_ff_exp)));
            }
            if spec.shared_expert && (spec.shared_gate || spec.shared_width_key) {
                m.push((format!("{a}.expert_shared_feed_forward_length"), u(self.n_ff_shexp)));
            }
            if deepseek_ffn(spec) {
                // Written for every such family; ERNIE's and DeepSeek-MoE's loaders ignore some.
                m.extend([
                    (format!("{a}.leading_dense_block_count"), u((self.n_layer > 1) as usize)),
                    (format!("{a}.expert_weights_norm"), Value::Bool(true)),
                    (format!("{a}.expert_weights_scale"), Value::F32(2.5)),
                ]);
                if !spec.shared_width_key {
                    m.push((format!("{a}.expert_shared_count"), u(self.deepseek.map_or(1, |m| m.n_shared))));
                }
            }
            if spec.name == "ernie4_5-moe" {
                m.push((format!("{a}.interleave_moe_layer_step"), u(1)));
            }
        }
        if spec.attention == Attention::Mla {
            self.mla_metadata(&mut m);
        }
        if spec.name == "glm4moe" {
            // GLM-4.5's files end with a multi-token-prediction block that plain decoding skips;
            // this one is counted but left out (llama.cpp loads such a trunk-only file too).
            m.retain(|(k, _)| *k != format!("{a}.block_count"));
            m.push((format!("{a}.block_count"), u(self.n_layer + 1)));
            m.push((format!("{a}.nextn_predict_layers"), u(1)));
        }
        m.extend(byte_level_vocab(self.n_vocab));
        m
    }

    /// Write the model to `path`, calling `progress(bytes_done, bytes_total)` as it goes.
    pub fn write(&self, path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<(), SynthError> {
        let plan = self.plan()?;
        let descs: Vec<(&str, GgmlType, &[u64])> =
            plan.iter().map(|p| (p.name.as_str(), p.ty, p.shape.as_slice())).collect();
        let total: u64 =
            plan.iter().map(|p| p.ty.row_bytes(p.shape[0]).unwrap_or(0) * p.shape[1..].iter().product::<u64>()).sum();
        let mut w = GgufStreamWriter::new(path, &self.metadata(self.spec()?), &descs)?;
        let mut done = 0u64;
        for (i, p) in plan.iter().enumerate() {
            let cols = p.shape[0] as usize;
            let rows: u64 = p.shape[1..].iter().product();
            let k = kernels(p.ty).ok_or(SynthError::Unsupported(p.ty.name()))?;
            let rb = p.ty.row_bytes(cols as u64).unwrap_or(0) as usize;
            let mut rng = SplitMix64::new(self.seed ^ fnv(&p.name));
            let mut row = vec![0f32; cols];
            let mut qrow = vec![0u8; rb];
            match p.fill {
                Fill::Banked(std) => {
                    const BANK: usize = 256;
                    let mut bank = vec![0u8; rb * BANK];
                    for b in 0..BANK {
                        row.iter_mut().for_each(|x| *x = rng.next_normal(std));
                        k.quantize_row_any(&row, &mut bank[b * rb..(b + 1) * rb]);
                    }
                    let mut chunk = Vec::with_capacity(rb * 1024);
                    for r in 0..rows {
                        let pick = (splitmix(self.seed ^ fnv(&p.name) ^ r.wrapping_mul(0x9E37_79B9)) as usize) % BANK;
                        chunk.extend_from_slice(&bank[pick * rb..(pick + 1) * rb]);
                        if chunk.len() >= rb * 1024 || r + 1 == rows {
                            w.write_tensor_data(i, &chunk)?;
                            done += chunk.len() as u64;
                            chunk.clear();
                            progress(done, total);
                        }
                    }
                }
                Fill::Random(_) | Fill::Norm => {
                    for _ in 0..rows {
                        row.iter_mut().for_each(|x| {
                            *x = match p.fill {
                                Fill::Random(std) => rng.next_normal(std),
                                _ => 1.0 + rng.next_normal(0.05),
                            }
                        });
                        k.quantize_row_any(&row, &mut qrow);
                        w.write_tensor_data(i, &qrow)?;
                        done += rb as u64;
                    }
                    progress(done, total);
                }
            }
        }
        w.finish()?;
        Ok(())
    }
}

/// DeepSeek's FFN (deepseek, deepseek2, glm4moe, ernie4_5-moe): a leading dense layer, ungated
/// shared experts, weights renormalized and scaled by 2.5 (where the family reads those keys);
/// the selection bias where the family has one.
fn deepseek_ffn(spec: &ArchSpec) -> bool {
    spec.shared_expert && !spec.shared_gate
}

// ---- deepseek2 (MLA) -------------------------------------------------------------------------
// DeepSeek-V3-like layers built from the MHA fields, so `SynthConfig` needs nothing new: nope
// and v_head = head_dim, rope = head_dim / 2, kv_lora = 2·head_dim, q_lora = n_embd / 2; one
// shared KV head; layer 0 dense (when there are more); sigmoid routing with `exp_probs_b`, two
// expert groups of which one is used, renormalized weights scaled by 2.5; one ungated shared
// expert of the routed width; YaRN (factor 40, yarn_log_multiplier 0.1 as the converter writes).

/// MLA's dimensions in a synthetic model.
struct MlaDims {
    q_lora: u64,
    kv_lora: u64,
    nope: u64,
    rope: u64,
    v_head: u64,
}

/// A type that holds rows of `cols` values: `ty`, else F16 (as `llama-quantize` falls back for
/// MLA's narrow per-head matrices).
fn fit(ty: GgmlType, cols: u64) -> GgmlType {
    if cols.is_multiple_of(ty.block_size()) {
        ty
    } else {
        GgmlType::F16
    }
}

type Push<'p> = dyn FnMut(TensorKind, Option<usize>, GgmlType, &[u64], Fill) + 'p;

impl SynthConfig {
    fn mla_dims(&self) -> MlaDims {
        let hd = self.head_dim as u64;
        let (q_lora, kv_lora) = match self.deepseek {
            Some(m) => (m.q_lora as u64, m.kv_lora as u64),
            None => (self.n_embd as u64 / 2, 2 * hd),
        };
        MlaDims { q_lora, kv_lora, nope: hd, rope: hd / 2, v_head: hd }
    }

    /// Layer `l` of an MLA model: attention, then a dense FFN (layer 0) or routed experts with
    /// the selection bias and an ungated shared expert.
    fn plan_mla_layer(&self, l: usize, push: &mut Push<'_>) {
        let MlaDims { q_lora, kv_lora, nope, rope, v_head } = self.mla_dims();
        let (d, h, f, e) = (self.n_embd as u64, self.n_head as u64, self.n_ff_exp as u64, self.n_expert as u64);
        let (w, std, lyr) = (self.weight_type, 0.02f32, Some(l));
        push(TensorKind::AttnNorm, lyr, GgmlType::F32, &[d], Fill::Norm);
        if q_lora > 0 {
            push(TensorKind::AttnQA, lyr, fit(w, d), &[d, q_lora], Fill::Banked(std * 4.0));
            push(TensorKind::AttnQANorm, lyr, GgmlType::F32, &[q_lora], Fill::Norm);
            push(TensorKind::AttnQB, lyr, fit(w, q_lora), &[q_lora, h * (nope + rope)], Fill::Banked(std * 4.0));
        } else {
            push(TensorKind::AttnQ, lyr, fit(w, d), &[d, h * (nope + rope)], Fill::Banked(std * 4.0));
        }
        push(TensorKind::AttnKvAMqa, lyr, fit(w, d), &[d, kv_lora + rope], Fill::Banked(std * 4.0));
        push(TensorKind::AttnKvANorm, lyr, GgmlType::F32, &[kv_lora], Fill::Norm);
        push(TensorKind::AttnKB, lyr, fit(w, nope), &[nope, kv_lora, h], Fill::Banked(std * 4.0));
        push(TensorKind::AttnVB, lyr, fit(w, kv_lora), &[kv_lora, v_head, h], Fill::Banked(std * 4.0));
        push(TensorKind::AttnOut, lyr, fit(w, h * v_head), &[h * v_head, d], Fill::Banked(std));
        push(TensorKind::FfnNorm, lyr, GgmlType::F32, &[d], Fill::Norm);
        if e == 0 || (l == 0 && self.n_layer > 1) {
            let f = self.deepseek.map_or(f, |m| m.n_ff_dense as u64);
            push(TensorKind::FfnGate, lyr, w, &[d, f], Fill::Banked(std * 2.0));
            push(TensorKind::FfnUp, lyr, w, &[d, f], Fill::Banked(std * 2.0));
            push(TensorKind::FfnDown, lyr, w, &[f, d], Fill::Banked(std * 2.0));
            return;
        }
        push(TensorKind::FfnGateInp, lyr, GgmlType::F32, &[d, e], Fill::Random(0.1));
        push(TensorKind::ExpProbsB, lyr, GgmlType::F32, &[e], Fill::Random(0.1));
        push(TensorKind::FfnGateExps, lyr, w, &[d, f, e], Fill::Banked(std * 2.0));
        push(TensorKind::FfnUpExps, lyr, w, &[d, f, e], Fill::Banked(std * 2.0));
        push(TensorKind::FfnDownExps, lyr, w, &[f, d, e], Fill::Banked(std * 2.0));
        let fs = f * self.deepseek.map_or(1, |m| m.n_shared as u64);
        push(TensorKind::FfnGateShexp, lyr, w, &[d, fs], Fill::Banked(std * 2.0));
        push(TensorKind::FfnUpShexp, lyr, w, &[d, fs], Fill::Banked(std * 2.0));
        push(TensorKind::FfnDownShexp, lyr, w, &[fs, d], Fill::Banked(std * 2.0));
    }

    /// MLA's keys, replacing the MHA head keys the common block wrote.
    fn mla_metadata(&self, m: &mut Vec<(String, Value)>) {
        let a = &self.arch;
        let MlaDims { q_lora, kv_lora, nope, rope, v_head } = self.mla_dims();
        let u = |v: u64| Value::U32(v as u32);
        let replaced =
            ["attention.head_count_kv", "attention.key_length", "attention.value_length", "feed_forward_length"];
        let replaced: Vec<String> =
            replaced.iter().chain(&["rope.dimension_count"]).map(|k| format!("{a}.{k}")).collect();
        m.retain(|(k, _)| !replaced.contains(k));
        m.extend([
            (format!("{a}.attention.head_count_kv"), u(1)),
            (format!("{a}.attention.key_length"), u(kv_lora + rope)),
            (format!("{a}.attention.value_length"), u(kv_lora)),
            (format!("{a}.attention.key_length_mla"), u(nope + rope)),
            (format!("{a}.attention.value_length_mla"), u(v_head)),
            (format!("{a}.attention.q_lora_rank"), u(q_lora)),
            (format!("{a}.feed_forward_length"), u(self.deepseek.map_or(self.n_ff_exp, |m| m.n_ff_dense) as u64)),
            (format!("{a}.attention.kv_lora_rank"), u(kv_lora)),
            (format!("{a}.rope.dimension_count"), u(rope)),
            (format!("{a}.rope.scaling.type"), Value::String("yarn".into())),
            (format!("{a}.rope.scaling.factor"), Value::F32(40.0)),
            (format!("{a}.rope.scaling.original_context_length"), u(64)),
            (format!("{a}.rope.scaling.yarn_log_multiplier"), Value::F32(0.1)),
        ]);
        if self.n_expert > 0 {
            m.push((format!("{a}.expert_gating_func"), u(2)));
            let groups = match self.deepseek {
                Some(m) => m.groups,
                None if self.n_expert.is_multiple_of(2) && self.n_expert >= 4 => (2, 1),
                None => (1, 1),
            };
            if groups.0 > 1 {
                m.push((format!("{a}.expert_group_count"), u(groups.0 as u64)));
                m.push((format!("{a}.expert_group_used_count"), u(groups.1 as u64)));
            }
        }
    }
}
// ---- end deepseek2 ----------------------------------------------------------------------------

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn splitmix(x: u64) -> u64 {
    SplitMix64::new(x).next_u64()
}

/// A GPT-2 style byte-level vocabulary: the 256 byte tokens, `<|bos|>`/`<|eos|>`, then fillers up
/// to `n_vocab` (at least 259). One merge only: text tokenizes to bytes, which is all a speed run needs.
fn byte_level_vocab(n_vocab: usize) -> Vec<(String, Value)> {
    let mut tokens: Vec<Value> = Vec::with_capacity(n_vocab.max(258));
    let mut types: Vec<Value> = Vec::with_capacity(n_vocab.max(258));
    // GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards.
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            char::from_u32(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra)
        };
        tokens.push(Value::String(c.map(String::from).unwrap_or_default()));
        types.push(Value::I32(1));
    }
    for s in ["<|bos|>", "<|eos|>"] {
        tokens.push(Value::String(s.into()));
        types.push(Value::I32(3));
    }
    // One merge (two spaces), with its token: GGUF cannot type an empty array as strings, and
    // llama.cpp insists the merges array holds strings.
    tokens.push(Value::String("\u{120}\u{120}".into()));
    types.push(Value::I32(1));
    while tokens.len() < n_vocab {
        tokens.push(Value::String(format!("<|synth_{}|>", tokens.len())));
        types.push(Value::I32(1));
    }
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![Value::String("\u{120} \u{120}".into())])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(256)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(257)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    /// Smaller still than `small`: rows of 64, too short for K-quants.
    fn tiny(arch: &str, ty: GgmlType) -> SynthConfig {
        SynthConfig {
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 16,
            n_ff_exp: 64,
            n_ff_shexp: 96,
            n_vocab: 300,
            ..SynthConfig::small(arch, ty)
        }
    }

    #[test]
    fn every_family_loads_back_and_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        for arch in crate::arch::SPECS.iter().map(|s| s.name) {
            let path = dir.path().join(format!("{arch}.gguf"));
            tiny(arch, GgmlType::F16).write(&path, &mut |_, _| {}).expect("write");
            let m = Model::load(&path).unwrap_or_else(|e| panic!("{arch}: {e}"));
            assert_eq!(m.spec.name, arch);
            assert_eq!(m.hp.n_expert, 4);
            let mut eng = crate::engine::Engine::new(std::sync::Arc::new(m), Default::default()).expect("engine");
            let mut s = eng.new_session().expect("session");
            let logits = eng.eval(&mut s, &[1, 2, 3], crate::layers::Logits::Last).expect("eval");
            assert_eq!(logits.len(), 300);
            assert!(logits.iter().all(|v| v.is_finite()), "{arch}: non-finite logits");
        }
    }

    // ---- deepseek2 (MLA) ----
    /// A synthetic DeepSeek-V3-like model (MLA, dense layer 0, group-limited sigmoid routing,
    /// ungated shared expert) runs on the CPU and the plain backend alike, a prompt batch and
    /// then one token at a time, and its cache holds one latent row per position.
    #[test]
    fn deepseek2_runs_alike_on_cpu_and_plain() {
        use crate::backend::{plain::PlainBackend, Backend};
        use crate::engine::{Engine, EngineConfig};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("deepseek2.gguf");
        SynthConfig { n_layer: 3, ..tiny("deepseek2", GgmlType::Q8_0) }.write(&path, &mut |_, _| {}).expect("write");
        let m = std::sync::Arc::new(Model::load(&path).unwrap_or_else(|e| panic!("{e}")));
        assert!(m.experts(0).is_none() && m.experts(1).is_some(), "layer 0 dense, the rest routed");
        let mla = m.hp.mla.expect("MLA dimensions");
        let kv = crate::engine::kv_config(&m, &EngineConfig::default());
        assert_eq!(kv.bytes(), (m.hp.n_layer * kv.n_ctx * (mla.kv_lora + m.hp.n_rot) * 2) as u64);
        fn logits<B: Backend>(m: &std::sync::Arc<Model>, b: B) -> Vec<f32> {
            let mut eng = Engine::with_backend(m.clone(), b, EngineConfig::default()).expect("engine");
            let mut s = eng.new_session().expect("session");
            let mut out = eng.eval(&mut s, &[1, 2, 3, 4, 5], crate::layers::Logits::All).expect("eval");
            out.extend(eng.eval(&mut s, &[6], crate::layers::Logits::Last).expect("decode"));
            out
        }
        let cpu = logits(&m, crate::backend::cpu::CpuBackend::new(2));
        let plain = logits(&m, PlainBackend::new());
        assert_eq!(cpu.len(), 6 * 300);
        let worst = cpu.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = plain.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(worst <= 0.01 * scale.max(1.0), "cpu and plain differ by {worst} (logits up to {scale})");
    }
    // ---- end deepseek2 ----

    #[test]
    fn dense_layers_and_tied_output_load_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dense-tied.gguf");
        let cfg = SynthConfig { n_expert: 0, n_expert_used: 0, tied_output: true, ..tiny("llama", GgmlType::Q8_0) };
        cfg.write(&path, &mut |_, _| {}).expect("write");
        let m = Model::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.hp.n_expert, 0);
        assert!(m.layers.iter().all(|l| matches!(l.ffn, crate::model::Ffn::Dense(_))));
        assert!(m.file.tensor("output.weight").is_none());
        assert_eq!(m.output.offset, m.tok_embd.offset, "output tied to the token embedding");
    }

    #[test]
    fn same_seed_same_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
        tiny("qwen3moe", GgmlType::Q8_0).write(&a, &mut |_, _| {}).expect("write a");
        tiny("qwen3moe", GgmlType::Q8_0).write(&b, &mut |_, _| {}).expect("write b");
        assert_eq!(std::fs::read(&a).expect("read"), std::fs::read(&b).expect("read"));
    }

    #[test]
    fn shapes_the_type_cannot_hold_are_refused() {
        let mut c = tiny("llama", GgmlType::Q4_K);
        c.n_embd = 64; // K-quants need rows of 256
        let dir = tempfile::tempdir().expect("tempdir");
        let err = c.write(&dir.path().join("x.gguf"), &mut |_, _| {}).expect_err("must refuse");
        assert!(err.to_string().contains("q4_K"), "{err}");
    }
}
