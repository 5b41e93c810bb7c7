//! `moerun bench`: prefill and decode speed (median of repeats, with spread), optionally side by
//! side with the linked llama.cpp on the same file, prompt and thread count. Writes JSON.
//!
//! This file: the flags, the alternating side-by-side runs and the report. The timing and
//! statistics helpers are `measure.rs`; `--sweep` (expert-cache budgets) is `sweep.rs`.

mod measure;
mod sweep;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use moerun::backend::Backend;
use moerun::engine::{Engine, EngineConfig, KvType};
use moerun::model::{Model, Resident};
use moerun::reference::{LlamaReference, ReferenceConfig};
use moerun::rng::SplitMix64;
use serde::Serialize;

use measure::{time_llama, time_ours_sampled, Stat};
use moerun::sysmem::RssPeak;
use sweep::SweepRun;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model (default: the bundled model).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Compute threads.
    #[arg(short, long)]
    threads: Option<usize>,
    /// Prompt tokens (prefill).
    #[arg(short = 'p', long, default_value_t = 64)]
    prompt: usize,
    /// Generated tokens (decode).
    #[arg(short = 'n', long, default_value_t = 32)]
    n_gen: usize,
    /// Measured repeats (after one warm-up run).
    #[arg(short, long, default_value_t = 3)]
    repeats: usize,
    /// Which weights are copied into resident memory (Q4_0 repacked for ggml's interleaved kernels).
    #[arg(long, value_enum, default_value_t = Resident::Auto)]
    resident: Resident,
    /// Also run the linked llama.cpp (reference) and print both and the ratio.
    #[arg(long)]
    compare: bool,
    /// Run only this engine (for runs in separate processes, e.g. under a memory cap).
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Let llama.cpp repack weights into its own buffers (its default); off, it streams every
    /// weight through mmap as it must when the model exceeds RAM.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    llama_repack: bool,
    /// Run the expert cache at each of these budgets (default 10%,25%,50%,75%,100%) and plot
    /// decode tok/s and hit rate against budget (PNG and JSON in bench-results/).
    #[arg(long, value_delimiter = ',', value_name = "BUDGETS", num_args = 0.., default_missing_value = "10%,25%,50%,75%,100%")]
    sweep: Option<Vec<String>>,
    #[command(flatten)]
    offload: super::offload_args::OffloadArgs,
    #[command(flatten)]
    device: super::device_args::DeviceArgs,
    /// Where to write the JSON results (default: bench-results/bench-<unix time>.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Only {
    Moerun,
    Llama,
}

#[derive(Debug, Serialize)]
struct Side {
    name: &'static str,
    prefill_tok_s: Stat,
    decode_tok_s: Stat,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    threads: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    repeats: usize,
    resident: Resident,
    /// This process's resident memory sampled through our runs, against what a budgeted run
    /// may hold.
    memory: Memory,
    resident_weights_mib: f64,
    kv_cache_mib: f64,
    moerun: Option<Side>,
    expert_cache: Option<moerun::engine::offload::OffloadStats>,
    /// Expert bytes read per generated or prompt token.
    expert_bytes_read_per_token: Option<f64>,
    /// Seconds waiting for expert reads per token.
    stall_s_per_token: Option<f64>,
    /// Measured read throughput of the expert cache (bytes / seconds with reads in flight).
    io_gb_s: Option<f64>,
    /// Where moerun computed (`cpu`, `cuda:0`), and a GPU's memory and copy counters.
    device: String,
    gpu: Option<moerun::backend::DeviceStats>,
    /// A GPU's copies through decode alone (one more run).
    gpu_decode: Option<measure::DecodeCopies>,
    /// The model's sizes: active bytes per token bound an all-resident decode.
    moe: moerun::stats::MoeFacts,
    llama_cpp: Option<Side>,
    llama_repack: bool,
    decode_ratio: Option<f64>,
    prefill_ratio: Option<f64>,
}

/// Resident memory through our runs, in MiB.
#[derive(Debug, Serialize)]
struct Memory {
    rss_peak_mib: f64,
    rss_anon_peak_mib: f64,
    rss_samples: u64,
    /// With an expert cache: its budget, and what the run may hold (`offload_args::memory_bound`).
    expert_budget_mib: Option<f64>,
    bound_mib: Option<f64>,
    within_bound: Option<bool>,
}

impl Memory {
    fn of(rss: RssPeak, budget: Option<u64>, resident: u64, kv: u64) -> Memory {
        let mib = |b: u64| b as f64 / 1048576.0;
        let bound = budget.map(|b| super::offload_args::memory_bound(b, resident, kv));
        Memory {
            rss_peak_mib: mib(rss.rss),
            rss_anon_peak_mib: mib(rss.anon),
            rss_samples: rss.samples,
            expert_budget_mib: budget.map(mib),
            bound_mib: bound.map(mib),
            within_bound: bound.map(|b| rss.rss <= b),
        }
    }

    /// One line for the terminal, with the report's resident weights and KV cache (MiB).
    fn line(&self, resident: Resident, resident_mib: f64, kv_mib: f64) -> String {
        let mut s = format!(
            "moerun peak RSS {:.1} MiB ({:.1} MiB anonymous, {} samples): resident weights ({resident:?}) {resident_mib:.1} MiB, KV cache {kv_mib:.1} MiB",
            self.rss_peak_mib, self.rss_anon_peak_mib, self.rss_samples
        );
        if let (Some(b), Some(bound), Some(ok)) = (self.expert_budget_mib, self.bound_mib, self.within_bound) {
            s += &format!(
                ", expert budget {b:.1} MiB; bound (budget + resident + KV + overhead) + 10% = {bound:.1} MiB: {}",
                if ok { "within" } else { "EXCEEDED" }
            );
        }
        s
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let threads = a.threads.unwrap_or_else(moerun::engine::default_threads).max(1);
    let device = a.device.resolve(threads)?;
    let name = device.name();
    super::device_args::with_backend!(device, threads, b => bench_on(a, b, name))
}

fn bench_on<B: Backend>(mut a: Args, backend: B, device: String) -> anyhow::Result<()> {
    let path = super::model_path(a.model.as_deref())?;
    let run_ours = a.only != Some(Only::Llama);
    let run_llama = a.compare || a.only == Some(Only::Llama);
    let model = Arc::new(Model::load(&path)?);
    let threads = a.threads.unwrap_or_else(moerun::engine::default_threads).max(1);
    let n_ctx = (a.prompt + a.n_gen + 1).next_multiple_of(256);
    let base =
        EngineConfig { threads: if run_ours { threads } else { 1 }, n_ctx, kv_type: KvType::F16, ..Default::default() };
    let cfg = match run_ours {
        true => a.offload.engine_config(&model, a.resident, base),
        false => EngineConfig { residency: a.offload.residency(Resident::None), ..base },
    };
    let mut engine = match run_ours {
        true => a.offload.engine_on(&model, &path, cfg, backend)?,
        false => Engine::with_backend(Arc::clone(&model), backend, cfg)?,
    };
    // A fixed pseudo-random prompt over the vocabulary (the same for both engines).
    let mut rng = SplitMix64::new(42);
    let prompt = rng.tokens(a.prompt.max(1), model.hp.n_vocab);

    eprintln!(
        "bench: {} on {device} — {} threads, {} prompt + {} generated tokens, {} repeats",
        path.display(),
        threads,
        prompt.len(),
        a.n_gen,
        a.repeats
    );
    if let Some(list) = &a.sweep {
        return sweep::run(SweepRun {
            offload: &a.offload,
            budgets: list,
            model: &model,
            path: &path,
            prompt: &prompt,
            n_gen: a.n_gen,
            repeats: a.repeats,
            threads,
            n_ctx,
        });
    }
    // Side by side, the engines alternate run by run (the order flips each repeat), so drift in
    // the machine's speed — other tenants of the host, thermal state — hits both alike; the ratio
    // is the median of the paired runs' ratios.
    let mut ours = (Vec::new(), Vec::new());
    let mut theirs = (Vec::new(), Vec::new());
    // Sampled through our runs only (llama.cpp's buffers share the process).
    let mut rss = RssPeak::default();
    if run_ours {
        // Warm-up.
        time_ours_sampled(&mut engine, &prompt, a.n_gen, &mut rss)?;
    }
    let mut llama = if run_llama {
        let mut r = LlamaReference::load(
            &path,
            ReferenceConfig { n_ctx: n_ctx as u32, threads: threads as i32, repack: a.llama_repack },
        )?;
        time_llama(&mut r, &prompt, a.n_gen)?;
        Some(r)
    } else {
        None
    };
    for i in 0..a.repeats {
        // Even repeats run ours first, odd ones llama.cpp first.
        for llama_turn in [i % 2 == 1, i % 2 == 0] {
            match (llama_turn, llama.as_mut()) {
                (true, Some(r)) => {
                    let (pf, dec) = time_llama(r, &prompt, a.n_gen)?;
                    theirs.0.push(pf);
                    theirs.1.push(dec);
                }
                (false, _) if run_ours => {
                    let (pf, dec) = time_ours_sampled(&mut engine, &prompt, a.n_gen, &mut rss)?;
                    ours.0.push(pf);
                    ours.1.push(dec);
                }
                _ => {}
            }
        }
    }
    drop(llama);
    let paired = |a: &[f64], b: &[f64]| {
        (!a.is_empty() && a.len() == b.len())
            .then(|| Stat::of(a.iter().zip(b).map(|(x, y)| x / y.max(1e-9)).collect()).median)
    };
    let decode_ratio = paired(&ours.1, &theirs.1);
    let prefill_ratio = paired(&ours.0, &theirs.0);
    let kv_mib = engine.session_kv_bytes() as f64 / (1024.0 * 1024.0);
    let (resident_mode, resident_bytes) = engine.resident();
    let moerun_side =
        run_ours.then(|| Side { name: "moerun", prefill_tok_s: Stat::of(ours.0), decode_tok_s: Stat::of(ours.1) });
    let gpu_decode = match run_ours && engine.device_stats().is_some() {
        true => measure::decode_copies(&mut engine, &prompt, a.n_gen)?,
        false => None,
    };
    let cache = engine.offload_stats();
    let gpu = engine.device_stats();
    let memory = Memory::of(rss, cache.as_ref().map(|c| c.budget_bytes), resident_bytes, engine.session_kv_bytes());
    // The warm-up and the repeats, and the decode-alone run where there was one.
    let runs = a.repeats + 1 + gpu_decode.is_some() as usize;
    let tokens_run = ((prompt.len() + a.n_gen) * runs) as f64;
    drop(engine);
    let llama_side = run_llama.then(|| Side {
        name: "llama.cpp",
        prefill_tok_s: Stat::of(theirs.0),
        decode_tok_s: Stat::of(theirs.1),
    });

    println!("{:<10} {:>26} {:>26}", "engine", "prefill tok/s [min–max]", "decode tok/s [min–max]");
    for s in moerun_side.iter().chain(llama_side.as_ref()) {
        println!("{:<10} {:>26} {:>26}", s.name, s.prefill_tok_s.show(), s.decode_tok_s.show());
    }
    if let (Some(d), Some(p)) = (decode_ratio, prefill_ratio) {
        println!("{:<10} {:>26} {:>26}", "ratio", format!("{p:.3}×"), format!("{d:.3}×"));
        println!("(ratio: median over the {} paired runs; the engines alternate run by run)", a.repeats);
    }
    let per_token = cache.as_ref().map(|c| (c.bytes_read_high + c.bytes_read_low) as f64 / tokens_run);
    let stall = cache.as_ref().map(|c| c.stall_s / tokens_run);
    let io_gb_s = cache
        .as_ref()
        .filter(|c| c.io_busy_s > 0.0)
        .map(|c| (c.bytes_read_high + c.bytes_read_low) as f64 / c.io_busy_s / 1e9);
    if let Some(c) = &cache {
        println!(
            "expert cache: {} high slots ({:.1} MiB), hit rate {:.1}%, {:.2} MiB read per token (high {} loads, low {} loads, {} skipped), stall {:.1} ms/token, reads at {:.2} GB/s",
            c.slots_high,
            c.budget_bytes as f64 / 1048576.0,
            100.0 * c.hit_rate,
            per_token.unwrap_or(0.0) / 1048576.0,
            c.loads_high,
            c.loads_low,
            c.skips,
            1000.0 * stall.unwrap_or(0.0),
            io_gb_s.unwrap_or(0.0)
        );
    }
    if let Some(d) = &gpu {
        println!("{}", super::device_args::device_line(d, tokens_run));
    }
    let pct = |v: Option<f64>| v.map_or("-".into(), |h| format!("{:.1}%", 100.0 * h));
    if let Some(g) = &gpu_decode {
        println!(
            "decode alone: {:.1} tok/s, {:.2} MiB copied per token ({:.1} lookups, hit rate {}), copy stream busy {:.2} ms per token, {:.0} kernel launches per token",
            g.decode_tok_s,
            g.bytes_copied_per_token / 1048576.0,
            g.lookups_per_token,
            pct(g.hit_rate),
            g.copy_busy_ms_per_token,
            g.launches_per_token
        );
        println!(
            "              {:.1} copies per token ahead of need ({} of them used; predictor recall {}), {} of copies straight from page-locked memory",
            g.prefetch_copies_per_token,
            pct(g.prefetch_used),
            pct(g.predictor_recall),
            pct(g.direct_copies)
        );
    }
    if run_ours {
        println!("{}", memory.line(resident_mode, resident_bytes as f64 / 1048576.0, kv_mib));
    }
    if memory.within_bound == Some(false) {
        tracing::warn!("resident memory went past what the budget allows (see above)");
    }

    let report = Report {
        model: path.display().to_string(),
        threads,
        prompt_tokens: prompt.len(),
        gen_tokens: a.n_gen,
        repeats: a.repeats,
        resident: resident_mode,
        memory,
        resident_weights_mib: resident_bytes as f64 / 1048576.0,
        kv_cache_mib: kv_mib,
        moerun: moerun_side,
        expert_cache: cache,
        expert_bytes_read_per_token: per_token,
        stall_s_per_token: stall,
        io_gb_s,
        device,
        gpu,
        gpu_decode,
        moe: moerun::stats::MoeFacts::of(&model),
        llama_cpp: llama_side,
        llama_repack: a.llama_repack,
        decode_ratio,
        prefill_ratio,
    };
    let out = match a.json {
        Some(p) => p,
        None => {
            std::fs::create_dir_all("bench-results").context("creating bench-results/")?;
            let t =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            PathBuf::from(format!("bench-results/bench-{t}.json"))
        }
    };
    moerun::atomic::write(&out, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
