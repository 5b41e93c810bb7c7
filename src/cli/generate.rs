//! `moerun generate`: prompt in, text out (streamed), or one JSON object with `--json`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use moerun::backend::Backend;
use moerun::engine::{Flow, GenerateOptions};
use moerun::model::{Model, Resident};
use moerun::tokenizer::{EncodeOptions, StreamDecoder, Tokenizer};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model (default: the bundled model).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// The prompt; special tokens in it are parsed.
    #[arg(short, long, required_unless_present = "prompt_tokens")]
    prompt: Option<String>,
    /// Instead of a text, a fixed pseudo-random prompt of this many token ids (as `bench` and
    /// llama-bench time prefill), for scripted speed runs.
    #[arg(long, conflicts_with = "prompt")]
    prompt_tokens: Option<usize>,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    n_predict: usize,
    #[command(flatten)]
    sampling: super::common_args::SamplingArgs,
    #[command(flatten)]
    engine: super::common_args::EngineArgs,
    /// Do not add BOS even if the model's metadata asks for it.
    #[arg(long)]
    no_bos: bool,
    /// Which weights are copied into resident memory (Q4_0 repacked for ggml's interleaved kernels).
    #[arg(long, value_enum, default_value_t = Resident::Auto)]
    resident: Resident,
    /// Keep generating past end-of-generation tokens: they are never chosen (llama.cpp's
    /// `--ignore-eos`), so greedy runs can be compared for a fixed length.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object (ids, text, top logits, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    offload: super::offload_args::OffloadArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let device = a.engine.device()?;
    let threads = a.engine.config().threads;
    super::device_args::with_backend!(device, threads, b => generate_on(a, b))
}

fn generate_on<B: Backend>(mut a: Args, backend: B) -> anyhow::Result<()> {
    let path = super::model_path(a.model.as_deref())?;
    let tok = Tokenizer::from_gguf(&path)?;
    let model = Arc::new(Model::load(&path)?);
    let cfg = a.offload.engine_config(&model, a.resident, a.engine.config());
    let mut engine = a.offload.engine_on(&model, &path, cfg, backend)?;
    let prompt = match (&a.prompt, a.prompt_tokens) {
        (_, Some(n)) => moerun::rng::SplitMix64::new(42).tokens(n.max(1), model.hp.n_vocab),
        (Some(p), None) => {
            tok.encode(p, EncodeOptions { add_bos: !a.no_bos && tok.add_bos_default(), parse_special: true })?
        }
        (None, None) => anyhow::bail!("give a prompt: -p TEXT or --prompt-tokens N"),
    };
    let mut sampler = a.sampling.config();
    if a.ignore_eos {
        sampler.banned = (0..tok.n_vocab() as u32).filter(|&id| tok.is_eog(id)).collect();
    }
    let ignore_eos = a.ignore_eos;
    let is_eog = |id: u32| !ignore_eos && tok.is_eog(id);
    let opts = GenerateOptions { max_tokens: a.n_predict, sampler, is_eog: &is_eog };
    let mut sess = engine.new_session()?;
    let mut stream = StreamDecoder::new(&tok);
    let mut stdout = std::io::stdout().lock();
    let json = a.json;
    let g = engine.generate(&mut sess, &prompt, &opts, &mut |id| {
        if !json {
            let s = stream.push(id);
            let _ = stdout.write_all(s.as_bytes());
            let _ = stdout.flush();
        }
        Flow::Continue
    })?;
    if json {
        let mut top: Vec<(usize, f32)> = g.first_logits.iter().copied().enumerate().collect();
        top.sort_by(|x, y| y.1.total_cmp(&x.1));
        top.truncate(20);
        let out = serde_json::json!({
            "prompt_ids": prompt,
            "ids": g.ids,
            "text": tok.decode(&g.ids),
            "top_logits": top,
            "stop": g.stop,
            "prompt_tokens": g.timings.prompt_tokens,
            "generated_tokens": g.timings.generated_tokens,
            "prefill_tok_s": g.timings.prefill_tok_s(),
            "decode_tok_s": g.timings.decode_tok_s(),
            "expert_cache": engine.offload_stats(),
            "device": engine.device_stats(),
            // Without an expert cache (whose figures carry it), a predictor still runs for a
            // GPU's own cache.
            "predictor": match engine.offload_stats() {
                Some(_) => None,
                None => engine.predictor().map(|p| p.stats(0)),
            },
            "memory": memory(&engine),
        });
        writeln!(stdout, "{out}")?;
    } else {
        let rest = stream.finish();
        writeln!(stdout, "{rest}")?;
        eprintln!(
            "[{} prompt tokens, {:.1} tok/s prefill; {} generated, {:.1} tok/s decode]",
            g.timings.prompt_tokens,
            g.timings.prefill_tok_s(),
            g.timings.generated_tokens,
            g.timings.decode_tok_s()
        );
        let steps = (g.timings.prompt_tokens + g.timings.generated_tokens).max(1) as f64;
        if let Some(d) = engine.device_stats() {
            eprintln!("[{}]", super::device_args::device_line(&d, steps));
            if let (None, Some(p)) = (engine.offload_stats(), engine.predictor()) {
                let p = p.stats(0);
                eprintln!(
                    "[predictor: next-layer recall {:.0}%, precision {:.0}%; {} of {} experts taken ahead of need used]",
                    100.0 * p.recall,
                    100.0 * p.precision,
                    p.prefetched_used,
                    p.prefetched
                );
            }
        }
        if let Some(st) = engine.offload_stats() {
            eprintln!(
                "[expert cache: hit rate {:.1}%, {:.2} MiB read per token (high {:.2}, low {:.2}), {:.1} ms stall per token, {} skipped]",
                100.0 * st.hit_rate,
                (st.bytes_read_high + st.bytes_read_low) as f64 / steps / 1048576.0,
                st.bytes_read_high as f64 / steps / 1048576.0,
                st.bytes_read_low as f64 / steps / 1048576.0,
                1000.0 * st.stall_s / steps,
                st.skips
            );
            if let Some(p) = &st.predictor {
                let per: Vec<String> =
                    p.per_distance.iter().map(|d| format!("{}: {:.0}%", d.distance, 100.0 * d.recall)).collect();
                eprintln!(
                    "[predictor: recall by distance {}, precision {:.0}%, {:.2} MiB wasted per token; decode stall {:.2} ms per token]",
                    per.join(", "),
                    100.0 * p.precision,
                    p.wasted_bytes_per_token / 1048576.0,
                    st.stall_ms_per_token
                );
            }
        }
    }
    engine.finish_trace()?;
    Ok(())
}

/// The process's peak resident memory (`VmHWM`: nothing else shares this process) and what the
/// run may hold: with an expert budget, `offload_args::memory_bound`.
fn memory<B: Backend>(engine: &moerun::engine::Engine<B>) -> serde_json::Value {
    let (_, resident) = engine.resident();
    let kv = engine.session_kv_bytes();
    let budget = engine.offload_stats().map(|s| s.budget_bytes);
    serde_json::json!({
        "peak_rss_bytes": moerun::sysmem::peak_rss(),
        "resident_weights_bytes": resident,
        "kv_cache_bytes": kv,
        "expert_budget_bytes": budget,
        "bound_bytes": budget.map(|b| super::offload_args::memory_bound(b, resident, kv)),
    })
}
