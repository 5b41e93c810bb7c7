//! Cross-layer expert prediction (Fate, HOBBIT): layer l's router input — the hidden state after
//! attention, normed — goes through the routers of the next `distance` MoE layers in one stacked
//! mat-mul, and the experts those routers would choose are prefetched before their layer asks.
//!
//! The forward pass does the mat-mul (it owns the backend); this room decides what the scores
//! mean: candidates in score order with their predicted gate weights, one `prefetch` per predicted
//! layer (HOBBIT's thresholds apply to the predicted weights), the cancellation of the experts a
//! prediction named that the layer then did not choose, and the live accounting of how good the
//! predictions were, per distance. A prediction never changes an answer: it only moves bytes
//! earlier (`layers::ExpertProvider::prefetch` never evicts the current layer's experts and never
//! hands out an expert before its bytes land).

use crate::arch::HParams;
use crate::layers::{route, Candidate, ExpertProvider, PrefetchId, Route};

/// The farthest a predictor looks ahead.
pub const MAX_DISTANCE: usize = 3;

/// What a predictor looks at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictConfig {
    /// MoE layers ahead (1 to [`MAX_DISTANCE`]).
    pub distance: usize,
    /// Candidates per predicted layer (0: the model's experts per token).
    pub width: usize,
    /// Prefetch a candidate only when predictions of its distance and rank have been right at
    /// least this often so far (a wrong prefetch costs a read as long as the one a right one
    /// hides, and may evict an expert that would have hit).
    pub min_confidence: f32,
    /// Give the planner each candidate's learned confidence, for its cost model
    /// (`ExpertProvider::prefetch_bar`) to weigh; off, every prediction goes as certain (and
    /// `min_confidence` does not apply).
    pub cost_gate: bool,
    /// Predict from each MoE layer's router input (Fate): the next `distance` MoE layers' routers
    /// run in the same mat-mul as the layer's own and are read with it, so a device pays no
    /// extra synchronization, and the copies start a layer earlier. Off: from the state entering
    /// each layer, through its own and the next routers, before its attention (the better
    /// recall on the CPU; a GPU pays one read per layer for it).
    pub from_router_input: bool,
}

/// The default look-ahead when experts are budgeted (chosen by measurement: see the closing note
/// of issue 11 and `moerun bench --predict`).
pub const DEFAULT_DISTANCE: usize = 1;

impl Default for PredictConfig {
    fn default() -> Self {
        PredictConfig {
            distance: DEFAULT_DISTANCE,
            width: 0,
            min_confidence: DEFAULT_MIN_CONFIDENCE,
            cost_gate: true,
            from_router_input: false,
        }
    }
}

/// See [`PredictConfig::min_confidence`]: break-even when a wrong read costs what a right one
/// saves.
pub const DEFAULT_MIN_CONFIDENCE: f32 = 0.5;

/// The predictor a backend with its own expert cache (a GPU) gets by default: from the router
/// input, so predicting costs it no extra read.
pub fn device_default() -> PredictConfig {
    PredictConfig { from_router_input: true, ..Default::default() }
}

/// `--predict N|fate|off`: a distance of 1–3 (from the state entering each layer), `fate` (the
/// next MoE layer from each layer's router input), or `off`.
pub fn parse_predict(s: &str) -> Result<Option<PredictConfig>, String> {
    match s.trim() {
        "off" | "0" | "none" => Ok(None),
        "fate" => Ok(Some(device_default())),
        t => match t.parse::<usize>() {
            Ok(d) if (1..=MAX_DISTANCE).contains(&d) => Ok(Some(PredictConfig { distance: d, ..Default::default() })),
            _ => Err(format!("--predict '{s}': expected a distance of 1 to {MAX_DISTANCE}, 'fate' or 'off'")),
        },
    }
}

/// How good the predictions `distance` layers ahead were, over decoded tokens.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DistanceStats {
    pub distance: usize,
    /// (token, layer) pairs predicted.
    pub predictions: u64,
    /// Experts named by those predictions.
    pub predicted: u64,
    /// Experts the routers then chose.
    pub used: u64,
    /// Experts both predicted and chosen.
    pub correct: u64,
    /// `correct / used`: how many of the experts a token needed were predicted.
    pub recall: f64,
    /// `correct / predicted`: how many of the predictions were needed.
    pub precision: f64,
}

/// The predictor's live figures (`generate --json`'s `expert_cache.predictor`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PredictStats {
    pub distance: usize,
    /// Candidates per predicted layer.
    pub width: usize,
    /// Tokens decoded with prediction on.
    pub tokens: u64,
    /// Next-layer recall and precision (distance 1).
    pub recall: f64,
    pub precision: f64,
    /// Bytes read for prefetched experts that were never used, per decoded token (filled in by
    /// the engine from the expert cache's counters; 0 without a cache).
    pub wasted_bytes_per_token: f64,
    /// Experts handed to the cache as prefetches (the confident predictions), and how many of
    /// them their layer then chose.
    pub prefetched: u64,
    pub prefetched_used: u64,
    pub per_distance: Vec<DistanceStats>,
}

/// One prediction waiting for its layer's real route.
struct Pending {
    target: usize,
    dist: usize,
    /// In score order.
    experts: Vec<u16>,
    /// The prefetch of the confident ones, and which they were.
    prefetch: Option<(PrefetchId, Vec<u16>)>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    predictions: u64,
    predicted: u64,
    used: u64,
    correct: u64,
}

/// See the module docs.
pub struct Predictor {
    cfg: PredictConfig,
    pending: Vec<Pending>,
    counts: [Counts; MAX_DISTANCE],
    /// Per distance and rank: (predictions, right ones), for the confidence of the next.
    calib: [Vec<(u64, u64)>; MAX_DISTANCE],
    tokens: u64,
    /// Experts prefetched on a prediction, and those of them the layer then chose.
    prefetched: u64,
    prefetched_used: u64,
}

impl Predictor {
    pub fn new(cfg: PredictConfig) -> Predictor {
        let cfg = PredictConfig { distance: cfg.distance.clamp(1, MAX_DISTANCE), ..cfg };
        Predictor {
            cfg,
            pending: Vec::new(),
            counts: [Counts::default(); MAX_DISTANCE],
            calib: Default::default(),
            tokens: 0,
            prefetched: 0,
            prefetched_used: 0,
        }
    }

    pub fn config(&self) -> PredictConfig {
        self.cfg
    }

    /// The layers a prediction made from the input of layer `l` covers: the `distance` MoE
    /// layers from `l` on (by `is_moe`), with their distance (1: layer `l`'s own router, whose
    /// input differs from `l`'s input only by `l`'s attention).
    pub fn targets(&self, l: usize, n_layers: usize, is_moe: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
        (l..n_layers).filter(|&t| is_moe(t)).take(self.cfg.distance).enumerate().map(|(i, t)| (t, i + 1)).collect()
    }

    /// With [`PredictConfig::from_router_input`]: the MoE layers after `l` that a prediction made
    /// from `l`'s router input covers, with their distance (1: the next MoE layer).
    pub fn targets_after(&self, l: usize, n_layers: usize, is_moe: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
        (l + 1..n_layers).filter(|&t| is_moe(t)).take(self.cfg.distance).enumerate().map(|(i, t)| (t, i + 1)).collect()
    }

    /// A decode pass starts: predictions left from an unfinished pass are dropped.
    pub fn begin_token(&mut self) {
        self.pending.clear();
        self.tokens += 1;
    }

    /// Layer `l` has routed its one token: score the predictions made for it and cancel the
    /// prefetches of experts it did not choose (their reads are dropped if not yet landed).
    pub fn observe<B: crate::backend::Backend>(
        &mut self,
        l: usize,
        actual: &Route,
        provider: &mut dyn ExpertProvider<B>,
    ) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].target != l {
                i += 1;
                continue;
            }
            let p = self.pending.swap_remove(i);
            let c = &mut self.counts[p.dist - 1];
            c.predictions += 1;
            c.predicted += p.experts.len() as u64;
            c.used += actual.experts.len() as u64;
            c.correct += p.experts.iter().filter(|&&e| actual.experts.contains(&(e as u32))).count() as u64;
            let used = |e: &u16| actual.experts.contains(&(*e as u32));
            let calib = &mut self.calib[p.dist - 1];
            for (rank, e) in p.experts.iter().enumerate() {
                if calib.len() <= rank {
                    calib.resize(rank + 1, (0, 0));
                }
                calib[rank].0 += 1;
                calib[rank].1 += u64::from(used(e));
            }
            if let Some((id, fetched)) = p.prefetch {
                let dead: Vec<u16> = fetched.iter().copied().filter(|e| !used(e)).collect();
                self.prefetched += fetched.len() as u64;
                self.prefetched_used += (fetched.len() - dead.len()) as u64;
                if dead.len() == fetched.len() {
                    provider.cancel(id);
                } else if !dead.is_empty() {
                    provider.cancel_experts(id, &dead);
                }
            }
        }
    }

    /// Scores of the routers of `targets` (side by side, `n_expert` each) for the one token of
    /// layer `from`: route each as its layer would, remember the prediction, prefetch its
    /// candidates nearest layer first, each in score order. Returns each target's confident
    /// candidates (those the provider was offered), for a backend's own cache to move ahead.
    pub fn predict<'m, B: crate::backend::Backend>(
        &mut self,
        targets: &[(usize, usize)],
        scores: &mut [f32],
        hp: &HParams,
        selection_bias: impl Fn(usize) -> Option<&'m [f32]>,
        provider: &mut dyn ExpertProvider<B>,
    ) -> Vec<(usize, Vec<u16>)> {
        let mut offered = Vec::with_capacity(targets.len());
        let (n_expert, router) = (hp.n_expert, &hp.router);
        let width = if self.cfg.width == 0 { hp.n_expert_used } else { self.cfg.width.min(n_expert) };
        for (&(target, dist), logits) in targets.iter().zip(scores.chunks_exact_mut(n_expert)) {
            let bias = selection_bias(target);
            let r = route(logits, width, router, bias);
            // Candidates in score order with their predicted weights (so HOBBIT's thresholds
            // apply) and confidences; the planner decides which to load.
            let cands: Vec<Candidate> = r
                .experts
                .iter()
                .zip(&r.weights)
                .enumerate()
                .map(|(rank, (&e, &w))| Candidate {
                    expert: e as u16,
                    weight: w,
                    confidence: if self.cfg.cost_gate { self.confidence(dist, rank) } else { 1.0 },
                })
                .filter(|c| !self.cfg.cost_gate || c.confidence >= self.cfg.min_confidence)
                .collect();
            let prefetch = match provider.predicted(target, &cands) {
                Ok(taken) => taken,
                Err(err) => {
                    tracing::warn!("prefetch for layer {target}: {err}");
                    None
                }
            };
            let experts = r.experts.iter().map(|&e| e as u16).collect();
            self.pending.push(Pending { target, dist, experts, prefetch });
            offered.push((target, cands.iter().map(|c| c.expert).collect()));
        }
        offered
    }

    /// How often predictions at `dist` and `rank` were right so far (Laplace-smoothed: an
    /// untried rank starts at one half).
    pub fn confidence(&self, dist: usize, rank: usize) -> f32 {
        let (n, right) = self.calib[dist - 1].get(rank).copied().unwrap_or((0, 0));
        (right as f32 + 1.0) / (n as f32 + 2.0)
    }

    /// The figures so far; `wasted_bytes` is what the cache read for prefetches never used.
    pub fn stats(&self, wasted_bytes: u64) -> PredictStats {
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let per_distance: Vec<DistanceStats> = self.counts[..self.cfg.distance]
            .iter()
            .enumerate()
            .map(|(i, c)| DistanceStats {
                distance: i + 1,
                predictions: c.predictions,
                predicted: c.predicted,
                used: c.used,
                correct: c.correct,
                recall: ratio(c.correct, c.used),
                precision: ratio(c.correct, c.predicted),
            })
            .collect();
        PredictStats {
            distance: self.cfg.distance,
            width: self.cfg.width,
            tokens: self.tokens,
            recall: per_distance.first().map_or(0.0, |d| d.recall),
            precision: per_distance.first().map_or(0.0, |d| d.precision),
            wasted_bytes_per_token: ratio(wasted_bytes, self.tokens),
            prefetched: self.prefetched,
            prefetched_used: self.prefetched_used,
            per_distance,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predict_flag_parses() {
        assert_eq!(parse_predict("off"), Ok(None));
        assert_eq!(parse_predict("2"), Ok(Some(PredictConfig { distance: 2, ..Default::default() })));
        assert!(parse_predict("4").is_err());
        assert_eq!(parse_predict("fate"), Ok(Some(device_default())));
        assert!(parse_predict("x").is_err());
    }

    #[test]
    fn targets_skip_dense_layers_and_stop_at_the_last() {
        let p = Predictor::new(PredictConfig { distance: 3, ..Default::default() });
        assert_eq!(p.targets(0, 6, |l| l != 1), vec![(0, 1), (2, 2), (3, 3)]);
        assert_eq!(p.targets(4, 6, |_| true), vec![(4, 1), (5, 2)]);
        assert!(p.targets(6, 6, |_| true).is_empty());
        assert_eq!(p.targets_after(0, 6, |l| l != 1), vec![(2, 1), (3, 2), (4, 3)]);
        assert!(p.targets_after(5, 6, |_| true).is_empty());
    }
}
