//! One backend against the others, on whole models: every family of `arch::SPECS` as a small
//! synthetic model (written here, deterministic), a 70-token prompt with the logits of every
//! row (batched paths: the tiled mat-mul, attention over a batch, sliding windows) and then a
//! few one-token steps (the decode paths), through the backend under test, the CPU backend and
//! the plain f32 backend; plus the same with an expert cache holding half the experts (experts
//! viewed in host memory: a device backend's copy path).
//!
//! What `cargo test` runs for the CPU backend (`tests/oracle.rs`) and `moerun device
//! --self-test` for CUDA: the same bodies for every backend.

use std::path::Path;
use std::sync::Arc;

use super::cpu::CpuBackend;
use super::plain::PlainBackend;
use super::Backend;
use crate::engine::offload::{Budget, Offload, OffloadConfig};
use crate::engine::{Engine, EngineConfig};
use crate::gguf::GgmlType;
use crate::layers::Logits;
use crate::model::Model;
use crate::synth::SynthConfig;

/// One comparison: the largest logit difference over the largest logit (at least 1), and how
/// many rows pick another top token where the reference's top two are further apart than the
/// tolerance. A row whose token took other experts than the reference's in some layer (a
/// near-tie in a random-weight router, flipped by rounding) is left out of both and counted in
/// `route_flips`; at most one row in 20 may be.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub what: String,
    pub max_rel_err: f64,
    pub tolerance: f64,
    pub rows: usize,
    pub argmax_flips: usize,
    pub route_flips: usize,
    pub ok: bool,
}

/// One run's logits (every prompt row, then each decode step) and each token's experts per
/// layer (sorted), from its routing trace.
pub struct Run {
    pub logits: Vec<f32>,
    pub routes: Vec<Vec<Vec<u32>>>,
}

/// A model to compare on.
#[derive(Debug, Clone)]
pub struct Case {
    pub arch: &'static str,
    pub ty: GgmlType,
    pub expert_ty: Option<GgmlType>,
    /// Run with an expert cache of half the experts.
    pub cache: bool,
}

impl Case {
    pub fn name(&self) -> String {
        let experts = self.expert_ty.map_or(String::new(), |t| format!(", experts {}", t.name()));
        let cache = if self.cache { ", expert cache 50%" } else { "" };
        format!("{} {}{experts}{cache}", self.arch, self.ty.name())
    }
}

/// Every family at Q8_0; Qwen3 with Q4_K experts over Q4_0 (the K-quant and the repacked
/// paths), gpt-oss with MXFP4 experts (its type) and F16; Qwen3 through an expert cache.
pub fn cases() -> Vec<Case> {
    let mut v: Vec<Case> = crate::arch::SPECS
        .iter()
        .map(|s| Case { arch: s.name, ty: GgmlType::Q8_0, expert_ty: None, cache: false })
        .collect();
    v.push(Case { arch: "qwen3moe", ty: GgmlType::Q4_0, expert_ty: Some(GgmlType::Q4_K), cache: false });
    v.push(Case { arch: "gpt-oss", ty: GgmlType::F16, expert_ty: Some(GgmlType::MXFP4), cache: false });
    v.push(Case { arch: "qwen3moe", ty: GgmlType::Q8_0, expert_ty: Some(GgmlType::Q6_K), cache: true });
    v
}

#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    #[error("{case}: {message}")]
    Case { case: String, message: String },
}

/// The prompt and decode ids every case runs (inside the synthetic vocabulary of 512).
const PROMPT: usize = 70;
const DECODE: [u32; 3] = [5, 300, 17];

/// The logits of every prompt row, then of each decode step, on `backend`, and the routes.
fn logits<B: Backend>(model: &Arc<Model>, backend: B, cache: bool, trace: &Path) -> Result<Run, String> {
    let cfg = EngineConfig { n_ctx: 128, threads: 2, ..EngineConfig::default() };
    let mut eng = Engine::with_backend(Arc::clone(model), backend, cfg).map_err(|e| e.to_string())?;
    eng.trace_to(trace).map_err(|e| e.to_string())?;
    if cache {
        let oc = OffloadConfig { budget: Budget::Share(0.5), profile: None, ..OffloadConfig::default() };
        eng.set_offload(Offload::new(Arc::clone(model), &oc).map_err(|e| e.to_string())?);
    }
    let mut s = eng.new_session().map_err(|e| e.to_string())?;
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| (i * 37 + 11) % 512).collect();
    let mut out = eng.eval(&mut s, &prompt, Logits::All).map_err(|e| e.to_string())?;
    for t in DECODE {
        out.extend(eng.eval(&mut s, &[t], Logits::Last).map_err(|e| e.to_string())?);
    }
    eng.finish_trace().map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(trace).map_err(|e| format!("{}: {e}", trace.display()))?;
    let mut routes = vec![vec![Vec::new(); model.hp.n_layer]; PROMPT + DECODE.len()];
    for line in text.lines().skip(1) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let (t, l) = (v["token"].as_u64().unwrap_or(0) as usize, v["layer"].as_u64().unwrap_or(0) as usize);
        let mut e: Vec<u32> =
            v["experts"].as_array().into_iter().flatten().filter_map(|x| x.as_u64()).map(|x| x as u32).collect();
        e.sort_unstable();
        if let Some(slot) = routes.get_mut(t).and_then(|r| r.get_mut(l)) {
            *slot = e;
        }
    }
    Ok(Run { logits: out, routes })
}

/// `got` against `want`, `n_vocab` logits a row; rows with `flipped[row]` are left out.
pub fn compare(what: String, got: &[f32], want: &[f32], n_vocab: usize, flipped: &[bool], tolerance: f64) -> Check {
    let scale = want.iter().fold(1f64, |m, &v| m.max((v as f64).abs()));
    let kept = |r: usize| !flipped.get(r).copied().unwrap_or(false);
    let worst = if got.len() == want.len() {
        got.chunks(n_vocab.max(1))
            .zip(want.chunks(n_vocab.max(1)))
            .enumerate()
            .filter(|(r, _)| kept(*r))
            .flat_map(|(_, (g, w))| g.iter().zip(w))
            .fold(0f64, |m, (&a, &b)| m.max(((a - b) as f64).abs()))
    } else {
        f64::INFINITY
    };
    let top2 = |row: &[f32]| {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        (idx[0], row[idx[0]] - row.get(idx.get(1).copied().unwrap_or(idx[0])).copied().unwrap_or(0.0))
    };
    let mut flips = 0;
    let rows = want.len() / n_vocab.max(1);
    if got.len() == want.len() {
        for (r, (g, w)) in got.chunks_exact(n_vocab).zip(want.chunks_exact(n_vocab)).enumerate() {
            if !kept(r) {
                continue;
            }
            let (wi, margin) = top2(w);
            if (margin as f64) > 2.0 * tolerance * scale && top2(g).0 != wi {
                flips += 1;
            }
        }
    }
    let max_rel_err = worst / scale;
    let route_flips = flipped.iter().filter(|&&f| f).count();
    let ok = max_rel_err <= tolerance && flips == 0 && route_flips * 20 <= rows;
    Check { what, max_rel_err, tolerance, rows, argmax_flips: flips, route_flips, ok }
}

/// Per row (token), whether its experts differ between two runs in any layer.
fn route_flips(a: &Run, b: &Run) -> Vec<bool> {
    a.routes.iter().zip(&b.routes).map(|(x, y)| x != y).collect()
}

/// Runs every case of `cases` through `make()`'s backend and compares it with the CPU backend
/// and the plain one (tolerance `tol` of the largest logit); models are written into `dir`.
pub fn run<B: Backend>(
    dir: &Path,
    cases: &[Case],
    tol: f64,
    make: &mut dyn FnMut() -> Result<B, String>,
) -> Result<Vec<Check>, ConformanceError> {
    let mut checks = Vec::new();
    for c in cases {
        let err = |message: String| ConformanceError::Case { case: c.name(), message };
        let path = dir.join(format!("{}-{}.gguf", c.arch, checks.len()));
        let cfg = SynthConfig { expert_type: c.expert_ty, ..SynthConfig::small(c.arch, c.ty) };
        cfg.write(&path, &mut |_, _| {}).map_err(|e| err(e.to_string()))?;
        let model = Arc::new(Model::load(&path).map_err(|e| err(e.to_string()))?);
        let n_vocab = model.hp.n_vocab;
        let trace = |who: &str| dir.join(format!("{}-{}-{who}.trace", c.arch, checks.len()));
        let plain = logits(&model, PlainBackend::new(), false, &trace("plain")).map_err(&err)?;
        let cpu = logits(&model, CpuBackend::new(2), false, &trace("cpu")).map_err(&err)?;
        let got = logits(&model, make().map_err(&err)?, c.cache, &trace("test")).map_err(&err)?;
        let what = |r: &str| format!("{} vs {r}", c.name());
        checks.push(compare(what("plain"), &got.logits, &plain.logits, n_vocab, &route_flips(&got, &plain), tol));
        checks.push(compare(what("cpu"), &got.logits, &cpu.logits, n_vocab, &route_flips(&got, &cpu), tol));
    }
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The suite itself: the CPU backend passes it against itself and the plain backend, and a
    /// backend that computes something else fails it.
    #[test]
    fn the_cpu_backend_conforms_and_a_wrong_answer_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let checks = run(dir.path(), &cases(), 0.02, &mut || Ok(CpuBackend::new(2))).expect("cases run");
        assert_eq!(checks.len(), 2 * cases().len());
        for c in &checks {
            eprintln!(
                "{}: {:.2e}, {} flips, {} route flips of {} rows",
                c.what, c.max_rel_err, c.argmax_flips, c.route_flips, c.rows
            );
            assert!(c.ok, "{c:?}");
        }
        let want = vec![0.0, 1.0, 5.0, 2.0];
        let bad = compare("bad".into(), &[0.0, 6.0, 5.0, 2.0], &want, 4, &[false], 0.02);
        assert!(!bad.ok && bad.argmax_flips == 1, "{bad:?}");
        // A row whose routing flipped is left out, but not many of them.
        let excused = compare("flip".into(), &[0.0, 6.0, 5.0, 2.0], &want, 4, &[true], 0.02);
        assert!(excused.argmax_flips == 0 && excused.route_flips == 1 && !excused.ok, "{excused:?}");
    }
}
