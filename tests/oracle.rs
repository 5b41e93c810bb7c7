//! llama.cpp is the oracle: our logits and greedy tokens on the fixture models must match the
//! references it produced (see ../shared/fixtures/README.md for the tolerances' reasoning).

mod common;

use std::sync::Arc;

use moerun::engine::{argmax, Engine, EngineConfig, GenerateOptions, SamplerConfig};
use moerun::layers::Logits;
use moerun::model::Model;

const LOGIT_TOL: f32 = 0.02;

/// rustdoc-moe prompts we cannot reproduce exactly yet (none today): held to a looser bound and
/// reported, not skipped. This sensitive model (f16 flash-attention accumulators) amplifies
/// last-bit differences to ~0.1 in logits. The test fails if a listed case passes the strict
/// check, so the list stays true.
const KNOWN_GAP: &[&str] = &[];
const KNOWN_GAP_TOL: f32 = 0.2;

fn engine(path: &std::path::Path, threads: usize) -> Engine {
    let model = Arc::new(Model::load(path).unwrap_or_else(|e| panic!("{e}")));
    Engine::new(model, EngineConfig { threads, ..Default::default() })
}

/// One fixture case: top-20 logits within tolerance, top-1 where the margin is clear, the argmax
/// at every prompt position, and (for the trained model) the full greedy continuation.
fn check(eng: &mut Engine, name: &str, c: &common::RefCase, exact_greedy: bool) -> Result<(), String> {
    let n_vocab = eng.model().hp.n_vocab;
    let mut sess = eng.new_session();
    let all = eng.eval(&mut sess, &c.prompt_ids, Logits::All).map_err(|e| e.to_string())?;
    let last = &all[(c.prompt_ids.len() - 1) * n_vocab..];
    for (&id, &want) in c.last_top20_ids.iter().zip(&c.last_top20_logits) {
        let got = last[id as usize];
        if (got - want).abs() > LOGIT_TOL {
            return Err(format!("{name} {:?}: logit of {id} is {got}, llama.cpp says {want}", c.prompt_text));
        }
    }
    if c.last_margin > 0.01 && argmax(last) as u32 != c.last_top20_ids[0] {
        return Err(format!("{name} {:?}: top-1 {} vs llama.cpp {}", c.prompt_text, argmax(last), c.last_top20_ids[0]));
    }
    for (p, &want) in c.all_positions_argmax.iter().enumerate() {
        let row = &all[p * n_vocab..(p + 1) * n_vocab];
        let got = argmax(row) as u32;
        let mut sorted = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let margin = sorted[0] - sorted[1];
        if got != want && (exact_greedy || margin > 0.01) {
            return Err(format!("{name} {:?}: argmax at position {p} is {got}, llama.cpp says {want}", c.prompt_text));
        }
    }
    if exact_greedy {
        let mut sess = eng.new_session();
        let opts =
            GenerateOptions { max_tokens: c.greedy_ids.len(), sampler: SamplerConfig::greedy(), is_eog: &|_| false };
        let g = eng
            .generate(&mut sess, &c.prompt_ids, &opts, &mut |_| moerun::engine::Flow::Continue)
            .map_err(|e| e.to_string())?;
        if g.ids != c.greedy_ids {
            return Err(format!("{name} {:?}: greedy\n  ours  {:?}\n  llama {:?}", c.prompt_text, g.ids, c.greedy_ids));
        }
    }
    Ok(())
}

#[test]
fn fixtures_match_llama_cpp() {
    let Some(root) = common::fixtures() else { return };
    let mut failures = Vec::new();
    let mut checked = 0;
    for (gguf, r) in common::ref_pairs(&root) {
        let name = gguf.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let exact = name.starts_with("rustdoc-moe");
        let mut eng = engine(&gguf, 2);
        for c in &r.cases {
            checked += 1;
            let strict = check(&mut eng, &name, c, exact);
            if exact && KNOWN_GAP.contains(&c.prompt_text.as_str()) {
                match strict {
                    Ok(()) => {
                        failures.push(format!("{name} {:?} is exact now: remove it from KNOWN_GAP", c.prompt_text))
                    }
                    Err(e) => {
                        eprintln!("known gap: {e}");
                        let n_vocab = eng.model().hp.n_vocab;
                        let mut sess = eng.new_session();
                        let all = eng.eval(&mut sess, &c.prompt_ids, Logits::Last).map_err(|e| e.to_string());
                        match all {
                            Ok(last) => {
                                assert_eq!(last.len(), n_vocab);
                                for (&id, &want) in c.last_top20_ids.iter().zip(&c.last_top20_logits) {
                                    if (last[id as usize] - want).abs() > KNOWN_GAP_TOL {
                                        failures.push(format!(
                                            "{name} {:?}: logit of {id} off by more than {KNOWN_GAP_TOL}",
                                            c.prompt_text
                                        ));
                                    }
                                }
                            }
                            Err(e) => failures.push(e),
                        }
                    }
                }
            } else if let Err(e) = strict {
                failures.push(e);
            }
        }
    }
    assert!(checked >= 8 + 3 * 5, "only {checked} cases found");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ from llama.cpp:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
