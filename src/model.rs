//! A loaded model: the GGUF mapping, its `ArchSpec` and hyper-parameters, and a view descriptor
//! for every weight, validated against the architecture before anything is allocated.
//! Invariant: weights are never copied here; small norm vectors are the only f32 copies.

use std::path::Path;
use std::sync::Arc;

use std::collections::HashMap;

use crate::arch::{self, tn, tn_expert, ArchError, ArchSpec, HParams, QkNorm, TensorKind};
use crate::backend::cpu::repack::{self, Layout};
use crate::backend::cpu::{kernels, MatRef};
use crate::backend::{cpu_supports, Op};
use crate::gguf::{GgmlType, GgufFile, TensorInfo};

/// A 2-D weight (or one expert's slice of a stacked 3-D tensor) inside the file.
#[derive(Debug, Clone, Copy)]
pub struct WeightDesc {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub bytes: u64,
}

impl WeightDesc {
    /// A view of these bytes taken from `data` (the file mapping, or a cache slot holding them).
    pub fn mat<'a>(&self, data: &'a [u8]) -> MatRef<'a> {
        MatRef::new(self.ty, self.rows, self.cols, data).expect("weight views are validated at load")
    }
}

/// The three matrices of one expert (SwiGLU: down(silu(gate·x) ⊙ up·x)).
#[derive(Debug, Clone, Copy)]
pub struct ExpertDesc {
    pub gate: WeightDesc,
    pub up: WeightDesc,
    pub down: WeightDesc,
}

impl ExpertDesc {
    pub fn bytes(&self) -> u64 {
        self.gate.bytes + self.up.bytes + self.down.bytes
    }

    /// The three byte extents (offset, length) in the file: what the expert cache streams.
    pub fn extents(&self) -> [(u64, u64); 3] {
        [(self.gate.offset, self.gate.bytes), (self.up.offset, self.up.bytes), (self.down.offset, self.down.bytes)]
    }
}

#[derive(Debug, Clone)]
pub struct SharedExpert {
    /// Sigmoid gate vector `[n_embd]`.
    pub gate_inp: Vec<f32>,
    pub ffn: ExpertDesc,
}

#[derive(Debug, Clone)]
pub enum Ffn {
    Dense(ExpertDesc),
    Moe {
        /// Router `[n_expert rows × n_embd]`.
        router: WeightDesc,
        experts: Vec<ExpertDesc>,
        shared: Option<SharedExpert>,
    },
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: WeightDesc,
    pub wk: WeightDesc,
    pub wv: WeightDesc,
    pub wo: WeightDesc,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
}

/// Which weights are copied out of the file mapping into resident memory at load. Q4_0 copies
/// are repacked for ggml's interleaved GEMV/GEMM (what llama.cpp does for every Q4_0 weight);
/// other types are copied as they are. A resident weight never touches the mapping again, so
/// the file can change under a running engine without a SIGBUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
pub enum Resident {
    /// Every weight is read from the file mapping (zero copies).
    None,
    /// Everything but the routed experts: embeddings, attention, output, shared experts — the
    /// part every token needs. Routed experts come from the mapping or the expert cache.
    Dense,
    /// Dense weights and every routed expert (needs RAM for the whole model).
    All,
    /// `all` when the whole model fits in the memory this process may still take (with 1 GiB
    /// to spare), else `dense`.
    #[default]
    Auto,
}

/// Headroom `Resident::Auto` keeps free beyond the model's bytes.
const AUTO_HEADROOM: u64 = 1 << 30;

/// How to load a model.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub resident: Resident,
}

/// Resident copies of weights, keyed by their file offset.
struct ResidentCopies {
    buf: memmap2::MmapMut,
    index: HashMap<u64, (usize, Layout)>,
}

pub struct Model {
    pub file: Arc<GgufFile>,
    pub spec: &'static ArchSpec,
    pub hp: HParams,
    pub tok_embd: WeightDesc,
    pub output_norm: Vec<f32>,
    pub output: WeightDesc,
    pub layers: Vec<Layer>,
    resident: Option<ResidentCopies>,
    /// What was made resident (`Auto` resolved).
    resident_mode: Resident,
}

struct Loader<'a> {
    file: &'a GgufFile,
    path: String,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo, ArchError> {
        self.file
            .tensor(name)
            .ok_or_else(|| ArchError::MissingTensor { path: self.path.clone(), tensor: name.to_string() })
    }

    fn check_shape(&self, t: &TensorInfo, expected: &[u64]) -> Result<(), ArchError> {
        if t.shape != expected {
            return Err(ArchError::BadTensorShape {
                path: self.path.clone(),
                tensor: t.name.clone(),
                found: t.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(())
    }

    fn check_matmul(&self, t: &TensorInfo) -> Result<(), ArchError> {
        if !cpu_supports(Op::MatMul, t.ggml_type) {
            return Err(ArchError::UnsupportedType {
                path: self.path.clone(),
                tensor: t.name.clone(),
                ty: t.ggml_type.name(),
                op: "multiply",
            });
        }
        Ok(())
    }

    /// A 2-D matrix `[cols, rows]` in ggml order.
    fn mat(&self, name: &str, cols: usize, rows: usize) -> Result<WeightDesc, ArchError> {
        let t = self.info(name)?;
        self.check_shape(t, &[cols as u64, rows as u64])?;
        self.check_matmul(t)?;
        Ok(WeightDesc { ty: t.ggml_type, rows, cols, offset: t.offset, bytes: t.size })
    }

    /// Slices of a stacked `[cols, rows, n]` tensor, one per expert.
    fn stacked(&self, name: &str, cols: usize, rows: usize, n: usize) -> Result<Vec<WeightDesc>, ArchError> {
        let t = self.info(name)?;
        self.check_shape(t, &[cols as u64, rows as u64, n as u64])?;
        self.check_matmul(t)?;
        let per = t.size / n as u64;
        Ok((0..n as u64)
            .map(|e| WeightDesc { ty: t.ggml_type, rows, cols, offset: t.offset + e * per, bytes: per })
            .collect())
    }

    /// A vector dequantized to f32.
    fn vec(&self, name: &str, len: usize) -> Result<Vec<f32>, ArchError> {
        let t = self.info(name)?;
        self.check_shape(t, &[len as u64])?;
        self.f32_data(t)
    }

    fn opt_vec(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, ArchError> {
        if self.file.tensor(name).is_none() {
            return Ok(None);
        }
        self.vec(name, len).map(Some)
    }

    fn f32_data(&self, t: &TensorInfo) -> Result<Vec<f32>, ArchError> {
        let k = kernels(t.ggml_type).filter(|_| cpu_supports(Op::GetRows, t.ggml_type)).ok_or_else(|| {
            ArchError::UnsupportedType {
                path: self.path.clone(),
                tensor: t.name.clone(),
                ty: t.ggml_type.name(),
                op: "dequantize",
            }
        })?;
        let mut out = vec![0f32; t.n_elements() as usize];
        k.dequantize(self.file.tensor_data(t), &mut out);
        Ok(out)
    }

    fn experts(&self, l: usize, hp: &HParams, n_ff_exp: usize) -> Result<Vec<ExpertDesc>, ArchError> {
        let (d, n) = (hp.n_embd, hp.n_expert);
        if self.file.tensor(&tn(TensorKind::FfnUpExps, Some(l))).is_some() {
            let gate = self.stacked(&tn(TensorKind::FfnGateExps, Some(l)), d, n_ff_exp, n)?;
            let up = self.stacked(&tn(TensorKind::FfnUpExps, Some(l)), d, n_ff_exp, n)?;
            let down = self.stacked(&tn(TensorKind::FfnDownExps, Some(l)), n_ff_exp, d, n)?;
            return Ok((0..n).map(|e| ExpertDesc { gate: gate[e], up: up[e], down: down[e] }).collect());
        }
        (0..n)
            .map(|e| {
                Ok(ExpertDesc {
                    gate: self.mat(&tn_expert(TensorKind::FfnGateExpert, l, e), d, n_ff_exp)?,
                    up: self.mat(&tn_expert(TensorKind::FfnUpExpert, l, e), d, n_ff_exp)?,
                    down: self.mat(&tn_expert(TensorKind::FfnDownExpert, l, e), n_ff_exp, d)?,
                })
            })
            .collect()
    }

    /// The expert FFN width, read from the first layer's tensors (the metadata key is optional
    /// and defaults differ by family).
    fn n_ff_exp(&self, hp: &HParams) -> usize {
        let stacked = self.file.tensor(&tn(TensorKind::FfnUpExps, Some(0)));
        let single = self.file.tensor(&tn_expert(TensorKind::FfnUpExpert, 0, 0));
        stacked.or(single).and_then(|t| t.shape.get(1)).map(|&v| v as usize).unwrap_or(hp.n_ff_exp)
    }
}

impl Model {
    /// Open and validate a GGUF model with default options.
    pub fn load(path: &Path) -> Result<Model, ArchError> {
        Model::load_with(path, LoadOptions::default())
    }

    /// Open and validate a GGUF model.
    pub fn load_with(path: &Path, opts: LoadOptions) -> Result<Model, ArchError> {
        let file = Arc::new(GgufFile::open(path)?);
        let mut m = Model::from_file(file)?;
        m.make_resident(opts.resident)?;
        Ok(m)
    }

    /// Validate `file` as a model; every weight is read from the mapping.
    pub fn from_file(file: Arc<GgufFile>) -> Result<Model, ArchError> {
        let path = file.path().display().to_string();
        let arch_name = file
            .get_str("general.architecture")?
            .ok_or_else(|| ArchError::MissingKey { path: path.clone(), key: "general.architecture".into() })?
            .to_string();
        let spec = arch::spec(&arch_name).ok_or_else(|| ArchError::UnknownArch {
            path: path.clone(),
            arch: arch_name.clone(),
            known: arch::SPECS.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
        })?;
        let mut hp = HParams::read(&file, spec)?;
        let ld = Loader { file: &file, path: path.clone() };
        let d = hp.n_embd;

        let embd_info = ld.info(&tn(TensorKind::TokenEmbd, None))?;
        if hp.n_vocab == 0 {
            hp.n_vocab = embd_info.shape.get(1).copied().unwrap_or(0) as usize;
        }
        let tok_embd = ld.mat(&tn(TensorKind::TokenEmbd, None), d, hp.n_vocab)?;
        let output_norm = ld.vec(&tn(TensorKind::OutputNorm, None), d)?;
        let output = match file.tensor(&tn(TensorKind::Output, None)) {
            Some(_) => ld.mat(&tn(TensorKind::Output, None), d, hp.n_vocab)?,
            None if spec.tied_output_allowed => tok_embd,
            None => return Err(ArchError::MissingTensor { path, tensor: tn(TensorKind::Output, None) }),
        };
        let n_ff_exp = ld.n_ff_exp(&hp);
        hp.n_ff_exp = n_ff_exp;

        let (q, kv) = (hp.q_dim(), hp.kv_dim());
        let mut layers = Vec::with_capacity(hp.n_layer);
        for l in 0..hp.n_layer {
            let t = |k| tn(k, Some(l));
            let (q_norm, k_norm) = match spec.qk_norm {
                QkNorm::None => (None, None),
                QkNorm::PerHead => (
                    Some(ld.vec(&t(TensorKind::AttnQNorm), hp.head_dim)?),
                    Some(ld.vec(&t(TensorKind::AttnKNorm), hp.head_dim)?),
                ),
                QkNorm::Full => {
                    (Some(ld.vec(&t(TensorKind::AttnQNorm), q)?), Some(ld.vec(&t(TensorKind::AttnKNorm), kv)?))
                }
            };
            let (bq, bk, bv) = if spec.attn_bias {
                (
                    ld.opt_vec(&t(TensorKind::AttnQBias), q)?,
                    ld.opt_vec(&t(TensorKind::AttnKBias), kv)?,
                    ld.opt_vec(&t(TensorKind::AttnVBias), kv)?,
                )
            } else {
                (None, None, None)
            };
            let ffn = if file.tensor(&t(TensorKind::FfnGateInp)).is_some() {
                if hp.n_expert == 0 {
                    return Err(ArchError::MissingKey {
                        path: path.clone(),
                        key: format!("{}.expert_count", spec.name),
                    });
                }
                let router = ld.mat(&t(TensorKind::FfnGateInp), d, hp.n_expert)?;
                let experts = ld.experts(l, &hp, n_ff_exp)?;
                let shared = if spec.shared_expert {
                    let f = hp.n_ff_shexp;
                    Some(SharedExpert {
                        gate_inp: ld.vec(&t(TensorKind::FfnGateInpShexp), d)?,
                        ffn: ExpertDesc {
                            gate: ld.mat(&t(TensorKind::FfnGateShexp), d, f)?,
                            up: ld.mat(&t(TensorKind::FfnUpShexp), d, f)?,
                            down: ld.mat(&t(TensorKind::FfnDownShexp), f, d)?,
                        },
                    })
                } else {
                    None
                };
                Ffn::Moe { router, experts, shared }
            } else {
                let f = hp.n_ff;
                Ffn::Dense(ExpertDesc {
                    gate: ld.mat(&t(TensorKind::FfnGate), d, f)?,
                    up: ld.mat(&t(TensorKind::FfnUp), d, f)?,
                    down: ld.mat(&t(TensorKind::FfnDown), f, d)?,
                })
            };
            layers.push(Layer {
                attn_norm: ld.vec(&t(TensorKind::AttnNorm), d)?,
                wq: ld.mat(&t(TensorKind::AttnQ), d, q)?,
                wk: ld.mat(&t(TensorKind::AttnK), d, kv)?,
                wv: ld.mat(&t(TensorKind::AttnV), d, kv)?,
                wo: ld.mat(&t(TensorKind::AttnOut), q, d)?,
                bq,
                bk,
                bv,
                q_norm,
                k_norm,
                ffn_norm: ld.vec(&t(TensorKind::FfnNorm), d)?,
                ffn,
            });
        }
        Ok(Model {
            file,
            spec,
            hp,
            tok_embd,
            output_norm,
            output,
            layers,
            resident: None,
            resident_mode: Resident::None,
        })
    }

    /// The weights `which` selects, in load order.
    fn resident_set(&self, which: Resident) -> Vec<WeightDesc> {
        let mut ws = Vec::new();
        if which == Resident::None {
            return ws;
        }
        ws.push(self.tok_embd);
        if self.output.offset != self.tok_embd.offset {
            ws.push(self.output);
        }
        for l in &self.layers {
            ws.extend([l.wq, l.wk, l.wv, l.wo]);
            match &l.ffn {
                Ffn::Dense(e) => ws.extend([e.gate, e.up, e.down]),
                Ffn::Moe { router, experts, shared } => {
                    ws.push(*router);
                    if let Some(sh) = shared {
                        ws.extend([sh.ffn.gate, sh.ffn.up, sh.ffn.down]);
                    }
                    if which == Resident::All {
                        ws.extend(experts.iter().flat_map(|e| [e.gate, e.up, e.down]));
                    }
                }
            }
        }
        ws
    }

    /// Copy the selected weights into one anonymous (huge-page advised) buffer, repacking the
    /// ones a faster layout exists for. The token embedding stays plain: rows are looked up.
    fn make_resident(&mut self, which: Resident) -> Result<(), ArchError> {
        let which = match which {
            Resident::Auto => {
                let all: u64 = self.resident_set(Resident::All).iter().map(|w| w.bytes).sum();
                let room = crate::sysmem::available();
                let pick = if room.is_some_and(|r| all + AUTO_HEADROOM <= r) { Resident::All } else { Resident::Dense };
                tracing::info!(
                    "resident auto: the model's weights take {:.1} MiB, {} available → {pick:?}",
                    all as f64 / 1048576.0,
                    room.map_or("unknown".to_string(), |r| format!("{:.1} MiB", r as f64 / 1048576.0))
                );
                pick
            }
            w => w,
        };
        self.resident_mode = which;
        let ws = self.resident_set(which);
        let total: u64 = ws.iter().map(|w| w.bytes).sum();
        if total == 0 {
            return Ok(());
        }
        let path = self.file.path().display().to_string();
        let t0 = std::time::Instant::now();
        let mut buf = memmap2::MmapMut::map_anon(total as usize).map_err(|e| ArchError::Resident {
            path: path.clone(),
            bytes: total,
            reason: e.to_string(),
        })?;
        // Huge pages cut TLB misses when streaming gigabytes of weights; a hint, so ignore failure.
        let _ = buf.advise(memmap2::Advice::HugePage);
        // Each weight's layout and place in the buffer, decided up front.
        let mut index = HashMap::with_capacity(ws.len());
        let mut at = 0usize;
        let mut jobs: Vec<(&WeightDesc, Layout, &mut [u8])> = Vec::with_capacity(ws.len());
        let mut rest: &mut [u8] = &mut buf;
        for w in &ws {
            let layout = match repack::repackable(w.ty, w.rows, w.cols) {
                Some(Layout::Q4_0x8) if w.offset != self.tok_embd.offset => Layout::Q4_0x8,
                _ => Layout::Plain,
            };
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(w.bytes as usize);
            rest = tail;
            jobs.push((w, layout, dst));
            index.insert(w.offset, (at, layout));
            at += w.bytes as usize;
        }
        let repacked = jobs.iter().filter(|j| j.1 == Layout::Q4_0x8).count();
        // A few threads each copy a contiguous share of the weights (repacking is CPU work, and
        // several readers keep the disk busy on a cold load).
        let n_threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
        let share = total.div_ceil(n_threads as u64);
        let mut groups: Vec<Vec<(&WeightDesc, Layout, &mut [u8])>> = Vec::new();
        let mut acc = u64::MAX;
        for j in jobs {
            if acc >= share {
                groups.push(Vec::new());
                acc = 0;
            }
            acc += j.0.bytes;
            groups.last_mut().expect("a group was just pushed").push(j);
        }
        let me = &*self;
        std::thread::scope(|sc| {
            for g in groups {
                sc.spawn(move || copy_weights(me, g));
            }
        });
        tracing::info!(
            "{} weights ({:.1} MiB) resident, {repacked} repacked for ggml's interleaved kernels, in {:.2} s",
            ws.len(),
            total as f64 / 1048576.0,
            t0.elapsed().as_secs_f64()
        );
        self.resident = Some(ResidentCopies { buf, index });
        Ok(())
    }

    /// Which weights were made resident (`Auto` resolved to `All` or `Dense`).
    pub fn resident_mode(&self) -> Resident {
        self.resident_mode
    }

    /// Bytes held in resident (repacked) copies.
    pub fn resident_bytes(&self) -> u64 {
        self.resident.as_ref().map(|r| r.buf.len() as u64).unwrap_or(0)
    }

    /// The bytes of a weight inside the mapping (ggml's plain layout).
    pub fn bytes_of(&self, w: &WeightDesc) -> &[u8] {
        &self.file.bytes()[w.offset as usize..(w.offset + w.bytes) as usize]
    }

    /// A weight in ggml's plain layout (row lookups, dequantization): its resident plain copy,
    /// else the mapping.
    pub fn plain_mat(&self, w: &WeightDesc) -> MatRef<'_> {
        match self.resident_copy(w) {
            Some((data, Layout::Plain)) => w.mat(data),
            _ => w.mat(self.bytes_of(w)),
        }
    }

    /// A weight for multiplication: its resident copy (repacked or plain) if it has one, else
    /// the mapping.
    pub fn mat(&self, w: &WeightDesc) -> MatRef<'_> {
        match self.resident_copy(w) {
            Some((data, Layout::Plain)) => w.mat(data),
            Some((data, layout)) => {
                MatRef::repacked(w.ty, w.rows, w.cols, data, layout).expect("resident copies are validated at load")
            }
            None => w.mat(self.bytes_of(w)),
        }
    }

    fn resident_copy(&self, w: &WeightDesc) -> Option<(&[u8], Layout)> {
        let r = self.resident.as_ref()?;
        let &(at, layout) = r.index.get(&w.offset)?;
        Some((&r.buf[at..at + w.bytes as usize], layout))
    }

    /// Per-layer routed experts, if the layer is MoE.
    pub fn experts(&self, layer: usize) -> Option<&[ExpertDesc]> {
        match &self.layers[layer].ffn {
            Ffn::Moe { experts, .. } => Some(experts),
            Ffn::Dense(_) => None,
        }
    }

    /// Bytes of all routed experts (the part the expert cache manages).
    pub fn expert_bytes(&self) -> u64 {
        (0..self.layers.len()).filter_map(|l| self.experts(l)).flatten().map(|e| e.bytes()).sum()
    }

    /// Bytes of all tensors in the file.
    pub fn total_bytes(&self) -> u64 {
        self.file.tensors().iter().map(|t| t.size).sum()
    }

    /// Weight bytes one token touches: everything but the unused routed experts (and the
    /// embedding table, of which one row is read).
    pub fn active_bytes_per_token(&self) -> u64 {
        let hp = &self.hp;
        let per_expert: u64 = (0..self.layers.len())
            .filter_map(|l| self.experts(l))
            .map(|ex| ex.iter().map(|e| e.bytes()).sum::<u64>() / ex.len().max(1) as u64 * hp.n_expert_used as u64)
            .sum();
        let embd_row = self.tok_embd.bytes / self.tok_embd.rows.max(1) as u64;
        let tied = self.output.offset == self.tok_embd.offset;
        let embd_total = if tied { 0 } else { self.tok_embd.bytes };
        self.total_bytes() - self.expert_bytes() - embd_total + embd_row + per_expert
    }
}

/// Copy (or repack) weights out of the mapping into their resident places, in order. Reads one
/// weight ahead (MADV_WILLNEED) while copying the one before, and drops copied ranges from the
/// mapping in batches (MADV_DONTNEED; each flushes TLBs): cold loads read at the disk's pace
/// instead of one page fault at a time, and RSS does not count the model twice.
fn copy_weights(model: &Model, jobs: Vec<(&WeightDesc, Layout, &mut [u8])>) {
    let file = &model.file;
    const RELEASE_BATCH: u64 = 256 << 20;
    let (mut pending, mut pending_bytes) = (Vec::new(), 0u64);
    if let Some(j) = jobs.first() {
        file.will_need(j.0.offset, j.0.bytes);
    }
    let mut it = jobs.into_iter().peekable();
    while let Some((w, layout, dst)) = it.next() {
        if let Some(next) = it.peek() {
            file.will_need(next.0.offset, next.0.bytes);
        }
        let src = model.bytes_of(w);
        match layout {
            Layout::Q4_0x8 => repack::repack_q4_0x8(src, w.rows, w.cols, dst),
            _ => dst.copy_from_slice(src),
        }
        pending.push((w.offset, w.bytes));
        pending_bytes += w.bytes;
        if pending_bytes >= RELEASE_BATCH {
            pending.drain(..).for_each(|(o, l)| file.release(o, l));
            pending_bytes = 0;
        }
    }
    pending.into_iter().for_each(|(o, l)| file.release(o, l));
}
