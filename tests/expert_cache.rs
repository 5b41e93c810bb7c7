//! Caching must never change the answer: with mixed precision off, every budget, every policy,
//! prefetches (right or wrong) and computing misses on the host give bit-identical logits and
//! tokens to the all-resident run, on every backend. A read that fails mid-run ends that
//! generation with a clear error while the process carries on; a failed prefetch of a later
//! layer never fails the current one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moerun::backend::{cpu::CpuBackend, plain::PlainBackend, Backend};
use moerun::engine::offload::{Budget, Offload, OffloadConfig};
use moerun::engine::{argmax, Engine, EngineConfig, Provider};
use moerun::experts::PolicyKind;
use moerun::gguf::GgmlType;
use moerun::layers::{ExpertProvider, ExpertState, Logits, PrefetchId, Priority, ProviderError, Route};
use moerun::model::{Model, Residency, Resident};
use moerun::predict::PredictConfig;
use moerun::synth::SynthConfig;

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/rustdoc-moe-Q8_0.gguf")
}

fn load(path: &Path) -> Arc<Model> {
    Arc::new(Model::load(path).unwrap_or_else(|e| panic!("{e}")))
}

/// `model` on `backend` with its dense weights resident (routed experts come from a cache).
fn engine<B: Backend>(model: &Arc<Model>, backend: B) -> Engine<B> {
    let cfg = EngineConfig { threads: 2, residency: Residency::fixed(Resident::Dense), ..Default::default() };
    Engine::with_backend(Arc::clone(model), backend, cfg).unwrap_or_else(|e| panic!("{e}"))
}

/// Prefill `prompt` and generate `n` greedy tokens through `provider` (the engine's own expert
/// cache when `None`); returns every step's logits and the tokens.
fn run<B: Backend>(
    eng: &mut Engine<B>,
    prompt: &[u32],
    n: usize,
    mut provider: Option<&mut dyn ExpertProvider<B>>,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut sess = eng.new_session().unwrap_or_else(|e| panic!("{e}"));
    let mut eval = |eng: &mut Engine<B>, sess: &mut _, ids: &[u32]| match provider.as_deref_mut() {
        Some(p) => eng.eval_with(sess, ids, Logits::Last, Provider::Cache(p), &mut ()),
        None => eng.eval(sess, ids, Logits::Last),
    };
    let mut logits = eval(eng, &mut sess, prompt).unwrap_or_else(|e| panic!("{e}"));
    let (mut all, mut ids) = (vec![], vec![]);
    for _ in 0..n {
        let id = argmax(&logits) as u32;
        all.push(logits);
        ids.push(id);
        logits = eval(eng, &mut sess, &[id]).unwrap_or_else(|e| panic!("{e}"));
    }
    (all, ids)
}

/// The all-resident answer of `model` on `backend`.
fn baseline<B: Backend>(model: &Arc<Model>, backend: B, prompt: &[u32]) -> (Vec<Vec<f32>>, Vec<u32>) {
    let cfg = EngineConfig { threads: 2, residency: Residency::fixed(Resident::All), ..Default::default() };
    let mut all = Engine::with_backend(Arc::clone(model), backend, cfg).unwrap_or_else(|e| panic!("{e}"));
    run(&mut all, prompt, 24, None)
}

fn check<B: Backend>(path: &Path, prompt: &[u32], pinned: usize, backend: impl Fn() -> B) {
    let model = load(path);
    // The all-resident run: every weight copied, Q4_0 and MXFP4 repacked for ggml's interleaved
    // kernels on the CPU backend — as the cache's slots are once their reads land.
    let (want_logits, want_ids) = baseline(&model, backend(), prompt);
    let profiles = tempfile::tempdir().expect("tempdir");
    for (i, policy) in [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Hobbit, PolicyKind::Fate].into_iter().enumerate()
    {
        for share in [0.10, 0.25, 0.50, 1.0] {
            // Without a predictor; then with one looking 1–3 layers ahead (from the state entering
            // each layer, or from the router input for every other policy) that prefetches every
            // prediction (no confidence or cost gate), and a routing profile: the first such run
            // records it, the repeat warms the cache from it.
            let profile = profiles.path().join(format!("{policy:?}-{share}.json"));
            let predict = PredictConfig {
                distance: 1 + i % 3,
                min_confidence: 0.0,
                cost_gate: false,
                from_router_input: i % 2 == 1,
                ..Default::default()
            };
            for (predictor, prof) in [(None, None), (Some(predict), Some(&profile)), (Some(predict), Some(&profile))] {
                let cfg = OffloadConfig {
                    budget: Budget::Share(share),
                    policy,
                    pinned_layers: if policy == PolicyKind::Fate && share >= 0.5 { pinned } else { 0 },
                    profile: prof.cloned(),
                    ..Default::default()
                };
                let what = format!("{}: {policy:?} at {share}, predictor {predictor:?}", path.display());
                let off = Offload::new(Arc::clone(&model), &cfg).unwrap_or_else(|e| panic!("{what}: {e}"));
                let mut eng = engine(&model, backend());
                eng.set_offload(off);
                eng.set_predictor(predictor);
                let (logits, ids) = run(&mut eng, prompt, 24, None);
                assert_eq!(ids, want_ids, "{what}: tokens differ");
                assert!(logits == want_logits, "{what}: logits are not bit-identical");
                let st = eng.offload_stats().expect("offload");
                assert!(st.lookups > 0 && st.hits <= st.lookups);
                if share < 1.0 && prof.is_none() {
                    assert!(st.loads_high > (model.hp.n_layer * model.hp.n_expert_used) as u64, "{what}: {st:?}");
                }
                if let Some(p) = &st.predictor {
                    assert!(p.per_distance[0].predictions > 0 && p.prefetched > 0, "{what}: {p:?}");
                }
            }
            let saved = moerun::experts::profile::RoutingProfile::load(&profile).expect("profile").expect("saved");
            assert_eq!(saved.tokens as usize, 2 * (prompt.len() + 24), "two runs counted");
        }
    }
}

const OWNERSHIP: [u32; 9] = [3197, 1045, 363, 271, 677, 302, 2073, 432, 1545];

/// A small 4-layer model of `arch` with 16 experts (top-4) in `dir`; `expert_ty` for the experts
/// when they differ from the rest.
fn synth(dir: &Path, arch: &str, ty: GgmlType, expert_ty: Option<GgmlType>) -> PathBuf {
    let path = dir.join(format!("{arch}.gguf"));
    let cfg = SynthConfig {
        n_layer: 4,
        n_ff_exp: 256,
        n_expert: 16,
        n_expert_used: 4,
        rms_eps: 1e-6,
        seed: 5,
        expert_type: expert_ty,
        ..SynthConfig::small(arch, ty)
    };
    cfg.write(&path, &mut |_, _| {}).expect("synth");
    path
}

fn synth_qwen3(dir: &Path) -> PathBuf {
    synth(dir, "qwen3moe", GgmlType::Q4_0, None)
}

#[test]
fn every_budget_and_policy_gives_the_all_resident_answer_on_rustdoc_moe() {
    // "Ownership is a set of rules that govern" in rustdoc-moe's vocabulary.
    check(&bundled(), &OWNERSHIP, 1, || CpuBackend::new(2));
}

#[test]
fn every_budget_and_policy_gives_the_all_resident_answer_on_a_synth_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    check(&synth_qwen3(dir.path()), &[3, 100, 200, 7, 42, 9, 300, 11], 1, || CpuBackend::new(2));
}

/// The families whose experts carry more than three matrices' bytes: gpt-oss (per-expert biases
/// that stay with the model, MXFP4 experts, sinks and sliding windows) and deepseek2 (MLA, a
/// dense first layer, group-limited routing, shared experts): the cache holds their experts like
/// any other's and never changes a token.
#[test]
fn every_budget_and_policy_gives_the_all_resident_answer_on_gpt_oss_and_deepseek2() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (arch, ty, expert_ty) in
        [("gpt-oss", GgmlType::Q8_0, Some(GgmlType::MXFP4)), ("deepseek2", GgmlType::Q4_0, None)]
    {
        let path = synth(dir.path(), arch, ty, expert_ty);
        check(&path, &[3, 100, 200, 7, 42, 9, 300, 11, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53], 1, || {
            CpuBackend::new(2)
        });
    }
}

#[test]
fn every_budget_and_policy_gives_the_all_resident_answer_on_the_plain_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    check(&synth_qwen3(dir.path()), &[3, 100, 200, 7, 42, 9, 300, 11], 1, PlainBackend::new);
}

/// An expert cache that, whenever layer l fetches, prefetches layer l+1's experts from a script:
/// the experts the all-resident run used there (right predictions) or others (wrong ones), and
/// cancels every other prediction it makes.
struct Prefetching {
    off: Offload,
    n_layers: usize,
    /// Per layer: experts to predict for it.
    predict: Box<dyn Fn(usize) -> Vec<(u16, f32)>>,
    issued: usize,
}

impl<B: Backend> ExpertProvider<B> for Prefetching {
    fn schedule(&mut self, l: usize, routes: &[Route]) -> Vec<Vec<u16>> {
        <Offload as ExpertProvider<B>>::schedule(&mut self.off, l, routes)
    }
    fn fetch(&mut self, l: usize, wave: &[u16], routes: &[Route]) -> Result<(), ProviderError> {
        <Offload as ExpertProvider<B>>::fetch(&mut self.off, l, wave, routes)?;
        let next = (l + 1) % self.n_layers;
        let id: PrefetchId =
            <Offload as ExpertProvider<B>>::prefetch(&mut self.off, next, &(self.predict)(next), Priority::Prefetch)?;
        self.issued += 1;
        if self.issued.is_multiple_of(2) {
            <Offload as ExpertProvider<B>>::cancel(&mut self.off, id);
        }
        Ok(())
    }
    fn wait(&mut self, l: usize) -> Result<(), ProviderError> {
        <Offload as ExpertProvider<B>>::wait(&mut self.off, l)
    }
    fn state(&self, l: usize, e: u16) -> ExpertState {
        <Offload as ExpertProvider<B>>::state(&self.off, l, e)
    }
    fn view(&self, l: usize, e: u16) -> Option<[B::Mat<'_>; 3]> {
        <Offload as ExpertProvider<B>>::view(&self.off, l, e)
    }
}

/// A scripted predictor: which experts to prefetch for layer `l`.
fn predictor(kind: usize) -> Box<dyn Fn(usize) -> Vec<(u16, f32)>> {
    match kind {
        0 => Box::new(|_l| vec![(0, 0.6), (1, 0.4)]),
        1 => Box::new(|_l| (0..8u16).map(|e| (e, 0.125)).collect()),
        _ => Box::new(|l| vec![((l % 8) as u16, 0.7), (((l + 3) % 8) as u16, 0.3)]),
    }
}

#[test]
fn prefetches_right_wrong_or_cancelled_never_change_the_answer() {
    let model = load(&bundled());
    let (want_logits, want_ids) = baseline(&model, CpuBackend::new(2), &OWNERSHIP);
    let n_layers = model.hp.n_layer;
    for kind in 0..3 {
        for share in [0.25, 0.5] {
            let cfg = OffloadConfig { budget: Budget::Share(share), ..Default::default() };
            let off = Offload::new(Arc::clone(&model), &cfg).expect("offload");
            let mut p = Prefetching { off, n_layers, predict: predictor(kind), issued: 0 };
            let mut eng = engine(&model, CpuBackend::new(2));
            let (logits, ids) = run(&mut eng, &OWNERSHIP, 24, Some(&mut p));
            assert_eq!(ids, want_ids, "predictor {kind} at {share}: tokens differ");
            assert!(logits == want_logits, "predictor {kind} at {share}: logits are not bit-identical");
            let st = p.off.stats();
            let prefetched: u64 = st.per_layer_prefetched.iter().sum();
            assert!(prefetched > 0, "predictor {kind} at {share}: nothing prefetched: {st:?}");
            assert!(st.bytes_prefetched > 0 && st.bytes_prefetched <= st.bytes_read_high);
            let used: u64 = st.per_layer_prefetch_used.iter().sum();
            let wasted: u64 = st.per_layer_prefetch_wasted.iter().sum();
            assert!(used + wasted <= prefetched, "{st:?}");
        }
    }
}

#[test]
fn computing_misses_on_the_host_never_changes_the_answer() {
    let model = load(&bundled());
    for backend in [0, 1] {
        let run_on = |off: Option<Offload>| -> (Vec<Vec<f32>>, Vec<u32>) {
            if backend == 0 {
                let mut eng = engine(&model, CpuBackend::new(2));
                if let Some(o) = off {
                    eng.set_offload(o);
                }
                run(&mut eng, &OWNERSHIP, 8, None)
            } else {
                let mut eng = engine(&model, PlainBackend::new());
                if let Some(o) = off {
                    eng.set_offload(o);
                }
                run(&mut eng, &OWNERSHIP, 8, None)
            }
        };
        let want = run_on(None);
        let cfg = OffloadConfig { budget: Budget::Share(0.25), host_compute: true, ..Default::default() };
        let off = Offload::new(Arc::clone(&model), &cfg).expect("offload");
        let got = run_on(Some(off));
        assert!(got == want, "backend {backend}: host compute changed the answer");
    }
}

#[test]
fn a_prefetch_never_evicts_the_current_layers_experts_and_views_wait_for_their_bytes() {
    let model = load(&bundled());
    // Budget: exactly one layer's top-k.
    let cfg = OffloadConfig { budget: Budget::Share(2.0 / 48.0), ..Default::default() };
    let mut off = Offload::new(Arc::clone(&model), &cfg).expect("offload");
    type P = dyn ExpertProvider<CpuBackend>;
    let route = Route { experts: vec![3, 5], weights: vec![0.6, 0.4] };
    let waves = <Offload as ExpertProvider<CpuBackend>>::schedule(&mut off, 0, std::slice::from_ref(&route));
    assert_eq!(waves, vec![vec![3, 5]]);
    let p: &mut P = &mut off;
    p.fetch(0, &waves[0], std::slice::from_ref(&route)).expect("fetch");
    // Before the wait: each expert is either still loading (no view) or landed (a view).
    for e in [3, 5] {
        match p.state(0, e) {
            ExpertState::Loading => assert!(p.view(0, e).is_none()),
            ExpertState::Ready => assert!(p.view(0, e).is_some()),
            s => panic!("expert {e}: {s:?}"),
        }
    }
    // Every slot is taken by layer 0's experts: a prefetch for layer 1 finds no victim.
    let id = p.prefetch(1, &[(0, 0.5), (1, 0.5)], Priority::Prefetch).expect("prefetch");
    assert_eq!(p.state(1, 0), ExpertState::Absent);
    p.cancel(id);
    p.wait(0).expect("wait");
    for e in [3, 5] {
        assert_eq!(p.state(0, e), ExpertState::Ready);
        assert!(p.view(0, e).is_some());
    }
    assert_eq!(p.state(0, 4), ExpertState::Absent);
    assert!(p.view(0, 4).is_none());
}

#[test]
fn a_failed_prefetch_of_a_later_layer_never_fails_the_current_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("victim.gguf");
    std::fs::copy(bundled(), &path).expect("copy");
    let model = load(&path);
    let cfg = OffloadConfig { budget: Budget::Share(0.5), ..Default::default() };
    let mut off = Offload::new(Arc::clone(&model), &cfg).expect("offload");
    let p: &mut dyn ExpertProvider<CpuBackend> = &mut off;
    let route = Route { experts: vec![1, 2], weights: vec![0.5, 0.5] };
    p.fetch(0, &[1, 2], std::slice::from_ref(&route)).expect("fetch");
    p.wait(0).expect("layer 0 reads fine");
    // Cut the file: the last layer's experts are gone. Prefetch them, then run layer 0 again.
    let last = model.hp.n_layer - 1;
    let cut = model.experts(last).expect("moe")[0].gate.offset;
    std::fs::OpenOptions::new().write(true).open(&path).expect("open").set_len(cut).expect("truncate");
    p.prefetch(last, &[(6, 0.5), (7, 0.5)], Priority::Prefetch).expect("submitting a prefetch does not fail");
    let route = Route { experts: vec![1, 2], weights: vec![0.5, 0.5] };
    p.fetch(0, &[1, 2], std::slice::from_ref(&route)).expect("hits");
    p.wait(0).expect("layer 0 does not wait for, nor fail on, the last layer's prefetch");
    assert!(p.view(0, 1).is_some() && p.view(0, 2).is_some());
    // The failed prefetch left nothing viewable; a demand read of it names the file.
    let route = Route { experts: vec![6, 7], weights: vec![0.5, 0.5] };
    p.fetch(last, &[6, 7], std::slice::from_ref(&route)).expect("fetch");
    let err = p.wait(last).expect_err("the cut experts cannot be read").to_string();
    assert!(err.contains("victim.gguf"), "{err}");
    assert!(p.view(last, 6).is_none() && p.view(last, 7).is_none());
}

#[test]
fn a_budget_below_one_layers_experts_is_a_clear_error() {
    let model = load(&bundled());
    let cfg = OffloadConfig { budget: Budget::Bytes(100_000), ..Default::default() };
    let err = Offload::new(model, &cfg).err().expect("must refuse").to_string();
    assert!(err.contains("100000"), "{err}");
}

#[test]
fn a_read_that_fails_mid_run_ends_the_generation_with_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("victim.gguf");
    std::fs::copy(bundled(), &path).expect("copy");
    let model = load(&path);
    let off = Offload::new(Arc::clone(&model), &OffloadConfig { budget: Budget::Share(0.1), ..Default::default() })
        .expect("offload");
    let mut eng = engine(&model, CpuBackend::new(2));
    eng.set_offload(off);
    let mut sess = eng.new_session().expect("session");
    eng.eval(&mut sess, &[709, 1352, 1093, 269], Logits::Last).expect("first eval reads fine");
    // Cut the file under the running engine: the experts of the last layers are gone.
    let len = std::fs::metadata(&path).expect("stat").len();
    std::fs::OpenOptions::new().write(true).open(&path).expect("open").set_len(len / 3).expect("truncate");
    let mut failed = None;
    for id in [545u32, 3676, 368, 427, 753, 12, 99, 1000, 2000, 3000] {
        if let Err(e) = eng.eval(&mut sess, &[id], Logits::Last) {
            failed = Some(e.to_string());
            break;
        }
    }
    let msg = failed.expect("a read past the cut must fail");
    assert!(msg.contains("victim.gguf"), "{msg}");
    // The engine survives: a new session over resident experts still runs or fails cleanly.
    let mut s2 = eng.new_session().expect("session");
    let _ = eng.eval(&mut s2, &[709], Logits::Last);
}

/// Per-layer shares set from a routing profile (deepseek2's dense first layer gets none) still
/// give the all-resident bits, with the predictor on.
#[test]
fn per_layer_shares_from_a_profile_never_change_the_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = synth(dir.path(), "deepseek2", GgmlType::Q4_0, None);
    let model = load(&path);
    let prompt = [3, 100, 200, 7, 42, 9, 300, 11];
    let (want_logits, want_ids) = baseline(&model, CpuBackend::new(2), &prompt);
    let profile = dir.path().join("profile.json");
    for pass in 0..2 {
        let cfg = OffloadConfig {
            budget: Budget::Share(0.5),
            per_layer: true,
            profile: Some(profile.clone()),
            ..Default::default()
        };
        let off = Offload::new(Arc::clone(&model), &cfg).unwrap_or_else(|e| panic!("pass {pass}: {e}"));
        let mut eng = engine(&model, CpuBackend::new(2));
        eng.set_offload(off);
        eng.set_predictor(Some(PredictConfig { distance: 2, cost_gate: false, ..Default::default() }));
        let (logits, ids) = run(&mut eng, &prompt, 24, None);
        assert_eq!(ids, want_ids, "pass {pass}");
        assert!(logits == want_logits, "pass {pass}: logits are not bit-identical");
        if pass == 1 {
            assert!(eng.offload_stats().expect("stats").bytes_warmed > 0, "the second run warms from the profile");
        }
    }
}
