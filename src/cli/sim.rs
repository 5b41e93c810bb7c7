//! `moerun sim`: replay a routing trace (`--trace`) through cache policies at given budgets,
//! offline, and compare hit rates and bytes-weighted miss penalties; with `--device`, predict
//! decode tok/s on that machine from the cost model (size a Jetson before buying one).

use std::path::PathBuf;

use anyhow::Context;
use moerun::engine::offload::{parse_budget, Budget};
use moerun::experts::sim::{config_for, simulate};
use moerun::experts::trace::read_trace;
use moerun::experts::{PolicyKind, DEFAULT_HOBBIT_WEIGHTS};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A trace written by `--trace`.
    trace: PathBuf,
    /// Budgets to try: sizes or shares of all experts (e.g. 25%,50%).
    #[arg(long, value_delimiter = ',', default_value = "25%,50%")]
    budgets: Vec<String>,
    /// Policies to compare.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "lru,lfu,hobbit,fate")]
    policies: Vec<PolicyKind>,
    /// HOBBIT's term weights w_lru,w_lfu,w_lhu,w_fld.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_HOBBIT_WEIGHTS)]
    hobbit_weights: Vec<f32>,
    /// Layers Fate pins.
    #[arg(long, default_value_t = 1)]
    pin_layers: usize,
    /// HOBBIT mixed precision in the replay: load a miss at low precision once the cumulative
    /// gate weight of higher-ranked experts passes T1 (needs --t2 and a low size).
    #[arg(long, requires = "t2")]
    t1: Option<f32>,
    /// Skip a miss once the cumulative gate weight of higher-ranked experts passes T2.
    #[arg(long, requires = "t1")]
    t2: Option<f32>,
    /// Bytes of a low-precision expert as a share of a high one (e.g. 0.53 for Q4_0 copies of
    /// Q8_0 experts); default: from the trace (recorded with --low). Low misses weigh this much
    /// in the bytes-weighted miss penalty.
    #[arg(long)]
    low_ratio: Option<f64>,
    /// Share of the budget for low-precision slots when mixed precision is on.
    #[arg(long, default_value_t = 0.25)]
    low_share: f32,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// A device profile (`devices/*.toml`): also predict decode tok/s and stall per token on it
    /// from the cost model, for the trace's decoded tokens.
    #[arg(long, value_name = "TOML")]
    device: Option<PathBuf>,
    /// The model the trace was recorded from (its dense and expert sizes); default: the path in
    /// the trace's header.
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Next-layer recall of the predictor to assume (0: no prediction; `generate --json` reports
    /// the live figure as `expert_cache.predictor.recall`).
    #[arg(long, default_value_t = 0.0)]
    predict_recall: f64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.hobbit_weights.len() != 4 {
        anyhow::bail!("--hobbit-weights takes four numbers: w_lru,w_lfu,w_lhu,w_fld");
    }
    let (mut header, records) = read_trace(&a.trace)?;
    if let Some(r) = a.low_ratio {
        if !(r > 0.0 && r < 1.0) {
            anyhow::bail!("--low-ratio {r}: a low-precision expert must be smaller than a high one (0 < ratio < 1)");
        }
        header.expert_bytes_low = ((header.expert_bytes_high as f64 * r).round() as u64).max(1);
    }
    let thresholds = a.t1.zip(a.t2);
    if thresholds.is_some() && header.expert_bytes_low == 0 {
        anyhow::bail!("--t1/--t2 need low-precision copies: the trace was recorded without --low, so give --low-ratio");
    }
    let all = (header.n_layers * header.n_experts) as u64 * header.expert_bytes_high;
    let cost = match &a.device {
        Some(d) => {
            let device = moerun::devices::DeviceProfile::load(d)?;
            let mpath = a.model.clone().unwrap_or_else(|| PathBuf::from(&header.model));
            let model = moerun::model::Model::load(&mpath)
                .with_context(|| format!("the trace's model (give it with --model): {}", mpath.display()))?;
            let mut mc = moerun::experts::costmodel::ModelCosts::of(&model);
            mc.expert_bytes_low = header.expert_bytes_low as f64;
            if !(0.0..=1.0).contains(&a.predict_recall) {
                anyhow::bail!("--predict-recall {}: a recall is between 0 and 1", a.predict_recall);
            }
            if !a.json {
                println!("on {} ({}):", device.name, d.display());
            }
            Some(moerun::experts::costmodel::CostModel { device, model: mc, predict_recall: a.predict_recall })
        }
        None => None,
    };
    let mut rows = Vec::new();
    if !a.json {
        println!(
            "{} — {} records, {} layers × {} experts (top-{})",
            a.trace.display(),
            records.len(),
            header.n_layers,
            header.n_experts,
            header.top_k
        );
        println!(
            "{:>8} {:>8} {:>9} {:>8} {:>16} {:>10}{}",
            "budget",
            "policy",
            "hit rate",
            "misses",
            "miss MiB",
            "vs LRU",
            if cost.is_some() { format!(" {:>13} {:>14}", "decode tok/s", "stall ms/tok") } else { String::new() }
        );
    }
    for b in &a.budgets {
        let bytes = match parse_budget(b).map_err(anyhow::Error::msg).with_context(|| format!("budget '{b}'"))? {
            Budget::Bytes(x) => x,
            Budget::Share(f) => {
                ((header.n_layers * header.n_experts) as f64 * f).round() as u64 * header.expert_bytes_high
            }
        };
        let mut lru_penalty = None;
        for &p in &a.policies {
            let mut cfg = config_for(&header, bytes);
            cfg.policy = p;
            cfg.thresholds = thresholds;
            cfg.low_share = a.low_share;
            cfg.hobbit_weights = [a.hobbit_weights[0], a.hobbit_weights[1], a.hobbit_weights[2], a.hobbit_weights[3]];
            if p == PolicyKind::Fate {
                cfg.pinned_layers = a.pin_layers;
            }
            let est = match &cost {
                Some(c) => Some(moerun::experts::sim::estimate_decode(cfg.clone(), &header, &records, c)?),
                None => None,
            };
            let r = match simulate(cfg, &header, &records) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{b} {p:?}: {e}");
                    continue;
                }
            };
            if p == PolicyKind::Lru {
                lru_penalty = Some(r.miss_penalty_bytes);
            }
            let vs = lru_penalty
                .map(|l| format!("{:+.1}%", 100.0 * (r.miss_penalty_bytes as f64 / l.max(1) as f64 - 1.0)))
                .unwrap_or_default();
            if !a.json {
                println!(
                    "{:>8} {:>8} {:>8.1}% {:>8} {:>16.1} {:>10}{}",
                    b,
                    format!("{p:?}").to_lowercase(),
                    100.0 * r.hit_rate,
                    r.misses,
                    r.miss_penalty_bytes as f64 / 1048576.0,
                    vs,
                    est.as_ref()
                        .map(|e| format!(" {:>13.1} {:>14.2}", e.decode_tok_s, e.stall_ms_per_token))
                        .unwrap_or_default()
                );
            }
            let est = est.map(|mut e| {
                e.cache = Default::default();
                e
            });
            rows.push(serde_json::json!({"budget": b, "budget_bytes": bytes, "share_of_experts": bytes as f64 / all as f64, "policy": p, "result": r, "decode_estimate": est}));
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}
