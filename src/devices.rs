//! Device profiles (`devices/*.toml`): what a machine has for running a MoE model out of a
//! budget — memory, the bandwidths experts move over (disk, host to device) and the rate its
//! kernels stream weights at while decoding — each number with its source. The cost model
//! (`experts::costmodel`) and `moerun sim --device` read them; nothing here measures anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One machine, as `devices/*.toml` describes it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    pub name: String,
    /// Memory the runtime may fill with weights and the expert cache, in bytes.
    pub memory_bytes: f64,
    /// The experts' memory is the host's (CPU, Jetson): a miss is read from disk into it, and
    /// there is no host-to-device copy.
    pub unified: bool,
    /// Host RAM, in bytes (for a discrete GPU: where the experts that miss may already sit).
    pub host_memory_bytes: f64,
    /// Bytes per second read from the model's disk with O_DIRECT, expert-sized reads.
    pub disk_bytes_per_s: f64,
    /// Seconds before the first byte of a layer's reads arrives (queueing, the device's
    /// latency); paid once per layer that misses.
    #[serde(default)]
    pub read_latency_s: f64,
    /// Bytes per second from pinned host memory to the device (0 with unified memory).
    pub host_to_device_bytes_per_s: f64,
    /// Bytes of weights per second the device's decode kernels stream (one token's mat-vecs
    /// are memory-bound: this is the effective rate, below the memory's peak).
    pub weight_bytes_per_s: f64,
    /// The same for the host CPU computing a miss where its bytes are (`--cpu-moe`-style).
    pub host_weight_bytes_per_s: f64,
    /// Fixed cost per layer and token (kernel launches, synchronization, attention at short
    /// context), in seconds.
    pub layer_overhead_s: f64,
    /// Where each number comes from (field name → source).
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{}: cannot read the device profile: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{}: {field} = {value} must be positive and finite", .path.display())]
    Field { path: PathBuf, field: &'static str, value: f64 },
}

impl DeviceProfile {
    pub fn load(path: &Path) -> Result<DeviceProfile, DeviceError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| DeviceError::Read { path: path.to_path_buf(), source })?;
        let d: DeviceProfile =
            toml::from_str(&text).map_err(|source| DeviceError::Parse { path: path.to_path_buf(), source })?;
        let positive = [
            ("memory_bytes", d.memory_bytes),
            ("disk_bytes_per_s", d.disk_bytes_per_s),
            ("weight_bytes_per_s", d.weight_bytes_per_s),
            ("host_weight_bytes_per_s", d.host_weight_bytes_per_s),
        ];
        let non_negative = [
            ("host_memory_bytes", d.host_memory_bytes),
            ("host_to_device_bytes_per_s", d.host_to_device_bytes_per_s),
            ("layer_overhead_s", d.layer_overhead_s),
            ("read_latency_s", d.read_latency_s),
        ];
        let bad = positive
            .iter()
            .find(|(_, v)| !(v.is_finite() && *v > 0.0))
            .or_else(|| non_negative.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)));
        if let Some(&(field, value)) = bad {
            return Err(DeviceError::Field { path: path.to_path_buf(), field, value });
        }
        if !d.unified && d.host_to_device_bytes_per_s <= 0.0 {
            return Err(DeviceError::Field {
                path: path.to_path_buf(),
                field: "host_to_device_bytes_per_s",
                value: d.host_to_device_bytes_per_s,
            });
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every profile shipped in `devices/` parses, validates and names a source for each number.
    #[test]
    fn shipped_profiles_load_and_cite_their_numbers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("devices");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("devices/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let d = DeviceProfile::load(&path).unwrap_or_else(|e| panic!("{e}"));
                for field in ["memory_bytes", "disk_bytes_per_s", "weight_bytes_per_s", "host_weight_bytes_per_s"] {
                    assert!(d.sources.contains_key(field), "{}: no source for {field}", path.display());
                }
                n += 1;
            }
        }
        assert!(n >= 6, "six device profiles");
        let bad = dir.join("../target/bad-device.toml");
        std::fs::write(&bad, "name = 'x'\nmemory_bytes = -1.0\n").expect("write");
        assert!(DeviceProfile::load(&bad).is_err());
    }
}
