//! The expert predictor on the bundled rustdoc-moe: how often the routers of the next layers,
//! fed the state entering a layer, name the experts the token then uses (issue 11's acceptance:
//! next-layer recall of the top-2 against the 2 used, over a few hundred decoded tokens, at
//! least 0.85).

use std::path::Path;
use std::sync::Arc;

use moerun::engine::{Engine, EngineConfig, GenerateOptions, SamplerConfig};
use moerun::model::Model;
use moerun::predict::PredictConfig;
use moerun::tokenizer::{EncodeOptions, Tokenizer};

#[test]
fn next_layer_recall_on_the_bundled_model_is_at_least_0_85() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/rustdoc-moe-Q8_0.gguf");
    let model = Arc::new(Model::load(&path).expect("model"));
    let tok = Tokenizer::from_gguf(&path).expect("tokenizer");
    let mut eng = Engine::new(Arc::clone(&model), EngineConfig { threads: 2, ..Default::default() }).expect("engine");
    eng.set_predictor(Some(PredictConfig { distance: 3, ..Default::default() }));
    let text = "Ownership is a set of rules that govern how a Rust program manages memory.";
    let prompt = tok.encode(text, EncodeOptions { add_bos: true, parse_special: true }).expect("encode");
    let mut sess = eng.new_session().expect("session");
    let opts = GenerateOptions {
        max_tokens: 300,
        sampler: SamplerConfig { temperature: 0.0, ..Default::default() },
        is_eog: &|_| false,
    };
    // Until the context (256 tokens) is full.
    let g = eng.generate(&mut sess, &prompt, &opts, &mut |_| moerun::engine::Flow::Continue).expect("generate");
    let steps = g.ids.len() as u64 - 1;
    let st = eng.predictor().expect("predictor").stats(0);
    let d: Vec<(usize, f64, u64)> = st.per_distance.iter().map(|d| (d.distance, d.recall, d.predictions)).collect();
    eprintln!("recall by distance (distance, recall, predictions): {d:?}");
    assert!(steps > 200 && st.tokens == steps, "{steps} decode steps, {} predicted", st.tokens);
    assert_eq!(d[0].2, steps * model.hp.n_layer as u64, "every layer of every decoded token predicted at distance 1");
    assert!(d[0].1 >= 0.85, "next-layer recall {:.3}", d[0].1);
    assert!(d[0].1 > d[1].1 && d[1].1 > d[2].1, "farther is harder: {d:?}");
}
