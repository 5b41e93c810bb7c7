//! Command-line front doors: the subcommands (`inspect`, `tokenize`, `generate`, `bench`,
//! `synth`, `prepare`, `chat`, `serve`), shared flags, and the bundled-model lookup.

mod bench;
mod chat;
mod common_args;
mod device;
mod device_args;
mod generate;
mod inspect;
mod offload_args;
mod prepare;
mod quality;
mod serve;
mod sim;
mod synth;
mod tokenize;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

/// The model that ships with moerun (`models/`), used when `-m` is not given.
pub const BUNDLED_MODEL: &str = "models/rustdoc-moe-Q8_0.gguf";

#[derive(Parser, Debug)]
#[command(name = "moerun", version, about = "Run Mixture-of-Experts GGUF models larger than device memory, fast.")]
pub struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Describe a GGUF MoE model: architecture, experts, sizes, tokenizer.
    Inspect(inspect::Args),
    /// Turn text into token ids exactly as llama.cpp does.
    Tokenize(tokenize::Args),
    /// Generate text from a prompt.
    Generate(generate::Args),
    /// Chat with the model in the terminal (multi-turn, streamed, /reset /stats /quit).
    Chat(chat::Args),
    /// Serve an OpenAI-compatible HTTP API (chat/completions, completions, models, moe/stats).
    Serve(serve::Args),
    /// Measure prefill and decode speed, optionally side by side with llama.cpp.
    Bench(bench::Args),
    /// Write a random-weight MoE at real layer shapes (for speed runs).
    Synth(synth::Args),
    /// Write the low-precision sidecar: every routed expert requantized to a low type.
    Prepare(prepare::Args),
    /// Replay a routing trace through cache policies offline (hit rate, miss penalty).
    Sim(sim::Args),
    /// Perplexity and top-1 agreement of cache/mixed-precision settings vs full precision.
    Quality(quality::Args),
    /// The accelerator this build and machine have; compile the CUDA kernels (--features cuda).
    Device(device::Args),
}

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    moerun::llama_log::init();
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Command::Inspect(a) => inspect::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Prepare(a) => prepare::run(a),
        Command::Sim(a) => sim::run(a),
        Command::Quality(a) => quality::run(a),
        Command::Device(a) => device::run(a),
    }
}

/// The model to use: `-m` if given, else the bundled one (looked up from the working
/// directory, then from the source tree this binary was built from).
pub fn model_path(m: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = m {
        if !p.exists() {
            bail!("{}: no such model file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let candidates = [PathBuf::from(BUNDLED_MODEL), Path::new(env!("CARGO_MANIFEST_DIR")).join(BUNDLED_MODEL)];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| format!("no -m given and the bundled model {BUNDLED_MODEL} was not found"))
}
