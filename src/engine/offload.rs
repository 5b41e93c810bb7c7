//! The expert cache at work: routed experts live in fixed-size slots of host memory under a byte
//! budget, `experts::ExpertCache` decides hits, loads, prefetches, evictions and precision, and
//! `io::IoService` streams misses from the model file (or the low-precision sidecar) with
//! O_DIRECT while the hits compute.
//!
//! Tickets: every `fetch` and every `prefetch` is one read group (a batch per file); a slot being
//! filled is `Loading(group)`. `wait(l)` finishes only the groups layer l's plan needs, so reads
//! started for later layers never hold it up. Invariants: a slot is viewed only once the reads
//! that fill it have completed (`view` checks; nothing ever borrows the slot memory as a whole
//! while reads are in flight); a slot is never refilled while a read into it is in flight; a
//! failed read empties its slots before the error is returned.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::Backend;
use crate::experts::profile::{ProfileError, ProfileRecorder, RoutingProfile};
use crate::experts::{
    Action, CacheConfig, CacheError, ExpertCache, ExpertKey, PlanKind, PolicyKind, Precision, SlotId,
    DEFAULT_HOBBIT_WEIGHTS,
};
use crate::io::{align_extent, AlignedBuf, IoConfig, IoError, IoService, ReadOp, Ticket, Urgency};
use crate::layers::{used_experts, ExpertProvider, ExpertState, PrefetchId, Priority, ProviderError, Route};
use crate::lowprec::{LowPrecError, LowPrecSidecar};
use crate::model::{Model, WeightDesc};

/// How much memory the expert cache may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Bytes(u64),
    /// A share of the model's routed-expert bytes (0–1).
    Share(f64),
}

/// A size or budget that does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SizeError {
    #[error("bad percentage '{0}'")]
    BadPercent(String),
    #[error("percentage '{0}' must be in (0, 100]")]
    PercentRange(String),
    #[error("bad size '{0}'")]
    BadSize(String),
    #[error("unknown size unit '{unit}' in '{text}' (use KiB/MiB/GiB or KB/MB/GB)")]
    Unit { unit: String, text: String },
}

/// Parse `2GiB`, `512MB`, `1.5G`, `123456` or (for `Budget`) `25%`.
pub fn parse_budget(s: &str) -> Result<Budget, SizeError> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let v: f64 = p.trim().parse().map_err(|_| SizeError::BadPercent(s.to_string()))?;
        if !(0.0..=100.0).contains(&v) || v == 0.0 {
            return Err(SizeError::PercentRange(s.to_string()));
        }
        return Ok(Budget::Share(v / 100.0));
    }
    parse_size(t).map(Budget::Bytes)
}

/// Parse a byte size with an optional KiB/MiB/GiB (binary) or KB/MB/GB (decimal) suffix.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| SizeError::BadSize(s.to_string()))?;
    let mul: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        u => return Err(SizeError::Unit { unit: u.to_string(), text: s.to_string() }),
    };
    Ok((v * mul) as u64)
}

/// Settings of the expert cache.
#[derive(Debug, Clone)]
pub struct OffloadConfig {
    pub budget: Budget,
    pub policy: PolicyKind,
    pub pinned_layers: usize,
    pub per_layer: bool,
    pub hobbit_weights: [f32; 4],
    /// Low-precision sidecar and HOBBIT thresholds (T1, T2): mixed precision when both are set.
    pub sidecar: Option<PathBuf>,
    pub thresholds: Option<(f32, f32)>,
    pub low_share: f32,
    /// Compute misses from the file mapping instead of loading them (see `CacheConfig`).
    pub host_compute: bool,
    pub io: IoConfig,
    /// The routing profile to warm the cache from and to save this run's routing to (see
    /// `experts::profile`); `None`: none.
    pub profile: Option<PathBuf>,
    /// Write every plan's decisions with their estimated costs to this JSON-lines file.
    pub explain: Option<PathBuf>,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        OffloadConfig {
            budget: Budget::Share(1.0),
            policy: PolicyKind::Lru,
            pinned_layers: 0,
            per_layer: false,
            hobbit_weights: DEFAULT_HOBBIT_WEIGHTS,
            sidecar: None,
            thresholds: None,
            low_share: 0.25,
            host_compute: false,
            io: IoConfig::default(),
            profile: None,
            explain: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("{path}: the model has no MoE layers, so there are no experts to cache")]
    NoExperts { path: String },
    #[error("expert budget of {budget} bytes: {source}")]
    Cache { budget: u64, source: CacheError },
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    LowPrec(#[from] LowPrecError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("warming the expert cache: {0}")]
    Warm(#[from] ProviderError),
    #[error("mixed precision needs both a low-precision sidecar (--low-sidecar, made by `moerun prepare`) and thresholds (--t1/--t2)")]
    MixedPrecisionHalfSet,
}

/// Where each of an expert's three matrices sits inside a slot.
#[derive(Debug, Clone, Copy)]
struct SlotShape {
    /// Byte offset of each region (gate, up, down) in the slot; regions hold aligned reads.
    region: [usize; 3],
    /// Slot size in bytes (a multiple of 4 KiB).
    bytes: usize,
}

impl SlotShape {
    /// Regions big enough for the aligned superset of any expert's matrices in `experts`.
    fn for_experts(experts: impl Iterator<Item = [WeightDesc; 3]>) -> SlotShape {
        let mut cap = [0usize; 3];
        for ex in experts {
            for (c, w) in cap.iter_mut().zip(ex) {
                *c = (*c).max(align_extent(w.offset, w.bytes).1);
            }
        }
        SlotShape { region: [0, cap[0], cap[0] + cap[1]], bytes: cap[0] + cap[1] + cap[2] }
    }
}

/// Where a slot's bytes stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Empty,
    /// Being filled by the reads of this group.
    Loading(u64),
    /// Its reads completed.
    Ready,
}

/// One slot: what it holds (the expert's matrices and each region's padding before the data).
#[derive(Debug, Clone, Copy)]
struct Slot {
    content: Option<([WeightDesc; 3], [usize; 3])>,
    /// Which matrices the backend rearranged after landing (`Backend::prepare_host_mat`).
    prepared: [bool; 3],
    state: SlotState,
}

/// One precision's slot memory. The memory is only ever addressed slot by slot (raw pointers
/// for reads, one slot's slices for views), never borrowed as a whole.
struct Arena {
    shape: SlotShape,
    mem: AlignedBuf,
    slots: Vec<Slot>,
}

impl Arena {
    fn new(shape: SlotShape, n: usize) -> Result<Arena, IoError> {
        Ok(Arena {
            shape,
            mem: AlignedBuf::new(shape.bytes * n)?,
            slots: vec![Slot { content: None, prepared: [false; 3], state: SlotState::Empty }; n],
        })
    }

    /// The three matrices' bytes of a slot whose reads have completed (`landed` answers for a
    /// slot still marked `Loading`), and which of them were prepared.
    #[allow(clippy::type_complexity)]
    fn bytes(&self, slot: SlotId, landed: impl Fn(u64) -> bool) -> Option<([WeightDesc; 3], [&[u8]; 3], [bool; 3])> {
        let s = self.slots.get(slot as usize)?;
        match s.state {
            SlotState::Ready => {}
            SlotState::Loading(g) if landed(g) => {}
            _ => return None,
        }
        let (descs, pads) = s.content?;
        let base = slot as usize * self.shape.bytes;
        let m = |i: usize| {
            let at = base + self.shape.region[i] + pads[i];
            assert!(at + descs[i].bytes as usize <= self.mem.len(), "slot view out of bounds");
            // SAFETY: in bounds of the allocation (asserted); this slot's reads have completed
            // (state checked above, under the I/O service's lock for `landed`), no read into it
            // can start while `&self` is borrowed (loads need `&mut Offload`), and no other
            // reference covers these bytes mutably.
            unsafe { std::slice::from_raw_parts(self.mem.as_ptr().add(at), descs[i].bytes as usize) }
        };
        Some((descs, [m(0), m(1), m(2)], s.prepared))
    }
}

/// The reads of one `fetch` or one `prefetch`.
struct Group {
    /// (ticket, from the low-precision sidecar).
    tickets: Vec<(Ticket, bool)>,
    /// What the reads fill.
    keys: Vec<(ExpertKey, Precision, SlotId)>,
    prefetch: Option<PrefetchId>,
    /// A cancelled prefetch: its experts were forgotten; its slots empty once the reads end.
    cancelled: bool,
}

/// Counters a user can read (tokens/s comes from the caller's timing).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OffloadStats {
    pub hits: u64,
    pub lookups: u64,
    pub hit_rate: f64,
    pub loads_high: u64,
    pub loads_low: u64,
    pub skips: u64,
    /// Misses computed from the host's copy instead of being loaded.
    pub computed_on_host: u64,
    pub bytes_read_high: u64,
    pub bytes_read_low: u64,
    /// Bytes read for prefetches (included in the two above).
    pub bytes_prefetched: u64,
    /// Bytes read at start to warm the cache from a routing profile (included above too).
    pub bytes_warmed: u64,
    /// Seconds the forward pass waited for reads.
    pub stall_s: f64,
    /// Milliseconds one-token passes (decode) waited for reads, per such pass.
    pub stall_ms_per_token: f64,
    /// One-token passes served.
    pub decode_tokens: u64,
    pub io_busy_s: f64,
    pub per_layer_hit_rate: Vec<f64>,
    /// Per layer: experts prefetched, prefetched ones used by a later plan, and ones evicted or
    /// cancelled unused.
    pub per_layer_prefetched: Vec<u64>,
    pub per_layer_prefetch_used: Vec<u64>,
    pub per_layer_prefetch_wasted: Vec<u64>,
    pub slots_high: usize,
    pub slots_low: usize,
    pub budget_bytes: u64,
    /// The expert predictor's figures when one runs (`Engine::offload_stats` fills them in).
    pub predictor: Option<crate::predict::PredictStats>,
}

/// What the current layer's plan decided for one expert.
#[derive(Debug, Clone, Copy)]
enum Decision {
    At(Precision, SlotId),
    /// Computed from the file mapping.
    Host,
    Skip,
}

/// The expert cache as an [`ExpertProvider`] for any backend that can view host memory.
pub struct Offload {
    model: Arc<Model>,
    cache: ExpertCache,
    // Fields drop in declaration order: the I/O services first, since dropping one drains its
    // reads in flight, which write into the arenas' memory (a cancelled prefetch may still be
    // landing when the provider goes).
    io_high: IoService,
    io_low: Option<IoService>,
    high: Arena,
    low: Option<(Arena, LowPrecSidecar)>,
    /// The layer of the last `fetch` and its plan's decisions.
    layer: usize,
    decisions: Vec<(u16, Decision)>,
    groups: HashMap<u64, Group>,
    next_group: u64,
    next_prefetch: u64,
    step: u64,
    stall_s: f64,
    /// Tokens in the current pass (1: decode), and decode's stall and passes.
    batch: usize,
    /// Live load figures for the prefetch cost model: when the last pass began (with the I/O
    /// busy time, hits and lookups then), and the recent disk utilization and hit rate.
    pass_mark: Option<(Instant, f64, u64, u64)>,
    utilization: f64,
    recent_hit_rate: f64,
    decode_stall_s: f64,
    decode_tokens: u64,
    bytes_high: u64,
    bytes_low: u64,
    bytes_prefetched: u64,
    bytes_warmed: u64,
    /// This run's routing, counted on top of the profile it started from, and where it goes.
    profile: Option<(ProfileRecorder, PathBuf)>,
    explain: Option<Explain>,
    /// The predictor's side of the next prefetch's explanation (bar, confidences).
    pending_explain: Option<serde_json::Value>,
    /// The backend's rearrangement of landed experts (`attach`), run on the I/O thread as each
    /// read group completes, before it counts as landed.
    prep: Option<Prep>,
    /// Experts a routing profile asked to warm, loaded once the backend is known.
    pending_warm: Option<Vec<(usize, Vec<u16>)>>,
}

/// A backend's way of holding experts in host memory (see `Backend::prepares_host_mat`).
#[derive(Clone, Copy)]
struct Prep {
    will: fn(&WeightDesc) -> bool,
    run: fn(&WeightDesc, &mut [u8]),
}

/// One matrix a read group rearranges when it lands: where its bytes start, and what it is.
struct PrepJob {
    at: *mut u8,
    desc: WeightDesc,
    run: fn(&WeightDesc, &mut [u8]),
}

// SAFETY: a PrepJob points into a slot being filled by its group's reads; it is used only by
// that group's completion step on the I/O thread, after the reads and before anyone may view
// or refill the slot (the slot stays `Loading` until the group is finished).
unsafe impl Send for PrepJob {}

/// `--explain-plan`: one JSON line per plan (and per wait), written as they happen.
struct Explain {
    out: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    failed: bool,
}

impl Explain {
    fn line(&mut self, v: serde_json::Value) {
        if self.failed {
            return;
        }
        if let Err(e) = serde_json::to_writer(&mut self.out, &v).map_err(std::io::Error::other).and_then(|_| {
            use std::io::Write;
            self.out.write_all(b"\n")
        }) {
            tracing::warn!("{}: cannot write the plan explanation: {e}", self.path.display());
            self.failed = true;
        }
    }
}

impl Offload {
    /// Forgets the last plan's decisions, first dropping the pages of the experts it computed
    /// from the file mapping out of this process (they stay in the page cache): computing on
    /// the host must not grow the resident memory past the budget. No view is alive here (the
    /// callers hold `&mut self`).
    fn release_host(&mut self) {
        for &(e, d) in &self.decisions {
            if let (Decision::Host, Some(ex)) = (d, self.model.experts(self.layer).and_then(|x| x.get(e as usize))) {
                for w in [ex.gate, ex.up, ex.down] {
                    self.model.file.release(w.offset, w.bytes);
                }
            }
        }
        self.decisions.clear();
    }

    pub fn new(model: Arc<Model>, cfg: &OffloadConfig) -> Result<Offload, OffloadError> {
        let hp = &model.hp;
        let path = model.file.path().to_path_buf();
        let moe_layers: Vec<usize> = (0..hp.n_layer).filter(|&l| model.experts(l).is_some()).collect();
        if moe_layers.is_empty() {
            return Err(OffloadError::NoExperts { path: path.display().to_string() });
        }
        let high_shape = SlotShape::for_experts(
            moe_layers.iter().flat_map(|&l| model.experts(l).into_iter().flatten().map(|e| [e.gate, e.up, e.down])),
        );
        let sidecar = match (&cfg.sidecar, cfg.thresholds) {
            (Some(p), Some(_)) => Some(LowPrecSidecar::open(p, &model)?),
            (None, None) => None,
            _ => return Err(OffloadError::MixedPrecisionHalfSet),
        };
        let low_shape = sidecar.as_ref().map(|sc| {
            SlotShape::for_experts(moe_layers.iter().flat_map(|&l| (0..hp.n_expert).map(move |e| sc.expert(l, e))))
        });
        let budget = match cfg.budget {
            Budget::Bytes(b) => b,
            // That share of all experts, counted in slots (a slot holds one expert's aligned reads).
            Budget::Share(f) => ((moe_layers.len() * hp.n_expert) as f64 * f).round() as u64 * high_shape.bytes as u64,
        };
        // This model's routing profile, if one is kept and matches: it warms the cache below and
        // sets per-layer shares.
        let profile = cfg.profile.as_deref().map(|p| {
            let id = profile_identity(&model);
            let saved = matching_profile(p, &model, &id);
            (p, id, saved)
        });
        // Every MoE layer needs slots (at least top_k, whatever the profile saw); dense ones none.
        let layer_weights = profile.as_ref().and_then(|(_, _, p)| p.as_ref()).map(|p| {
            let eff = p.effective_experts();
            (0..hp.n_layer).map(|l| if model.experts(l).is_some() { eff[l].max(1.0) } else { 0.0 }).collect()
        });
        let cache_cfg = CacheConfig {
            layer_weights,
            n_layers: hp.n_layer,
            n_experts: hp.n_expert,
            top_k: hp.n_expert_used,
            expert_bytes_high: high_shape.bytes as u64,
            expert_bytes_low: low_shape.map(|s| s.bytes as u64).unwrap_or(0),
            budget_bytes: budget,
            low_share: cfg.low_share,
            policy: cfg.policy,
            hobbit_weights: cfg.hobbit_weights,
            pinned_layers: cfg.pinned_layers,
            per_layer: cfg.per_layer,
            thresholds: cfg.thresholds,
            host_compute: cfg.host_compute,
        };
        let cache = ExpertCache::new(cache_cfg).map_err(|source| OffloadError::Cache { budget, source })?;
        let high = Arena::new(high_shape, cache.n_slots(Precision::High))?;
        let io_high = IoService::open(&path, cfg.io.clone())?;
        let (low, io_low) = match (sidecar, low_shape) {
            (Some(sc), Some(shape)) => {
                let io = IoService::open(sc.path(), cfg.io.clone())?;
                (Some((Arena::new(shape, cache.n_slots(Precision::Low))?, sc)), Some(io))
            }
            _ => (None, None),
        };
        tracing::info!(
            "expert cache: {} high slots of {:.2} MiB{}, {:?}, reads via {:?}{}",
            cache.n_slots(Precision::High),
            high_shape.bytes as f64 / 1048576.0,
            low.as_ref()
                .map(|(a, _)| format!(" + {} low slots of {:.2} MiB", a.slots.len(), a.shape.bytes as f64 / 1048576.0))
                .unwrap_or_default(),
            cfg.policy,
            io_high.backend(),
            if io_high.direct() { " with O_DIRECT" } else { "" }
        );
        let mut off = Offload {
            model,
            cache,
            high,
            low,
            io_high,
            io_low,
            layer: usize::MAX,
            decisions: Vec::new(),
            groups: HashMap::new(),
            next_group: 0,
            next_prefetch: 0,
            step: 0,
            stall_s: 0.0,
            batch: 0,
            pass_mark: None,
            utilization: 0.0,
            recent_hit_rate: 0.0,
            decode_stall_s: 0.0,
            decode_tokens: 0,
            bytes_high: 0,
            bytes_low: 0,
            bytes_prefetched: 0,
            bytes_warmed: 0,
            profile: None,
            explain: None,
            pending_explain: None,
            prep: None,
            pending_warm: None,
        };
        if let Some(p) = &cfg.explain {
            let f = std::fs::File::create(p).map_err(|source| IoError::Open { path: p.clone(), source })?;
            off.explain = Some(Explain { out: std::io::BufWriter::new(f), path: p.clone(), failed: false });
        }
        if let Some((path, id, saved)) = profile {
            off.start_profile(path, id, saved)?;
        }
        Ok(off)
    }

    /// Warm the cache with the most used experts of `saved` (this model's profile, if any) and
    /// record this run's routing into it (a new profile for the model of identity `id` when there
    /// is none), to be saved at `path`.
    fn start_profile(
        &mut self,
        path: &Path,
        (fp, size): (String, u64),
        saved: Option<RoutingProfile>,
    ) -> Result<(), OffloadError> {
        let profile = match saved {
            Some(p) => {
                let hot = p.hottest(self.cache.n_slots(Precision::High));
                // Loaded once the backend is known (`attach`), so they land prepared for it.
                self.pending_warm = Some(hot.clone());
                tracing::info!(
                    "routing profile {}: {} tokens seen; warming {} experts",
                    path.display(),
                    p.tokens,
                    hot.iter().map(|(_, e)| e.len()).sum::<usize>()
                );
                p
            }
            None => {
                let m = &self.model;
                let name = m.file.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                RoutingProfile::new(name, fp, size, m.hp.n_layer, m.hp.n_expert)
            }
        };
        self.profile = Some((ProfileRecorder::new(profile), path.to_path_buf()));
        Ok(())
    }

    /// The host memory the cache's slots live in, as (address, length) per arena: a backend
    /// that reads host memory in place (unified memory) registers it once
    /// (`Backend::use_host_memory`). Raw ranges, never slices: reads write into them.
    pub fn host_regions(&self) -> Vec<(*const u8, usize)> {
        let mut r = vec![(self.high.mem.as_ptr(), self.high.mem.len())];
        if let Some((a, _)) = &self.low {
            r.push((a.mem.as_ptr(), a.mem.len()));
        }
        r
    }

    /// Learn how backend `B` holds experts (so landed slots are rearranged as its resident
    /// copies are) and start the warm-up reads a routing profile asked for. Idempotent; the
    /// engine calls it when the cache is put on it, and every provider call makes sure.
    pub fn attach<B: Backend>(&mut self) {
        if self.prep.is_some() {
            return;
        }
        self.prep = Some(Prep { will: B::prepares_host_mat, run: B::prepare_host_mat });
        if let Some(hot) = self.pending_warm.take() {
            if let Err(e) = self.warm(&hot) {
                tracing::warn!("warming the expert cache: {e}");
            }
        }
    }

    /// Start loading `experts` (per layer) into free slots, in the background: demand reads
    /// jump ahead of them, and a layer that needs one waits only for its own read.
    pub fn warm(&mut self, experts: &[(usize, Vec<u16>)]) -> Result<(), ProviderError> {
        for (l, ex) in experts {
            if self.model.experts(*l).is_none() {
                continue;
            }
            let plan = self.cache.plan_warm(*l, self.step, ex);
            self.check_plan(&plan)?;
            self.cache.apply(&plan);
            let id = self.new_prefetch_id();
            let before = self.bytes_high + self.bytes_low;
            self.issue(&plan, Some(id), Urgency::Background)?;
            self.bytes_warmed += self.bytes_high + self.bytes_low - before;
        }
        Ok(())
    }

    /// Save the routing profile (with this run's counts), if one is kept; atomically.
    pub fn save_profile(&mut self) -> Result<(), ProfileError> {
        match &mut self.profile {
            Some((rec, path)) if rec.dirty() => rec.save(path),
            _ => Ok(()),
        }
    }

    pub fn stats(&self) -> OffloadStats {
        let c = self.cache.stats();
        let per_layer_hit_rate = c
            .per_layer_hits
            .iter()
            .zip(&c.per_layer_lookups)
            .map(|(&h, &n)| if n == 0 { 0.0 } else { h as f64 / n as f64 })
            .collect();
        OffloadStats {
            hits: c.hits,
            lookups: c.lookups,
            hit_rate: c.hit_rate(),
            loads_high: c.loads_high,
            loads_low: c.loads_low,
            skips: c.skips,
            computed_on_host: c.computed_elsewhere,
            bytes_read_high: self.bytes_high,
            bytes_read_low: self.bytes_low,
            bytes_prefetched: self.bytes_prefetched,
            bytes_warmed: self.bytes_warmed,
            stall_s: self.stall_s,
            stall_ms_per_token: if self.decode_tokens == 0 {
                0.0
            } else {
                1000.0 * self.decode_stall_s / self.decode_tokens as f64
            },
            decode_tokens: self.decode_tokens,
            io_busy_s: self.io_high.stats().busy_s + self.io_low.as_ref().map(|i| i.stats().busy_s).unwrap_or(0.0),
            per_layer_hit_rate,
            per_layer_prefetched: c.per_layer_prefetched.clone(),
            per_layer_prefetch_used: c.per_layer_prefetch_used.clone(),
            per_layer_prefetch_wasted: c.per_layer_prefetch_wasted.clone(),
            slots_high: self.cache.n_slots(Precision::High),
            slots_low: self.cache.n_slots(Precision::Low),
            budget_bytes: self.cache.config().budget_bytes,
            predictor: None,
        }
    }

    /// Bytes read for prefetched experts that left the cache (or were cancelled) unused.
    pub fn wasted_prefetch_bytes(&self) -> u64 {
        let n: u64 = self.cache.stats().per_layer_prefetch_wasted.iter().sum();
        n * self.high.shape.bytes as u64
    }

    /// A forward pass begins: fold the last pass's disk utilization and hit rate into the
    /// running figures (exponentially weighted, about the last ten passes).
    fn mark_pass(&mut self) {
        let busy = self.io_high.stats().busy_s + self.io_low.as_ref().map_or(0.0, |i| i.stats().busy_s);
        let (hits, lookups) = (self.cache.stats().hits, self.cache.stats().lookups);
        let now = Instant::now();
        if let Some((t, b, h, n)) = self.pass_mark {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.0 && lookups > n {
                let a = 0.1;
                let rho = ((busy - b) / dt).clamp(0.0, 1.0);
                self.utilization += a * (rho - self.utilization);
                self.recent_hit_rate += a * ((hits - h) as f64 / (lookups - n) as f64 - self.recent_hit_rate);
            }
        }
        self.pass_mark = Some((now, busy, hits, lookups));
    }

    /// Live read rate (bytes per busy second) of the model file, if anything was read yet.
    fn read_rate(&self) -> Option<f64> {
        let st = self.io_high.stats();
        (st.busy_s > 0.0 && st.bytes > 0).then(|| st.bytes as f64 / st.busy_s)
    }

    /// One plan's decisions for `--explain-plan`, with each load's estimated read time.
    fn explain_plan(&mut self, plan: &crate::experts::Plan, extra: serde_json::Value) {
        if self.explain.is_none() {
            return;
        }
        let rate = self.read_rate();
        let bytes = self.high.shape.bytes as f64;
        let read_ms = |p: Precision| {
            let b = match p {
                Precision::High => bytes,
                Precision::Low => self.low.as_ref().map_or(bytes, |(a, _)| a.shape.bytes as f64),
            };
            rate.map(|r| 1000.0 * b / r)
        };
        let actions: Vec<serde_json::Value> = plan
            .actions
            .iter()
            .map(|&(key, a, w)| {
                let (what, precision, evict, est) = match a {
                    Action::Hit { precision, .. } => ("hit", Some(precision), None, None),
                    Action::Load { precision, evict, .. } => ("load", Some(precision), evict, read_ms(precision)),
                    Action::Prefetch { precision, evict, .. } => {
                        ("prefetch", Some(precision), evict, read_ms(precision))
                    }
                    Action::ComputeOn(_) => ("compute_on_host", None, None, None),
                    Action::Skip => ("skip", None, None, None),
                };
                serde_json::json!({"expert": key.expert, "weight": w, "action": what, "precision": precision,
                    "evicts": evict.map(|k| k.to_string()), "est_read_ms": est})
            })
            .collect();
        let mut v = serde_json::json!({"pass": self.step, "layer": plan.layer, "kind": plan.kind, "actions": actions,
            "disk_utilization": self.utilization, "recent_hit_rate": self.recent_hit_rate,
            "read_gb_s": rate.map(|r| r / 1e9)});
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        if let Some(x) = &mut self.explain {
            x.line(v);
        }
    }

    /// Count time the forward pass waited for reads.
    fn stalled(&mut self, t0: Instant) {
        let dt = t0.elapsed().as_secs_f64();
        self.stall_s += dt;
        if self.batch == 1 {
            self.decode_stall_s += dt;
        }
    }

    /// Bytes of slot memory held.
    pub fn slot_bytes(&self) -> u64 {
        self.high.mem.len() as u64 + self.low.as_ref().map(|(a, _)| a.mem.len() as u64).unwrap_or(0)
    }

    /// Start of a new sequence (HOBBIT resets its per-sequence records).
    pub fn reset_sequence(&mut self) {
        self.cache.reset_sequence();
    }

    fn arena(&self, p: Precision) -> Option<&Arena> {
        match p {
            Precision::High => Some(&self.high),
            Precision::Low => self.low.as_ref().map(|(a, _)| a),
        }
    }

    fn arena_mut(&mut self, p: Precision) -> Option<&mut Arena> {
        match p {
            Precision::High => Some(&mut self.high),
            Precision::Low => self.low.as_mut().map(|(a, _)| a),
        }
    }

    fn io(&self, low: bool) -> Option<&IoService> {
        if low {
            self.io_low.as_ref()
        } else {
            Some(&self.io_high)
        }
    }

    /// Whether group `g`'s reads are all done: `None` while any is in flight (or the group is
    /// unknown), else whether they all succeeded. Never blocks.
    fn group_done(&self, g: u64) -> Option<bool> {
        let grp = self.groups.get(&g)?;
        let mut ok = true;
        for &(t, low) in &grp.tickets {
            ok &= self.io(low).and_then(|io| io.finished(t))?;
        }
        Some(ok)
    }

    /// Whether every read of group `g` has completed successfully.
    fn landed(&self, g: u64) -> bool {
        self.group_done(g) == Some(true)
    }

    fn slot_state(&self, p: Precision, slot: SlotId) -> Option<SlotState> {
        self.arena(p)?.slots.get(slot as usize).map(|s| s.state)
    }

    fn decision(&self, l: usize, e: u16) -> Option<Decision> {
        if l != self.layer {
            return None;
        }
        self.decisions.iter().find(|(x, _)| *x == e).map(|&(_, d)| d)
    }

    /// Where expert `e` of layer `l` is: this layer's decision, else the cache's residency.
    fn place(&self, l: usize, e: u16) -> Option<Decision> {
        self.decision(l, e)
            .or_else(|| self.cache.lookup(ExpertKey::new(l, e as usize)).map(|(s, p)| Decision::At(p, s)))
    }

    /// End group `g` (waiting for its reads when `block`; else only if they are all done): its
    /// slots become `Ready`, or `Empty` where it was cancelled, its expert was evicted meanwhile,
    /// or a read failed (the cache forgets those experts). Returns the first read error.
    fn finish_group(&mut self, g: u64, block: bool) -> Result<(), ProviderError> {
        if !block && self.group_done(g).is_none() {
            return Ok(());
        }
        let Some(grp) = self.groups.remove(&g) else { return Ok(()) };
        let mut first_err: Option<IoError> = None;
        let mut dropped = false;
        for &(t, low) in &grp.tickets {
            match self.io(low).map(|io| io.wait(t)) {
                // Our own cancel: the slots empty, nothing failed.
                Some(Err(IoError::Cancelled { .. })) => dropped = true,
                Some(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                _ => {}
            }
        }
        for &(key, p, slot) in &grp.keys {
            let still_ours = !grp.cancelled && self.cache.lookup(key) == Some((slot, p));
            if first_err.is_some() && still_ours {
                self.cache.invalidate(key);
            }
            let ok = first_err.is_none() && !dropped && still_ours;
            if dropped && still_ours {
                self.cache.invalidate(key);
            }
            if let Some(s) = self.arena_mut(p).and_then(|a| a.slots.get_mut(slot as usize)) {
                if s.state == SlotState::Loading(g) {
                    s.state = if ok { SlotState::Ready } else { SlotState::Empty };
                    if !ok {
                        s.content = None;
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(ProviderError::Io(e)),
            None => Ok(()),
        }
    }

    /// End every group whose reads are all done, without blocking. A failed prefetch only
    /// forgets its experts (a later demand read reports a persistent failure).
    fn sweep(&mut self) {
        let ids: Vec<u64> = self.groups.keys().copied().collect();
        for g in ids {
            if let Err(e) = self.finish_group(g, false) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Queue the three reads filling `slot` with `key` at precision `p`, for group `g`.
    fn load_ops(
        &mut self,
        key: ExpertKey,
        p: Precision,
        slot: SlotId,
        g: u64,
        ops: &mut Vec<ReadOp>,
        preps: &mut Vec<PrepJob>,
    ) -> Result<(), ProviderError> {
        let (l, e) = (key.layer as usize, key.expert as usize);
        let prep = self.prep;
        let descs = match (p, &self.low) {
            (Precision::High, _) => {
                let ex = &self.model.experts(l).expect("plans name MoE layers only")[e];
                [ex.gate, ex.up, ex.down]
            }
            (Precision::Low, Some((_, sc))) => sc.expert(l, e),
            (Precision::Low, None) => return Err(ProviderError::NoSidecar { layer: l, expert: key.expert }),
        };
        let arena = self.arena_mut(p).ok_or(ProviderError::NoSidecar { layer: l, expert: key.expert })?;
        let base = slot as usize * arena.shape.bytes;
        let mut pads = [0usize; 3];
        let mut prepared = [false; 3];
        let mut bytes = 0u64;
        for i in 0..3 {
            let (off, len, pad) = align_extent(descs[i].offset, descs[i].bytes);
            pads[i] = pad;
            let at = base + arena.shape.region[i];
            // The region was sized for the largest aligned extent, so this stays in the slot.
            assert!(at + len <= arena.mem.len(), "slot region out of bounds");
            // SAFETY: in bounds (asserted); only a pointer is formed, no reference to the memory.
            let dst = unsafe { arena.mem.as_mut_ptr().add(at) };
            ops.push(ReadOp { file_offset: off, len, dst });
            bytes += len as u64;
            if let Some(pr) = prep.filter(|pr| (pr.will)(&descs[i])) {
                // pad + the weight's bytes lie inside the aligned extent read just above.
                preps.push(PrepJob { at: dst.wrapping_add(pad), desc: descs[i], run: pr.run });
                prepared[i] = true;
            }
        }
        arena.slots[slot as usize] = Slot { content: Some((descs, pads)), prepared, state: SlotState::Loading(g) };
        match p {
            Precision::High => self.bytes_high += bytes,
            Precision::Low => self.bytes_low += bytes,
        }
        Ok(())
    }

    /// Make sure no read is still filling any slot `plan` loads into (a cancelled or evicted
    /// prefetch's): wait for those reads, whose content is being replaced anyway.
    fn drain_targets(&mut self, plan: &crate::experts::Plan) {
        let busy: Vec<u64> = plan
            .loads()
            .filter_map(|(_, slot, p, _)| match self.slot_state(p, slot) {
                Some(SlotState::Loading(g)) => Some(g),
                _ => None,
            })
            .collect();
        for g in busy {
            let t0 = Instant::now();
            if let Err(e) = self.finish_group(g, true) {
                tracing::warn!("{e}");
            }
            self.stalled(t0);
        }
    }

    /// Refuse a plan whose loads this cache cannot carry out, before it is applied (low
    /// precision without a sidecar: the cache never plans that, but a half-applied plan would
    /// leave experts the cache thinks resident and no read filling them).
    fn check_plan(&self, plan: &crate::experts::Plan) -> Result<(), ProviderError> {
        match plan.loads().find(|&(_, _, p, _)| p == Precision::Low && self.low.is_none()) {
            Some((key, ..)) => Err(ProviderError::NoSidecar { layer: key.layer as usize, expert: key.expert }),
            None => Ok(()),
        }
    }

    /// Issue each of `plan`'s loads as its own read group (so each lands, and can be dropped,
    /// alone); on failure, the position among the loads of the one that failed.
    fn issue_each(
        &mut self,
        plan: &crate::experts::Plan,
        prefetch: Option<PrefetchId>,
        urgency: Urgency,
    ) -> Result<(), (usize, ProviderError)> {
        let loads = plan.actions.iter().filter(|a| matches!(a.1, Action::Load { .. } | Action::Prefetch { .. }));
        for (i, &action) in loads.enumerate() {
            let one =
                crate::experts::Plan { kind: plan.kind, layer: plan.layer, token: plan.token, actions: vec![action] };
            self.issue(&one, prefetch, urgency).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    fn new_prefetch_id(&mut self) -> PrefetchId {
        self.next_prefetch += 1;
        PrefetchId(self.next_prefetch - 1)
    }

    /// Issue the reads of `plan`'s loads as one group; returns its id (None if nothing to read).
    fn issue(
        &mut self,
        plan: &crate::experts::Plan,
        prefetch: Option<PrefetchId>,
        urgency: Urgency,
    ) -> Result<Option<u64>, ProviderError> {
        let g = self.next_group;
        let (mut ops_high, mut ops_low, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        let (mut prep_high, mut prep_low) = (Vec::new(), Vec::new());
        for (key, slot, p, _) in plan.loads() {
            let (ops, preps) =
                if p == Precision::High { (&mut ops_high, &mut prep_high) } else { (&mut ops_low, &mut prep_low) };
            self.load_ops(key, p, slot, g, ops, preps)?;
            keys.push((key, p, slot));
        }
        if keys.is_empty() {
            return Ok(None);
        }
        self.next_group += 1;
        let mut tickets = Vec::new();
        for (ops, preps, low) in [(ops_high, prep_high, false), (ops_low, prep_low, true)] {
            if ops.is_empty() {
                continue;
            }
            // The backend's rearrangement runs on the I/O thread as the reads complete.
            let then: Option<Box<dyn FnOnce() + Send>> = (!preps.is_empty()).then(|| {
                Box::new(move || {
                    for j in preps {
                        // SAFETY: see `PrepJob`: the reads into these bytes have completed, the
                        // batch is not finished yet, so nobody else touches them.
                        let bytes = unsafe { std::slice::from_raw_parts_mut(j.at, j.desc.bytes as usize) };
                        (j.run)(&j.desc, bytes);
                    }
                }) as Box<dyn FnOnce() + Send>
            });
            if prefetch.is_some() && plan.kind == PlanKind::Prefetch {
                self.bytes_prefetched += ops.iter().map(|o| o.len as u64).sum::<u64>();
            }
            let io = self.io(low).ok_or(ProviderError::NoSidecar { layer: plan.layer, expert: keys[0].0.expert })?;
            // SAFETY: every op writes inside one slot's region of its arena, which lives as long
            // as `self` (and the IoService, whose Drop waits for in-flight reads, is dropped
            // with it); those slots are `Loading(g)`: nothing views them and nothing refills
            // them until the reads are done (`finish_group`).
            tickets.push((unsafe { io.submit_then(ops, urgency, then) }, low));
        }
        self.groups.insert(g, Group { tickets, keys, prefetch, cancelled: false });
        Ok(Some(g))
    }
}

impl<B: Backend> ExpertProvider<B> for Offload {
    fn schedule(&mut self, l: usize, routes: &[Route]) -> Vec<Vec<u16>> {
        if l == 0 || self.layer > l {
            self.step += 1;
            self.batch = routes.len();
            self.mark_pass();
            if routes.len() == 1 {
                self.decode_tokens += 1;
            }
        }
        if let Some((rec, _)) = &mut self.profile {
            rec.record(l, routes);
        }
        let mut used = used_experts(routes);
        if routes.len() > 1 {
            // A batch: the experts most tokens share load (and compute) first.
            let count = |e: u16| routes.iter().filter(|r| r.experts.contains(&(e as u32))).count();
            used.sort_by_cached_key(|&e| std::cmp::Reverse(count(e)));
        }
        // A wave must fit the slots this layer may use (never fewer than top-k: checked at start).
        let cap = self.cache.layer_slots(l, Precision::High).len().max(1);
        used.chunks(cap).map(|c| c.to_vec()).collect()
    }

    fn fetch(&mut self, l: usize, wave: &[u16], routes: &[Route]) -> Result<(), ProviderError> {
        self.attach::<B>();
        self.sweep();
        // The last plan (of `self.layer`) is done with: its host experts' pages go back.
        self.release_host();
        self.layer = l;
        // One token: its experts in rank order with their gate weights, so HOBBIT's thresholds
        // apply. A batch (prefill): the wave at weight 0, i.e. all high precision, none skipped.
        let needed: Vec<(u16, f32)> = match routes {
            [r] => r
                .experts
                .iter()
                .zip(&r.weights)
                .map(|(&e, &w)| (e as u16, w))
                .filter(|(e, _)| wave.contains(e))
                .collect(),
            _ => wave.iter().map(|&e| (e, 0.0)).collect(),
        };
        let plan = self.cache.plan(l, self.step, &needed);
        self.check_plan(&plan)?;
        self.drain_targets(&plan);
        self.cache.apply(&plan);
        for &(key, action, _) in &plan.actions {
            let d = match action {
                Action::Hit { slot, precision } | Action::Load { slot, precision, .. } => Decision::At(precision, slot),
                Action::ComputeOn(_) => Decision::Host,
                Action::Skip | Action::Prefetch { .. } => Decision::Skip,
            };
            self.decisions.push((key.expert, d));
        }
        self.explain_plan(&plan, serde_json::json!({"tokens": routes.len()}));
        if routes.len() > 1 {
            // A batch: one read group per expert, so each computes as soon as it lands.
            self.issue_each(&plan, None, Urgency::Urgent).map_err(|(_, e)| e)?;
        } else {
            self.issue(&plan, None, Urgency::Urgent)?;
        }
        self.promote_needed();
        Ok(())
    }

    fn wait(&mut self, l: usize) -> Result<(), ProviderError> {
        self.attach::<B>();
        let t0 = Instant::now();
        // The read groups still filling the slots of layer l's decisions (its own loads, and
        // prefetches of experts it hit); nothing else.
        let mut needed: Vec<u64> = Vec::new();
        if l == self.layer {
            for &(_, d) in &self.decisions {
                if let Decision::At(p, slot) = d {
                    if let Some(SlotState::Loading(g)) = self.slot_state(p, slot) {
                        if !needed.contains(&g) {
                            needed.push(g);
                        }
                    }
                }
            }
        }
        let mut first_err = None;
        for g in needed {
            if let Err(e) = self.finish_group(g, true) {
                first_err.get_or_insert(e);
            }
        }
        self.stalled(t0);
        if let Some(x) = &mut self.explain {
            x.line(serde_json::json!({"pass": self.step, "layer": l, "kind": "Wait",
                "stall_ms": 1000.0 * t0.elapsed().as_secs_f64()}));
        }
        match first_err {
            Some(e) => {
                // The failed loads' slots are empty; nothing of this plan is viewed any more.
                self.release_host();
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn wait_for(&mut self, l: usize, e: u16) -> Result<(), ProviderError> {
        self.attach::<B>();
        let group = match self.decision(l, e) {
            Some(Decision::At(p, slot)) => match self.slot_state(p, slot) {
                Some(SlotState::Loading(g)) => g,
                _ => return Ok(()),
            },
            _ => return Ok(()),
        };
        let t0 = Instant::now();
        let r = self.finish_group(group, true);
        self.stalled(t0);
        if r.is_err() {
            // The failed loads' slots are empty; nothing of this plan is viewed any more.
            self.release_host();
        }
        r
    }

    fn state(&self, l: usize, e: u16) -> ExpertState {
        match self.place(l, e) {
            None => ExpertState::Absent,
            Some(Decision::Skip) => ExpertState::Skipped,
            Some(Decision::Host) => ExpertState::Ready,
            Some(Decision::At(p, slot)) => match self.slot_state(p, slot) {
                Some(SlotState::Ready) => ExpertState::Ready,
                Some(SlotState::Loading(g)) if self.landed(g) => ExpertState::Ready,
                Some(SlotState::Loading(_)) => ExpertState::Loading,
                _ => ExpertState::Absent,
            },
        }
    }

    fn view(&self, l: usize, e: u16) -> Option<[B::Mat<'_>; 3]> {
        let (descs, bytes) = match self.place(l, e)? {
            Decision::Skip => return None,
            Decision::Host => {
                let ex = self.model.experts(l)?.get(e as usize)?;
                let descs = [ex.gate, ex.up, ex.down];
                (descs, descs.map(|w| self.model.bytes_of(&w)))
            }
            Decision::At(p, slot) => {
                let (descs, bytes, prepared) = self.arena(p)?.bytes(slot, |g| self.landed(g))?;
                let m = |i: usize| match prepared[i] {
                    true => B::host_mat_prepared(&descs[i], bytes[i]),
                    false => B::host_mat(&descs[i], bytes[i]),
                };
                return Some([m(0), m(1), m(2)]);
            }
        };
        Some([B::host_mat(&descs[0], bytes[0]), B::host_mat(&descs[1], bytes[1]), B::host_mat(&descs[2], bytes[2])])
    }

    fn prefetch(&mut self, l: usize, experts: &[(u16, f32)], priority: Priority) -> Result<PrefetchId, ProviderError> {
        self.attach::<B>();
        self.sweep();
        // Never evict what the current layer uses or what is still being read.
        let mut protect: Vec<ExpertKey> = self
            .decisions
            .iter()
            .filter(|(_, d)| matches!(d, Decision::At(..)))
            .map(|&(e, _)| ExpertKey::new(self.layer, e as usize))
            .collect();
        protect.extend(self.groups.values().flat_map(|g| g.keys.iter().map(|k| k.0)));
        let mut plan = self.cache.plan_prefetch(l, self.step, experts, &protect);
        debug_assert_eq!(plan.kind, PlanKind::Prefetch);
        // A free slot whose last read (a cancelled prefetch) is still running is not worth a wait.
        for a in &mut plan.actions {
            if let Action::Prefetch { slot, precision, .. } = a.1 {
                if matches!(self.slot_state(precision, slot), Some(SlotState::Loading(_))) {
                    a.1 = Action::Skip;
                }
            }
        }
        self.check_plan(&plan)?;
        let extra = self.pending_explain.take().unwrap_or(serde_json::Value::Null);
        self.explain_plan(&plan, extra);
        self.cache.apply(&plan);
        let id = self.new_prefetch_id();
        let urgency = if priority == Priority::Demand { Urgency::Urgent } else { Urgency::Background };
        // One read group per expert, so a prediction that dies is dropped alone.
        if let Err((i, e)) = self.issue_each(&plan, Some(id), urgency) {
            // The rest of this plan was applied: forget it, nothing reads into it.
            for (key, slot, precision, _) in plan.loads().skip(i) {
                if self.cache.lookup(key) == Some((slot, precision)) {
                    self.cache.invalidate(key);
                }
            }
            return Err(e);
        }
        Ok(id)
    }

    fn cancel(&mut self, id: PrefetchId) {
        self.drop_prefetch(id, None);
    }

    fn predicted(
        &mut self,
        l: usize,
        candidates: &[crate::layers::Candidate],
    ) -> Result<Option<(PrefetchId, Vec<u16>)>, ProviderError> {
        let bar = <Offload as ExpertProvider<B>>::prefetch_bar(self);
        let take = crate::layers::confident(candidates, bar);
        if self.explain.is_some() {
            let below: Vec<serde_json::Value> = candidates
                .iter()
                .filter(|c| c.confidence < bar)
                .map(|c| serde_json::json!({"expert": c.expert, "weight": c.weight, "confidence": c.confidence}))
                .collect();
            let conf: Vec<f32> = candidates.iter().filter(|c| c.confidence >= bar).map(|c| c.confidence).collect();
            let expl = serde_json::json!({"bar": bar, "confidences": conf, "below_bar": below});
            if take.is_empty() {
                // Nothing to prefetch: an empty plan carries the explanation.
                let plan =
                    crate::experts::Plan { kind: PlanKind::Prefetch, layer: l, token: self.step, actions: vec![] };
                self.explain_plan(&plan, expl);
            } else {
                self.pending_explain = Some(expl);
            }
        }
        if take.is_empty() {
            return Ok(None);
        }
        let id = <Offload as ExpertProvider<B>>::prefetch(self, l, &take, Priority::Prefetch)?;
        Ok(Some((id, take.iter().map(|t| t.0).collect())))
    }

    /// The cost model's break-even: a right prefetch saves about one read's stall, but only
    /// while the disk has idle time (1 − ρ of it); a wrong one costs a read's disk time when the
    /// disk is busy (ρ) and evicts an expert that would have hit with the recent hit rate h.
    /// Prefetch when q·(1 − ρ) > (1 − q)·(ρ + h), i.e. q > (ρ + h) / (1 + h).
    fn prefetch_bar(&self) -> f32 {
        let (rho, h) = (self.utilization, self.recent_hit_rate);
        ((rho + h) / (1.0 + h)) as f32
    }

    fn cancel_experts(&mut self, id: PrefetchId, experts: &[u16]) {
        self.drop_prefetch(id, Some(experts));
    }
}

impl Offload {
    /// Forget the experts of prefetch `id` (those in `only`, else all) whose reads have not
    /// landed, and drop their reads that have not started. Their slots turn `Empty` when the
    /// reads end (`finish_group`); landed ones simply stay cached.
    fn drop_prefetch(&mut self, id: PrefetchId, only: Option<&[u16]>) {
        let groups: Vec<u64> = self
            .groups
            .iter()
            .filter(|(_, g)| {
                g.prefetch == Some(id) && only.is_none_or(|ex| g.keys.iter().any(|(k, ..)| ex.contains(&k.expert)))
            })
            .map(|(&g, _)| g)
            .collect();
        for g in groups {
            if self.landed(g) {
                continue;
            }
            let Some(grp) = self.groups.get_mut(&g) else { continue };
            grp.cancelled = true;
            let (keys, tickets) = (grp.keys.clone(), grp.tickets.clone());
            for (key, p, slot) in keys {
                if self.cache.lookup(key) == Some((slot, p)) {
                    self.cache.invalidate(key);
                }
            }
            for (t, low) in tickets {
                if let Some(io) = self.io(low) {
                    io.cancel(t);
                }
            }
        }
    }

    /// Reads of prefetches the current layer now needs go ahead of other prefetches.
    fn promote_needed(&self) {
        for &(_, d) in &self.decisions {
            if let Decision::At(p, slot) = d {
                if let Some(SlotState::Loading(g)) = self.slot_state(p, slot) {
                    if let Some(grp) = self.groups.get(&g).filter(|grp| grp.prefetch.is_some()) {
                        for &(t, low) in &grp.tickets {
                            if let Some(io) = self.io(low) {
                                io.promote(t);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A model's identity in routing profiles: its fingerprint (hex) and file size.
fn profile_identity(m: &Model) -> (String, u64) {
    (format!("{:016x}", crate::lowprec::fingerprint(m)), m.file.bytes().len() as u64)
}

/// The routing profile at `path` if it is that of `model`, whose identity is `id` (a missing,
/// unreadable or foreign one: none, with a warning for the last two).
fn matching_profile(path: &Path, model: &Model, (fp, size): &(String, u64)) -> Option<RoutingProfile> {
    match RoutingProfile::load(path) {
        Ok(Some(p)) if p.matches(fp, *size, model.hp.n_layer, model.hp.n_expert) => Some(p),
        Ok(Some(_)) => {
            tracing::warn!("{}: a routing profile of another model; starting a new one", path.display());
            None
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("{e}; starting a new profile");
            None
        }
    }
}

impl Drop for Offload {
    /// The routing profile is saved when the cache goes (the end of a run or a session).
    fn drop(&mut self) {
        if let Err(e) = self.save_profile() {
            tracing::warn!("{e}");
        }
    }
}

/// Where to find the sidecar of `model` for low type `low` by default.
pub fn default_sidecar(model: &Path, low: &str) -> PathBuf {
    let stem = model.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    model.with_file_name(format!("{stem}.{low}.lowprec.gguf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_budgets_parse() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512 MB"), Ok(512_000_000));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_budget("25%"), Ok(Budget::Share(0.25)));
        assert!(parse_budget("0%").is_err());
        assert!(parse_budget("150%").is_err());
    }
}
