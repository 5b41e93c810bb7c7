//! Offline simulator: replays a routing trace through `ExpertCache::plan`/`apply` exactly as
//! the engine does (one plan per (token, layer), applied before the next), and reports hit
//! rate, bytes moved and the precision mix. No I/O; read the trace with [`super::trace`].

use super::trace::{TraceHeader, TraceRecord};
use super::{CacheConfig, CacheError, ExpertCache, Precision};
use crate::rng::SplitMix64;

/// What a replay measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SimResult {
    pub lookups: u64,
    pub hits: u64,
    /// Hits served by a low-precision copy (included in `hits`).
    pub hits_low: u64,
    /// Loads (= misses that were not skipped): `loads_high + loads_low`.
    pub misses: u64,
    pub loads_high: u64,
    pub loads_low: u64,
    pub skips: u64,
    pub evictions: u64,
    pub hit_rate: f64,
    pub bytes_loaded: u64,
    /// Bytes-weighted miss penalty: Σ over misses of the bytes loaded (a low load costs
    /// `expert_bytes_low`). Equals `bytes_loaded`; kept by name for reports.
    pub miss_penalty_bytes: u64,
    /// HOBBIT's miss penalty in units of one high-precision miss:
    /// `loads_high + loads_low · B_low / B_high`.
    pub miss_penalty: f64,
    pub per_layer_hit_rate: Vec<f64>,
    /// The most bytes resident at once (never above the budget).
    pub peak_resident_bytes: u64,
    pub n_slots_high: usize,
    pub n_slots_low: usize,
    /// Sequences seen (see [`simulate`] for how boundaries are found).
    pub sequences: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("simulator: the cache config has {field} = {config} but the trace header has {trace}")]
    Mismatch { field: &'static str, config: usize, trace: usize },
}

/// A cache config matching a trace's shape and expert sizes, with plain LRU defaults.
pub fn config_for(header: &TraceHeader, budget_bytes: u64) -> CacheConfig {
    let mut cfg =
        CacheConfig::new(header.n_layers, header.n_experts, header.top_k, header.expert_bytes_high, budget_bytes);
    cfg.expert_bytes_low = header.expert_bytes_low;
    cfg
}

/// Replay `records` in file order. A new sequence (→ `reset_sequence`) starts where the token
/// id goes down while the layer does not go up, which tells a restarted sequence from a
/// layer-major prefill batch.
pub fn simulate(cfg: CacheConfig, header: &TraceHeader, records: &[TraceRecord]) -> Result<SimResult, SimError> {
    check_shape(&cfg, header)?;
    let mut cache = ExpertCache::new(cfg)?;
    Ok(replay(&mut cache, records, |_, _, _| {}))
}

fn check_shape(cfg: &CacheConfig, header: &TraceHeader) -> Result<(), SimError> {
    let fields = [
        ("n_layers", cfg.n_layers, header.n_layers, cfg.n_layers == header.n_layers),
        ("n_experts", cfg.n_experts, header.n_experts, cfg.n_experts == header.n_experts),
        ("top_k", cfg.top_k, header.top_k, cfg.top_k >= header.top_k),
    ];
    for (field, config, trace, ok) in fields {
        if !ok {
            return Err(SimError::Mismatch { field, config, trace });
        }
    }
    Ok(())
}

/// The replay loop; `after` sees each record, its plan and the cache after the apply (tests
/// check invariants there; the decode estimate counts the plan's work).
fn replay(
    cache: &mut ExpertCache,
    records: &[TraceRecord],
    mut after: impl FnMut(&TraceRecord, &super::Plan, &ExpertCache),
) -> SimResult {
    let mut peak = 0u64;
    let mut sequences = 0u64;
    let mut prev: Option<(u64, u16)> = None;
    for rec in records {
        let new_seq = match prev {
            None => true,
            Some((t, l)) => rec.token < t && rec.layer <= l,
        };
        if new_seq {
            if prev.is_some() {
                cache.reset_sequence();
            }
            sequences += 1;
        }
        prev = Some((rec.token, rec.layer));
        let plan = cache.plan(rec.layer as usize, rec.token, &rec.needed());
        cache.apply(&plan);
        peak = peak.max(cache.resident_bytes());
        after(rec, &plan, cache);
    }
    let cfg = cache.config();
    let s = cache.stats();
    let rate = |h: u64, n: u64| if n == 0 { 0.0 } else { h as f64 / n as f64 };
    let low_ratio = cfg.expert_bytes_low as f64 / cfg.expert_bytes_high as f64;
    SimResult {
        lookups: s.lookups,
        hits: s.hits,
        hits_low: s.hits_low,
        misses: s.loads_high + s.loads_low,
        loads_high: s.loads_high,
        loads_low: s.loads_low,
        skips: s.skips,
        evictions: s.evictions,
        hit_rate: s.hit_rate(),
        bytes_loaded: s.bytes_loaded,
        miss_penalty_bytes: s.loads_high * cfg.expert_bytes_high + s.loads_low * cfg.expert_bytes_low,
        miss_penalty: s.loads_high as f64 + s.loads_low as f64 * low_ratio,
        per_layer_hit_rate: s.per_layer_hits.iter().zip(&s.per_layer_lookups).map(|(&h, &n)| rate(h, n)).collect(),
        peak_resident_bytes: peak,
        n_slots_high: cache.n_slots(Precision::High),
        n_slots_low: cache.n_slots(Precision::Low),
        sequences,
    }
}

/// What the cost model predicts for the decoded tokens of a trace.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DecodeEstimate {
    /// Tokens decoded one at a time (a token whose MoE layers follow each other in the trace;
    /// prompt tokens come layer by layer for the whole batch).
    pub tokens: u64,
    pub decode_tok_s: f64,
    pub compute_ms_per_token: f64,
    pub stall_ms_per_token: f64,
    /// Hit rate over the decoded tokens only.
    pub hit_rate: f64,
    pub cache: SimResult,
}

/// Replay `records` as [`simulate`] does and time every decoded token with `cost`.
pub fn estimate_decode(
    cfg: CacheConfig,
    header: &TraceHeader,
    records: &[TraceRecord],
    cost: &super::costmodel::CostModel,
) -> Result<DecodeEstimate, SimError> {
    use super::costmodel::LayerWork;
    use super::Action;
    check_shape(&cfg, header)?;
    let mut cache = ExpertCache::new(cfg)?;
    // Per token (in file order): its layers' work; a token whose records are not contiguous
    // (a prompt batch) is dropped when the next token interrupts it.
    let keep_decoded = |tokens: &mut Vec<Vec<LayerWork>>, done: Option<(u64, Vec<LayerWork>)>| {
        if let Some((_, layers)) = done.filter(|(_, l)| l.len() > 1 || header.n_layers == 1) {
            tokens.push(layers);
        }
    };
    let mut tokens: Vec<Vec<LayerWork>> = Vec::new();
    let mut current: Option<(u64, Vec<LayerWork>)> = None;
    let cache_result = replay(&mut cache, records, |rec, plan, _| {
        let mut w = LayerWork::default();
        for &(_, a, _) in &plan.actions {
            match a {
                Action::Hit { precision, .. } => {
                    w.hits += 1;
                    w.hits_low += u32::from(precision == Precision::Low);
                }
                Action::Load { precision: Precision::High, .. } => w.loads_high += 1,
                Action::Load { precision: Precision::Low, .. } => w.loads_low += 1,
                _ => {}
            }
        }
        match &mut current {
            Some((t, layers)) if *t == rec.token => layers.push(w),
            _ => {
                keep_decoded(&mut tokens, current.take());
                current = Some((rec.token, vec![w]));
            }
        }
    });
    keep_decoded(&mut tokens, current.take());
    let n = tokens.len().max(1) as f64;
    let (mut compute, mut stall, mut hits, mut lookups) = (0.0, 0.0, 0u64, 0u64);
    for layers in &tokens {
        let t = cost.token(layers);
        compute += t.compute_s;
        stall += t.stall_s;
        for w in layers {
            hits += w.hits as u64;
            lookups += (w.hits + w.loads_high + w.loads_low) as u64;
        }
    }
    Ok(DecodeEstimate {
        tokens: tokens.len() as u64,
        decode_tok_s: if tokens.is_empty() { 0.0 } else { n / (compute + stall) },
        compute_ms_per_token: 1000.0 * compute / n,
        stall_ms_per_token: 1000.0 * stall / n,
        hit_rate: if lookups == 0 { 0.0 } else { hits as f64 / lookups as f64 },
        cache: cache_result,
    })
}

/// A synthetic, deterministic routing trace with skewed, layer-correlated, sticky routing.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub n_tokens: u64,
    /// Zipf exponent of expert popularity within a layer (0 = uniform).
    pub zipf_s: f64,
    /// Chance that neighbouring popularity ranks swap from one layer to the next (0 = every
    /// layer shares one popularity order, 1 = little correlation).
    pub layer_swap: f64,
    /// Chance that each pick reuses an expert the previous token chose at this layer.
    pub stickiness: f64,
    pub seed: u64,
}

impl Default for SynthSpec {
    fn default() -> SynthSpec {
        SynthSpec { n_tokens: 64, zipf_s: 1.1, layer_swap: 0.2, stickiness: 0.3, seed: 1 }
    }
}

/// Token-major records (token 0 layers 0.., token 1 …), weights normalized, in rank order.
pub fn synthetic_trace(header: &TraceHeader, spec: &SynthSpec) -> Vec<TraceRecord> {
    let (n_l, n_e, k) = (header.n_layers, header.n_experts, header.top_k.min(header.n_experts));
    let mut rng = SplitMix64::new(spec.seed);
    // Popularity order per layer: a shuffle, then each layer perturbs the previous one.
    let mut order: Vec<u16> = (0..n_e as u16).collect();
    for i in (1..n_e).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut orders = Vec::with_capacity(n_l);
    for _ in 0..n_l {
        for i in 1..n_e {
            if rng.next_f64() < spec.layer_swap {
                order.swap(i - 1, i);
            }
        }
        orders.push(order.clone());
    }
    let zipf: Vec<f64> = (0..n_e).map(|r| 1.0 / ((r + 1) as f64).powf(spec.zipf_s)).collect();
    let mut prev: Vec<Vec<u16>> = vec![Vec::new(); n_l];
    let mut out = Vec::with_capacity(spec.n_tokens as usize * n_l);
    for token in 0..spec.n_tokens {
        for (layer, order) in orders.iter().enumerate() {
            let mut chosen: Vec<u16> = Vec::with_capacity(k);
            while chosen.len() < k {
                let sticky: Vec<u16> = prev[layer].iter().copied().filter(|e| !chosen.contains(e)).collect();
                if !sticky.is_empty() && rng.next_f64() < spec.stickiness {
                    chosen.push(sticky[(rng.next_u64() % sticky.len() as u64) as usize]);
                    continue;
                }
                let total: f64 = (0..n_e).filter(|&r| !chosen.contains(&order[r])).map(|r| zipf[r]).sum();
                let mut u = rng.next_f64() * total;
                let mut pick = None;
                for r in (0..n_e).filter(|&r| !chosen.contains(&order[r])) {
                    pick = Some(order[r]);
                    u -= zipf[r];
                    if u < 0.0 {
                        break;
                    }
                }
                // `pick` is None only if every expert is chosen, which `k ≤ n_e` rules out.
                chosen.extend(pick);
            }
            let mut w: Vec<f32> = (0..k).map(|_| (0.05 + rng.next_f64()).powi(2) as f32).collect();
            w.sort_by(|a, b| b.total_cmp(a));
            let sum: f32 = w.iter().sum();
            w.iter_mut().for_each(|x| *x /= sum);
            prev[layer] = chosen.clone();
            out.push(TraceRecord { token, layer: layer as u16, experts: chosen, weights: w });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experts::PolicyKind;
    use std::collections::HashSet;

    fn header() -> TraceHeader {
        TraceHeader {
            model: "synth".into(),
            n_layers: 6,
            n_experts: 16,
            top_k: 4,
            expert_bytes_high: 1000,
            expert_bytes_low: 300,
        }
    }

    fn configs(h: &TraceHeader) -> Vec<CacheConfig> {
        let mut out = Vec::new();
        for policy in [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Hobbit, PolicyKind::Fate] {
            for per_layer in [false, true] {
                for thresholds in [None, Some((0.6, 0.9))] {
                    let mut c = config_for(h, 60 * h.expert_bytes_high + 999);
                    c.policy = policy;
                    c.per_layer = per_layer;
                    c.thresholds = thresholds;
                    c.pinned_layers = if policy == PolicyKind::Fate { 1 } else { 0 };
                    c.hobbit_weights = [0.4, 0.3, 0.2, 0.1];
                    out.push(c);
                }
            }
        }
        out
    }

    #[test]
    fn sim_accounting_invariants_hold_for_every_policy() {
        let h = header();
        let recs = synthetic_trace(&h, &SynthSpec { n_tokens: 80, ..SynthSpec::default() });
        assert_eq!(recs.len(), 80 * 6);
        for cfg in configs(&h) {
            let budget = cfg.budget_bytes;
            let label = format!("{:?} per_layer={} thresholds={:?}", cfg.policy, cfg.per_layer, cfg.thresholds);
            let mut cache = ExpertCache::new(cfg.clone()).unwrap();
            let r = replay(&mut cache, &recs, |_, _, c| {
                c.check_invariants();
                assert!(c.resident_bytes() <= budget);
            });
            assert_eq!(r.lookups, 80 * 6 * 4, "{label}");
            assert_eq!(r.hits + r.loads_high + r.loads_low + r.skips, r.lookups, "{label}");
            assert_eq!(r.bytes_loaded, r.loads_high * 1000 + r.loads_low * 300, "{label}");
            assert_eq!(r.miss_penalty_bytes, r.bytes_loaded, "{label}");
            assert!((r.miss_penalty - (r.loads_high as f64 + 0.3 * r.loads_low as f64)).abs() < 1e-9);
            assert!(r.peak_resident_bytes <= budget, "{label}");
            assert!(r.hit_rate > 0.0 && r.hit_rate < 1.0, "{label}: {}", r.hit_rate);
            if cfg.thresholds.is_none() {
                assert_eq!((r.loads_low, r.skips, r.n_slots_low), (0, 0, 0), "{label}");
            } else {
                assert!(r.loads_low > 0 && r.skips > 0, "{label}: {r:?}");
            }
            // The same replay through `simulate` gives the same numbers.
            let again = simulate(cfg, &h, &recs).unwrap();
            assert_eq!((again.hits, again.bytes_loaded, again.evictions), (r.hits, r.bytes_loaded, r.evictions));
        }
    }

    #[test]
    fn sim_with_room_for_everything_misses_each_expert_once() {
        let h = header();
        let recs = synthetic_trace(&h, &SynthSpec { n_tokens: 50, seed: 7, ..SynthSpec::default() });
        let distinct: HashSet<(u16, u16)> =
            recs.iter().flat_map(|r| r.experts.iter().map(move |&e| (r.layer, e))).collect();
        for policy in [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Hobbit] {
            let mut cfg = config_for(&h, (6 * 16) as u64 * h.expert_bytes_high);
            cfg.policy = policy;
            let r = simulate(cfg, &h, &recs).unwrap();
            assert_eq!(r.misses, distinct.len() as u64, "{policy:?}");
            assert_eq!((r.evictions, r.skips), (0, 0));
            assert_eq!(r.hits, r.lookups - distinct.len() as u64);
            assert_eq!(r.n_slots_high, 96);
        }
    }

    #[test]
    fn sim_synthetic_trace_is_deterministic_skewed_and_valid() {
        let h = header();
        let spec = SynthSpec { n_tokens: 200, ..SynthSpec::default() };
        let a = synthetic_trace(&h, &spec);
        assert_eq!(a, synthetic_trace(&h, &spec));
        let mut counts = vec![0u32; 16];
        for r in &a {
            assert_eq!(r.experts.len(), 4);
            assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            assert!(r.weights.windows(2).all(|w| w[0] >= w[1]));
            let set: HashSet<_> = r.experts.iter().collect();
            assert_eq!(set.len(), 4);
            if r.layer == 0 {
                r.experts.iter().for_each(|&e| counts[e as usize] += 1);
            }
        }
        counts.sort();
        // Skewed: the most popular expert is picked far more often than the least.
        assert!(counts[15] > 3 * counts[0].max(1), "{counts:?}");
        // Written and read back, it is the same trace.
        let mut w = super::super::trace::TraceWriter::new(Vec::new(), "mem", &h).unwrap();
        for r in &a {
            w.record(r.token, r.layer, &r.experts, &r.weights).unwrap();
        }
        let bytes = w.finish().unwrap();
        let (h2, b) = super::super::trace::read_trace_from(&bytes[..], "mem").unwrap();
        assert_eq!((h2, b), (h, a));
    }

    #[test]
    fn sim_finds_sequence_boundaries_and_checks_shape() {
        let h = header();
        let mut recs = synthetic_trace(&h, &SynthSpec { n_tokens: 3, ..SynthSpec::default() });
        recs.extend(synthetic_trace(&h, &SynthSpec { n_tokens: 3, seed: 2, ..SynthSpec::default() }));
        let r = simulate(config_for(&h, 40_000), &h, &recs).unwrap();
        assert_eq!(r.sequences, 2);
        // Layer-major order (a prefill batch) is one sequence.
        let mut lm = synthetic_trace(&h, &SynthSpec { n_tokens: 3, ..SynthSpec::default() });
        lm.sort_by_key(|r| (r.layer, r.token));
        assert_eq!(simulate(config_for(&h, 40_000), &h, &lm).unwrap().sequences, 1);
        let mut cfg = config_for(&h, 40_000);
        cfg.n_experts = 8;
        let err = simulate(cfg, &h, &recs).unwrap_err().to_string();
        assert_eq!(err, "simulator: the cache config has n_experts = 8 but the trace header has 16");
    }
}
