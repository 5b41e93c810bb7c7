//! llama.cpp is the oracle: our logits and greedy tokens on the fixture models must match the
//! references it produced (see ../shared/fixtures/README.md for the tolerances' reasoning).

mod common;

use std::sync::Arc;

use moerun::backend::{cpu::CpuBackend, plain::PlainBackend, Backend};
use moerun::engine::{argmax, Engine, EngineConfig, GenerateOptions, SamplerConfig};
use moerun::layers::Logits;
use moerun::model::{Model, Residency, Resident};

/// How closely a backend must follow llama.cpp: logits within `logit`, and the top-1 (at every
/// prompt position, and at every greedy step of the trained model) wherever the margin between
/// the two best candidates exceeds `margin`; the trained model has its own pair.
struct Tolerance {
    logit: f32,
    margin: f32,
    trained_logit: f32,
    trained_margin: f32,
}

/// A backend on ggml's own kernels (the same arithmetic as llama.cpp): within 0.02, and the
/// trained model's argmaxes and greedy continuations exactly.
const KERNELS: Tolerance = Tolerance { logit: 0.02, margin: 0.01, trained_logit: 0.02, trained_margin: 0.0 };

/// The plain f32 backend: llama.cpp's data types, but exact f64 sums instead of ggml's SIMD
/// order and f16 value accumulators. The random-weight models stay within 0.02; rustdoc-moe's
/// logits move by up to ~0.2 (the f16 attention accumulators round differently, and this model
/// amplifies that), so there the fixtures' own measure applies: the argmax at every prompt
/// position and the greedy continuation, parting from llama.cpp's only where its margin is
/// within 0.5.
const PLAIN: Tolerance = Tolerance { logit: 0.02, margin: 0.01, trained_logit: 0.25, trained_margin: 0.5 };

/// `path` on `backend`, every weight resident (what `generate` does when the model fits).
fn engine<B: Backend>(path: &std::path::Path, backend: B) -> Engine<B> {
    let model = Arc::new(Model::load(path).unwrap_or_else(|e| panic!("{e}")));
    let cfg = EngineConfig { residency: Residency::fixed(Resident::All), ..Default::default() };
    Engine::with_backend(model, backend, cfg).unwrap_or_else(|e| panic!("{e}"))
}

/// One fixture case: top-20 logits within tolerance, top-1 where the margin is clear, the argmax
/// at every prompt position, and (for the trained model) the greedy continuation.
fn check<B: Backend>(
    eng: &mut Engine<B>,
    name: &str,
    c: &common::RefCase,
    tol: &Tolerance,
    trained: bool,
) -> Result<(), String> {
    let n_vocab = eng.model().hp.n_vocab;
    let (logit_tol, margin) = if trained { (tol.trained_logit, tol.trained_margin) } else { (tol.logit, tol.margin) };
    let mut sess = eng.new_session().map_err(|e| e.to_string())?;
    let all = eng.eval(&mut sess, &c.prompt_ids, Logits::All).map_err(|e| e.to_string())?;
    let last = &all[(c.prompt_ids.len() - 1) * n_vocab..];
    let worst = c.last_top20_ids.iter().zip(&c.last_top20_logits).map(|(&id, &w)| (last[id as usize] - w).abs());
    eprintln!("{name} {:?}: top-20 logits within {:.4}", c.prompt_text, worst.fold(0f32, f32::max));
    for (&id, &want) in c.last_top20_ids.iter().zip(&c.last_top20_logits) {
        let got = last[id as usize];
        if (got - want).abs() > logit_tol {
            return Err(format!("{name} {:?}: logit of {id} is {got}, llama.cpp says {want}", c.prompt_text));
        }
    }
    if c.last_margin > margin.max(0.01) && argmax(last) as u32 != c.last_top20_ids[0] {
        return Err(format!("{name} {:?}: top-1 {} vs llama.cpp {}", c.prompt_text, argmax(last), c.last_top20_ids[0]));
    }
    for (p, &want) in c.all_positions_argmax.iter().enumerate() {
        let row = &all[p * n_vocab..(p + 1) * n_vocab];
        let got = argmax(row) as u32;
        let mut sorted = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if got != want && sorted[0] - sorted[1] > margin {
            return Err(format!("{name} {:?}: argmax at position {p} is {got}, llama.cpp says {want}", c.prompt_text));
        }
    }
    if trained {
        let mut sess = eng.new_session().map_err(|e| e.to_string())?;
        let opts =
            GenerateOptions { max_tokens: c.greedy_ids.len(), sampler: SamplerConfig::greedy(), is_eog: &|_| false };
        let g = eng
            .generate(&mut sess, &c.prompt_ids, &opts, &mut |_| moerun::engine::Flow::Continue)
            .map_err(|e| e.to_string())?;
        // Identical, or parting only at a step where llama.cpp's own margin is within tolerance.
        let parted = g.ids.iter().zip(&c.greedy_ids).position(|(a, b)| a != b);
        let excused = parted.is_some_and(|i| c.greedy_margins.get(i).is_some_and(|&m| m <= margin));
        if (parted.is_some() || g.ids.len() != c.greedy_ids.len()) && !excused {
            return Err(format!("{name} {:?}: greedy\n  ours  {:?}\n  llama {:?}", c.prompt_text, g.ids, c.greedy_ids));
        }
    }
    Ok(())
}

/// Every case of every `(gguf, ref)` pair on a fresh `backend` per file: how many cases ran, and
/// the failures (only rustdoc-moe, the trained model, is held to its greedy continuations).
fn check_pairs<B: Backend>(
    pairs: Vec<(std::path::PathBuf, common::RefFile)>,
    backend: &impl Fn() -> B,
    tol: &Tolerance,
) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for (gguf, r) in pairs {
        let name = gguf.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let trained = name.starts_with("rustdoc-moe");
        let mut eng = engine(&gguf, backend());
        for c in &r.cases {
            checked += 1;
            if let Err(e) = check(&mut eng, &name, c, tol, trained) {
                failures.push(e);
            }
        }
    }
    (checked, failures)
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
