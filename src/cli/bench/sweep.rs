//! `moerun bench --sweep`: decode speed and hit rate of the expert cache across budgets, as a
//! table, JSON and a PNG plot. Measures through `measure`; knows nothing of `bench`'s report.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use moerun::engine::offload::{parse_budget, Budget};
use moerun::engine::EngineConfig;
use moerun::model::{Model, Resident};
use plotters::prelude::*;

use super::measure::{measure_ours, Stat};
use crate::cli::offload_args::OffloadArgs;

#[derive(serde::Serialize)]
struct Point {
    budget: String,
    /// The predictor's look-ahead (None: prediction off).
    predict: Option<usize>,
    predictor_recall: Option<f64>,
    budget_mib: f64,
    share_of_experts: f64,
    decode_tok_s: Stat,
    prefill_tok_s: Stat,
    hit_rate: f64,
    mib_read_per_token: f64,
    stall_ms_per_token: f64,
}

/// One sweep: the model and run shape `bench` set up, its cache flags, and the budgets to try.
pub(super) struct SweepRun<'a> {
    /// The cache flags; each budget replaces `--expert-budget` (and clears `--memory-budget`).
    pub(super) offload: &'a OffloadArgs,
    pub(super) budgets: &'a [String],
    pub(super) model: &'a Arc<Model>,
    pub(super) path: &'a Path,
    pub(super) prompt: &'a [u32],
    pub(super) n_gen: usize,
    pub(super) repeats: usize,
    pub(super) threads: usize,
    pub(super) n_ctx: usize,
}

pub(super) fn run(sweep: SweepRun<'_>) -> anyhow::Result<()> {
    let SweepRun { offload: args, budgets, model, path, prompt, n_gen, repeats, threads, n_ctx } = sweep;
    let mut points = Vec::new();
    println!(
        "{:>8} {:>8} {:>10} {:>22} {:>9} {:>12} {:>10}",
        "budget", "predict", "MiB", "decode tok/s [min–max]", "hit rate", "MiB/token", "stall ms/tok"
    );
    // Every budget without prediction and with it (the `--predict` given, else the default);
    // routing profiles stay off unless asked for, so that one budget's run does not warm the next.
    let mut a = args.clone();
    a.predict = None;
    a.expert_budget = Some("100%".into());
    let with = match args.predict.as_deref() {
        Some("off") => None,
        _ => args.predict_config()?.or_else(|| a.predict_config().ok().flatten()),
    };
    let predictors: Vec<Option<moerun::predict::PredictConfig>> = std::iter::once(None).chain(with.map(Some)).collect();
    for b in budgets {
        for &predict in &predictors {
            let mut a = args.clone();
            a.expert_budget = Some(b.clone());
            a.memory_budget = None;
            a.profile = Some(args.profile.clone().unwrap_or_else(|| "off".into()));
            a.trace = None;
            let cfg = EngineConfig { threads, n_ctx, residency: a.residency(Resident::Dense), ..Default::default() };
            let mut engine = a.engine(model, path, cfg)?;
            engine.set_predictor(predict);
            let ((pf, dec), _) = measure_ours(&mut engine, prompt, n_gen, repeats)?;
            let st = engine.offload_stats().context("offload stats")?;
            let tokens = ((prompt.len() + n_gen) * (repeats + 1)) as f64;
            let share = match parse_budget(b) {
                Ok(Budget::Share(f)) => f,
                _ => st.budget_bytes as f64 / model.expert_bytes().max(1) as f64,
            };
            let p = Point {
                budget: b.clone(),
                predict: predict.map(|p| p.distance),
                predictor_recall: st.predictor.as_ref().map(|p| p.recall),
                budget_mib: st.budget_bytes as f64 / 1048576.0,
                share_of_experts: share,
                decode_tok_s: Stat::of(dec),
                prefill_tok_s: Stat::of(pf),
                hit_rate: st.hit_rate,
                mib_read_per_token: (st.bytes_read_high + st.bytes_read_low) as f64 / tokens / 1048576.0,
                stall_ms_per_token: st.stall_ms_per_token,
            };
            println!(
                "{:>8} {:>8} {:>10.1} {:>22} {:>8.1}% {:>12.2} {:>10.2}",
                p.budget,
                p.predict.map_or("off".to_string(), |d| d.to_string()),
                p.budget_mib,
                p.decode_tok_s.show(),
                100.0 * p.hit_rate,
                p.mib_read_per_token,
                p.stall_ms_per_token
            );
            points.push(p);
        }
    }
    std::fs::create_dir_all("bench-results").context("creating bench-results/")?;
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let json = PathBuf::from(format!("bench-results/sweep-{t}.json"));
    moerun::atomic::write(&json, serde_json::to_string_pretty(&points)?.as_bytes())
        .with_context(|| format!("writing {}", json.display()))?;
    let png = json.with_extension("png");
    plot(&points, &png, &path.display().to_string())?;
    eprintln!("wrote {} and {}", json.display(), png.display());
    Ok(())
}

/// A font for the plot's text: plotters renders glyphs from a font we register ourselves.
fn register_font() -> bool {
    const CANDIDATES: &[&str] = &[
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    ];
    for c in CANDIDATES {
        if let Ok(bytes) = std::fs::read(c) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

fn plot(points: &[Point], png: &Path, title: &str) -> anyhow::Result<()> {
    let labels = register_font();
    if !labels {
        tracing::warn!("no TrueType font found: the plot has no labels");
    }
    let root = BitMapBackend::new(png, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let max_tok = points.iter().map(|p| p.decode_tok_s.median).fold(1.0, f64::max) * 1.15;
    let xs: Vec<f64> = points.iter().map(|p| 100.0 * p.share_of_experts).collect();
    let xmax = xs.iter().copied().fold(1.0, f64::max) * 1.05;
    let mut b = ChartBuilder::on(&root);
    b.margin(20);
    if labels {
        b.caption(format!("expert cache sweep: {title}"), ("sans-serif", 20))
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(60);
    }
    let mut chart = b
        .build_cartesian_2d(0.0..xmax, 0.0..max_tok)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?
        .set_secondary_coord(0.0..xmax, 0.0..100.0);
    if labels {
        chart
            .configure_mesh()
            .x_desc("expert budget (% of all experts)")
            .y_desc("decode tok/s")
            .draw()
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        chart.configure_secondary_axes().y_desc("hit rate (%)").draw().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    // One decode line and one hit-rate line per predictor setting.
    let settings: Vec<Option<usize>> = points.iter().fold(Vec::new(), |mut v, p| {
        if !v.contains(&p.predict) {
            v.push(p.predict);
        }
        v
    });
    for (i, &setting) in settings.iter().enumerate() {
        let (tok_color, hit_color) = if i == 0 { (BLUE, RED) } else { (GREEN, MAGENTA) };
        let name = setting.map_or("no prediction".to_string(), |d| format!("prediction {d} ahead"));
        let mine: Vec<(f64, &Point)> =
            xs.iter().zip(points).filter(|(_, p)| p.predict == setting).map(|(&x, p)| (x, p)).collect();
        let tok: Vec<(f64, f64)> = mine.iter().map(|&(x, p)| (x, p.decode_tok_s.median)).collect();
        let hit: Vec<(f64, f64)> = mine.iter().map(|&(x, p)| (x, 100.0 * p.hit_rate)).collect();
        let s1 = chart
            .draw_series(LineSeries::new(tok.clone(), tok_color.stroke_width(3)))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        if labels {
            s1.label(format!("decode tok/s, {name}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], tok_color));
        }
        chart
            .draw_series(tok.iter().map(|&p| Circle::new(p, 4, tok_color.filled())))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        let s2 = chart
            .draw_secondary_series(LineSeries::new(hit.clone(), hit_color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        if labels {
            s2.label(format!("hit rate %, {name}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], hit_color));
        }
        chart
            .draw_secondary_series(hit.iter().map(|&p| Circle::new(p, 4, hit_color.filled())))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    if labels {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok(())
}
