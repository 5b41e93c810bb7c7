//! `moerun prepare`: write the low-precision sidecar (every routed expert requantized) that
//! HOBBIT-style mixed precision loads for unimportant missed experts.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use moerun::gguf::GgmlType;
use moerun::lowprec::{self, LowPrecSidecar};
use moerun::model::Model;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model (default: the bundled model).
    model: Option<PathBuf>,
    /// Low-precision type for the expert copies (q4_0, q3_K, q2_K, iq3_xxs, …).
    #[arg(long)]
    low: String,
    /// Output sidecar (default: `<model stem>.<low>.lowprec.gguf` beside the model).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

/// `<dir>/<stem>.<low>.lowprec.gguf` for a model at `<dir>/<stem>.gguf`.
fn default_output(model: &Path, low: GgmlType) -> PathBuf {
    let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    model.with_file_name(format!("{stem}.{}.lowprec.gguf", low.name()))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let low = GgmlType::parse(&a.low).with_context(|| format!("unknown ggml type '{}'", a.low))?;
    let path = super::model_path(a.model.as_deref())?;
    // No repacked copies: prepare reads every expert once, straight from the mapping.
    let model = Model::load(&path)?;
    let out = a.output.unwrap_or_else(|| default_output(&path, low));

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("requantizing experts to {}", low.name()));
    let t0 = Instant::now();
    lowprec::prepare(&model, low, &out, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish();
    let secs = t0.elapsed().as_secs_f64();

    // Read it back the way the runtime will: a sidecar that does not verify is not a result.
    let side = LowPrecSidecar::open(&out, &model)?;
    let first = (0..model.layers.len()).find_map(|l| model.experts(l)).and_then(|ex| ex.first());
    let high = first.map_or(0, |e| e.bytes());
    let high_ty = first.map_or("?", |e| e.gate.ty.name());
    let n_experts: usize = (0..model.layers.len()).filter_map(|l| model.experts(l)).map(<[_]>::len).sum();
    let low_b = side.bytes_per_expert();
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!("wrote {} in {secs:.1} s ({n_experts} experts)", out.display());
    eprintln!(
        "  per expert: {high_ty} {:.3} MiB -> {} {:.3} MiB ({:.1}%)",
        mib(high),
        low.name(),
        mib(low_b),
        100.0 * low_b as f64 / high.max(1) as f64
    );
    eprintln!("  all experts: {:.1} MiB -> {:.1} MiB", mib(model.expert_bytes()), mib(low_b * n_experts as u64));
    if low_b >= high {
        tracing::warn!(
            "{} experts are no smaller than the {high_ty} originals: loading them at low precision saves no \
             bytes (pick a smaller type, e.g. q3_K or q2_K)",
            low.name()
        );
    }
    Ok(())
}
