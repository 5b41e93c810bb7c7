//! What the front doors (`chat`, `serve`) report about the MoE work: the model's fixed expert
//! facts, counters of requests and tokens, and the expert-cache figures. Counts and serializes;
//! never formats for a terminal, never speaks HTTP.
//!
//! Invariant: no number is made up. Figures that need the expert cache (hit rate, bytes moved,
//! precision mix) are `None` — `null` in JSON — when the run has no cache (every expert in RAM or
//! the mapping); predictor accuracy is `None` without a predictor.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::engine::Timings;
use crate::model::Model;

/// Facts about the model's experts that do not change while it runs.
#[derive(Debug, Clone, Serialize)]
pub struct MoeFacts {
    pub n_layer: usize,
    /// Layers whose FFN is a routed mixture of experts.
    pub n_layer_moe: usize,
    /// Routed experts per MoE layer.
    pub n_expert: usize,
    /// Experts each token uses per MoE layer.
    pub experts_per_token: usize,
    /// Bytes of every tensor in the file.
    pub total_bytes: u64,
    /// Bytes of all routed experts (what an expert cache manages).
    pub expert_bytes: u64,
    /// Weight bytes one token touches: dense weights plus its routed experts.
    pub active_bytes_per_token: u64,
    /// Bytes of routed-expert weights by ggml type, as stored in the file.
    pub expert_types: BTreeMap<&'static str, u64>,
}

impl MoeFacts {
    pub fn of(model: &Model) -> MoeFacts {
        let mut expert_types = BTreeMap::new();
        let mut n_layer_moe = 0;
        for l in 0..model.layers.len() {
            if let Some(experts) = model.experts(l) {
                n_layer_moe += 1;
                for e in experts {
                    for w in [&e.gate, &e.up, &e.down] {
                        *expert_types.entry(w.ty.name()).or_insert(0) += w.bytes;
                    }
                }
            }
        }
        MoeFacts {
            n_layer: model.hp.n_layer,
            n_layer_moe,
            n_expert: model.hp.n_expert,
            experts_per_token: model.hp.n_expert_used,
            total_bytes: model.total_bytes(),
            expert_bytes: model.expert_bytes(),
            active_bytes_per_token: model.active_bytes_per_token(),
            expert_types,
        }
    }
}

/// The expert cache's figures ([`ExpertCacheStats::of`] an `Offload`'s statistics); without a cache,
/// [`ExpertCacheStats::absent`] is all `None`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExpertCacheStats {
    /// Whether an expert cache is in use.
    pub enabled: bool,
    /// Expert lookups served from the cache, as a fraction of all lookups.
    pub hit_rate: Option<f64>,
    /// Bytes read into the cache per generated token.
    pub bytes_moved_per_token: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub budget_bytes: Option<u64>,
    /// Fraction of resident expert bytes held at each precision.
    pub precision_mix: Option<BTreeMap<String, f64>>,
    /// How often the expert predictor named an expert the router then chose (next-layer recall).
    pub predictor_accuracy: Option<f64>,
    /// Milliseconds a decoded token waited for expert reads.
    pub stall_ms_per_token: Option<f64>,
    /// The predictor's figures: recall and precision per distance, wasted bytes per token.
    pub predictor: Option<crate::predict::PredictStats>,
}

impl ExpertCacheStats {
    /// No expert cache: every figure unknown.
    pub fn absent() -> ExpertCacheStats {
        ExpertCacheStats::default()
    }

    /// The figures of a running cache; `tokens` is how many tokens it served (for per-token
    /// bytes). The precision mix is over the experts loaded so far.
    pub fn of(o: &crate::engine::offload::OffloadStats, tokens: u64) -> ExpertCacheStats {
        let loads = (o.loads_high + o.loads_low + o.skips).max(1) as f64;
        let mix = BTreeMap::from([
            ("high".to_string(), o.loads_high as f64 / loads),
            ("low".to_string(), o.loads_low as f64 / loads),
            ("skip".to_string(), o.skips as f64 / loads),
        ]);
        ExpertCacheStats {
            enabled: true,
            hit_rate: Some(o.hit_rate),
            bytes_moved_per_token: (tokens > 0).then(|| (o.bytes_read_high + o.bytes_read_low) as f64 / tokens as f64),
            resident_bytes: None,
            budget_bytes: Some(o.budget_bytes),
            precision_mix: Some(mix),
            predictor_accuracy: o.predictor.as_ref().map(|p| p.recall),
            stall_ms_per_token: Some(o.stall_ms_per_token),
            predictor: o.predictor.clone(),
        }
    }
}

/// How one generation ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// The client left or the user interrupted.
    Cancelled,
    Failed,
}

/// Running totals over many generations.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub requests: u64,
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
    /// Prompt tokens asked for, including those whose K/V were reused from an earlier turn.
    pub prompt_tokens: u64,
    /// Prompt tokens whose K/V were already in the session (not evaluated again).
    pub prompt_tokens_reused: u64,
    pub generated_tokens: u64,
    /// Seconds spent evaluating prompts, and tokens evaluated in that time.
    pub prefill_s: f64,
    pub prefill_tokens: u64,
    /// Seconds spent in decode steps, and the steps taken (the first generated token of each
    /// generation comes from the prefill, so it is not a decode step).
    pub decode_s: f64,
    pub decode_tokens: u64,
}

impl Counters {
    /// Adds one generation: `prompt_len` tokens asked for, of which `reused` were in the session.
    pub fn record(&mut self, outcome: Outcome, prompt_len: usize, reused: usize, t: &Timings) {
        self.requests += 1;
        match outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::Cancelled => self.cancelled += 1,
            Outcome::Failed => self.failed += 1,
        }
        self.prompt_tokens += prompt_len as u64;
        self.prompt_tokens_reused += reused as u64;
        self.generated_tokens += t.generated_tokens as u64;
        self.prefill_s += t.prefill_s;
        self.prefill_tokens += t.prompt_tokens as u64;
        self.decode_s += t.decode_s;
        self.decode_tokens += t.generated_tokens.saturating_sub(1) as u64;
    }

    /// A request that never reached the engine (cancelled while queued, or refused).
    pub fn record_unstarted(&mut self, outcome: Outcome) {
        self.requests += 1;
        match outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::Cancelled => self.cancelled += 1,
            Outcome::Failed => self.failed += 1,
        }
    }

    pub fn prefill_tok_s(&self) -> Option<f64> {
        rate(self.prefill_tokens, self.prefill_s)
    }

    pub fn decode_tok_s(&self) -> Option<f64> {
        rate(self.decode_tokens, self.decode_s)
    }
}

fn rate(n: u64, s: f64) -> Option<f64> {
    (n > 0 && s > 0.0).then(|| n as f64 / s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_and_rates_need_data() {
        let mut c = Counters::default();
        assert_eq!(c.decode_tok_s(), None);
        let t = Timings { prompt_tokens: 10, prefill_s: 0.5, generated_tokens: 11, decode_s: 2.0 };
        c.record(Outcome::Completed, 14, 4, &t);
        c.record_unstarted(Outcome::Cancelled);
        assert_eq!((c.requests, c.completed, c.cancelled), (2, 1, 1));
        assert_eq!((c.prompt_tokens, c.prompt_tokens_reused, c.generated_tokens), (14, 4, 11));
        assert_eq!(c.prefill_tok_s(), Some(20.0));
        assert_eq!(c.decode_tok_s(), Some(5.0));
    }

    #[test]
    fn absent_cache_serializes_as_nulls() {
        let v = serde_json::to_value(ExpertCacheStats::absent()).expect("serializes");
        assert_eq!(v["enabled"], false);
        for k in [
            "hit_rate",
            "bytes_moved_per_token",
            "precision_mix",
            "predictor_accuracy",
            "stall_ms_per_token",
            "predictor",
        ] {
            assert!(v[k].is_null(), "{k}: {v}");
        }
    }
}
