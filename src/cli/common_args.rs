//! Flag groups shared by the front doors: sampling and engine settings.

use moerun::engine::{EngineConfig, KvType, SamplerConfig};

/// Sampling flags (defaults follow llama.cpp).
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Random seed (default: time-based).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn config(&self) -> SamplerConfig {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
        });
        SamplerConfig {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed,
            ..Default::default()
        }
    }
}

/// Engine flags.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Compute threads (default: available cores, at most 8).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Context length (default: the model's, at most 4096).
    #[arg(short = 'c', long, default_value_t = 0)]
    pub ctx_size: usize,
    /// KV cache type.
    #[arg(long, value_enum, default_value_t = KvType::F16)]
    pub kv_type: KvType,
    /// Prompt tokens per forward pass (llama.cpp's `-b`); a sliding-window layer's KV ring holds
    /// its window plus this many positions.
    #[arg(short = 'b', long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// Keep sliding-window layers' KV cache full length (default: a ring of window + batch
    /// positions, as llama.cpp's SWA cache).
    #[arg(long)]
    pub swa_full: bool,
    #[command(flatten)]
    pub device: super::device_args::DeviceArgs,
}

impl EngineArgs {
    /// The device `--device` and its flags name.
    pub fn device(&self) -> anyhow::Result<super::device_args::Device> {
        self.device.resolve(self.config().threads)
    }

    pub fn config(&self) -> EngineConfig {
        let mut cfg = EngineConfig {
            n_ctx: self.ctx_size,
            n_batch: self.batch_size as usize,
            kv_type: self.kv_type,
            swa_full: self.swa_full,
            ..Default::default()
        };
        if let Some(t) = self.threads {
            cfg.threads = t.max(1);
        }
        cfg
    }
}
