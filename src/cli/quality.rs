//! `moerun quality`: what the expert-cache settings cost in quality on held-out text. Runs the
//! text token by token (decode, where mixed precision applies) twice — all resident at full
//! precision, then with the given cache settings — and reports perplexity, its change, top-1
//! agreement and bytes read per token.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use moerun::engine::{argmax, Engine, EngineConfig};
use moerun::layers::Logits;
use moerun::model::{Model, Residency, Resident};
use moerun::tokenizer::{EncodeOptions, Tokenizer};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model (default: the bundled model).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Held-out text; paragraphs (blank-line separated) are evaluated as separate sequences,
    /// without BOS (as the fixtures were made).
    #[arg(long, default_value = "benches/data/heldout.txt")]
    text: PathBuf,
    #[arg(short, long)]
    threads: Option<usize>,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    offload: super::offload_args::OffloadArgs,
}

struct Pass {
    nll: f64,
    n: usize,
    top1: Vec<u32>,
}

fn pass(engine: &mut Engine, seqs: &[Vec<u32>]) -> anyhow::Result<Pass> {
    let mut p = Pass { nll: 0.0, n: 0, top1: Vec::new() };
    for ids in seqs {
        let mut sess = engine.new_session()?;
        if let Some(o) = engine.offload_mut() {
            o.reset_sequence();
        }
        for w in ids.windows(2) {
            let logits = engine.eval(&mut sess, &w[..1], Logits::Last)?;
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
            p.nll += lse - logits[w[1] as usize] as f64;
            p.n += 1;
            p.top1.push(argmax(&logits) as u32);
        }
    }
    Ok(p)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = super::model_path(a.model.as_deref())?;
    let tok = Tokenizer::from_gguf(&path)?;
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let seqs: Vec<Vec<u32>> = text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| tok.encode(p, EncodeOptions { add_bos: false, parse_special: false }))
        .collect::<Result<_, _>>()?;
    let model = Arc::new(Model::load(&path)?);
    let threads = a.threads.unwrap_or_else(moerun::engine::default_threads);
    // Experts in ggml's plain layout in both runs, as the cache holds them.
    let cfg = EngineConfig { threads, residency: Residency::fixed(Resident::Dense), ..Default::default() };
    let mut base = Engine::new(Arc::clone(&model), cfg.clone())?;
    let full = pass(&mut base, &seqs)?;
    drop(base);
    let mut eng = a.offload.engine(&model, &path, cfg)?;
    let test = pass(&mut eng, &seqs)?;
    let ppl = |p: &Pass| (p.nll / p.n.max(1) as f64).exp();
    let agree = full.top1.iter().zip(&test.top1).filter(|(a, b)| a == b).count() as f64 / full.top1.len().max(1) as f64;
    let st = eng.offload_stats();
    let per_tok =
        st.as_ref().map(|s| ((s.bytes_read_high as f64) / test.n as f64, (s.bytes_read_low as f64) / test.n as f64));
    println!("{} tokens of {} in {} sequences", full.n, a.text.display(), seqs.len());
    println!(
        "perplexity: full precision, all resident {:.3}; with these settings {:.3} ({:+.2}%)",
        ppl(&full),
        ppl(&test),
        100.0 * (ppl(&test) / ppl(&full) - 1.0)
    );
    println!("top-1 agreement with full precision: {:.2}%", 100.0 * agree);
    if let (Some(s), Some((h, l))) = (&st, per_tok) {
        let looks = s.lookups.max(1) as f64;
        println!(
            "expert cache: hit rate {:.1}%, read per token {:.3} MiB high + {:.3} MiB low; misses: {} high, {} low, {} skipped ({:.1}% / {:.1}% / {:.1}% of lookups)",
            100.0 * s.hit_rate,
            h / 1048576.0,
            l / 1048576.0,
            s.loads_high,
            s.loads_low,
            s.skips,
            100.0 * s.loads_high as f64 / looks,
            100.0 * s.loads_low as f64 / looks,
            100.0 * s.skips as f64 / looks
        );
    }
    if let Some(j) = a.json {
        let report = serde_json::json!({
            "tokens": full.n, "ppl_full": ppl(&full), "ppl": ppl(&test), "top1_agreement": agree,
            "expert_cache": st, "bytes_high_per_token": per_tok.map(|p| p.0), "bytes_low_per_token": per_tok.map(|p| p.1),
        });
        moerun::atomic::write(&j, serde_json::to_string_pretty(&report)?.as_bytes())
            .with_context(|| format!("writing {}", j.display()))?;
    }
    Ok(())
}
