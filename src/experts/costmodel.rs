//! The cost model: how long one decoded token takes on a device (`devices::DeviceProfile`)
//! given, per MoE layer, which experts hit the cache and which were loaded — the same
//! arithmetic `moerun sim --device` uses to size a machine before buying it.
//!
//! Per layer: the dense part streams its weights (`dense / W` plus a fixed overhead); the hits
//! compute while the misses are read (the engine's overlap), then the misses compute:
//! `t = dense + max(hits·E / W, misses·E / R) + misses·E / W`, with `W` the device's weight
//! rate and `R` the rate misses arrive at (after the device's read latency, once per layer) (disk, or host-to-device for a discrete GPU whose
//! host holds the model). Where computing a miss on the host beats moving it (a discrete GPU,
//! llama.cpp's `--cpu-moe`), the miss costs `E / W_host` instead. A predictor with recall `r`
//! starts that share of a layer's reads one layer early, hiding up to the previous layer's time.

use crate::devices::DeviceProfile;

/// The model's sizes the cost model needs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ModelCosts {
    /// Weight bytes a token reads outside the routed experts (attention, shared experts,
    /// norms, output head, one embedding row).
    pub dense_bytes_per_token: f64,
    /// Bytes of one routed expert at high and low precision.
    pub expert_bytes_high: f64,
    pub expert_bytes_low: f64,
    /// Layers in all (each pays the overhead) and MoE layers.
    pub n_layers: usize,
    pub n_moe_layers: usize,
    /// Bytes of the whole model file (does it fit the host's RAM?).
    pub model_bytes: f64,
}

impl ModelCosts {
    pub fn of(model: &crate::model::Model) -> ModelCosts {
        let hp = &model.hp;
        let moe: Vec<usize> = (0..model.layers.len()).filter(|&l| model.experts(l).is_some()).collect();
        let expert =
            moe.iter().filter_map(|&l| model.experts(l)).flatten().map(|e| e.bytes()).max().unwrap_or(0) as f64;
        let routed_per_token = (moe.len() * hp.n_expert_used) as f64 * expert;
        ModelCosts {
            dense_bytes_per_token: (model.active_bytes_per_token() as f64 - routed_per_token).max(0.0),
            expert_bytes_high: expert,
            expert_bytes_low: 0.0,
            n_layers: hp.n_layer,
            n_moe_layers: moe.len().max(1),
            model_bytes: model.total_bytes() as f64,
        }
    }
}

/// What one MoE layer did for one token.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LayerWork {
    pub hits: u32,
    /// Hits on low-precision copies (included in `hits`).
    pub hits_low: u32,
    pub loads_high: u32,
    pub loads_low: u32,
}

/// One token's estimated time, split.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct TokenTime {
    pub compute_s: f64,
    pub stall_s: f64,
}

impl TokenTime {
    pub fn total_s(&self) -> f64 {
        self.compute_s + self.stall_s
    }
}

/// A device and a model; see the module docs.
#[derive(Debug, Clone)]
pub struct CostModel {
    pub device: DeviceProfile,
    pub model: ModelCosts,
    /// Recall of the next-layer predictor (0: no prediction).
    pub predict_recall: f64,
}

impl CostModel {
    /// The rate misses arrive at: from disk into unified memory; to a discrete device from host
    /// RAM when the model fits there, else from disk through the host.
    pub fn miss_bytes_per_s(&self) -> f64 {
        let d = &self.device;
        if d.unified {
            d.disk_bytes_per_s
        } else if self.model.model_bytes <= d.host_memory_bytes {
            d.host_to_device_bytes_per_s
        } else {
            d.disk_bytes_per_s.min(d.host_to_device_bytes_per_s)
        }
    }

    /// Seconds to move one miss of `bytes`, and seconds to compute it on the host instead
    /// (`None` where the host is the device).
    pub fn miss_costs(&self, bytes: f64) -> (f64, Option<f64>) {
        let latency = if bytes > 0.0 { self.device.read_latency_s } else { 0.0 };
        let load = latency + bytes / self.miss_bytes_per_s();
        let host = (!self.device.unified).then(|| bytes / self.device.host_weight_bytes_per_s);
        (load, host)
    }

    /// One decoded token's time from its MoE layers' work (in layer order).
    pub fn token(&self, layers: &[LayerWork]) -> TokenTime {
        let d = &self.device;
        let w = d.weight_bytes_per_s;
        let (eh, el) = (self.model.expert_bytes_high, self.model.expert_bytes_low.max(0.0));
        let dense = self.model.dense_bytes_per_token / w + self.model.n_layers as f64 * d.layer_overhead_s;
        let per_layer_dense = dense / self.model.n_moe_layers.max(1) as f64;
        let mut t = TokenTime { compute_s: dense, stall_s: 0.0 };
        let mut prev_layer_s = 0.0;
        for lw in layers {
            let hit_bytes = (lw.hits - lw.hits_low) as f64 * eh + lw.hits_low as f64 * el;
            let miss_bytes = lw.loads_high as f64 * eh + lw.loads_low as f64 * el;
            let hits_s = hit_bytes / w;
            let (read_s, host_s) = self.miss_costs(miss_bytes);
            let (miss_compute_s, stall_s) = match host_s {
                // The host computes the misses while the device computes the hits.
                Some(h) if h < read_s + miss_bytes / w => (0.0, (h - hits_s).max(0.0)),
                _ => {
                    let hidden = self.predict_recall * prev_layer_s;
                    (miss_bytes / w, (read_s - hits_s - hidden).max(0.0))
                }
            };
            t.compute_s += hits_s + miss_compute_s;
            t.stall_s += stall_s;
            prev_layer_s = per_layer_dense + hits_s + miss_compute_s + stall_s;
        }
        t
    }
}

/// The live rates a device's planner splits one layer's misses by (`split_misses`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MissRates {
    /// Seconds per byte copied host to device, and fixed seconds per copy.
    pub copy_s_per_byte: f64,
    pub copy_fixed_s: f64,
    /// Seconds per weight byte and token of the host computing an expert from its host copy,
    /// and fixed seconds per layer that computes any (reading the input back, uploading the
    /// outputs).
    pub host_s_per_byte: f64,
    pub host_fixed_s: f64,
}

/// One expert a layer needs that the device does not hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Miss {
    /// Bytes (and copies) the device lacks: its matrices not in the device's cache.
    pub copy_bytes: u64,
    pub copies: u32,
    /// Bytes the host reads to compute it (all its matrices), and the tokens it serves; `None`
    /// where the host cannot compute it.
    pub host_bytes: Option<u64>,
    pub tokens: u32,
}

/// Which of one layer's misses to compute on the host instead of copying them: the split that
/// ends the layer's expert work soonest, the copies running one after another on the link while
/// the host computes its share (and the device its hits, which both wait for). Greedy: the
/// costliest copy moves to the host while that shortens `max(copies, host)`; deterministic for
/// given rates (ties go to the later miss).
pub fn split_misses(misses: &[Miss], rates: &MissRates) -> Vec<bool> {
    let copy = |m: &Miss| m.copies as f64 * rates.copy_fixed_s + m.copy_bytes as f64 * rates.copy_s_per_byte;
    let host = |m: &Miss, b: u64| b as f64 * rates.host_s_per_byte * m.tokens.max(1) as f64;
    let mut on_host = vec![false; misses.len()];
    let mut link: f64 = misses.iter().map(copy).sum();
    let mut cpu = 0.0;
    loop {
        let best = (0..misses.len())
            .filter(|&i| !on_host[i] && misses[i].host_bytes.is_some())
            .max_by(|&a, &b| copy(&misses[a]).total_cmp(&copy(&misses[b])).then(a.cmp(&b)));
        let Some(i) = best else { break };
        let m = &misses[i];
        let Some(b) = m.host_bytes else { break };
        // The first miss the host takes pays its fixed cost (input back, outputs up).
        let fixed = if on_host.contains(&true) { 0.0 } else { rates.host_fixed_s };
        let (link2, cpu2) = (link - copy(m), cpu + fixed + host(m, b));
        if link2.max(cpu2) >= link.max(cpu) {
            break;
        }
        (link, cpu) = (link2, cpu2);
        on_host[i] = true;
    }
    on_host
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(unified: bool) -> DeviceProfile {
        DeviceProfile {
            name: "t".into(),
            memory_bytes: 8e9,
            unified,
            host_memory_bytes: 32e9,
            disk_bytes_per_s: 1e9,
            host_to_device_bytes_per_s: 20e9,
            weight_bytes_per_s: 100e9,
            host_weight_bytes_per_s: 10e9,
            layer_overhead_s: 0.0,
            read_latency_s: 0.0,
            sources: Default::default(),
        }
    }

    fn model() -> ModelCosts {
        ModelCosts {
            dense_bytes_per_token: 1e9,
            expert_bytes_high: 1e8,
            expert_bytes_low: 5e7,
            n_layers: 2,
            n_moe_layers: 2,
            model_bytes: 10e9,
        }
    }

    #[test]
    fn hits_only_is_the_weight_stream_and_misses_stall_on_the_disk() {
        let cm = CostModel { device: device(true), model: model(), predict_recall: 0.0 };
        let all_hit = [LayerWork { hits: 2, ..Default::default() }; 2];
        let t = cm.token(&all_hit);
        assert!((t.compute_s - (1e9 + 4e8) / 100e9).abs() < 1e-12 && t.stall_s == 0.0, "{t:?}");
        // One miss per layer: 0.1 s read against 1 ms of hit compute.
        let one_miss = [LayerWork { hits: 1, loads_high: 1, ..Default::default() }; 2];
        let t = cm.token(&one_miss);
        assert!((t.stall_s - 2.0 * (0.1 - 1e-3)).abs() < 1e-9, "{t:?}");
        // A perfect predictor hides the second layer's read behind the first layer's time.
        let p = CostModel { predict_recall: 1.0, ..cm.clone() };
        assert!(p.token(&one_miss).stall_s < t.stall_s * 0.55);
    }

    #[test]
    fn a_discrete_gpu_copies_from_host_ram_or_computes_there() {
        let cm = CostModel { device: device(false), model: model(), predict_recall: 0.0 };
        assert_eq!(cm.miss_bytes_per_s(), 20e9, "the model fits the host: PCIe");
        let (load, host) = cm.miss_costs(1e8);
        assert!((load - 5e-3).abs() < 1e-12 && host == Some(1e-2));
        let big = CostModel { model: ModelCosts { model_bytes: 64e9, ..model() }, ..cm };
        assert_eq!(big.miss_bytes_per_s(), 1e9, "it does not: the disk");
        // Computing a miss on the host (10 ms) beats reading it from disk (100 ms).
        let t = big.token(&[LayerWork { hits: 1, loads_high: 1, ..Default::default() }]);
        assert!(t.stall_s < 0.01, "{t:?}");
    }

    fn miss(bytes: u64) -> Miss {
        Miss { copy_bytes: bytes, copies: 3, host_bytes: Some(bytes), tokens: 1 }
    }

    #[test]
    fn misses_split_between_the_link_and_the_host_by_rate() {
        // 1 MB experts; the link moves one in 40 µs + 3 × 20 µs, the host computes one in 200 µs.
        let rates =
            MissRates { copy_s_per_byte: 4e-11, copy_fixed_s: 2e-5, host_s_per_byte: 2e-10, host_fixed_s: 5e-5 };
        // One miss: copying (100 µs) beats the host (250 µs).
        assert_eq!(split_misses(&[miss(1_000_000)], &rates), [false]);
        // Eight misses: 800 µs of copies; the host takes one (250 µs) then a second (450 µs),
        // leaving 600 µs of copies; a third would make the host the longer side (650 µs).
        let eight = [miss(1_000_000); 8];
        let split = split_misses(&eight, &rates);
        assert_eq!(split.iter().filter(|&&h| h).count(), 2, "{split:?}");
        assert_eq!(split, [false, false, false, false, false, false, true, true], "ties go to the later miss");
        // A fast host takes most; a host that cannot compute a miss never gets it.
        let fast = MissRates { host_s_per_byte: 1e-11, ..rates };
        let mut mixed = eight;
        mixed[7].host_bytes = None;
        let split = split_misses(&mixed, &fast);
        assert!(!split[7] && split.iter().filter(|&&h| h).count() >= 5, "{split:?}");
        // A miss serving many tokens costs the host per token: it stays on the link.
        let batch = [Miss { tokens: 64, ..miss(1_000_000) }; 4];
        assert_eq!(split_misses(&batch, &fast), [false; 4]);
        // Partly cached: only the missing matrix is copied, so the link wins.
        let partial = [Miss { copy_bytes: 300_000, copies: 1, ..miss(1_000_000) }; 2];
        assert_eq!(split_misses(&partial, &rates), [false; 2]);
        assert!(split_misses(&[], &rates).is_empty());
    }
}
