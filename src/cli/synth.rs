//! `moerun synth`: write a random-weight MoE at real layer shapes for speed runs.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use moerun::gguf::GgmlType;
use moerun::synth::Preset;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Layer shapes to copy.
    #[arg(long, value_enum)]
    preset: Preset,
    /// Number of layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Type of the big matrices (q4_0, q8_0, q4_K, f16, …).
    #[arg(long = "type", default_value = "q4_0")]
    ty: String,
    /// Random seed (the same seed writes the same file).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output file.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let ty = GgmlType::parse(&a.ty).with_context(|| format!("unknown ggml type '{}'", a.ty))?;
    let cfg = a.preset.config(a.layers, ty, a.seed);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("writing {}", a.output.display()));
    cfg.write(&a.output, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish();
    eprintln!("wrote {} ({} layers of {:?}, {})", a.output.display(), a.layers, a.preset, ty.name());
    Ok(())
}
