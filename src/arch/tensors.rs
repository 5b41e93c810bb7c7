//! The tensor-name table: every name moerun reads is built here, from one pattern per kind.

/// Every tensor role moerun knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum TensorKind {
    TokenEmbd,
    OutputNorm,
    Output,
    AttnNorm,
    AttnQ,
    AttnK,
    AttnV,
    AttnOut,
    AttnOutBias,
    AttnSinks,
    AttnPostNorm,
    AttnQBias,
    AttnKBias,
    AttnVBias,
    AttnQNorm,
    AttnKNorm,
    /// MLA (DeepSeek): the query LoRA, the compressed KV projection and its norm, the per-head
    /// absorbed key and value decompressions.
    AttnQA,
    AttnQANorm,
    AttnQB,
    AttnKvAMqa,
    AttnKvANorm,
    AttnKB,
    AttnVB,
    /// The router's selection-only bias (DeepSeek-V3).
    ExpProbsB,
    FfnNorm,
    FfnGateInp,
    FfnGateInpBias,
    FfnGateExps,
    FfnUpExps,
    FfnDownExps,
    FfnGateExpsBias,
    FfnUpExpsBias,
    FfnDownExpsBias,
    /// Old layout: one tensor per expert (`blk.N.ffn_gate.E.weight`); the expert goes in `tn_expert`.
    FfnGateExpert,
    FfnUpExpert,
    FfnDownExpert,
    FfnGateInpShexp,
    FfnGateShexp,
    FfnUpShexp,
    FfnDownShexp,
    FfnGate,
    FfnUp,
    FfnDown,
}

impl TensorKind {
    fn pattern(self) -> &'static str {
        use TensorKind::*;
        match self {
            TokenEmbd => "token_embd.weight",
            OutputNorm => "output_norm.weight",
            Output => "output.weight",
            AttnNorm => "attn_norm.weight",
            AttnQ => "attn_q.weight",
            AttnK => "attn_k.weight",
            AttnV => "attn_v.weight",
            AttnOut => "attn_output.weight",
            AttnOutBias => "attn_output.bias",
            AttnSinks => "attn_sinks.weight",
            AttnPostNorm => "post_attention_norm.weight",
            AttnQBias => "attn_q.bias",
            AttnKBias => "attn_k.bias",
            AttnVBias => "attn_v.bias",
            AttnQNorm => "attn_q_norm.weight",
            AttnKNorm => "attn_k_norm.weight",
            AttnQA => "attn_q_a.weight",
            AttnQANorm => "attn_q_a_norm.weight",
            AttnQB => "attn_q_b.weight",
            AttnKvAMqa => "attn_kv_a_mqa.weight",
            AttnKvANorm => "attn_kv_a_norm.weight",
            AttnKB => "attn_k_b.weight",
            AttnVB => "attn_v_b.weight",
            ExpProbsB => "exp_probs_b.bias",
            FfnNorm => "ffn_norm.weight",
            FfnGateInp => "ffn_gate_inp.weight",
            FfnGateInpBias => "ffn_gate_inp.bias",
            FfnGateExpsBias => "ffn_gate_exps.bias",
            FfnUpExpsBias => "ffn_up_exps.bias",
            FfnDownExpsBias => "ffn_down_exps.bias",
            FfnGateExps => "ffn_gate_exps.weight",
            FfnUpExps => "ffn_up_exps.weight",
            FfnDownExps => "ffn_down_exps.weight",
            FfnGateExpert => "ffn_gate",
            FfnUpExpert => "ffn_up",
            FfnDownExpert => "ffn_down",
            FfnGateInpShexp => "ffn_gate_inp_shexp.weight",
            FfnGateShexp => "ffn_gate_shexp.weight",
            FfnUpShexp => "ffn_up_shexp.weight",
            FfnDownShexp => "ffn_down_shexp.weight",
            FfnGate => "ffn_gate.weight",
            FfnUp => "ffn_up.weight",
            FfnDown => "ffn_down.weight",
        }
    }

    fn is_global(self) -> bool {
        matches!(self, TensorKind::TokenEmbd | TensorKind::OutputNorm | TensorKind::Output)
    }
}

/// The GGUF name of a tensor: `tn(AttnQ, Some(3))` is `blk.3.attn_q.weight`.
pub fn tn(kind: TensorKind, layer: Option<usize>) -> String {
    match (kind.is_global(), layer) {
        (true, _) | (false, None) => kind.pattern().to_string(),
        (false, Some(l)) => format!("blk.{l}.{}", kind.pattern()),
    }
}

/// The old per-expert name: `blk.N.ffn_up.E.weight`.
pub fn tn_expert(kind: TensorKind, layer: usize, expert: usize) -> String {
    format!("blk.{layer}.{}.{expert}.weight", kind.pattern())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(tn(TensorKind::TokenEmbd, None), "token_embd.weight");
        assert_eq!(tn(TensorKind::FfnUpExps, Some(5)), "blk.5.ffn_up_exps.weight");
        assert_eq!(tn_expert(TensorKind::FfnDownExpert, 1, 7), "blk.1.ffn_down.7.weight");
    }
}
