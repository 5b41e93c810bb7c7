//! Which of a model's weights a backend copies out of the file mapping into its own memory. The
//! decision only: the backend does the copying (and chooses layouts, e.g. the CPU backend's
//! repacked Q4_0). Invariant: reads nothing of the system; the memory room is passed in.

use super::{Ffn, Model, WeightDesc};

/// Which weights are copied out of the file mapping at load. A copied weight never touches the
/// mapping again, so the file can change under a running engine without a SIGBUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
pub enum Resident {
    /// Every weight is read from the file mapping (zero copies).
    None,
    /// Everything but the routed experts: embeddings, attention, output, shared experts — the
    /// part every token needs. Routed experts come from the mapping or the expert cache.
    Dense,
    /// Dense weights and every routed expert (needs memory for the whole model).
    All,
    /// `all` when the whole model fits in the room given (with 1 GiB to spare), else `dense`.
    #[default]
    Auto,
}

/// What to copy, and the memory this process may still take (for `Auto`; the front doors pass
/// `sysmem::available()`). Without a room, `Auto` copies the dense weights only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Residency {
    pub which: Resident,
    pub room: Option<u64>,
}

/// Headroom `Resident::Auto` keeps free beyond the model's bytes.
const AUTO_HEADROOM: u64 = 1 << 30;

impl Residency {
    /// Exactly `which` (`Auto` without a room means `Dense`).
    pub fn fixed(which: Resident) -> Residency {
        Residency { which, room: None }
    }

    /// `which` resolved for `model`: never `Auto`.
    pub fn resolve(&self, model: &Model) -> Resident {
        match self.which {
            Resident::Auto => {
                let all = resident_bytes(model, Resident::All);
                let pick = if self.room.is_some_and(|r| fits(model, r)) { Resident::All } else { Resident::Dense };
                tracing::info!(
                    "resident auto: the model's weights take {:.1} MiB, {} available → {pick:?}",
                    all as f64 / 1048576.0,
                    self.room.map_or("unknown".to_string(), |r| format!("{:.1} MiB", r as f64 / 1048576.0))
                );
                pick
            }
            w => w,
        }
    }
}

/// Whether all of `model`'s weights fit in `room` bytes with `auto`'s headroom to spare (what
/// `Resident::Auto` copies everything for).
pub fn fits(model: &Model, room: u64) -> bool {
    resident_bytes(model, Resident::All) + AUTO_HEADROOM <= room
}

/// Bytes of the weights `which` (resolved) selects.
pub fn resident_bytes(model: &Model, which: Resident) -> u64 {
    resident_set(model, which).iter().map(|w| w.bytes).sum()
}

/// The weights `which` (resolved) selects, in load order, each once.
pub fn resident_set(model: &Model, which: Resident) -> Vec<WeightDesc> {
    let mut ws = Vec::new();
    if which == Resident::None {
        return ws;
    }
    ws.push(model.tok_embd);
    if model.output.offset != model.tok_embd.offset {
        ws.push(model.output);
    }
    for l in &model.layers {
        ws.extend(l.attn.matrices());
        ws.push(l.wo);
        match &l.ffn {
            Ffn::Dense(e) => ws.extend([e.gate, e.up, e.down]),
            Ffn::Moe { router, experts, shared, .. } => {
                ws.push(*router);
                if let Some(sh) = shared {
                    ws.extend(sh.gate_inp);
                    ws.extend([sh.ffn.gate, sh.ffn.up, sh.ffn.down]);
                }
                if which != Resident::Dense {
                    ws.extend(experts.iter().flat_map(|e| [e.gate, e.up, e.down]));
                }
            }
        }
    }
    ws
}
