//! Every family, written by our synthesizer in F32, F16 and Q8_0, run by moerun and by the linked
//! libllama in the same test: logits after the prompt within tolerance and greedy continuations
//! identical. This is how families without a fixture (qwen2moe, olmoe) are held to llama.cpp.

use std::path::Path;
use std::sync::Arc;

use moerun::arch::{QkNorm, SPECS};
use moerun::engine::{argmax, Engine, EngineConfig};
use moerun::gguf::GgmlType;
use moerun::layers::Logits;
use moerun::model::Model;
use moerun::reference::{LlamaReference, ReferenceConfig};
use moerun::synth::SynthConfig;

fn config(arch: &str, ty: GgmlType) -> SynthConfig {
    SynthConfig {
        n_layer: 3,
        // A norm over the whole k projection (OLMoE) is sized by n_embd in llama.cpp: no
        // grouped-query attention there.
        n_head_kv: if moerun::arch::spec(arch).is_some_and(|s| s.qk_norm == QkNorm::Full) { 8 } else { 4 },
        n_ff_exp: 256,
        n_expert: 8,
        rms_eps: 1e-6,
        seed: 11,
        ..SynthConfig::small(arch, ty)
    }
}

/// Compare ours and libllama's last-position logits (max abs difference ≤ `tol`) and 16 greedy
/// tokens (identical), for a 12-token prompt.
fn check(path: &Path, tol: f32) -> Result<(), String> {
    let model = Arc::new(Model::load(path).map_err(|e| e.to_string())?);
    let mut eng =
        Engine::new(model, EngineConfig { threads: 2, n_ctx: 256, ..Default::default() }).map_err(|e| e.to_string())?;
    let mut reference = LlamaReference::load(path, ReferenceConfig { n_ctx: 256, threads: 1, repack: true })
        .map_err(|e| e.to_string())?;
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 500).collect();
    let mut sess = eng.new_session().map_err(|e| e.to_string())?;
    let mut ours = eng.eval(&mut sess, &prompt, Logits::Last).map_err(|e| e.to_string())?;
    let mut theirs = reference.decode(&prompt).map_err(|e| e.to_string())?;
    let diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("{}: max logit difference {diff:.2e}", path.file_name().and_then(|n| n.to_str()).unwrap_or_default());
    if diff > tol {
        return Err(format!("{}: last-position logits differ by {diff} > {tol}", path.display()));
    }
    for step in 0..16 {
        let (a, b) = (argmax(&ours), argmax(&theirs));
        if a != b {
            return Err(format!("{}: greedy step {step}: moerun {a}, llama.cpp {b}", path.display()));
        }
        ours = eng.eval(&mut sess, &[a as u32], Logits::Last).map_err(|e| e.to_string())?;
        theirs = reference.decode(&[b as u32]).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[test]
fn every_family_matches_linked_llama_cpp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for arch in SPECS.iter().map(|s| s.name) {
        for (ty, tol) in [(GgmlType::F32, 0.002), (GgmlType::F16, 0.002), (GgmlType::Q8_0, 0.02)] {
            let path = dir.path().join(format!("{arch}-{}.gguf", ty.name()));
            config(arch, ty).write(&path, &mut |_, _| {}).expect("synth");
            if let Err(e) = check(&path, tol) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
