//! Token sampling: repeat penalty, top-k, top-p, min-p and temperature, in llama.cpp's order,
//! drawing from a seeded generator. Temperature ≤ 0 is greedy (argmax).

use crate::rng::SplitMix64;

/// Sampling settings (llama.cpp's defaults).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SamplerConfig {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
    /// Tokens that are never chosen (their logits count as -inf), as llama.cpp's `--ignore-eos`
    /// does with the end-of-generation tokens.
    pub banned: Vec<u32>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
            banned: Vec::new(),
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig { temperature: 0.0, ..Default::default() }
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: SplitMix64,
}

/// Index of the largest value (first one on ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let rng = SplitMix64::new(cfg.seed);
        Sampler { cfg, rng }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Pick the next token from `logits`, given the ids generated so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let c = &self.cfg;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        for &id in &c.banned {
            if let Some(x) = cand.get_mut(id as usize) {
                x.1 = f32::NEG_INFINITY;
            }
        }
        if c.repeat_penalty != 1.0 && c.repeat_last_n > 0 {
            let start = history.len().saturating_sub(c.repeat_last_n);
            let mut seen = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(x) = cand.get_mut(id as usize) {
                    x.1 = if x.1 > 0.0 { x.1 / c.repeat_penalty } else { x.1 * c.repeat_penalty };
                }
            }
        }
        if c.temperature <= 0.0 {
            let l: Vec<f32> = cand.iter().map(|c| c.1).collect();
            return argmax(&l) as u32;
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if c.top_k > 0 {
            cand.truncate(c.top_k.max(1));
        }
        let probs = |cand: &[(u32, f32)], t: f32| -> Vec<f64> {
            let max = cand[0].1 as f64;
            let e: Vec<f64> = cand.iter().map(|x| ((x.1 as f64 - max) / t as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect()
        };
        if c.top_p < 1.0 {
            let p = probs(&cand, 1.0);
            let mut cum = 0.0;
            let mut keep = cand.len();
            for (i, pi) in p.iter().enumerate() {
                cum += pi;
                if cum >= c.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if c.min_p > 0.0 {
            let p = probs(&cand, 1.0);
            let thresh = p[0] * c.min_p as f64;
            let keep = p.iter().take_while(|&&pi| pi >= thresh).count();
            cand.truncate(keep.max(1));
        }
        let p = probs(&cand, c.temperature);
        let r = self.rng.next_f64();
        let mut cum = 0.0;
        for (i, pi) in p.iter().enumerate() {
            cum += pi;
            if r < cum {
                return cand[i].0;
            }
        }
        cand[cand.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banned_tokens_are_never_chosen() {
        let cfg = SamplerConfig { banned: vec![1, 3], ..SamplerConfig::greedy() };
        assert_eq!(Sampler::new(cfg.clone()).sample(&[0.1, 2.0, -1.0, 1.9], &[]), 0);
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, ..cfg });
        assert!((0..200).all(|_| ![1, 3].contains(&s.sample(&[0.1, 2.0, -1.0, 1.9], &[]))));
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9], &[]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37 % 17) as f32) * 0.1).collect();
        let cfg = SamplerConfig { seed: 42, ..Default::default() };
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..20).map(|_| s.sample(&logits, &[])).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..20).map(|_| s.sample(&logits, &[])).collect()
        };
        assert_eq!(a, b);
        let mut s = Sampler::new(SamplerConfig { top_k: 1, ..cfg });
        assert_eq!(s.sample(&logits, &[]), argmax(&logits) as u32);
    }

    #[test]
    fn repeat_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplerConfig { repeat_penalty: 2.0, ..SamplerConfig::greedy() });
        assert_eq!(s.sample(&[1.0, 0.9], &[0]), 1);
    }
}
