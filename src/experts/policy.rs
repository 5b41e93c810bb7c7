//! Eviction priorities as pure functions of per-expert records. Lower evicts first.
//!
//! ## HOBBIT (DESIGN §3), as we read it
//! `P = w_lru·R/T + w_lfu·F/T + w_lhu·H/T + w_fld·D`, higher = keep, with all four records
//! per sequence (reset by `reset_sequence`):
//! - `T`: tokens of this sequence so far, counting the token being planned: `max − min + 1`
//!   over the token ids seen since the reset (so the engine's token numbering does not matter,
//!   and layer-major prefill batches count each token once);
//! - `R`: the last token that used the expert, on the same scale (`last − min + 1`; 0 if
//!   unused this sequence), so `R/T ∈ [0, 1]` and the token just used scores 1;
//! - `F`: how many tokens used it (hit or load) this sequence; `H`: how many of those were
//!   hits. An expert serves one layer and is used at most once per token, so `H ≤ F ≤ T`.
//! - `D`, the layer-distance term. DESIGN writes `1 − d/l_n` with `d = (l_t − l_i + l_n) mod
//!   l_n`. Read literally with `l_t` the layer being planned, that scores the current layer 1,
//!   the layer just executed `1 − 1/l_n` and the *next* layer `1/l_n`: it would keep what was
//!   just used (a second LRU at layer granularity) and evict first exactly the experts needed
//!   soonest, the opposite of the term's name in HOBBIT ("farthest layer distance": evict the
//!   experts whose layer runs farthest in the future). Layers run cyclically (0..l_n, then the
//!   next token), so after layer `l_t` the expert of layer `l_i` is next needed
//!   `(l_i − l_t − 1) mod l_n + 1` layers later: the next layer in 1, the current layer (its
//!   other experts) only in `l_n`. We score `D = 1 − that/l_n = ((l_t − l_i + l_n) mod l_n)/l_n`
//!   — the same `d` as DESIGN, without the `1 −`: next layer `(l_n − 1)/l_n`, current layer 0.
//!   With `per_layer` pools all candidates share one layer and `D` is a constant.
//!
//! Ties (equal priority) go to the least recently used, then to the lowest slot, so every plan
//! is deterministic.

use super::PolicyKind;
use std::cmp::Ordering;

/// What the cache remembers about one expert (resident or not).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Record {
    /// The cache's apply step that last used it (0 = never). Never reset.
    pub last_step: u64,
    /// Uses over the cache's lifetime (LFU). Never reset.
    pub uses: u64,
    /// The last token id that used it in this sequence.
    pub seq_last_token: Option<u64>,
    /// Uses (hits + loads) in this sequence.
    pub seq_uses: u64,
    /// Hits in this sequence.
    pub seq_hits: u64,
    /// Loaded by a prefetch plan and not yet used by a demand plan.
    pub prefetched: bool,
}

/// The token span of the current sequence, as seen by `apply`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SeqClock {
    pub min: Option<u64>,
    pub max: Option<u64>,
}

impl SeqClock {
    /// (first token id, T) with `token` counted as seen.
    pub fn span_with(&self, token: u64) -> (u64, u64) {
        let min = self.min.map_or(token, |m| m.min(token));
        let max = self.max.map_or(token, |m| m.max(token));
        (min, max - min + 1)
    }

    pub fn observe(&mut self, token: u64) {
        let (min, _) = self.span_with(token);
        self.max = Some(self.max.map_or(token, |m| m.max(token)));
        self.min = Some(min);
    }
}

/// HOBBIT's layer-distance term `D` (see the module docs): `((l_t − l_i + l_n) mod l_n) / l_n`,
/// largest for the layer that runs next, 0 for the layer being planned.
pub fn layer_distance_term(l_t: usize, l_i: usize, l_n: usize) -> f64 {
    if l_n == 0 {
        return 0.0;
    }
    ((l_t % l_n + l_n - l_i % l_n) % l_n) as f64 / l_n as f64
}

/// Everything a priority needs about the moment of the decision.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// The layer being planned.
    pub layer: usize,
    pub n_layers: usize,
    /// First token id of this sequence and `T` (see [`SeqClock::span_with`]).
    pub seq_first: u64,
    pub seq_tokens: u64,
}

/// HOBBIT's priority (higher = keep).
pub fn hobbit_priority(w: [f32; 4], rec: &Record, expert_layer: usize, now: &Now) -> f64 {
    let t = now.seq_tokens.max(1) as f64;
    let r = rec.seq_last_token.map_or(0.0, |last| (last.saturating_sub(now.seq_first) + 1) as f64);
    let [w_lru, w_lfu, w_lhu, w_fld] = w.map(f64::from);
    w_lru * r / t
        + w_lfu * rec.seq_uses as f64 / t
        + w_lhu * rec.seq_hits as f64 / t
        + w_fld * layer_distance_term(now.layer, expert_layer, now.n_layers)
}

/// Orders eviction candidates: the smallest evicts first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VictimKey {
    /// Policy score (0 for LRU/Fate, lifetime uses for LFU, HOBBIT priority).
    pub score: f64,
    pub last_step: u64,
    pub slot: u32,
}

impl VictimKey {
    pub fn new(policy: PolicyKind, w: [f32; 4], rec: &Record, expert_layer: usize, slot: u32, now: &Now) -> VictimKey {
        let score = match policy {
            PolicyKind::Lru | PolicyKind::Fate => 0.0,
            PolicyKind::Lfu => rec.uses as f64,
            PolicyKind::Hobbit => hobbit_priority(w, rec, expert_layer, now),
        };
        VictimKey { score, last_step: rec.last_step, slot }
    }

    /// Eviction order: `Less` evicts first.
    pub fn order(&self, other: &VictimKey) -> Ordering {
        self.score.total_cmp(&other.score).then(self.last_step.cmp(&other.last_step)).then(self.slot.cmp(&other.slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_distance_favors_the_next_layer() {
        // 4 layers, planning layer 1: layer 2 runs next, then 3, 0, and 1 again last.
        let d: Vec<f64> = (0..4).map(|li| layer_distance_term(1, li, 4)).collect();
        assert_eq!(d, vec![0.25, 0.0, 0.75, 0.5]);
    }

    #[test]
    fn hobbit_priority_terms() {
        let now = Now { layer: 0, n_layers: 4, seq_first: 10, seq_tokens: 4 };
        // Used at tokens 11 and 13 (last), one hit. From layer 0, layer 1 runs next, layer 3
        // last before layer 0 comes round again.
        let rec = Record { seq_last_token: Some(13), seq_uses: 2, seq_hits: 1, ..Default::default() };
        let p = hobbit_priority([1.0, 0.0, 0.0, 0.0], &rec, 3, &now);
        assert_eq!(p, 1.0); // R = 4 of T = 4
        assert_eq!(hobbit_priority([0.0, 1.0, 0.0, 0.0], &rec, 3, &now), 0.5);
        assert_eq!(hobbit_priority([0.0, 0.0, 1.0, 0.0], &rec, 3, &now), 0.25);
        assert_eq!(hobbit_priority([0.0, 0.0, 0.0, 1.0], &rec, 1, &now), 0.75);
        assert_eq!(hobbit_priority([0.0, 0.0, 0.0, 1.0], &rec, 3, &now), 0.25);
        // Unused this sequence: only the distance term remains.
        let fresh = Record::default();
        assert_eq!(hobbit_priority([1.0, 1.0, 1.0, 0.0], &fresh, 2, &now), 0.0);
    }

    #[test]
    fn seq_clock_counts_span() {
        let mut c = SeqClock::default();
        assert_eq!(c.span_with(5), (5, 1));
        c.observe(5);
        c.observe(7);
        assert_eq!(c.span_with(7), (5, 3));
        assert_eq!(c.span_with(9), (5, 5));
    }
}
