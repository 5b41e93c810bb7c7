//! Caching must never change the answer: with mixed precision off, every budget and every
//! policy gives bit-identical logits and tokens to the all-resident run. And a read that fails
//! mid-run ends that generation with a clear error while the process carries on.

use std::path::Path;
use std::sync::Arc;

use moerun::engine::offload::{Budget, Offload, OffloadConfig};
use moerun::engine::{argmax, Engine, EngineConfig};
use moerun::experts::PolicyKind;
use moerun::gguf::GgmlType;
use moerun::layers::Logits;
use moerun::model::{LoadOptions, Model, Resident};
use moerun::synth::SynthConfig;

fn load(path: &Path) -> Arc<Model> {
    // Experts stay in ggml's plain layout, as the cache holds them.
    Arc::new(Model::load_with(path, LoadOptions { resident: Resident::Dense }).unwrap_or_else(|e| panic!("{e}")))
}

/// Prefill `prompt` and generate `n` greedy tokens; returns every step's logits and the tokens.
fn run(eng: &mut Engine, prompt: &[u32], n: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut sess = eng.new_session();
    let mut logits = eng.eval(&mut sess, prompt, Logits::Last).unwrap_or_else(|e| panic!("{e}"));
    let (mut all, mut ids) = (vec![], vec![]);
    for _ in 0..n {
        let id = argmax(&logits) as u32;
        all.push(logits);
        ids.push(id);
        logits = eng.eval(&mut sess, &[id], Logits::Last).unwrap_or_else(|e| panic!("{e}"));
    }
    (all, ids)
}

fn check(path: &Path, prompt: &[u32], pinned: usize) {
    let model = load(path);
    let mut base = Engine::new(Arc::clone(&model), EngineConfig { threads: 2, ..Default::default() });
    let (want_logits, want_ids) = run(&mut base, prompt, 24);
    for policy in [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Hobbit, PolicyKind::Fate] {
        for share in [0.10, 0.25, 0.50, 1.0] {
            let cfg = OffloadConfig {
                budget: Budget::Share(share),
                policy,
                pinned_layers: if policy == PolicyKind::Fate && share >= 0.5 { pinned } else { 0 },
                ..Default::default()
            };
            let off = Offload::new(Arc::clone(&model), &cfg).unwrap_or_else(|e| panic!("{policy:?} {share}: {e}"));
            let mut eng = Engine::new(Arc::clone(&model), EngineConfig { threads: 2, ..Default::default() });
            eng.set_offload(off);
            let (logits, ids) = run(&mut eng, prompt, 24);
            assert_eq!(ids, want_ids, "{}: {policy:?} at {share}: tokens differ", path.display());
            assert!(logits == want_logits, "{}: {policy:?} at {share}: logits are not bit-identical", path.display());
            let st = eng.offload().expect("offload").stats();
            assert!(st.lookups > 0 && st.hits <= st.lookups);
            if share < 1.0 {
                assert!(
                    st.loads_high > (model.hp.n_layer * model.hp.n_expert_used) as u64,
                    "{policy:?} {share}: {st:?}"
                );
            }
        }
    }
}

#[test]
fn every_budget_and_policy_gives_the_all_resident_answer_on_rustdoc_moe() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/rustdoc-moe-Q8_0.gguf");
    // "Ownership is a set of rules that govern" in rustdoc-moe's vocabulary.
    let prompt = [3197, 1045, 363, 271, 677, 302, 2073, 432, 1545];
    check(&path, &prompt, 1);
}

#[test]
fn every_budget_and_policy_gives_the_all_resident_answer_on_a_synth_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qwen3moe.gguf");
    let cfg = SynthConfig {
        n_layer: 4,
        n_ff_exp: 256,
        n_expert: 16,
        n_expert_used: 4,
        rms_eps: 1e-6,
        seed: 5,
        ..SynthConfig::small("qwen3moe", GgmlType::Q4_0)
    };
    cfg.write(&path, &mut |_, _| {}).expect("synth");
    check(&path, &[3, 100, 200, 7, 42, 9, 300, 11], 1);
}

#[test]
fn a_budget_below_one_layers_experts_is_a_clear_error() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/rustdoc-moe-Q8_0.gguf");
    let model = load(&path);
    let cfg = OffloadConfig { budget: Budget::Bytes(100_000), ..Default::default() };
    let err = Offload::new(model, &cfg).err().expect("must refuse").to_string();
    assert!(err.contains("100000"), "{err}");
}

#[test]
fn a_read_that_fails_mid_run_ends_the_generation_with_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("victim.gguf");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/rustdoc-moe-Q8_0.gguf"), &path).expect("copy");
    let model = load(&path);
    let off = Offload::new(Arc::clone(&model), &OffloadConfig { budget: Budget::Share(0.1), ..Default::default() })
        .expect("offload");
    let mut eng = Engine::new(Arc::clone(&model), EngineConfig { threads: 2, ..Default::default() });
    eng.set_offload(off);
    let mut sess = eng.new_session();
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
    let mut s2 = eng.new_session();
    let _ = eng.eval(&mut s2, &[709], Logits::Last);
}
