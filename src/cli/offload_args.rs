//! The expert-cache flags shared by `generate`, `bench`, `chat` and `serve`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use moerun::backend::Backend;
use moerun::engine::offload::{default_sidecar, parse_budget, parse_size, Budget, Offload, OffloadConfig};
use moerun::engine::{Engine, EngineConfig};
use moerun::experts::PolicyKind;
use moerun::io::{IoBackend, IoConfig};
use moerun::model::{resident_bytes, Model, Residency, Resident};
use moerun::predict::{parse_predict, PredictConfig};

/// Room left for scratch buffers, the tokenizer and the allocator when deriving the expert
/// budget from `--memory-budget`.
const OVERHEAD: u64 = 64 << 20;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct OffloadArgs {
    /// Hold routed experts in a RAM cache of this size (e.g. 2GiB, 1500MB, or 25% of the model's
    /// experts); misses stream from the file with io_uring and O_DIRECT.
    #[arg(long, visible_alias = "budget", value_name = "SIZE|PCT")]
    pub expert_budget: Option<String>,
    /// Total memory budget: the expert cache gets what is left after the resident dense
    /// weights, the KV cache and a small overhead. `auto`: 90% of the memory this process may
    /// take (the smaller of MemAvailable and the memory cgroup's room). A budget past that room
    /// is refused, so a run never meets its cgroup's limit.
    #[arg(long, value_name = "SIZE|auto", conflicts_with = "expert_budget")]
    pub memory_budget: Option<String>,
    /// Eviction policy of the expert cache.
    #[arg(long, value_enum, default_value_t = PolicyKind::Lru)]
    pub policy: PolicyKind,
    /// Pin every expert of the first N layers (Fate's shallow-favoring cache).
    #[arg(long, default_value_t = 0)]
    pub pin_layers: usize,
    /// Give each layer an equal share of the cache instead of one shared pool.
    #[arg(long)]
    pub per_layer: bool,
    /// Mixed precision (HOBBIT): load unimportant missed experts from this low type's sidecar
    /// (`moerun prepare MODEL --low TYPE` makes `<model>.<type>.lowprec.gguf`).
    #[arg(long, value_name = "TYPE")]
    pub low: Option<String>,
    /// The sidecar's path, when it is not beside the model.
    #[arg(long, value_name = "PATH")]
    pub low_sidecar: Option<PathBuf>,
    /// Cumulative gate weight up to which a missed expert loads at high precision.
    #[arg(long, default_value_t = 0.6)]
    pub t1: f32,
    /// Cumulative gate weight up to which a missed expert loads at low precision (skipped above).
    #[arg(long, default_value_t = 0.9)]
    pub t2: f32,
    /// How misses are read.
    #[arg(long, value_enum, default_value_t = IoBackend::Auto)]
    pub io: IoBackend,
    /// Write every routing decision (token, layer, experts, weights) to this JSON-lines file.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Predict the experts of the next N MoE layers (1–3) from each layer's hidden state and
    /// prefetch them; `fate` for the next MoE layer from each layer's router input (no extra
    /// read on a GPU); `off` to disable. Default: on (1) with a RAM expert cache; `fate` with a
    /// GPU's own cache alone (`--gpu-budget`); else off (with every expert in memory, `--predict
    /// N` only measures the predictions).
    #[arg(long, value_name = "N|off")]
    pub predict: Option<String>,
    /// The routing profile: which experts this model's routers choose, kept across runs to warm
    /// the cache at start (saved when the run ends). Default: one file per model in the user's
    /// cache directory (`~/.cache/moerun/profiles`); `off` for none.
    #[arg(long, value_name = "PATH|off")]
    pub profile: Option<String>,
    /// Write every expert-cache decision (hit, load, prefetch, skip, compute on the host; the
    /// predictor's candidates against the cost model's bar) with its estimated read time, and
    /// every wait with its stall, to this JSON-lines file.
    #[arg(long, value_name = "FILE")]
    pub explain_plan: Option<PathBuf>,
}

/// What a run with an expert budget of `expert_budget` bytes may hold resident: the budget,
/// the resident weights, one KV cache and the process's own overhead, plus 10%.
pub fn memory_bound(expert_budget: u64, resident: u64, kv: u64) -> u64 {
    ((expert_budget + resident + kv + OVERHEAD) as f64 * 1.1) as u64
}

impl OffloadArgs {
    pub fn enabled(&self) -> bool {
        self.expert_budget.is_some() || self.memory_budget.is_some()
    }

    /// With no budget given and `resident` left at `auto`: when the model's weights do not fit in
    /// the memory this process may take (with `auto`'s 1 GiB to spare), `--memory-budget auto`
    /// is implied — routed experts go to the cache, read with checked O_DIRECT reads, instead of
    /// the file mapping — as long as that leaves the cache a tenth of the experts.
    pub fn imply_budget(&mut self, model: &Model, resident: Resident, kv_bytes: u64) {
        if self.enabled() || resident != Resident::Auto {
            return;
        }
        let Some(room) = moerun::sysmem::room() else { return };
        if implied_budget(model, &room, kv_bytes).is_some() {
            eprintln!(
                "moerun: the model's weights ({:.2} GiB) do not fit in {room}: routed experts go to an \
                 expert cache (--memory-budget auto; --resident dense reads them through the file mapping instead)",
                resident_bytes(model, Resident::All) as f64 / (1u64 << 30) as f64
            );
            self.memory_budget = Some("auto".into());
        }
    }

    /// `base` with what the backend copies for `resident` (the flag), after [`Self::imply_budget`].
    pub fn engine_config(&mut self, model: &Model, resident: Resident, base: EngineConfig) -> EngineConfig {
        self.imply_budget(model, resident, moerun::engine::session_kv_bytes(model, &base));
        EngineConfig { residency: self.residency(resident), ..base }
    }

    /// What the backend copies: with the cache on, routed experts stay out of resident memory;
    /// `auto` is decided against the memory this process may still take.
    pub fn residency(&self, default: Resident) -> Residency {
        let which = if self.enabled() { Resident::Dense } else { default };
        Residency { which, room: moerun::sysmem::available() }
    }

    /// The budget flag as given, for errors.
    fn budget_flag(&self) -> String {
        match (&self.expert_budget, &self.memory_budget) {
            (Some(b), _) => format!("--expert-budget {b}"),
            (None, Some(m)) => {
                format!("--memory-budget {m} (less the dense weights, the KV cache and {} MiB)", OVERHEAD >> 20)
            }
            (None, None) => "the expert cache".into(),
        }
    }

    /// The cache config for `model` (None when no budget was given); `kv_bytes` is the KV cache
    /// one session will hold.
    pub fn config(&self, model: &Model, model_path: &Path, kv_bytes: u64) -> anyhow::Result<Option<OffloadConfig>> {
        let budget = match (&self.expert_budget, &self.memory_budget) {
            (Some(b), _) => parse_budget(b).map_err(anyhow::Error::msg).context("--expert-budget")?,
            (None, Some(m)) => {
                let total = memory_budget(m, moerun::sysmem::room())?;
                // With the cache on, the backend copies the dense weights (`residency`).
                let fixed = fixed_bytes(model, kv_bytes);
                if total <= fixed {
                    bail!(
                        "--memory-budget {m}: dense weights ({:.1} MiB), KV cache ({:.1} MiB) and overhead ({} MiB) already need {:.1} MiB",
                        resident_bytes(model, Resident::Dense) as f64 / 1048576.0,
                        kv_bytes as f64 / 1048576.0,
                        OVERHEAD >> 20,
                        fixed as f64 / 1048576.0
                    );
                }
                Budget::Bytes(total - fixed)
            }
            (None, None) => return Ok(None),
        };
        let sidecar = match (&self.low_sidecar, &self.low) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(t)) => Some(default_sidecar(model_path, t)),
            (None, None) => None,
        };
        if let Some(p) = &sidecar {
            if !p.exists() {
                bail!(
                    "{}: no low-precision sidecar; make it with `moerun prepare {} --low {}`",
                    p.display(),
                    model_path.display(),
                    self.low.as_deref().unwrap_or("TYPE")
                );
            }
        }
        let thresholds = sidecar.as_ref().map(|_| (self.t1, self.t2));
        let profile = match self.profile.as_deref() {
            Some("off") => None,
            Some(p) => Some(PathBuf::from(p)),
            None => moerun::experts::profile::default_dir().map(|d| {
                let stem = model_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                d.join(format!("{stem}.{:016x}.json", moerun::lowprec::fingerprint(model)))
            }),
        };
        Ok(Some(OffloadConfig {
            profile,
            explain: self.explain_plan.clone(),
            budget,
            policy: self.policy,
            pinned_layers: self.pin_layers,
            per_layer: self.per_layer,
            sidecar,
            thresholds,
            io: IoConfig { backend: self.io, ..Default::default() },
            ..Default::default()
        }))
    }

    /// The predictor `--predict` asks for (default: on when experts are budgeted).
    pub fn predict_config(&self) -> anyhow::Result<Option<PredictConfig>> {
        match &self.predict {
            Some(s) => parse_predict(s).map_err(anyhow::Error::msg),
            None => Ok(self.enabled().then(PredictConfig::default)),
        }
    }

    /// The engine for `model` with what the flags ask for: the expert cache is built first, so
    /// a budget that cannot work fails before any weight is copied; then the engine, then the
    /// cache, the predictor and the routing trace go on it.
    pub fn engine(&self, model: &Arc<Model>, model_path: &Path, cfg: EngineConfig) -> anyhow::Result<Engine> {
        let threads = cfg.threads;
        self.engine_on(model, model_path, cfg, moerun::backend::cpu::CpuBackend::new(threads))
    }

    /// [`OffloadArgs::engine`] on `backend`.
    pub fn engine_on<B: Backend>(
        &self,
        model: &Arc<Model>,
        model_path: &Path,
        cfg: EngineConfig,
        backend: B,
    ) -> anyhow::Result<Engine<B>> {
        let kv = moerun::engine::session_kv_bytes(model, &cfg);
        let offload = match self.config(model, model_path, kv)? {
            Some(c) => Some(Offload::new(Arc::clone(model), &c).with_context(|| self.budget_flag())?),
            None => None,
        };
        let mut engine = Engine::with_backend(Arc::clone(model), backend, cfg)?;
        if let Some(off) = offload {
            engine.set_offload(off);
        }
        let mut predict = self.predict_config()?;
        if predict.is_none() && self.predict.is_none() && engine.backend().caches_experts() {
            // A GPU's own cache alone: predicting from the router input costs it no extra read.
            predict = Some(moerun::predict::device_default());
        }
        engine.set_predictor(predict);
        if let Some(t) = &self.trace {
            engine.trace_to(t).with_context(|| format!("cannot write the trace {}", t.display()))?;
        }
        Ok(engine)
    }
}

/// The expert cache `--memory-budget auto` would give `model` in `room`, when the whole model
/// does not fit there and that cache holds at least a tenth of its experts.
fn implied_budget(model: &Model, room: &moerun::sysmem::Room, kv_bytes: u64) -> Option<u64> {
    if moerun::model::fits(model, room.bytes) {
        return None;
    }
    let cache = auto_total(room).checked_sub(fixed_bytes(model, kv_bytes))?;
    (cache >= model.expert_bytes() / 10).then_some(cache)
}

/// What `--memory-budget auto` takes of `room`: 90%.
fn auto_total(room: &moerun::sysmem::Room) -> u64 {
    room.bytes / 10 * 9
}

/// What a memory budget holds besides the expert cache: the dense weights (copied when the
/// cache is on), one KV cache and the process's overhead.
fn fixed_bytes(model: &Model, kv_bytes: u64) -> u64 {
    resident_bytes(model, Resident::Dense) + kv_bytes + OVERHEAD
}

/// `--memory-budget`'s bytes: a size, or `auto` (90% of the room); never more than `room`.
fn memory_budget(arg: &str, room: Option<moerun::sysmem::Room>) -> anyhow::Result<u64> {
    if arg.trim().eq_ignore_ascii_case("auto") {
        let room = room.context("--memory-budget auto: this system does not say how much memory is free")?;
        return Ok(auto_total(&room));
    }
    let total = parse_size(arg).map_err(anyhow::Error::msg).context("--memory-budget")?;
    match room {
        Some(room) if total > room.bytes => bail!(
            "--memory-budget {arg} is more than this process may take: {room}; give at most that, \
             or --memory-budget auto"
        ),
        _ => Ok(total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moerun::sysmem::{Limit, Room};

    #[test]
    fn a_model_past_the_room_gets_an_implied_cache_when_one_can_work() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/rustdoc-moe-Q8_0.gguf");
        let model = Model::load(&path).expect("bundled model");
        let all = resident_bytes(&model, Resident::All);
        let dense = resident_bytes(&model, Resident::Dense);
        let room = |bytes| Room { bytes, by: Limit::MemAvailable };
        // It fits: no cache.
        assert_eq!(implied_budget(&model, &room(all + (2 << 30)), 0), None);
        // It does not fit, and 90% of the room leaves the experts a cache past the fixed part.
        let r = dense + OVERHEAD + model.expert_bytes();
        let cache = implied_budget(&model, &room(r), 0).expect("a cache");
        assert_eq!(cache, r / 10 * 9 - dense - OVERHEAD);
        // Too little room for a useful cache: left to the mapping, as before.
        assert_eq!(implied_budget(&model, &room(dense + OVERHEAD), 0), None);
    }

    #[test]
    fn a_memory_budget_past_the_cgroup_room_is_refused_and_auto_stays_inside() {
        let room = Room { bytes: 4 << 30, by: Limit::Cgroup { limit: 5 << 30, used: 1 << 30 } };
        let err = memory_budget("6GiB", Some(room.clone())).expect_err("past the room").to_string();
        assert!(err.contains("cgroup") && err.contains("6GiB"), "{err}");
        assert_eq!(memory_budget("3GiB", Some(room.clone())).expect("inside"), 3 << 30);
        let auto = memory_budget("auto", Some(room)).expect("auto");
        assert!(auto < 4 << 30 && auto > 3 << 30, "{auto}");
        assert!(memory_budget("auto", None).is_err());
        assert_eq!(memory_budget("1GiB", None).expect("no room known"), 1 << 30);
    }
}
