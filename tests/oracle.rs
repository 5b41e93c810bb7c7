//! llama.cpp is the oracle: our logits and greedy tokens on the fixture models must match the
//! references it produced (see ../shared/fixtures/README.md for the tolerances' reasoning).

mod common;

use std::sync::Arc;

use moerun::backend::{cpu::CpuBackend, plain::PlainBackend, Backend};
use moerun::engine::{argmax, Engine, EngineConfig};
use moerun::layers::Logits;
use moerun::model::{Model, Residency, Resident};
use moerun::oracle::{self, Tolerance, KERNELS, PLAIN};

/// Every case of `pairs` on a fresh `backend` per file: how many ran, and the failures.
fn check_pairs<B: Backend>(
    pairs: Vec<(std::path::PathBuf, common::RefFile)>,
    backend: &impl Fn() -> B,
    tol: &Tolerance,
) -> (usize, Vec<String>) {
    let out = oracle::check_pairs(pairs, &mut || Ok(backend()), tol);
    for (model, prompt, worst) in &out.worst {
        eprintln!("{model} {prompt:?}: top-20 logits within {worst:.4}");
    }
    (out.checked, out.failures)
}

/// The oracle body, the same on every backend.
fn fixtures_match_llama_cpp<B: Backend>(backend: impl Fn() -> B, tol: &Tolerance) {
    let Some(root) = common::fixtures() else { return };
    let (checked, failures) = check_pairs(common::ref_pairs(&root), &backend, tol);
    assert!(checked >= 8 + 3 * 5, "only {checked} cases found");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ from llama.cpp:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn fixtures_match_llama_cpp_on_the_cpu_backend() {
    fixtures_match_llama_cpp(|| CpuBackend::new(2), &KERNELS);
}

#[test]
fn fixtures_match_llama_cpp_on_the_plain_f32_backend() {
    fixtures_match_llama_cpp(PlainBackend::new, &PLAIN);
}

/// One family being added (`../shared/fixtures-next/<folder>`), every case within `tol`.
fn fixtures_next_match_llama_cpp(folder: &str, tol: &Tolerance) {
    let Some(root) = common::fixtures() else { return };
    let dir = root.join("../fixtures-next").join(folder);
    let (checked, failures) = check_pairs(common::ref_pairs_in(&dir), &|| CpuBackend::new(2), tol);
    assert!(checked > 0, "no reference cases in {}", dir.display());
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ from llama.cpp:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// qwen2moe's converter writes the shared-expert gate as `[n_embd, 1]` (the F16 file),
/// `llama-quantize` as `[n_embd]` (the Q4_K_M file); both must load and match.
#[test]
fn qwen2moe_fixtures_next_match_llama_cpp() {
    fixtures_next_match_llama_cpp("qwen2moe-tiny", &KERNELS);
}

/// A dense llama reproducer whose references come from AVX-512 kernels and whose first prompt
/// (67 tokens) takes llama.cpp's tiled attention path: the native build's kernels and f32
/// attention accumulation for long prompt batches match it (an AVX2 build's SwiGLU `exp` is
/// 1 ulp off, and 8 layers turn that into 0.04).
#[test]
fn llama_dense_fixture_matches_llama_cpp() {
    fixtures_next_match_llama_cpp("llama-dense-tiny", &KERNELS);
}

/// gpt-oss: attention sinks, sliding windows on even layers, YaRN, router and expert biases,
/// softmax over the selected logits, the clamped SwiGLU, MXFP4 experts.
#[test]
fn gptoss_fixtures_next_match_llama_cpp() {
    fixtures_next_match_llama_cpp("gptoss-tiny", &KERNELS);
}

/// DeepSeek-V3-style MLA (q LoRA, one shared latent KV head, absorbed `attn_k_b`/`attn_v_b`,
/// YaRN with `yarn_log_multiplier`), a leading dense layer, sigmoid routing with the selection
/// bias and group limit, an ungated shared expert.
#[test]
fn deepseek2_fixtures_next_match_llama_cpp() {
    fixtures_next_match_llama_cpp("deepseek2-tiny", &KERNELS);
}

/// gpt-oss's sliding-window layers keep a ring of window + batch positions (llama.cpp's SWA
/// cache) instead of the whole context. With batches small enough that the rings wrap many
/// times — one-row attention (8-row batches) and the tiled path (64-row batches) — every logit
/// of a 200-token prompt and of 24 greedy steps after it is bit-identical to full-length layers,
/// and the cache is smaller.
#[test]
fn sliding_window_rings_give_the_full_cache_answer() {
    let Some(root) = common::fixtures() else { return };
    let path = root.join("../fixtures-next/gptoss-tiny/gptoss-tiny-Q8_0.gguf");
    let model = Arc::new(Model::load(&path).unwrap_or_else(|e| panic!("{e}")));
    let prompt: Vec<u32> = (0..200u32).map(|i| (i * 37 + 11) % 3000).collect();
    let run = |n_batch: usize, swa_full: bool| {
        let cfg = EngineConfig {
            threads: 2,
            n_ctx: 256,
            n_batch,
            swa_full,
            residency: Residency::fixed(Resident::All),
            ..Default::default()
        };
        let mut eng = Engine::new(Arc::clone(&model), cfg).unwrap_or_else(|e| panic!("{e}"));
        let mut sess = eng.new_session().unwrap_or_else(|e| panic!("{e}"));
        let mut all = eng.eval(&mut sess, &prompt, Logits::All).unwrap_or_else(|e| panic!("{e}"));
        let mut last = all[all.len() - model.hp.n_vocab..].to_vec();
        for _ in 0..24 {
            last = eng.eval(&mut sess, &[argmax(&last) as u32], Logits::Last).unwrap_or_else(|e| panic!("{e}"));
            all.extend_from_slice(&last);
        }
        (all, eng.session_kv_bytes())
    };
    for n_batch in [8, 64] {
        let (full, full_bytes) = run(n_batch, true);
        let (ring, ring_bytes) = run(n_batch, false);
        assert!(ring == full, "batches of {n_batch}: the ring changed the logits");
        assert!(ring_bytes < full_bytes, "batches of {n_batch}: {ring_bytes} vs {full_bytes} bytes");
    }
}
