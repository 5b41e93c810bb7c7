//! Unit tests of the cache's rules: every plan is checked exactly (which slot, which eviction).

use super::*;
use crate::experts::{CacheConfig, PolicyKind};

const B: u64 = 100; // bytes of one high-precision expert
const BL: u64 = 30; // bytes of one low-precision expert

fn cfg(n_layers: usize, n_experts: usize, top_k: usize, high_slots: u64) -> CacheConfig {
    CacheConfig::new(n_layers, n_experts, top_k, B, high_slots * B)
}

fn cache(c: CacheConfig) -> ExpertCache {
    ExpertCache::new(c).expect("valid config")
}

fn k(layer: u16, expert: u16) -> ExpertKey {
    ExpertKey { layer, expert }
}

fn hit(slot: SlotId) -> Action {
    Action::Hit { slot, precision: Precision::High }
}

fn hit_low(slot: SlotId) -> Action {
    Action::Hit { slot, precision: Precision::Low }
}

fn load(slot: SlotId, evict: Option<ExpertKey>) -> Action {
    Action::Load { slot, precision: Precision::High, evict }
}

fn load_low(slot: SlotId, evict: Option<ExpertKey>) -> Action {
    Action::Load { slot, precision: Precision::Low, evict }
}

/// Plan experts (equal weights unless given) at `layer`/`token`, check the actions, apply.
fn check(c: &mut ExpertCache, layer: usize, token: u64, needed: &[(u16, f32)], want: &[Action]) -> Plan {
    let plan = c.plan(layer, token, needed);
    let got: Vec<Action> = plan.actions.iter().map(|a| a.1).collect();
    assert_eq!(got, want, "layer {layer} token {token} needed {needed:?}");
    assert_eq!(plan.actions.iter().map(|a| (a.0.expert, a.2)).collect::<Vec<_>>(), needed);
    c.apply(&plan);
    c.check_invariants();
    plan
}

fn w(experts: &[u16]) -> Vec<(u16, f32)> {
    let g = 1.0 / experts.len() as f32;
    experts.iter().map(|&e| (e, g)).collect()
}

#[test]
fn budget_error_names_the_numbers() {
    let err = ExpertCache::new(CacheConfig::new(4, 8, 2, B, 150)).err().unwrap();
    assert_eq!(
        err.to_string(),
        "expert cache: a budget of 150 B leaves 150 B for high-precision experts of 100 B each \
         = 1 slots, but 2 are needed (top_k = 2 experts of one layer)"
    );
    let mut per_layer = CacheConfig::new(4, 8, 2, B, 750);
    per_layer.per_layer = true;
    let err = ExpertCache::new(per_layer).err().unwrap();
    assert_eq!(
        err,
        CacheError::Budget {
            budget_bytes: 750,
            high_bytes: 750,
            expert_bytes_high: B,
            have: 7,
            need: 8,
            why: "top_k = 2 for each of 4 layers".into(),
        }
    );
    let mut pinned = CacheConfig::new(4, 8, 2, B, 1700);
    pinned.pinned_layers = 2;
    let err = ExpertCache::new(pinned).err().unwrap().to_string();
    assert!(err.ends_with("= 17 slots, but 18 are needed (all 8 experts of each of 2 pinned layers, plus top_k = 2 experts of one layer)"), "{err}");
    // The low share comes out of the same budget.
    let mut low = CacheConfig::new(4, 8, 2, B, 250);
    low.expert_bytes_low = BL;
    low.thresholds = Some((0.6, 0.9));
    low.low_share = 0.25;
    let err = ExpertCache::new(low).err().unwrap().to_string();
    assert!(err.contains("a budget of 250 B leaves 188 B"), "{err}");
    // Exactly enough is fine.
    assert!(ExpertCache::new(CacheConfig::new(4, 8, 2, B, 200)).is_ok());
}

#[test]
fn inconsistent_configs_are_refused() {
    let base = cfg(2, 4, 2, 4);
    let bad: Vec<(CacheConfig, &str)> = vec![
        (CacheConfig { top_k: 5, ..base.clone() }, "top_k = 5"),
        (CacheConfig { n_layers: 0, ..base.clone() }, "n_layers = 0"),
        (CacheConfig { expert_bytes_high: 0, ..base.clone() }, "expert_bytes_high is 0"),
        (CacheConfig { low_share: 1.0, ..base.clone() }, "low_share = 1"),
        (CacheConfig { thresholds: Some((0.9, 0.6)), ..base.clone() }, "T1 = 0.9, T2 = 0.6"),
        (CacheConfig { thresholds: Some((f32::NAN, 0.6)), ..base.clone() }, "T1 = NaN"),
        (CacheConfig { hobbit_weights: [0.1, -1.0, 0.0, 0.0], ..base.clone() }, "HOBBIT weights"),
        (CacheConfig { pinned_layers: 3, ..base.clone() }, "pinned_layers = 3 exceeds n_layers = 2"),
    ];
    for (c, want) in bad {
        let err = ExpertCache::new(c).err().unwrap().to_string();
        assert!(err.contains(want), "{err} lacks {want}");
    }
}

#[test]
fn slot_counts_split_the_budget() {
    let mut c = CacheConfig::new(2, 8, 2, B, 1000);
    c.expert_bytes_low = BL;
    c.low_share = 0.25;
    // Low copies exist but no thresholds: nothing would ever load low, all 10 slots are high.
    let plain = cache(c.clone());
    assert_eq!((plain.n_slots(Precision::High), plain.n_slots(Precision::Low)), (10, 0));
    c.thresholds = Some((0.6, 0.9));
    let mixed = cache(c.clone());
    // 250 B → 8 low slots of 30 B; 750 B → 7 high slots.
    assert_eq!((mixed.n_slots(Precision::High), mixed.n_slots(Precision::Low)), (7, 8));
    // Never more slots than experts: 2 × 8 = 16.
    let huge = cache(CacheConfig::new(2, 8, 2, B, 1_000_000));
    assert_eq!(huge.n_slots(Precision::High), 16);
}

#[test]
fn per_layer_ranges_are_equal_shares_remainder_to_shallow_layers() {
    let mut c = cfg(3, 8, 2, 10);
    c.per_layer = true;
    let cache3 = cache(c.clone());
    let ranges: Vec<_> = (0..3).map(|l| cache3.layer_slots(l, Precision::High)).collect();
    assert_eq!(ranges, vec![0..4, 4..7, 7..10]);
    // Pinned layer 0 holds all its 4 experts; the other 6 slots split 3 + 3.
    let mut p = cfg(3, 4, 2, 10);
    p.per_layer = true;
    p.pinned_layers = 1;
    let pinned = cache(p);
    let ranges: Vec<_> = (0..3).map(|l| pinned.layer_slots(l, Precision::High)).collect();
    assert_eq!(ranges, vec![0..4, 4..7, 7..10]);
}

#[test]
fn misses_take_lowest_free_slots_then_hit_and_plan_is_pure() {
    let mut c = cache(cfg(2, 8, 2, 4));
    let needed = [(3, 0.7), (1, 0.3)];
    let before = c.plan(0, 0, &needed);
    let again = c.plan(0, 0, &needed);
    assert_eq!(before.actions, again.actions);
    assert_eq!(c.stats().lookups, 0);
    check(&mut c, 0, 0, &needed, &[load(0, None), load(1, None)]);
    check(&mut c, 1, 0, &needed, &[load(2, None), load(3, None)]);
    check(&mut c, 0, 1, &[(1, 0.6), (3, 0.4)], &[hit(1), hit(0)]);
    assert_eq!(c.lookup(k(0, 3)), Some((0, Precision::High)));
    assert_eq!(c.lookup(k(1, 1)), Some((3, Precision::High)));
    assert_eq!(c.lookup(k(1, 0)), None);
    let s = c.stats();
    assert_eq!((s.lookups, s.hits, s.loads_high, s.evictions, s.bytes_loaded), (6, 2, 4, 0, 400));
    assert_eq!((s.per_layer_hits.clone(), s.per_layer_lookups.clone()), (vec![2, 0], vec![4, 2]));
    assert!((s.hit_rate() - 2.0 / 6.0).abs() < 1e-12);
}

#[test]
fn lru_evicts_the_least_recently_used() {
    let mut c = cache(cfg(1, 8, 1, 3));
    check(&mut c, 0, 0, &w(&[0]), &[load(0, None)]);
    check(&mut c, 0, 1, &w(&[1]), &[load(1, None)]);
    check(&mut c, 0, 2, &w(&[2]), &[load(2, None)]);
    check(&mut c, 0, 3, &w(&[0]), &[hit(0)]);
    check(&mut c, 0, 4, &w(&[3]), &[load(1, Some(k(0, 1)))]);
    check(&mut c, 0, 5, &w(&[4]), &[load(2, Some(k(0, 2)))]);
    check(&mut c, 0, 6, &w(&[5]), &[load(0, Some(k(0, 0)))]);
    assert_eq!(c.stats().evictions, 3);
}

#[test]
fn lfu_evicts_the_least_frequent_ties_to_the_least_recent() {
    let mut c = cache(CacheConfig { policy: PolicyKind::Lfu, ..cfg(1, 8, 1, 3) });
    for (t, e) in [0, 0, 0, 1, 2, 2].into_iter().enumerate() {
        c.apply(&c.plan(0, t as u64, &w(&[e])));
    }
    // Uses: e0 × 3 (slot 0), e1 × 1 (slot 1), e2 × 2 (slot 2).
    check(&mut c, 0, 6, &w(&[3]), &[load(1, Some(k(0, 1)))]);
    // Now e3 × 1 (slot 1) is the least frequent.
    check(&mut c, 0, 7, &w(&[4]), &[load(1, Some(k(0, 3)))]);
    // e4 × 1, e2 × 2: add a use of e4 so both have 2 — the less recent, e2, goes.
    check(&mut c, 0, 8, &w(&[4]), &[hit(1)]);
    check(&mut c, 0, 9, &w(&[5]), &[load(2, Some(k(0, 2)))]);
}

#[test]
fn never_evicts_an_expert_needed_in_the_same_plan() {
    let mut c = cache(cfg(1, 8, 2, 2));
    check(&mut c, 0, 0, &w(&[0]), &[load(0, None)]);
    check(&mut c, 0, 1, &w(&[1]), &[load(1, None)]);
    // e0 is the LRU victim, but this plan needs it: e1 goes instead.
    check(&mut c, 0, 2, &w(&[2, 0]), &[load(1, Some(k(0, 1))), hit(0)]);
    // Two misses in one plan take two different victims, never the same slot.
    let mut c = cache(cfg(1, 8, 2, 3));
    for (t, e) in [0, 1, 2].into_iter().enumerate() {
        c.apply(&c.plan(0, t as u64, &w(&[e])));
    }
    check(&mut c, 0, 3, &w(&[5, 6]), &[load(0, Some(k(0, 0))), load(1, Some(k(0, 1)))]);
    // And a later-ranked hit protects its slot from an earlier-ranked miss.
    check(&mut c, 0, 4, &w(&[7, 2]), &[load(0, Some(k(0, 5))), hit(2)]);
}

fn mixed(n_layers: usize, top_k: usize, high_slots: u64, low_slots: u64) -> CacheConfig {
    // Budget split exactly: low_share of the budget = low_slots × BL.
    let budget = high_slots * B + low_slots * BL;
    CacheConfig {
        expert_bytes_low: BL,
        low_share: (low_slots * BL) as f32 / budget as f32 + 1e-6,
        thresholds: Some((0.6, 0.9)),
        ..CacheConfig::new(n_layers, 8, top_k, B, budget)
    }
}

#[test]
fn thresholds_give_high_high_low_skip() {
    let mut c = cache(mixed(1, 4, 4, 2));
    assert_eq!((c.n_slots(Precision::High), c.n_slots(Precision::Low)), (4, 2));
    let g = [(4, 0.5), (5, 0.3), (6, 0.15), (7, 0.05)];
    check(&mut c, 0, 0, &g, &[load(0, None), load(1, None), load_low(0, None), Action::Skip]);
    let s = c.stats();
    assert_eq!((s.loads_high, s.loads_low, s.skips, s.bytes_loaded), (2, 1, 1, 2 * B + BL));
    // Rank 0 is always high, even with T1 = T2 = 0; everything after it is skipped.
    let mut z = cache(CacheConfig { thresholds: Some((0.0, 0.0)), ..mixed(1, 4, 4, 2) });
    check(&mut z, 0, 0, &g, &[load(0, None), Action::Skip, Action::Skip, Action::Skip]);
}

#[test]
fn thresholds_resident_experts_hit_at_either_precision() {
    let mut c = cache(mixed(1, 4, 4, 2));
    check(
        &mut c,
        0,
        0,
        &[(4, 0.5), (5, 0.3), (6, 0.15), (7, 0.05)],
        &[load(0, None), load(1, None), load_low(0, None), Action::Skip],
    );
    // e6 (low) now ranks first: a hit at low precision, not a high reload. e4 (high) in the
    // low band: a hit at high. e5 (high) past T2: still a hit, not a skip.
    check(&mut c, 0, 1, &[(6, 0.5), (4, 0.3), (5, 0.15), (7, 0.05)], &[hit_low(0), hit(0), hit(1), Action::Skip]);
    assert_eq!(c.stats().hits_low, 1);
}

#[test]
fn low_loads_fall_back_to_high_when_no_low_slot_is_free() {
    // One low slot; three experts in the low band of one plan.
    let mut c = cache(CacheConfig { thresholds: Some((0.3, 0.9)), ..mixed(1, 4, 4, 1) });
    let g = [(0, 0.4), (1, 0.2), (2, 0.2), (3, 0.2)];
    check(&mut c, 0, 0, &g, &[load(0, None), load_low(0, None), load(1, None), load(2, None)]);
    // Without a low pool (no low copies) the low band loads high.
    let mut h = cache(CacheConfig { expert_bytes_low: 0, ..mixed(1, 4, 4, 0) });
    assert_eq!(h.n_slots(Precision::Low), 0);
    check(
        &mut h,
        0,
        0,
        &[(4, 0.5), (5, 0.3), (6, 0.15), (7, 0.05)],
        &[load(0, None), load(1, None), load(2, None), Action::Skip],
    );
}

#[test]
fn fate_pins_the_first_layers_and_evicts_lru_among_the_rest() {
    let mut c = cache(CacheConfig { policy: PolicyKind::Fate, pinned_layers: 1, ..cfg(2, 2, 1, 3) });
    check(&mut c, 0, 0, &w(&[0]), &[load(0, None)]);
    check(&mut c, 1, 0, &w(&[0]), &[load(1, None)]);
    check(&mut c, 0, 1, &w(&[1]), &[load(2, None)]);
    // L0E0 is the least recent, but pinned: L1E0 goes.
    check(&mut c, 1, 1, &w(&[1]), &[load(1, Some(k(1, 0)))]);
    check(&mut c, 1, 2, &w(&[0]), &[load(1, Some(k(1, 1)))]);
    assert_eq!(c.lookup(k(0, 0)), Some((0, Precision::High)));
    // Plain LRU with the same history would have evicted L0E0.
    let mut l = cache(cfg(2, 2, 1, 3));
    for (layer, t, e) in [(0, 0, 0), (1, 0, 0), (0, 1, 1)] {
        l.apply(&l.plan(layer, t, &w(&[e])));
    }
    check(&mut l, 1, 1, &w(&[1]), &[load(0, Some(k(0, 0)))]);
}

#[test]
fn pinned_layers_load_high_even_in_the_low_band() {
    let mut c = cache(CacheConfig { pinned_layers: 1, ..mixed(2, 4, 12, 2) });
    let g = [(4, 0.5), (5, 0.3), (6, 0.15), (7, 0.05)];
    check(&mut c, 0, 0, &g, &[load(0, None), load(1, None), load(2, None), Action::Skip]);
    check(&mut c, 1, 0, &g, &[load(3, None), load(4, None), load_low(0, None), Action::Skip]);
}

#[test]
fn per_layer_pools_never_evict_another_layers_expert() {
    let mut c = cache(CacheConfig { per_layer: true, ..cfg(2, 4, 1, 4) });
    check(&mut c, 0, 0, &w(&[0]), &[load(0, None)]);
    check(&mut c, 1, 0, &w(&[0]), &[load(2, None)]);
    check(&mut c, 0, 1, &w(&[1]), &[load(1, None)]);
    check(&mut c, 1, 1, &w(&[1]), &[load(3, None)]);
    check(&mut c, 0, 2, &w(&[2]), &[load(0, Some(k(0, 0)))]);
    check(&mut c, 0, 3, &w(&[3]), &[load(1, Some(k(0, 1)))]);
    check(&mut c, 1, 3, &w(&[0]), &[hit(2)]);
}

fn hobbit(weights: [f32; 4]) -> CacheConfig {
    CacheConfig { policy: PolicyKind::Hobbit, hobbit_weights: weights, ..cfg(2, 4, 1, 3) }
}

#[test]
fn hobbit_layer_distance_keeps_the_layer_that_runs_next() {
    // History: t0 L0E0 (slot 0), t0 L1E0 (slot 1), t1 L0E1 (slot 2); now t1 L1E1 misses.
    let history = [(0, 0, 0), (1, 0, 0), (0, 1, 1)];
    let mut c = cache(hobbit([0.0, 0.0, 0.0, 1.0]));
    for (layer, t, e) in history {
        c.apply(&c.plan(layer, t, &w(&[e])));
    }
    // Planning layer 1: layer 0 runs next (D = 1/2), layer 1's other expert only after a
    // full cycle (D = 0), so L1E0 goes although L0E0 is less recent.
    assert_eq!(c.victim_key(k(0, 0), 1, 1).unwrap().score, 0.5);
    assert_eq!(c.victim_key(k(1, 0), 1, 1).unwrap().score, 0.0);
    check(&mut c, 1, 1, &w(&[1]), &[load(1, Some(k(1, 0)))]);
}

#[test]
fn hobbit_priority_mixes_recency_frequency_and_hits() {
    // Single layer, so D is constant. e0 used at t0, t1, t2 (2 hits); e1 at t3; e2 at t4.
    let history = [0, 0, 0, 1, 2];
    let run = |weights: [f32; 4]| {
        let mut c = cache(CacheConfig { policy: PolicyKind::Hobbit, hobbit_weights: weights, ..cfg(1, 8, 1, 3) });
        for (t, e) in history.into_iter().enumerate() {
            c.apply(&c.plan(0, t as u64, &w(&[e])));
        }
        c
    };
    // Recency only (R/T): e0 (R = 3 of T = 6) is the oldest → evicted.
    let mut c = run([1.0, 0.0, 0.0, 0.0]);
    check(&mut c, 0, 5, &w(&[3]), &[load(0, Some(k(0, 0)))]);
    // Frequency only (F/T): e0 has 3, e1 and e2 one each → e1, the less recent of the tie.
    let mut c = run([0.0, 1.0, 0.0, 0.0]);
    check(&mut c, 0, 5, &w(&[3]), &[load(1, Some(k(0, 1)))]);
    // Mixed: e0 = 0.5·3/6 + 0.3·3/6 + 0.2·2/6 ≈ 0.467, e1 = 0.5·4/6 + 0.3/6 ≈ 0.383,
    // e2 = 0.5·5/6 + 0.3/6 ≈ 0.467 → e1.
    let mut c = run([0.5, 0.3, 0.2, 0.0]);
    check(&mut c, 0, 5, &w(&[3]), &[load(1, Some(k(0, 1)))]);
}

#[test]
fn hobbit_records_reset_per_sequence() {
    let mut c =
        cache(CacheConfig { policy: PolicyKind::Hobbit, hobbit_weights: [0.0, 1.0, 0.0, 0.0], ..cfg(1, 8, 1, 2) });
    for (t, e) in [0, 0, 0, 1].into_iter().enumerate() {
        c.apply(&c.plan(0, t as u64, &w(&[e])));
    }
    // In this sequence e0 is used 3 times, e1 once: e1 would go.
    assert_eq!(c.plan(0, 4, &w(&[2])).actions[0].1, load(1, Some(k(0, 1))));
    c.reset_sequence();
    // A new sequence: no records, all tie at 0, the least recent (e0) goes. Residency stays.
    assert_eq!(c.lookup(k(0, 0)), Some((0, Precision::High)));
    check(&mut c, 0, 0, &w(&[2]), &[load(0, Some(k(0, 0)))]);
}

#[test]
fn out_of_range_and_duplicate_inputs_are_skipped_not_panics() {
    let mut c = cache(cfg(2, 4, 2, 2));
    check(&mut c, 5, 0, &w(&[0, 1]), &[Action::Skip, Action::Skip]);
    check(&mut c, 0, 0, &w(&[9, 1]), &[Action::Skip, load(0, None)]);
    check(&mut c, 0, 1, &w(&[2, 2]), &[load(1, None), Action::Skip]);
    // Longer than top_k and nothing evictable: the extra expert is skipped.
    check(&mut c, 1, 2, &w(&[0, 1, 2]), &[load(0, Some(k(0, 1))), load(1, Some(k(0, 2))), Action::Skip]);
    assert_eq!(c.stats().skips, 5);
    assert_eq!(c.stats().lookups, 9);
}

#[test]
fn stale_plans_still_leave_a_consistent_cache() {
    let mut c = cache(cfg(1, 4, 1, 1));
    let a = c.plan(0, 0, &w(&[0]));
    let b = c.plan(0, 0, &w(&[1]));
    c.apply(&a);
    c.apply(&b); // planned as a free slot, but e0 sits there now: it is evicted
    c.check_invariants();
    assert_eq!((c.lookup(k(0, 0)), c.lookup(k(0, 1))), (None, Some((0, Precision::High))));
    assert_eq!(c.stats().evictions, 1);
    c.apply(&a); // e0 back into slot 0
    c.apply(&Plan { layer: 0, token: 1, actions: vec![(k(0, 2), load(7, None), 1.0)], ..Default::default() });
    c.check_invariants();
    assert_eq!(c.stats().skips, 1);
}

#[test]
fn per_layer_shares_follow_layer_weights_within_top_k_and_all_experts() {
    let mut c = cfg(4, 8, 2, 16);
    c.per_layer = true;
    c.layer_weights = Some(vec![1.0, 1.0, 6.0, 0.5]);
    let cache = ExpertCache::new(c).unwrap();
    let sizes: Vec<usize> = (0..4).map(|l| cache.layer_slots(l, Precision::High).len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 16, "{sizes:?}");
    assert_eq!(sizes[2], 8, "capped at all 8 experts: {sizes:?}");
    assert!(sizes.iter().all(|&n| n >= 2), "at least top_k each: {sizes:?}");
    assert!(sizes[0] >= sizes[3], "{sizes:?}");
}
