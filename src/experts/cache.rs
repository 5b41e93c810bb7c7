//! The expert cache: slot pools per precision, `plan` (pure) and `apply` (the only mutation).
//!
//! Invariants (checked by `check_invariants` in tests): every expert sits in at most one slot;
//! every slot holds at most one expert, inside its layer's range; pinned experts sit only in
//! high slots; resident bytes never exceed the budget.

use super::policy::{Now, Record, SeqClock, VictimKey};
use super::{Action, CacheConfig, CacheError, CacheStats, Device, ExpertKey, Plan, PlanKind, Precision, SlotId};
use std::ops::Range;

/// One precision's slots and which of them each layer may use.
#[derive(Clone, Debug)]
struct Pool {
    slots: Vec<Option<ExpertKey>>,
    /// Per layer: the slots it may load into (the whole pool when shared).
    ranges: Vec<Range<SlotId>>,
}

pub struct ExpertCache {
    cfg: CacheConfig,
    high: Pool,
    low: Pool,
    /// By `layer * n_experts + expert`.
    resident: Vec<Option<(Precision, SlotId)>>,
    records: Vec<Record>,
    /// Number of plans applied (the LRU clock).
    step: u64,
    /// Occupied slots per pool (high, low).
    used: [u64; 2],
    seq: SeqClock,
    stats: CacheStats,
}

impl ExpertCache {
    /// Error (naming the numbers) when the budget cannot hold one layer's `top_k` experts at
    /// high precision (with `per_layer`: every layer's share), plus every expert of the pinned
    /// layers, or when the config is inconsistent.
    pub fn new(cfg: CacheConfig) -> Result<ExpertCache, CacheError> {
        validate(&cfg)?;
        let (high, low) = layout(&cfg)?;
        let n_keys = cfg.n_layers * cfg.n_experts;
        Ok(ExpertCache {
            high,
            low,
            resident: vec![None; n_keys],
            records: vec![Record::default(); n_keys],
            step: 0,
            used: [0, 0],
            seq: SeqClock::default(),
            stats: CacheStats {
                per_layer_hits: vec![0; cfg.n_layers],
                per_layer_lookups: vec![0; cfg.n_layers],
                per_layer_prefetched: vec![0; cfg.n_layers],
                per_layer_prefetch_used: vec![0; cfg.n_layers],
                per_layer_prefetch_wasted: vec![0; cfg.n_layers],
                ..CacheStats::default()
            },
            cfg,
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// How many buffers of precision `p` the engine must provide.
    pub fn n_slots(&self, p: Precision) -> usize {
        self.pool(p).slots.len()
    }

    /// The slots of precision `p` that `layer` may use (all of them unless `per_layer`).
    pub fn layer_slots(&self, layer: usize, p: Precision) -> Range<SlotId> {
        self.pool(p).ranges.get(layer).cloned().unwrap_or(0..0)
    }

    /// Who sits in a slot.
    pub fn occupant(&self, p: Precision, slot: SlotId) -> Option<ExpertKey> {
        self.pool(p).slots.get(slot as usize).copied().flatten()
    }

    /// Bytes held by resident experts now.
    pub fn resident_bytes(&self) -> u64 {
        self.used[0] * self.cfg.expert_bytes_high + self.used[1] * self.cfg.expert_bytes_low
    }

    pub fn lookup(&self, key: ExpertKey) -> Option<(SlotId, Precision)> {
        let (p, slot) = (*self.resident.get(self.index(key)?)?)?;
        Some((slot, p))
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Decide for the experts `needed` by one token in one layer: (expert index, normalized
    /// gate weight) in router rank order. Pure: no state change.
    ///
    /// - A resident expert is a `Hit`, at whichever precision it sits.
    /// - A miss picks a precision: without thresholds always `High`; with `(T1, T2)`, rank 0 is
    ///   `High`, then with `s_i = Σ_{j<i} g_j`: `s ≤ T1` → `High`, `T1 < s ≤ T2` → `Low`,
    ///   `s > T2` → `Skip`. `Low` becomes `High` in pinned layers (their copy is permanent)
    ///   and when the layer has no low slot it may take.
    /// - A load takes the lowest free slot of the layer's range, else evicts the
    ///   lowest-priority resident that is neither needed in this plan nor pinned, nor already
    ///   taken by an earlier load of this plan. If no low slot qualifies the load goes high.
    /// - With `host_compute`, a miss is `ComputeOn(Host)` instead of a load.
    /// - `Skip` also answers what cannot be placed: a layer or expert out of range, a
    ///   duplicate expert, or (only if `needed` is longer than `top_k`) no slot at all.
    pub fn plan(&self, layer: usize, token: u64, needed: &[(u16, f32)]) -> Plan {
        self.plan_kind(PlanKind::Demand, layer, token, needed, &[])
    }

    /// Decide which of the experts predicted for `layer` (index, predicted gate weight, in score
    /// order) to load ahead of need. Pure, like `plan`. Resident ones are `Hit`s (nothing to
    /// do); a miss becomes a `Prefetch` at the precision the thresholds give its predicted
    /// weight, into a free slot or in place of an expert that is neither in `protect` (the
    /// current layer's experts, reads in flight) nor pinned; what finds no such slot, or would be
    /// skipped, or computed elsewhere, is `Skip`.
    pub fn plan_prefetch(&self, layer: usize, token: u64, candidates: &[(u16, f32)], protect: &[ExpertKey]) -> Plan {
        self.plan_kind(PlanKind::Prefetch, layer, token, candidates, protect)
    }

    /// Like `plan_prefetch`, for warming the cache at start from a routing profile: the loads
    /// are not counted as prefetches (nothing predicted them).
    pub fn plan_warm(&self, layer: usize, token: u64, experts: &[u16]) -> Plan {
        let cands: Vec<(u16, f32)> = experts.iter().map(|&e| (e, 0.0)).collect();
        self.plan_kind(PlanKind::Warm, layer, token, &cands, &[])
    }

    fn plan_kind(
        &self,
        kind: PlanKind,
        layer: usize,
        token: u64,
        needed: &[(u16, f32)],
        protect: &[ExpertKey],
    ) -> Plan {
        let mut plan = Plan { kind, layer, token, actions: Vec::with_capacity(needed.len()) };
        let mut taken: Vec<(Precision, SlotId)> = Vec::with_capacity(needed.len());
        let (seq_first, seq_tokens) = self.seq.span_with(token);
        let now = Now { layer, n_layers: self.cfg.n_layers, seq_first, seq_tokens };
        let mut s = 0.0f32;
        for (rank, &(e, g)) in needed.iter().enumerate() {
            let key = ExpertKey { layer: layer as u16, expert: e };
            let duplicate = needed[..rank].iter().any(|&(d, _)| d == e);
            let action = match (self.index(key), duplicate) {
                (Some(i), false) => match self.resident[i] {
                    Some((precision, slot)) => Action::Hit { slot, precision },
                    None => match (self.want(layer, rank, s), kind) {
                        (None, _) => Action::Skip,
                        (Some(_), PlanKind::Demand) if self.cfg.host_compute => Action::ComputeOn(Device::Host),
                        (Some(_), _) if self.cfg.host_compute => Action::Skip,
                        (Some(p), _) => match self.place(p, needed, protect, &taken, &now) {
                            Some((precision, slot, evict)) => {
                                taken.push((precision, slot));
                                match kind {
                                    PlanKind::Demand => Action::Load { slot, precision, evict },
                                    PlanKind::Prefetch | PlanKind::Warm => Action::Prefetch { slot, precision, evict },
                                }
                            }
                            None => Action::Skip,
                        },
                    },
                },
                _ => Action::Skip,
            };
            plan.actions.push((key, action, g));
            s += g;
        }
        plan
    }

    /// The only mutation: record hits, loads and evictions and update the policy records.
    ///
    /// `plan` should come from `self.plan` on the current state. A stale plan is still applied
    /// so that the invariants hold: a load evicts whoever actually sits in its slot and frees
    /// any other slot the expert held; actions naming slots or experts out of range count as
    /// skips.
    pub fn apply(&mut self, plan: &Plan) {
        self.step += 1;
        if plan.kind != PlanKind::Demand {
            return self.apply_prefetch(plan);
        }
        self.seq.observe(plan.token);
        for &(key, action, _) in &plan.actions {
            self.stats.lookups += 1;
            let index = self.index(key);
            if let Some(c) = self.stats.per_layer_lookups.get_mut(key.layer as usize).filter(|_| index.is_some()) {
                *c += 1;
            }
            match (action, index) {
                (Action::Hit { precision, .. }, Some(i)) => {
                    self.stats.hits += 1;
                    self.stats.per_layer_hits[key.layer as usize] += 1;
                    if precision == Precision::Low {
                        self.stats.hits_low += 1;
                    }
                    if std::mem::take(&mut self.records[i].prefetched) {
                        self.stats.per_layer_prefetch_used[key.layer as usize] += 1;
                    }
                    self.touch(i, plan.token, true);
                }
                (Action::Load { slot, precision, .. }, Some(i))
                    if (slot as usize) < self.pool(precision).slots.len() =>
                {
                    self.place_key(key, i, precision, slot);
                    match precision {
                        Precision::High => self.stats.loads_high += 1,
                        Precision::Low => self.stats.loads_low += 1,
                    }
                    self.touch(i, plan.token, false);
                }
                (Action::ComputeOn(_), Some(_)) => self.stats.computed_elsewhere += 1,
                _ => self.stats.skips += 1,
            }
        }
    }

    /// A prefetch plan's loads: residency and the prefetch counters change, nothing else (no
    /// lookup, no use: the expert's recency is refreshed so the next plan does not evict it).
    fn apply_prefetch(&mut self, plan: &Plan) {
        for &(key, action, _) in &plan.actions {
            if let (Action::Prefetch { slot, precision, .. }, Some(i)) = (action, self.index(key)) {
                if (slot as usize) < self.pool(precision).slots.len() {
                    self.place_key(key, i, precision, slot);
                    if plan.kind == PlanKind::Prefetch {
                        self.stats.per_layer_prefetched[key.layer as usize] += 1;
                        self.records[i].prefetched = true;
                    }
                    self.records[i].last_step = self.step;
                }
            }
        }
    }

    /// Put `key` (index `i`) into `slot`, evicting its occupant and freeing any slot `key` held.
    fn place_key(&mut self, key: ExpertKey, i: usize, precision: Precision, slot: SlotId) {
        if let Some(old) = self.pool_mut(precision).slots[slot as usize].take() {
            if let Some(o) = self.index(old) {
                self.resident[o] = None;
                self.forget_prefetch(o);
            }
            self.stats.evictions += 1;
            self.used[pool_index(precision)] -= 1;
        }
        if let Some((p0, s0)) = self.resident[i].take() {
            self.pool_mut(p0).slots[s0 as usize] = None;
            self.used[pool_index(p0)] -= 1;
        }
        self.used[pool_index(precision)] += 1;
        self.pool_mut(precision).slots[slot as usize] = Some(key);
        self.resident[i] = Some((precision, slot));
        self.stats.bytes_loaded += self.cfg.expert_bytes(precision);
    }

    /// A prefetched expert leaves unused: count it as wasted.
    fn forget_prefetch(&mut self, i: usize) {
        if std::mem::take(&mut self.records[i].prefetched) {
            self.stats.per_layer_prefetch_wasted[i / self.cfg.n_experts] += 1;
        }
    }

    /// Forget `key`'s resident copy (its load failed, so the slot holds garbage): the slot
    /// becomes free and the next plan loads the expert again.
    pub fn invalidate(&mut self, key: ExpertKey) {
        let Some(i) = self.index(key) else { return };
        self.forget_prefetch(i);
        if let Some((p, slot)) = self.resident[i].take() {
            self.pool_mut(p).slots[slot as usize] = None;
            self.used[pool_index(p)] -= 1;
        }
    }

    /// Forget the per-sequence records (HOBBIT's R, F, H and T). Residency, the LRU clock and
    /// LFU's lifetime counts stay.
    pub fn reset_sequence(&mut self) {
        for r in &mut self.records {
            r.seq_last_token = None;
            r.seq_uses = 0;
            r.seq_hits = 0;
        }
        self.seq = SeqClock::default();
    }

    fn pool(&self, p: Precision) -> &Pool {
        match p {
            Precision::High => &self.high,
            Precision::Low => &self.low,
        }
    }

    fn pool_mut(&mut self, p: Precision) -> &mut Pool {
        match p {
            Precision::High => &mut self.high,
            Precision::Low => &mut self.low,
        }
    }

    fn index(&self, key: ExpertKey) -> Option<usize> {
        let (l, e) = (key.layer as usize, key.expert as usize);
        (l < self.cfg.n_layers && e < self.cfg.n_experts).then(|| l * self.cfg.n_experts + e)
    }

    fn pinned(&self, layer: usize) -> bool {
        layer < self.cfg.pinned_layers
    }

    fn touch(&mut self, i: usize, token: u64, hit: bool) {
        let r = &mut self.records[i];
        r.last_step = self.step;
        r.uses += 1;
        r.seq_uses += 1;
        r.seq_hits += u64::from(hit);
        r.seq_last_token = Some(token);
    }

    /// The precision a miss of rank `rank` with cumulative weight `s` before it should load
    /// at, or None to skip it.
    fn want(&self, layer: usize, rank: usize, s: f32) -> Option<Precision> {
        let Some((t1, t2)) = self.cfg.thresholds else {
            return Some(Precision::High);
        };
        if rank == 0 || s <= t1 {
            Some(Precision::High)
        } else if s <= t2 {
            let low_ok = !self.pinned(layer) && !self.layer_slots(layer, Precision::Low).is_empty();
            Some(if low_ok { Precision::Low } else { Precision::High })
        } else {
            None
        }
    }

    /// A slot for a load at `p` (falling back from low to high), with the expert it evicts.
    fn place(
        &self,
        p: Precision,
        needed: &[(u16, f32)],
        protect: &[ExpertKey],
        taken: &[(Precision, SlotId)],
        now: &Now,
    ) -> Option<(Precision, SlotId, Option<ExpertKey>)> {
        let found = self.slot_in(p, needed, protect, taken, now).map(|(s, e)| (p, s, e));
        match (found, p) {
            (None, Precision::Low) => {
                self.slot_in(Precision::High, needed, protect, taken, now).map(|(s, e)| (Precision::High, s, e))
            }
            _ => found,
        }
    }

    fn slot_in(
        &self,
        p: Precision,
        needed: &[(u16, f32)],
        protect: &[ExpertKey],
        taken: &[(Precision, SlotId)],
        now: &Now,
    ) -> Option<(SlotId, Option<ExpertKey>)> {
        let pool = self.pool(p);
        let range = pool.ranges.get(now.layer)?.clone();
        let free = range.clone().filter(|&s| !taken.contains(&(p, s))).find(|&s| pool.slots[s as usize].is_none());
        if let Some(s) = free {
            return Some((s, None));
        }
        let mut best: Option<(VictimKey, SlotId, ExpertKey)> = None;
        for s in range {
            let Some(occ) = pool.slots[s as usize] else { continue };
            let needed_here = occ.layer as usize == now.layer && needed.iter().any(|&(e, _)| e == occ.expert);
            if needed_here || protect.contains(&occ) || self.pinned(occ.layer as usize) || taken.contains(&(p, s)) {
                continue;
            }
            let Some(i) = self.index(occ) else { continue };
            let vk =
                VictimKey::new(self.cfg.policy, self.cfg.hobbit_weights, &self.records[i], occ.layer as usize, s, now);
            if best.as_ref().is_none_or(|(b, _, _)| vk.order(b).is_lt()) {
                best = Some((vk, s, occ));
            }
        }
        best.map(|(_, s, occ)| (s, Some(occ)))
    }

    /// The priority `policy` gives `key` if planned now at `layer` (for logs and tests).
    pub fn victim_key(&self, key: ExpertKey, layer: usize, token: u64) -> Option<VictimKey> {
        let i = self.index(key)?;
        let (seq_first, seq_tokens) = self.seq.span_with(token);
        let now = Now { layer, n_layers: self.cfg.n_layers, seq_first, seq_tokens };
        let slot = self.lookup(key).map_or(0, |(s, _)| s);
        Some(VictimKey::new(self.cfg.policy, self.cfg.hobbit_weights, &self.records[i], key.layer as usize, slot, &now))
    }

    /// Panics when an invariant of the module docs is broken (tests only).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        for (p, pool) in [(Precision::High, &self.high), (Precision::Low, &self.low)] {
            for (s, occ) in pool.slots.iter().enumerate() {
                if let Some(k) = occ {
                    let i = self.index(*k).expect("occupant in range");
                    assert_eq!(self.resident[i], Some((p, s as SlotId)), "{k} in {p:?} slot {s}");
                    assert!(pool.ranges[k.layer as usize].contains(&(s as SlotId)), "{k} outside its layer's range");
                    assert!(p == Precision::High || !self.pinned(k.layer as usize), "pinned {k} at low");
                }
            }
        }
        for (i, r) in self.resident.iter().enumerate() {
            if let Some((p, s)) = r {
                let k = ExpertKey::new(i / self.cfg.n_experts, i % self.cfg.n_experts);
                assert_eq!(self.occupant(*p, *s), Some(k));
            }
        }
        let count = |p: &Pool| p.slots.iter().filter(|s| s.is_some()).count() as u64;
        assert_eq!(self.used, [count(&self.high), count(&self.low)]);
        assert!(self.resident_bytes() <= self.cfg.budget_bytes, "over budget");
    }
}

fn pool_index(p: Precision) -> usize {
    match p {
        Precision::High => 0,
        Precision::Low => 1,
    }
}

fn validate(cfg: &CacheConfig) -> Result<(), CacheError> {
    let max = u16::MAX as usize + 1;
    let bad = cfg.n_layers == 0
        || cfg.n_experts == 0
        || cfg.top_k == 0
        || cfg.top_k > cfg.n_experts
        || cfg.n_layers > max
        || cfg.n_experts > max
        || cfg.n_layers.saturating_mul(cfg.n_experts) > u32::MAX as usize;
    if bad {
        return Err(CacheError::Shape { n_layers: cfg.n_layers, n_experts: cfg.n_experts, top_k: cfg.top_k });
    }
    if cfg.expert_bytes_high == 0 {
        return Err(CacheError::ZeroExpertBytes);
    }
    if !(0.0..1.0).contains(&cfg.low_share) {
        return Err(CacheError::LowShare { low_share: cfg.low_share });
    }
    if let Some((t1, t2)) = cfg.thresholds {
        if !(t1.is_finite() && t2.is_finite() && 0.0 <= t1 && t1 <= t2) {
            return Err(CacheError::Thresholds { t1, t2 });
        }
    }
    if !cfg.hobbit_weights.iter().all(|w| w.is_finite() && *w >= 0.0) {
        return Err(CacheError::HobbitWeights { weights: cfg.hobbit_weights });
    }
    if cfg.pinned_layers > cfg.n_layers {
        return Err(CacheError::PinnedLayers { pinned_layers: cfg.pinned_layers, n_layers: cfg.n_layers });
    }
    Ok(())
}

/// Sizes the pools and each layer's ranges.
///
/// Low slots exist only with low-precision copies *and* thresholds (otherwise nothing would
/// ever load low): `floor(budget · low_share)` bytes; the rest is high. Pinned layers get every
/// one of their experts in high slots and no low slots. `per_layer` splits what is left evenly
/// over the other layers, the remainder one slot each to the shallowest. No pool, and no
/// layer's share, is larger than the experts it could ever hold.
fn layout(cfg: &CacheConfig) -> Result<(Pool, Pool), CacheError> {
    let (n_l, n_e, pinned) = (cfg.n_layers as u64, cfg.n_experts as u64, cfg.pinned_layers as u64);
    let low_on = cfg.expert_bytes_low > 0 && cfg.thresholds.is_some();
    let low_bytes = if low_on { (cfg.budget_bytes as f64 * f64::from(cfg.low_share)).floor() as u64 } else { 0 };
    let high_bytes = cfg.budget_bytes - low_bytes.min(cfg.budget_bytes);
    let have = high_bytes / cfg.expert_bytes_high;
    let free_layers = n_l - pinned;
    let (need_free, what) = match (free_layers, cfg.per_layer) {
        (0, _) => (0, String::new()),
        (_, false) => (cfg.top_k as u64, format!("top_k = {} experts of one layer", cfg.top_k)),
        (m, true) => (m * cfg.top_k as u64, format!("top_k = {} for each of {m} layers", cfg.top_k)),
    };
    let need = pinned * n_e + need_free;
    if have < need {
        let pin = format!("all {n_e} experts of each of {pinned} pinned layers");
        let why = match (pinned, what.is_empty()) {
            (0, _) => what,
            (_, true) => pin,
            _ => format!("{pin}, plus {what}"),
        };
        return Err(CacheError::Budget {
            budget_bytes: cfg.budget_bytes,
            high_bytes,
            expert_bytes_high: cfg.expert_bytes_high,
            have,
            need,
            why,
        });
    }
    let n_low = if low_on { low_bytes / cfg.expert_bytes_low } else { 0 };
    let pinned_layer = |l: u64| l < pinned;
    let weighted = cfg.layer_weights.as_ref().filter(|w| cfg.per_layer && w.len() == cfg.n_layers);
    let (high_sizes, low_sizes): (Vec<u64>, Vec<u64>) = if let Some(w) = weighted {
        let free: Vec<f64> = (0..n_l).map(|l| if pinned_layer(l) { 0.0 } else { w[l as usize].max(0.0) }).collect();
        let high = apportion(have - pinned * n_e, &free, cfg.top_k as u64, n_e);
        let low = apportion(n_low, &free, 0, n_e);
        (0..n_l as usize).map(|l| if pinned_layer(l as u64) { (n_e, 0) } else { (high[l], low[l]) }).unzip()
    } else if cfg.per_layer {
        // `nth` counts the unpinned layers from 0; free_layers > 0 whenever it is called.
        let split = |total: u64, nth: u64| (total / free_layers + u64::from(nth < total % free_layers)).min(n_e);
        (0..n_l)
            .map(|l| {
                if pinned_layer(l) {
                    (n_e, 0)
                } else {
                    (split(have - pinned * n_e, l - pinned), split(n_low, l - pinned))
                }
            })
            .unzip()
    } else {
        let high = have.min(n_l * n_e);
        let low = n_low.min(free_layers * n_e);
        (vec![high; cfg.n_layers], (0..n_l).map(|l| if pinned_layer(l) { 0 } else { low }).collect())
    };
    Ok((pool(&high_sizes, cfg.per_layer), pool(&low_sizes, cfg.per_layer)))
}

/// `total` slots over the layers with a positive weight, in proportion to it, each between `min`
/// and `max` (largest remainders first; `total` is at least `min` per such layer, checked by
/// the caller).
fn apportion(total: u64, weights: &[f64], min: u64, max: u64) -> Vec<u64> {
    let live: Vec<usize> = (0..weights.len()).filter(|&l| weights[l] > 0.0).collect();
    let sum: f64 = live.iter().map(|&l| weights[l]).sum();
    let mut out = vec![0u64; weights.len()];
    if live.is_empty() || sum <= 0.0 {
        return out;
    }
    let ideal = |l: usize| total as f64 * weights[l] / sum;
    for &l in &live {
        out[l] = (ideal(l).floor() as u64).clamp(min, max);
    }
    let mut given: u64 = out.iter().sum();
    // Too many (the minimums pushed it over): take from the layers furthest above their ideal.
    while given > total {
        let Some(&l) = live
            .iter()
            .filter(|&&l| out[l] > min)
            .max_by(|&&a, &&b| (out[a] as f64 - ideal(a)).total_cmp(&(out[b] as f64 - ideal(b))))
        else {
            break;
        };
        out[l] -= 1;
        given -= 1;
    }
    // Too few: give to the layers furthest below their ideal.
    while given < total {
        let Some(&l) = live
            .iter()
            .filter(|&&l| out[l] < max)
            .max_by(|&&a, &&b| (ideal(a) - out[a] as f64).total_cmp(&(ideal(b) - out[b] as f64)))
        else {
            break;
        };
        out[l] += 1;
        given += 1;
    }
    out
}

/// Per-layer sizes → a pool: contiguous ranges when per layer, else one range shared by all.
fn pool(sizes: &[u64], per_layer: bool) -> Pool {
    if per_layer {
        let mut start = 0u32;
        let ranges = sizes
            .iter()
            .map(|&n| {
                let r = start..start + n as u32;
                start = r.end;
                r
            })
            .collect();
        Pool { slots: vec![None; start as usize], ranges }
    } else {
        let n = sizes.iter().copied().max().unwrap_or(0) as u32;
        Pool { slots: vec![None; n as usize], ranges: sizes.iter().map(|&s| 0..s as u32).collect() }
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
