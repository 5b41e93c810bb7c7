//! Routing profiles: what a model's routers chose, kept across runs. Per model file (keyed by a
//! fingerprint of its routed experts and its size): per-layer expert frequencies and
//! layer-to-layer transitions (expert i in layer l, then expert j in the next MoE layer, for
//! the same token). A profile is loaded when the expert cache starts — its most frequent experts
//! warm the cache within the budget — and saved, merged with what this run saw, when the cache
//! goes: written to a temporary file, synced, then renamed over the old one, so a crash or a
//! full disk never leaves half a profile.

use std::path::{Path, PathBuf};

use crate::layers::Route;

/// The format version written; other versions are ignored (a fresh profile starts).
pub const PROFILE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{}: cannot read the routing profile: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a routing profile: {source}", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: cannot write the routing profile: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// See the module docs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoutingProfile {
    pub version: u32,
    /// The model file's name, for people reading the file.
    pub model: String,
    /// `lowprec::fingerprint` of the model, in hex, and the file's size.
    pub fingerprint: String,
    pub file_size: u64,
    pub n_layers: usize,
    pub n_experts: usize,
    /// Tokens routed (counted once per token, in its first MoE layer).
    pub tokens: u64,
    /// `[layer][expert]`: how often the expert was chosen.
    pub freq: Vec<Vec<u64>>,
    /// `[layer]`: (expert in this layer, expert in the next MoE layer, count), nonzero only.
    pub transitions: Vec<Vec<(u16, u16, u64)>>,
}

impl RoutingProfile {
    pub fn new(model: String, fingerprint: String, file_size: u64, n_layers: usize, n_experts: usize) -> Self {
        RoutingProfile {
            version: PROFILE_VERSION,
            model,
            fingerprint,
            file_size,
            n_layers,
            n_experts,
            tokens: 0,
            freq: vec![vec![0; n_experts]; n_layers],
            transitions: vec![Vec::new(); n_layers],
        }
    }

    /// Whether this profile is for the model with this identity and shape.
    pub fn matches(&self, fingerprint: &str, file_size: u64, n_layers: usize, n_experts: usize) -> bool {
        self.version == PROFILE_VERSION
            && self.fingerprint == fingerprint
            && self.file_size == file_size
            && self.n_layers == n_layers
            && self.n_experts == n_experts
            && self.freq.len() == n_layers
            && self.freq.iter().all(|f| f.len() == n_experts)
            && self.transitions.len() == n_layers
    }

    /// Read `path`; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<RoutingProfile>, ProfileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ProfileError::Read { path: path.to_path_buf(), source }),
        };
        serde_json::from_str(&text).map(Some).map_err(|source| ProfileError::Parse { path: path.to_path_buf(), source })
    }

    /// Write atomically: a temporary file beside `path`, synced, renamed over it.
    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other);
        json.and_then(|j| crate::atomic::write(path, &j))
            .map_err(|source| ProfileError::Write { path: path.to_path_buf(), source })?;
        Ok(())
    }

    /// Add what `other` (the same model) counted.
    pub fn merge(&mut self, other: &RoutingProfile) {
        self.tokens += other.tokens;
        for (a, b) in self.freq.iter_mut().zip(&other.freq) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        for (a, b) in self.transitions.iter_mut().zip(&other.transitions) {
            for &(i, j, n) in b {
                match a.iter_mut().find(|(x, y, _)| (*x, *y) == (i, j)) {
                    Some(t) => t.2 += n,
                    None => a.push((i, j, n)),
                }
            }
        }
    }

    /// Per layer, the effective number of experts its routing spreads over: exp of the entropy
    /// of its frequencies (0 for a layer never routed, e.g. a dense one).
    pub fn effective_experts(&self) -> Vec<f64> {
        self.freq
            .iter()
            .map(|f| {
                let total: u64 = f.iter().sum();
                if total == 0 {
                    return 0.0;
                }
                let h: f64 = f
                    .iter()
                    .filter(|&&c| c > 0)
                    .map(|&c| {
                        let p = c as f64 / total as f64;
                        -p * p.ln()
                    })
                    .sum();
                h.exp()
            })
            .collect()
    }

    /// The `n` most chosen experts over all layers (ties: lower layer, then lower index), as
    /// (layer, experts in frequency order); experts never chosen are left out.
    pub fn hottest(&self, n: usize) -> Vec<(usize, Vec<u16>)> {
        let mut all: Vec<(u64, usize, u16)> = self
            .freq
            .iter()
            .enumerate()
            .flat_map(|(l, f)| f.iter().enumerate().filter(|(_, &c)| c > 0).map(move |(e, &c)| (c, l, e as u16)))
            .collect();
        all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        all.truncate(n);
        let mut by_layer: Vec<(usize, Vec<u16>)> = Vec::new();
        for (_, l, e) in all {
            match by_layer.iter_mut().find(|(x, _)| *x == l) {
                Some((_, v)) => v.push(e),
                None => by_layer.push((l, vec![e])),
            }
        }
        by_layer.sort_by_key(|(l, _)| *l);
        by_layer
    }
}

/// Counts one run's routing into a profile (dense transition counts while running).
#[derive(Debug, Clone)]
pub struct ProfileRecorder {
    profile: RoutingProfile,
    /// `[layer][i * n_experts + j]` while running; folded into `profile.transitions` on save.
    trans: Vec<Vec<u64>>,
    /// The last MoE layer routed in this pass and its routes (for transitions).
    last: Option<(usize, Vec<Vec<u32>>)>,
    first_moe: Option<usize>,
    dirty: bool,
}

impl ProfileRecorder {
    /// Start counting into `profile` (a fresh one, or what earlier runs saved).
    pub fn new(mut profile: RoutingProfile) -> ProfileRecorder {
        let (nl, ne) = (profile.n_layers, profile.n_experts);
        // Saved transitions are sparse; while running they are dense counts.
        let mut trans = vec![Vec::new(); nl];
        for (dense, saved) in trans.iter_mut().zip(&mut profile.transitions) {
            for (i, j, n) in saved.drain(..) {
                if (i as usize) < ne && (j as usize) < ne {
                    dense.resize(ne * ne, 0);
                    dense[i as usize * ne + j as usize] += n;
                }
            }
        }
        ProfileRecorder { profile, trans, last: None, first_moe: None, dirty: false }
    }

    /// Layer `l` routed these tokens (one route per token, in batch order).
    pub fn record(&mut self, l: usize, routes: &[Route]) {
        let ne = self.profile.n_experts;
        let Some(freq) = self.profile.freq.get_mut(l) else { return };
        self.dirty = true;
        if self.first_moe.is_none_or(|f| l <= f) {
            self.first_moe = Some(l);
            self.profile.tokens += routes.len() as u64;
            self.last = None;
        }
        for r in routes {
            for &e in &r.experts {
                if let Some(c) = freq.get_mut(e as usize) {
                    *c += 1;
                }
            }
        }
        if let Some((pl, prev)) = self.last.take() {
            if pl < l && prev.len() == routes.len() {
                let t = &mut self.trans[pl];
                if t.is_empty() {
                    t.resize(ne * ne, 0);
                }
                for (a, b) in prev.iter().zip(routes) {
                    for &i in a {
                        for &j in &b.experts {
                            if (i as usize) < ne && (j as usize) < ne {
                                t[i as usize * ne + j as usize] += 1;
                            }
                        }
                    }
                }
            }
        }
        self.last = Some((l, routes.iter().map(|r| r.experts.clone()).collect()));
    }

    /// Whether anything was recorded since the start (or the last save).
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// The profile with this run's counts.
    pub fn profile(&self) -> RoutingProfile {
        let mut p = self.profile.clone();
        let ne = p.n_experts;
        for (l, t) in self.trans.iter().enumerate() {
            p.transitions[l] = t
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(k, &n)| ((k / ne) as u16, (k % ne) as u16, n))
                .collect();
        }
        p
    }

    /// Save atomically to `path`.
    pub fn save(&mut self, path: &Path) -> Result<(), ProfileError> {
        self.profile().save(path)?;
        self.dirty = false;
        Ok(())
    }
}

/// Where profiles live by default: `$XDG_CACHE_HOME/moerun/profiles`, else
/// `$HOME/.cache/moerun/profiles`.
pub fn default_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache"),
    };
    Some(base.join("moerun").join("profiles"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(e: &[u32]) -> Route {
        Route { experts: e.to_vec(), weights: vec![0.5; e.len()] }
    }

    #[test]
    fn records_frequencies_and_transitions_and_round_trips() {
        let mut r = ProfileRecorder::new(RoutingProfile::new("m".into(), "ab".into(), 10, 3, 4));
        // Two passes: a 2-token batch, then one token; layer 1 is dense (never recorded).
        r.record(0, &[route(&[0, 1]), route(&[2, 3])]);
        r.record(2, &[route(&[1, 2]), route(&[3, 0])]);
        r.record(0, &[route(&[0, 2])]);
        r.record(2, &[route(&[1, 3])]);
        let p = r.profile();
        assert_eq!(p.tokens, 3);
        assert_eq!(p.freq[0], vec![2, 1, 2, 1]);
        assert_eq!(p.freq[2], vec![1, 2, 1, 2]);
        let t = |i, j| p.transitions[0].iter().find(|x| (x.0, x.1) == (i, j)).map_or(0, |x| x.2);
        assert_eq!(t(0, 1), 2, "token 0 then token 2: 0→1 twice");
        assert_eq!(t(2, 3), 2);
        assert_eq!(t(3, 1), 0);
        assert_eq!(p.hottest(3), vec![(0, vec![0, 2]), (2, vec![1])]);
        let eff = p.effective_experts();
        assert_eq!(eff[1], 0.0, "a layer never routed");
        assert!(eff[0] > 3.0 && eff[0] < 4.0, "four experts, uneven: {eff:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/p.json");
        r.save(&path).expect("save");
        let back = RoutingProfile::load(&path).expect("load").expect("exists");
        assert_eq!(back, p);
        assert!(back.matches("ab", 10, 3, 4) && !back.matches("ab", 11, 3, 4));
        // A recorder resumed from the saved profile keeps counting on top.
        let mut again = ProfileRecorder::new(back);
        again.record(0, &[route(&[0, 1])]);
        again.record(2, &[route(&[1, 2])]);
        let q = again.profile();
        assert_eq!(q.tokens, 4);
        assert_eq!(q.transitions[0].iter().find(|x| (x.0, x.1) == (0, 1)).map(|x| x.2), Some(3));
        assert!(RoutingProfile::load(&dir.path().join("none.json")).expect("absent is fine").is_none());
        std::fs::write(&path, b"{ not json").expect("write");
        assert!(matches!(RoutingProfile::load(&path), Err(ProfileError::Parse { .. })));
    }
}
