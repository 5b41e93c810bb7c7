//! The expert cache at work: routed experts live in fixed-size slots of RAM under a byte budget,
//! `experts::ExpertCache` decides hits, loads, evictions and precision, and `io::IoService`
//! streams misses from the model file (or the low-precision sidecar) with O_DIRECT while the
//! hits compute. Invariant: a slot is viewed only after the read that filled it completed; a
//! failed read empties its slot before the error is returned.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::cpu::MatRef;
use crate::experts::{
    Action, CacheConfig, CacheError, ExpertCache, ExpertKey, PolicyKind, Precision, SlotId, DEFAULT_HOBBIT_WEIGHTS,
};
use crate::io::{align_extent, AlignedBuf, IoConfig, IoError, IoService, ReadOp, Ticket};
use crate::layers::{used_experts, ExpertProvider, ProviderError, Route};
use crate::lowprec::{LowPrecError, LowPrecSidecar};
use crate::model::{Model, WeightDesc};

/// How much memory the expert cache may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Bytes(u64),
    /// A share of the model's routed-expert bytes (0–1).
    Share(f64),
}

/// Parse `2GiB`, `512MB`, `1.5G`, `123456` or (for `Budget`) `25%`.
pub fn parse_budget(s: &str) -> Result<Budget, String> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let v: f64 = p.trim().parse().map_err(|_| format!("bad percentage '{s}'"))?;
        if !(0.0..=100.0).contains(&v) || v == 0.0 {
            return Err(format!("percentage '{s}' must be in (0, 100]"));
        }
        return Ok(Budget::Share(v / 100.0));
    }
    parse_size(t).map(Budget::Bytes)
}

/// Parse a byte size with an optional KiB/MiB/GiB (binary) or KB/MB/GB (decimal) suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("bad size '{s}'"))?;
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
        u => return Err(format!("unknown size unit '{u}' in '{s}' (use KiB/MiB/GiB or KB/MB/GB)")),
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
    pub io: IoConfig,
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
            io: IoConfig::default(),
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
    fn for_experts<'a>(experts: impl Iterator<Item = [WeightDesc; 3]>) -> SlotShape {
        let mut cap = [0usize; 3];
        for ex in experts {
            for (c, w) in cap.iter_mut().zip(ex) {
                *c = (*c).max(align_extent(w.offset, w.bytes).1);
            }
        }
        SlotShape { region: [0, cap[0], cap[0] + cap[1]], bytes: cap[0] + cap[1] + cap[2] }
    }
}

/// One precision's slot memory and what each slot holds.
struct Pool {
    shape: SlotShape,
    mem: AlignedBuf,
    /// Per slot: the expert's matrices and each region's padding before the data.
    content: Vec<Option<([WeightDesc; 3], [usize; 3])>>,
}

impl Pool {
    fn new(shape: SlotShape, n: usize) -> Result<Pool, IoError> {
        Ok(Pool { shape, mem: AlignedBuf::new(shape.bytes * n)?, content: vec![None; n] })
    }

    fn view(&self, slot: SlotId) -> Option<[MatRef<'_>; 3]> {
        let (descs, pads) = self.content.get(slot as usize)?.as_ref()?;
        let base = slot as usize * self.shape.bytes;
        let m = |i: usize| {
            let at = base + self.shape.region[i] + pads[i];
            descs[i].mat(&self.mem.as_slice()[at..at + descs[i].bytes as usize])
        };
        Some([m(0), m(1), m(2)])
    }
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
    pub bytes_read_high: u64,
    pub bytes_read_low: u64,
    /// Seconds the forward pass waited for reads.
    pub stall_s: f64,
    pub io_busy_s: f64,
    pub per_layer_hit_rate: Vec<f64>,
    pub slots_high: usize,
    pub slots_low: usize,
    pub budget_bytes: u64,
}

/// What the current layer's plan decided for one expert.
#[derive(Debug, Clone, Copy)]
enum Decision {
    At(Precision, SlotId, bool /* loaded by this plan */),
    Skip,
}

/// The expert cache as an [`ExpertProvider`].
pub struct Offload {
    model: Arc<Model>,
    cache: ExpertCache,
    high: Pool,
    low: Option<(Pool, LowPrecSidecar)>,
    io_high: IoService,
    io_low: Option<IoService>,
    layer: usize,
    decisions: Vec<(u16, Decision)>,
    pending: Vec<(Ticket, bool /* low file */)>,
    loading: Vec<ExpertKey>,
    step: u64,
    stall_s: f64,
    bytes_high: u64,
    bytes_low: u64,
}

impl Offload {
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
        let cache_cfg = CacheConfig {
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
        };
        let cache = ExpertCache::new(cache_cfg).map_err(|source| OffloadError::Cache { budget, source })?;
        let high = Pool::new(high_shape, cache.n_slots(Precision::High))?;
        let io_high = IoService::open(&path, cfg.io.clone())?;
        let (low, io_low) = match (sidecar, low_shape) {
            (Some(sc), Some(shape)) => {
                let io = IoService::open(sc.path(), cfg.io.clone())?;
                (Some((Pool::new(shape, cache.n_slots(Precision::Low))?, sc)), Some(io))
            }
            _ => (None, None),
        };
        tracing::info!(
            "expert cache: {} high slots of {:.2} MiB{}, {:?}, reads via {:?}{}",
            cache.n_slots(Precision::High),
            high_shape.bytes as f64 / 1048576.0,
            low.as_ref()
                .map(|(p, _)| format!(
                    " + {} low slots of {:.2} MiB",
                    p.content.len(),
                    p.shape.bytes as f64 / 1048576.0
                ))
                .unwrap_or_default(),
            cfg.policy,
            io_high.backend(),
            if io_high.direct() { " with O_DIRECT" } else { "" }
        );
        Ok(Offload {
            model,
            cache,
            high,
            low,
            io_high,
            io_low,
            layer: usize::MAX,
            decisions: Vec::new(),
            pending: Vec::new(),
            loading: Vec::new(),
            step: 0,
            stall_s: 0.0,
            bytes_high: 0,
            bytes_low: 0,
        })
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
            bytes_read_high: self.bytes_high,
            bytes_read_low: self.bytes_low,
            stall_s: self.stall_s,
            io_busy_s: self.io_high.stats().busy_s + self.io_low.as_ref().map(|i| i.stats().busy_s).unwrap_or(0.0),
            per_layer_hit_rate,
            slots_high: self.cache.n_slots(Precision::High),
            slots_low: self.cache.n_slots(Precision::Low),
            budget_bytes: self.cache.config().budget_bytes,
        }
    }

    /// Bytes of slot memory held.
    pub fn slot_bytes(&self) -> u64 {
        self.high.mem.len() as u64 + self.low.as_ref().map(|(p, _)| p.mem.len() as u64).unwrap_or(0)
    }

    /// Start of a new sequence (HOBBIT resets its per-sequence records).
    pub fn reset_sequence(&mut self) {
        self.cache.reset_sequence();
    }

    fn decision(&self, e: u16) -> Option<Decision> {
        self.decisions.iter().find(|(x, _)| *x == e).map(|&(_, d)| d)
    }

    /// Queue the three reads filling `slot` with `key` at precision `p`.
    fn load_ops(&mut self, key: ExpertKey, p: Precision, slot: SlotId, ops: &mut Vec<ReadOp>) {
        let (l, e) = (key.layer as usize, key.expert as usize);
        let descs = match p {
            Precision::High => {
                let ex = &self.model.experts(l).expect("plans name MoE layers only")[e];
                [ex.gate, ex.up, ex.down]
            }
            Precision::Low => self.low.as_ref().expect("low loads need the sidecar").1.expert(l, e),
        };
        let pool = match p {
            Precision::High => &mut self.high,
            Precision::Low => &mut self.low.as_mut().expect("checked above").0,
        };
        let base = slot as usize * pool.shape.bytes;
        let mut pads = [0usize; 3];
        for i in 0..3 {
            let (off, len, pad) = align_extent(descs[i].offset, descs[i].bytes);
            pads[i] = pad;
            let at = base + pool.shape.region[i];
            // The region was sized for the largest aligned extent, so this stays in the slot.
            let dst = pool.mem.as_mut_slice()[at..at + len].as_mut_ptr();
            ops.push(ReadOp { file_offset: off, len, dst });
            match p {
                Precision::High => self.bytes_high += len as u64,
                Precision::Low => self.bytes_low += len as u64,
            }
        }
        pool.content[slot as usize] = Some((descs, pads));
    }
}

impl ExpertProvider for Offload {
    fn schedule(&mut self, l: usize, routes: &[Route]) -> Vec<Vec<u16>> {
        if l == 0 || self.layer > l {
            self.step += 1;
        }
        let used = used_experts(routes);
        // A wave must fit the slots this layer may use (never fewer than top-k: checked at start).
        let cap = self.cache.layer_slots(l, Precision::High).len().max(1);
        used.chunks(cap).map(|c| c.to_vec()).collect()
    }

    fn fetch(&mut self, l: usize, wave: &[u16], routes: &[Route]) -> Result<(), ProviderError> {
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
        self.cache.apply(&plan);
        self.decisions.clear();
        let mut ops_high = Vec::new();
        let mut ops_low = Vec::new();
        self.loading.clear();
        for &(key, action, _) in &plan.actions {
            let d = match action {
                Action::Hit { slot, precision } => Decision::At(precision, slot, false),
                Action::Load { slot, precision, .. } => {
                    let ops = if precision == Precision::High { &mut ops_high } else { &mut ops_low };
                    self.load_ops(key, precision, slot, ops);
                    self.loading.push(key);
                    Decision::At(precision, slot, true)
                }
                Action::Skip => Decision::Skip,
            };
            self.decisions.push((key.expert, d));
        }
        if !ops_high.is_empty() {
            // SAFETY: every op writes inside one slot's region of `high.mem`, which lives as long
            // as `self`; those slots are not viewed (`ready` is false, `view` waits) until
            // `wait` returned, and `Drop` of the IoService waits for in-flight reads.
            self.pending.push((unsafe { self.io_high.submit(ops_high) }, false));
        }
        if !ops_low.is_empty() {
            let io =
                self.io_low.as_ref().ok_or_else(|| ProviderError("low-precision load without a sidecar".into()))?;
            // SAFETY: as above, for the low pool.
            self.pending.push((unsafe { io.submit(ops_low) }, true));
        }
        Ok(())
    }

    fn ready(&self, _l: usize, e: u16) -> bool {
        !matches!(self.decision(e), Some(Decision::At(_, _, true)))
    }

    fn wait(&mut self, _l: usize) -> Result<(), ProviderError> {
        let t0 = Instant::now();
        let mut first_err: Option<IoError> = None;
        for (t, low) in self.pending.drain(..) {
            let io = if low { self.io_low.as_ref() } else { Some(&self.io_high) };
            if let Some(Err(e)) = io.map(|io| io.wait(t)) {
                first_err.get_or_insert(e);
            }
        }
        self.stall_s += t0.elapsed().as_secs_f64();
        if let Some(e) = first_err {
            // The slots of this plan's loads hold garbage: forget them so nothing views them.
            for key in self.loading.drain(..) {
                if let Some((slot, p)) = self.cache.lookup(key) {
                    let pool =
                        if p == Precision::High { &mut self.high } else { &mut self.low.as_mut().expect("low slot").0 };
                    pool.content[slot as usize] = None;
                }
                self.cache.invalidate(key);
            }
            self.decisions.clear();
            return Err(ProviderError(e.to_string()));
        }
        self.loading.clear();
        Ok(())
    }

    fn view(&self, _l: usize, e: u16) -> Option<[MatRef<'_>; 3]> {
        match self.decision(e)? {
            Decision::At(Precision::High, slot, _) => self.high.view(slot),
            Decision::At(Precision::Low, slot, _) => self.low.as_ref()?.0.view(slot),
            Decision::Skip => None,
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
