//! Timing and statistics for `bench` and its `--sweep`: one timed greedy run of either engine,
//! median and spread over runs, the process's RSS sampled through our runs. Measures only; prints nothing.

use std::time::Instant;

use moerun::backend::Backend;
use moerun::engine::{argmax, Engine};
use moerun::layers::Logits;
use moerun::reference::LlamaReference;
use moerun::sysmem::{RssPeak, RssSampler};
use serde::Serialize;

/// Median and spread of one measure.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Stat {
    pub(super) median: f64,
    min: f64,
    max: f64,
    runs: Vec<f64>,
}

impl Stat {
    pub(super) fn of(mut runs: Vec<f64>) -> Stat {
        runs.sort_by(|a, b| a.total_cmp(b));
        let median = if runs.is_empty() { 0.0 } else { runs[runs.len() / 2] };
        Stat { median, min: runs.first().copied().unwrap_or(0.0), max: runs.last().copied().unwrap_or(0.0), runs }
    }

    pub(super) fn show(&self) -> String {
        format!("{:8.2}  [{:.2}–{:.2}]", self.median, self.min, self.max)
    }
}

/// (prefill tok/s, decode tok/s) of each measured run.
pub(super) type Runs = (Vec<f64>, Vec<f64>);

/// Warm up once, then time `repeats` runs of our engine: ((prefill tok/s, decode tok/s) per
/// run, the resident memory sampled through all of them).
pub(super) fn measure_ours<B: Backend>(
    engine: &mut Engine<B>,
    prompt: &[u32],
    n_gen: usize,
    repeats: usize,
) -> anyhow::Result<(Runs, RssPeak)> {
    let mut peak = RssPeak::default();
    let mut ours = (Vec::new(), Vec::new());
    for i in 0..=repeats {
        let (pf, dec) = time_ours_sampled(engine, prompt, n_gen, &mut peak)?;
        if i > 0 {
            ours.0.push(pf);
            ours.1.push(dec);
        }
    }
    Ok((ours, peak))
}

/// [`time_ours`] with this process's RSS sampled every 5 ms through the run, into `peak`.
pub(super) fn time_ours_sampled<B: Backend>(
    engine: &mut Engine<B>,
    prompt: &[u32],
    n_gen: usize,
    peak: &mut RssPeak,
) -> anyhow::Result<(f64, f64)> {
    let sampler = RssSampler::start(std::time::Duration::from_millis(5));
    let r = time_ours(engine, prompt, n_gen);
    *peak = peak.max(sampler.finish());
    r
}

/// One timed greedy run of our engine in a fresh session.
pub(super) fn time_ours<B: Backend>(
    engine: &mut Engine<B>,
    prompt: &[u32],
    n_gen: usize,
) -> anyhow::Result<(f64, f64)> {
    let mut sess = engine.new_session()?;
    let cell = std::cell::RefCell::new((&mut *engine, &mut sess));
    time_run(
        prompt,
        n_gen,
        |p| {
            let mut c = cell.borrow_mut();
            let (e, s) = &mut *c;
            Ok(e.eval(s, p, Logits::Last)?)
        },
        |id| {
            let mut c = cell.borrow_mut();
            let (e, s) = &mut *c;
            Ok(e.eval(s, &[id], Logits::Last)?)
        },
    )
}

/// A GPU's copies through decode alone: one more greedy run whose prompt is evaluated first,
/// then the device's counters taken around `n_gen` one-token steps.
#[derive(Debug, serde::Serialize)]
pub(super) struct DecodeCopies {
    pub decode_tok_s: f64,
    pub bytes_copied_per_token: f64,
    pub copy_busy_ms_per_token: f64,
    /// Lookups of host-held experts in the GPU arena during decode, and the share that hit.
    pub lookups_per_token: f64,
    pub hit_rate: Option<f64>,
    pub launches_per_token: f64,
    /// Copies made ahead of need on a prediction, and the share of them a lookup then used.
    pub prefetch_copies_per_token: f64,
    pub prefetch_used: Option<f64>,
    /// The share of copies that went straight from page-locked host memory (no staging).
    pub direct_copies: Option<f64>,
    /// The predictor's next-layer recall, where one runs.
    pub predictor_recall: Option<f64>,
}

pub(super) fn decode_copies<B: Backend>(
    engine: &mut Engine<B>,
    prompt: &[u32],
    n_gen: usize,
) -> anyhow::Result<Option<DecodeCopies>> {
    let mut sess = engine.new_session()?;
    let mut logits = engine.eval(&mut sess, prompt, Logits::Last)?;
    let Some(before) = engine.device_stats() else { return Ok(None) };
    let t = Instant::now();
    for _ in 0..n_gen {
        let id = argmax(&logits) as u32;
        logits = engine.eval(&mut sess, &[id], Logits::Last)?;
    }
    let secs = t.elapsed().as_secs_f64();
    let after = engine.device_stats().unwrap_or_default();
    let n = n_gen.max(1) as f64;
    let share = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
    let lookups = after.expert_lookups - before.expert_lookups;
    Ok(Some(DecodeCopies {
        decode_tok_s: n / secs.max(1e-9),
        bytes_copied_per_token: (after.bytes_copied - before.bytes_copied) as f64 / n,
        copy_busy_ms_per_token: 1000.0 * (after.copy_busy_s - before.copy_busy_s) / n,
        lookups_per_token: lookups as f64 / n,
        hit_rate: (lookups > 0).then(|| (after.expert_hits - before.expert_hits) as f64 / lookups as f64),
        launches_per_token: (after.launches - before.launches) as f64 / n,
        prefetch_copies_per_token: (after.prefetch_copies - before.prefetch_copies) as f64 / n,
        prefetch_used: share(
            after.prefetch_used - before.prefetch_used,
            after.prefetch_copies - before.prefetch_copies,
        ),
        direct_copies: share(after.direct_copies - before.direct_copies, after.copies - before.copies),
        predictor_recall: engine.predictor().map(|p| p.stats(0).recall),
    }))
}

/// One timed greedy run of the linked llama.cpp from an empty context.
pub(super) fn time_llama(r: &mut LlamaReference, prompt: &[u32], n_gen: usize) -> anyhow::Result<(f64, f64)> {
    r.clear();
    let cell = std::cell::RefCell::new(r);
    time_run(prompt, n_gen, |p| Ok(cell.borrow_mut().decode(p)?), |id| Ok(cell.borrow_mut().decode(&[id])?))
}

/// One timed run: (prefill tok/s, decode tok/s), greedy.
fn time_run(
    prompt: &[u32],
    n_gen: usize,
    mut prefill: impl FnMut(&[u32]) -> anyhow::Result<Vec<f32>>,
    mut step: impl FnMut(u32) -> anyhow::Result<Vec<f32>>,
) -> anyhow::Result<(f64, f64)> {
    let t0 = Instant::now();
    let mut logits = prefill(prompt)?;
    let pf = prompt.len() as f64 / t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..n_gen {
        let id = argmax(&logits) as u32;
        logits = step(id)?;
    }
    let dec = n_gen as f64 / t1.elapsed().as_secs_f64();
    Ok((pf, dec))
}
