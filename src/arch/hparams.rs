//! Hyper-parameters read from GGUF metadata with the family's key prefix.

use super::{ArchError, ArchSpec, Attention, ExpertWidth, Gating, GroupLimit, RouterConfig};
use crate::gguf::GgufFile;

/// The dimensions of DeepSeek's multi-head latent attention (`n_rot` is the RoPE part of each
/// query/key head, `head_dim` = `kv_lora + n_rot` the stored KV row).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Mla {
    /// `attention.q_lora_rank` (0: a plain `attn_q`, the "lite" models).
    pub q_lora: usize,
    /// `attention.kv_lora_rank`: the latent, which is also the value.
    pub kv_lora: usize,
    /// The non-rotated part of a query head (`key_length_mla - n_rot`).
    pub nope: usize,
    /// `attention.value_length_mla`: a head's output after `attn_v_b`.
    pub v_head: usize,
}

/// The numbers that shape a model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HParams {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    /// Dense FFN width (also the fallback for expert width).
    pub n_ff: usize,
    pub n_ff_exp: usize,
    pub n_ff_shexp: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_freq_base: f32,
    pub rope_freq_scale: f32,
    /// YaRN (`rope.scaling.type = yarn`): 1 mixes interpolated and extrapolated frequencies,
    /// 0 is plain (linear) scaling.
    pub rope_ext_factor: f32,
    /// The magnitude factor llama.cpp passes to its rope (1 for YaRN files whose own factor
    /// ggml re-applies, times `rope.scaling.attn_factor`).
    pub rope_attn_factor: f32,
    /// `rope.scaling.original_context_length` (YaRN's correction dimensions).
    pub rope_n_ctx_orig: usize,
    /// `attention.sliding_window` (0: none); which layers use it is the family's.
    pub n_swa: usize,
    /// Attention logit scale (1/sqrt(head_dim) unless the model says otherwise).
    pub attn_scale: f32,
    pub router: RouterConfig,
    /// Multi-head latent attention (DeepSeek), if the family uses it.
    pub mla: Option<Mla>,
}

impl HParams {
    pub fn read(file: &GgufFile, spec: &ArchSpec) -> Result<HParams, ArchError> {
        let path = file.path().display().to_string();
        let a = spec.name;
        let key = |k: &str| format!("{a}.{k}");
        let req = |k: &str| -> Result<usize, ArchError> {
            let full = key(k);
            file.get_u64(&full)?
                .map(|v| v as usize)
                .ok_or_else(|| ArchError::MissingKey { path: path.clone(), key: full })
        };
        let opt = |k: &str| -> Result<Option<usize>, ArchError> { Ok(file.get_u64(&key(k))?.map(|v| v as usize)) };
        let optf = |k: &str| -> Result<Option<f32>, ArchError> { Ok(file.get_f32(&key(k))?) };
        let bad = |k: &str, reason: String| ArchError::BadValue { path: path.clone(), key: key(k), reason };

        // A trailing multi-token-prediction block (GLM-4.5's `nextn`) is counted in
        // `block_count` but is not part of the model's forward pass.
        let n_blocks = req("block_count")?;
        let nextn = opt("nextn_predict_layers")?.unwrap_or(0);
        if nextn >= n_blocks && n_blocks > 0 {
            return Err(bad("nextn_predict_layers", format!("{nextn} of {n_blocks} blocks")));
        }
        let n_layer = n_blocks - nextn;
        // Multimodal RoPE (a vision model's sections) is not ordinary RoPE.
        let sections = file.get(&key("rope.dimension_sections")).and_then(|v| v.as_array());
        if sections.is_some_and(|s| s.iter().any(|v| v.as_i64().is_some_and(|n| n != 0))) {
            return Err(bad("rope.dimension_sections", "multimodal RoPE sections are not supported".into()));
        }
        let n_embd = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = opt("attention.head_count_kv")?.unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(bad("attention.head_count_kv", format!("{n_head_kv} does not divide {n_head} heads")));
        }
        let head_dim = opt("attention.key_length")?.unwrap_or(n_embd / n_head);
        let v_dim = opt("attention.value_length")?.unwrap_or(head_dim);
        if v_dim != head_dim && spec.attention == Attention::Mha {
            return Err(bad("attention.value_length", format!("{v_dim} differs from key_length {head_dim}")));
        }
        let n_rot = opt("rope.dimension_count")?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(bad("rope.dimension_count", format!("{n_rot} with head size {head_dim}")));
        }
        let n_ff = opt("feed_forward_length")?.unwrap_or(0);
        let n_expert = opt("expert_count")?.unwrap_or(0);
        let n_expert_used = opt("expert_used_count")?.unwrap_or(0);
        if n_expert > 0 && (n_expert_used == 0 || n_expert_used > n_expert) {
            return Err(bad("expert_used_count", format!("{n_expert_used} of {n_expert} experts")));
        }
        let n_ff_exp = opt("expert_feed_forward_length")?.unwrap_or(match spec.expert_width {
            ExpertWidth::ExpertKey if n_expert_used > 0 => n_ff / n_expert_used,
            _ => n_ff,
        });
        let mut n_ff_shexp = opt("expert_shared_feed_forward_length")?.unwrap_or(n_ff);
        let rms_eps = optf("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5);
        let rope_freq_base = optf("rope.freq_base")?.unwrap_or(10000.0);
        let ropescale = match optf("rope.scaling.factor")? {
            Some(v) => v,
            None => optf("rope.scale_linear")?.unwrap_or(0.0),
        };
        let rope_freq_scale = if ropescale == 0.0 { 1.0 } else { 1.0 / ropescale };
        let n_ctx_train = opt("context_length")?.unwrap_or(4096);
        let yarn = file.get_str(&key("rope.scaling.type"))? == Some("yarn");
        let rope_n_ctx_orig = opt("rope.scaling.original_context_length")?.unwrap_or(n_ctx_train);
        // As llama.cpp sets up its context: YaRN's magnitude factor is computed, then divided
        // out again because ggml's rope multiplies it back in (f32 throughout, as there).
        let rope_ext_factor = if yarn { 1.0f32 } else { 0.0 };
        // DeepSeek's `yarn_log_multiplier` (the converter writes 0.1·mscale_all_dim; llama.cpp
        // divides the 0.1 out again).
        let yarn_log_mul = match spec.attention {
            Attention::Mla => optf("rope.scaling.yarn_log_multiplier")?.map_or(0.0, |v| v / 0.1),
            Attention::Mha => 0.0,
        };
        let mut rope_attn_factor = 1.0f32;
        if yarn {
            let factor = 1.0f32 / rope_freq_scale;
            // (GCC contracts these `a·b + c` into fused multiply-adds.)
            let mscale = |m: f32| if factor <= 1.0 { 1.0 } else { (0.1f32 * m).mul_add(factor.ln(), 1.0) };
            rope_attn_factor = if yarn_log_mul != 0.0 {
                // llama.cpp assumes mscale 1, except DeepSeek's with mscale_all_dim ≠ 1.
                let m = if yarn_log_mul != 1.0 { yarn_log_mul } else { 1.0 };
                mscale(m) / mscale(yarn_log_mul)
            } else {
                mscale(1.0)
            };
            rope_attn_factor *= 1.0f32 / 0.1f32.mul_add(factor.ln(), 1.0);
        }
        rope_attn_factor *= optf("rope.scaling.attn_factor")?.unwrap_or(1.0);
        let n_swa = opt("attention.sliding_window")?.unwrap_or(0);
        if spec.sliding_window != super::SlidingWindow::None && n_swa == 0 {
            return Err(ArchError::MissingKey { path: path.clone(), key: key("attention.sliding_window") });
        }
        let mut attn_scale = match optf("attention.scale")? {
            Some(s) if s != 0.0 => s,
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        let mut mla = None;
        if spec.attention == Attention::Mla {
            let kv_lora = req("attention.kv_lora_rank")?;
            let q_lora = opt("attention.q_lora_rank")?.unwrap_or(0);
            let k_mla = req("attention.key_length_mla")?;
            let v_head = req("attention.value_length_mla")?;
            if n_head_kv != 1 {
                return Err(bad("attention.head_count_kv", format!("{n_head_kv}: MLA stores one shared KV head")));
            }
            if head_dim != kv_lora + n_rot || v_dim != kv_lora {
                return Err(bad(
                    "attention.key_length",
                    format!(
                        "{head_dim}/{v_dim}: MLA needs kv_lora_rank + rope dims / kv_lora_rank ({kv_lora}, {n_rot})"
                    ),
                ));
            }
            if k_mla <= n_rot {
                return Err(bad(
                    "attention.key_length_mla",
                    format!("{k_mla} leaves no room beside {n_rot} rope dims"),
                ));
            }
            mla = Some(Mla { q_lora, kv_lora, nope: k_mla - n_rot, v_head });
            // llama.cpp's kq_scale: YaRN's magnitude (undone in the rope's attn_factor) squared,
            // over the query head size before absorption (f32, contracted as GCC does).
            let inv_fs = (1.0f32 / rope_freq_scale).ln();
            let attn_factor_org = rope_attn_factor * 0.1f32.mul_add(inv_fs, 1.0);
            let mscale = attn_factor_org * (0.1f32 * yarn_log_mul).mul_add(inv_fs, 1.0);
            attn_scale = mscale * mscale / (k_mla as f32).sqrt();
        }
        // Ungated shared experts: DeepSeek's `expert_shared_count` of the routed width, or
        // ERNIE's own width (none without the key).
        if spec.shared_expert && !spec.shared_gate {
            n_ff_shexp = match spec.shared_width_key {
                true => opt("expert_shared_feed_forward_length")?.unwrap_or(0),
                false => n_ff_exp * req("expert_shared_count")?,
            };
        }
        let mut router = spec.router;
        if spec.selection_bias {
            router.gating = match opt("expert_gating_func")?.unwrap_or(0) {
                0 => spec.router.gating,
                1 => Gating::Softmax,
                2 => Gating::Sigmoid,
                g => return Err(bad("expert_gating_func", format!("{g} (moerun knows 1 softmax, 2 sigmoid)"))),
            };
        }
        if spec.attention == Attention::Mla {
            let n_group = opt("expert_group_count")?.unwrap_or(0);
            let n_used = opt("expert_group_used_count")?.unwrap_or(0);
            if n_group > 1 {
                if n_expert % n_group != 0 || n_expert / n_group < 2 || n_used == 0 || n_used > n_group {
                    return Err(bad(
                        "expert_group_used_count",
                        format!("{n_used} of {n_group} groups over {n_expert} experts"),
                    ));
                }
                router.groups = Some(GroupLimit { n_group, n_used });
            }
        }
        if let Some(norm) = file.get_bool(&key("expert_weights_norm"))?.filter(|_| spec.weights_norm_key) {
            router.renormalize = norm;
        }
        if let Some(s) = optf("expert_weights_scale")?.filter(|_| spec.weights_scale_key) {
            if s != 0.0 {
                router.scale = s;
            }
        }
        let n_vocab = match opt("vocab_size")? {
            Some(v) => v,
            None => file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|a| a.len()).unwrap_or(0),
        };
        Ok(HParams {
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            n_ff,
            n_ff_exp,
            n_ff_shexp,
            n_expert,
            n_expert_used,
            n_vocab,
            n_ctx_train,
            rms_eps,
            rope_freq_base,
            rope_freq_scale,
            rope_ext_factor,
            rope_attn_factor,
            rope_n_ctx_orig,
            n_swa,
            attn_scale,
            router,
            mla,
        })
    }

    /// The rotary embedding of this model in `style`, YaRN's correction dimensions included
    /// (llama.cpp's defaults beta_fast 32, beta_slow 1; f32 as ggml computes them).
    pub fn rope(&self, style: super::RopeStyle) -> crate::backend::Rope {
        let n = self.n_rot as f32;
        let corr = |beta: f32| {
            n * (self.rope_n_ctx_orig as f32 / (beta * 2.0 * std::f32::consts::PI)).ln()
                / (2.0 * self.rope_freq_base.ln())
        };
        let corr_dims = [corr(32.0).floor().max(0.0), corr(1.0).ceil().min(n - 1.0)];
        crate::backend::Rope {
            style,
            n_dims: self.n_rot,
            freq_base: self.rope_freq_base,
            freq_scale: self.rope_freq_scale,
            ext_factor: self.rope_ext_factor,
            attn_factor: self.rope_attn_factor,
            corr_dims,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
