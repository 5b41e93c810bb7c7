//! Decides which experts live where. Never touches a device pointer or a file, never runs a
//! kernel.
//!
//! The cache owns *residency*: which `(layer, expert)` sits in which slot, at which precision.
//! Slots are abstract indices; the engine maps a slot to device memory and moves the bytes.
//! Following house habit 4, the one decision is [`ExpertCache::plan`] (pure, `&self`) and the one
//! mutation is [`ExpertCache::apply`]; plans are plain data, logged and unit-tested on their own.
//!
//! - [`cache`]: the cache, its slot pools and the plan/apply rules.
//! - [`policy`]: eviction priorities (LRU, LFU, HOBBIT, Fate) as pure functions of the records.
//! - [`trace`]: routing traces as JSON lines, and [`profile`]: routing profiles kept across
//!   runs — the two files of this room that do file I/O; the cache and the simulator never do.
//! - [`sim`]: replays a trace through `plan`/`apply` exactly as the engine does, offline.
//!
//! Slot numbering: each precision has its own pool, numbered from 0. An action's `(slot,
//! precision)` pair addresses one buffer: slot 3 at `High` and slot 3 at `Low` are different
//! buffers. The engine allocates `n_slots(High)` buffers of `expert_bytes_high` and
//! `n_slots(Low)` of `expert_bytes_low`; the cache never asks for more.

pub mod cache;
pub mod costmodel;
pub mod policy;
pub mod profile;
pub mod sim;
pub mod trace;

pub use cache::ExpertCache;

/// One expert of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ExpertKey {
    pub layer: u16,
    pub expert: u16,
}

impl ExpertKey {
    pub fn new(layer: usize, expert: usize) -> ExpertKey {
        // Callers index within a validated config (n_layers, n_experts ≤ u16::MAX + 1).
        ExpertKey { layer: layer as u16, expert: expert as u16 }
    }
}

impl std::fmt::Display for ExpertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "L{}E{}", self.layer, self.expert)
    }
}

/// The precision of a resident copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Precision {
    High,
    Low,
}

/// A slot index within one precision's pool (see the module docs).
pub type SlotId = u32;

/// Which eviction priority the cache uses.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum, Default, serde::Serialize)]
pub enum PolicyKind {
    /// Least recently used (by plan step).
    #[default]
    Lru,
    /// Least frequently used over the cache's lifetime; ties go to the least recent.
    Lfu,
    /// HOBBIT's multidimensional priority (DESIGN §3); see [`policy::hobbit_priority`].
    Hobbit,
    /// Fate's shallow-favoring cache: the first `pinned_layers` layers are pinned, LRU for the
    /// rest (the paper uses ARC; LRU is our stand-in).
    Fate,
}

/// Equal weights for the four HOBBIT terms `(w_lru, w_lfu, w_lhu, w_fld)`.
pub const DEFAULT_HOBBIT_WEIGHTS: [f32; 4] = [0.25, 0.25, 0.25, 0.25];

/// Everything the cache needs to size its pools and choose victims.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub n_layers: usize,
    pub n_experts: usize,
    pub top_k: usize,
    /// Bytes of one expert at high precision (all experts of a model have the same size per
    /// precision; take the max).
    pub expert_bytes_high: u64,
    /// Bytes of one expert at low precision (0 = no low-precision copies).
    pub expert_bytes_low: u64,
    /// Total bytes for expert slots (high + low slots together).
    pub budget_bytes: u64,
    /// Share of the budget given to low-precision slots when expert_bytes_low > 0 and
    /// thresholds are set (e.g. 0.25). Without thresholds nothing is ever loaded at low
    /// precision, so the whole budget goes to high slots.
    pub low_share: f32,
    pub policy: PolicyKind,
    /// HOBBIT weights (w_lru, w_lfu, w_lhu, w_fld), DESIGN §3.
    pub hobbit_weights: [f32; 4],
    /// First L layers fully pinned (their experts never evicted once loaded). Honoured by
    /// every policy; `Fate` is LRU plus this.
    pub pinned_layers: usize,
    /// Give every layer its own share of slots instead of one shared pool: equal, or in
    /// proportion to `layer_weights`.
    pub per_layer: bool,
    /// With `per_layer`: each layer's relative need (a routing profile's effective number of
    /// experts per layer); every layer still gets at least top_k and at most all its experts.
    pub layer_weights: Option<Vec<f64>>,
    /// HOBBIT mixed precision thresholds (T1, T2) on cumulative normalized gate weight
    /// (None = always high).
    pub thresholds: Option<(f32, f32)>,
    /// Compute a miss where its bytes already are (the host) instead of loading it into a slot
    /// — llama.cpp's `--cpu-moe`; the planner chooses this per expert from a cost model later.
    pub host_compute: bool,
}

impl CacheConfig {
    /// A plain LRU config: one shared high-precision pool, no pinning, no thresholds.
    pub fn new(
        n_layers: usize,
        n_experts: usize,
        top_k: usize,
        expert_bytes_high: u64,
        budget_bytes: u64,
    ) -> CacheConfig {
        CacheConfig {
            n_layers,
            n_experts,
            top_k,
            expert_bytes_high,
            expert_bytes_low: 0,
            budget_bytes,
            low_share: 0.25,
            policy: PolicyKind::Lru,
            hobbit_weights: DEFAULT_HOBBIT_WEIGHTS,
            pinned_layers: 0,
            per_layer: false,
            layer_weights: None,
            thresholds: None,
            host_compute: false,
        }
    }

    /// Bytes of one expert at precision `p`.
    pub fn expert_bytes(&self, p: Precision) -> u64 {
        match p {
            Precision::High => self.expert_bytes_high,
            Precision::Low => self.expert_bytes_low,
        }
    }
}

/// Where a miss is computed instead of being loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Device {
    /// The CPU, from the host's copy (the file mapping or host RAM).
    Host,
}

/// What to do for one needed (or predicted) expert.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum Action {
    Hit {
        slot: SlotId,
        precision: Precision,
    },
    /// Load into `slot` (evicting `evict` if Some); `precision` chosen by the thresholds.
    Load {
        slot: SlotId,
        precision: Precision,
        evict: Option<ExpertKey>,
    },
    /// A predicted expert of a later layer: load it into `slot` now, ahead of need (a prefetch
    /// plan's load; never evicts an expert the current layer needs).
    Prefetch {
        slot: SlotId,
        precision: Precision,
        evict: Option<ExpertKey>,
    },
    /// Compute this miss on `Device` from where its bytes are; nothing is loaded.
    ComputeOn(Device),
    /// Too unimportant this token (cumulative gate weight above T2): skip it. Also used for
    /// inputs the cache cannot place: an expert index out of range, a duplicate in one plan,
    /// or a layer out of range; in a prefetch plan, a prediction it does not load.
    Skip,
}

/// Whether a plan serves the layer being computed or predicts a later one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum PlanKind {
    /// The experts the router chose: counted as lookups, hits and misses.
    #[default]
    Demand,
    /// Predicted experts of a later layer: loads only, counted as prefetches.
    Prefetch,
    /// Experts a routing profile says are used most, loaded at start: loads only, not counted.
    Warm,
}

/// The decisions for one token in one layer, in router rank order.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Plan {
    pub kind: PlanKind,
    pub layer: usize,
    pub token: u64,
    /// (expert, what to do, its normalized gate weight).
    pub actions: Vec<(ExpertKey, Action, f32)>,
}

impl Plan {
    /// The loads of this plan (prefetches included): (expert, slot, precision, evicted expert).
    pub fn loads(&self) -> impl Iterator<Item = (ExpertKey, SlotId, Precision, Option<ExpertKey>)> + '_ {
        self.actions.iter().filter_map(|&(k, a, _)| match a {
            Action::Load { slot, precision, evict } | Action::Prefetch { slot, precision, evict } => {
                Some((k, slot, precision, evict))
            }
            _ => None,
        })
    }
}

/// Counters over the cache's lifetime (not reset per sequence).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CacheStats {
    pub lookups: u64,
    pub hits: u64,
    pub loads_high: u64,
    pub loads_low: u64,
    pub skips: u64,
    pub evictions: u64,
    pub bytes_loaded: u64,
    /// Hits that found a low-precision copy (included in `hits`).
    pub hits_low: u64,
    pub per_layer_hits: Vec<u64>,
    pub per_layer_lookups: Vec<u64>,
    /// Misses computed where their bytes are (`Action::ComputeOn`).
    pub computed_elsewhere: u64,
    /// Experts loaded by prefetch plans, per layer.
    pub per_layer_prefetched: Vec<u64>,
    /// Prefetched experts a later demand plan hit before they were evicted, per layer.
    pub per_layer_prefetch_used: Vec<u64>,
    /// Prefetched experts evicted (or forgotten) before any demand plan used them, per layer.
    pub per_layer_prefetch_wasted: Vec<u64>,
}

impl CacheStats {
    /// Hits over lookups (skips count as lookups that did not hit); 0 with no lookups.
    pub fn hit_rate(&self) -> f64 {
        if self.lookups == 0 {
            0.0
        } else {
            self.hits as f64 / self.lookups as f64
        }
    }
}

/// A config the cache cannot honour.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CacheError {
    #[error(
        "expert cache: n_layers = {n_layers}, n_experts = {n_experts}, top_k = {top_k}: \
         each must be at least 1, top_k at most n_experts, layers and experts at most 65536 each, their product below 2^32"
    )]
    Shape { n_layers: usize, n_experts: usize, top_k: usize },
    #[error("expert cache: expert_bytes_high is 0")]
    ZeroExpertBytes,
    #[error("expert cache: low_share = {low_share} is not in [0, 1)")]
    LowShare { low_share: f32 },
    #[error("expert cache: thresholds (T1 = {t1}, T2 = {t2}) must be finite with 0 <= T1 <= T2")]
    Thresholds { t1: f32, t2: f32 },
    #[error("expert cache: HOBBIT weights {weights:?} must be finite and non-negative")]
    HobbitWeights { weights: [f32; 4] },
    #[error("expert cache: pinned_layers = {pinned_layers} exceeds n_layers = {n_layers}")]
    PinnedLayers { pinned_layers: usize, n_layers: usize },
    #[error(
        "expert cache: a budget of {budget_bytes} B leaves {high_bytes} B for high-precision \
         experts of {expert_bytes_high} B each = {have} slots, but {need} are needed ({why})"
    )]
    Budget { budget_bytes: u64, high_bytes: u64, expert_bytes_high: u64, have: u64, need: u64, why: String },
}
