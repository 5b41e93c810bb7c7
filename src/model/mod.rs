//! A model as the file describes it: the GGUF mapping, its `ArchSpec` and hyper-parameters, and a
//! descriptor for every weight, validated against the architecture before anything is allocated.
//! Invariant: no weight is copied here (small norm vectors and biases, dequantized to f32, are the
//! only copies); which weights a backend copies is `residency`'s decision and the backend's work.

mod residency;

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;

pub use residency::{fits, resident_bytes, resident_set, Residency, Resident};

use crate::arch::{self, tn, tn_expert, ArchError, ArchSpec, Attention, HParams, QkNorm, TensorKind};
use crate::backend::Op;
use crate::ggml::kernels;
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

/// A small f32 vector of the model (a norm weight or a bias), dequantized at load; see
/// [`Model::vector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VecRef(u32);

impl VecRef {
    /// Its index in [`Model::vectors`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// The three matrices of one expert (SwiGLU: down(silu(gate·x) ⊙ up·x)), and their biases
/// where the family has them (small f32 vectors that stay with the model, not in the cache).
#[derive(Debug, Clone, Copy)]
pub struct ExpertDesc {
    pub gate: WeightDesc,
    pub up: WeightDesc,
    pub down: WeightDesc,
    /// gate, up, down.
    pub bias: Option<[VecRef; 3]>,
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
    /// Sigmoid gate, one row of `n_embd` (llama.cpp multiplies it like any weight); DeepSeek's
    /// shared experts have none.
    pub gate_inp: Option<WeightDesc>,
    pub ffn: ExpertDesc,
}

#[derive(Debug, Clone)]
pub enum Ffn {
    Dense(ExpertDesc),
    Moe {
        /// Router `[n_expert rows × n_embd]`.
        router: WeightDesc,
        router_bias: Option<VecRef>,
        /// Added to the probabilities for choosing experts only (DeepSeek-V3's `exp_probs_b`).
        selection_bias: Option<VecRef>,
        experts: Vec<ExpertDesc>,
        shared: Option<SharedExpert>,
    },
}

/// DeepSeek's multi-head latent attention weights (see [`Attention::Mla`]).
#[derive(Debug, Clone)]
pub struct MlaWeights {
    /// `attn_q_a` and `attn_q_a_norm` (the query LoRA), if the model has one.
    pub q_a: Option<(WeightDesc, VecRef)>,
    /// `attn_q_b` after the LoRA, else `attn_q`: `n_head × (nope | rope)` per token.
    pub q: WeightDesc,
    /// `attn_kv_a_mqa`: `[kv_lora | rope]` per token.
    pub kv_a: WeightDesc,
    pub kv_a_norm: VecRef,
    /// Per head, slices of the 3-D `attn_k_b` (`kv_lora` rows × `nope`: the query's nope part
    /// into the latent space) and `attn_v_b` (`v_head` rows × `kv_lora`: the output out of it).
    pub k_b: Vec<WeightDesc>,
    pub v_b: Vec<WeightDesc>,
}

/// How a layer projects its queries, keys and values.
#[derive(Debug, Clone)]
pub enum AttnWeights {
    Mha { wq: WeightDesc, wk: WeightDesc, wv: WeightDesc },
    Mla(MlaWeights),
}

impl AttnWeights {
    /// Every matrix, in load order.
    pub fn matrices(&self) -> Vec<WeightDesc> {
        match self {
            AttnWeights::Mha { wq, wk, wv } => vec![*wq, *wk, *wv],
            AttnWeights::Mla(m) => {
                let mut v: Vec<WeightDesc> = m.q_a.iter().map(|(w, _)| *w).collect();
                v.extend([m.q, m.kv_a]);
                v.extend(m.k_b.iter().chain(&m.v_b));
                v
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: VecRef,
    pub attn: AttnWeights,
    pub wo: WeightDesc,
    pub bo: Option<VecRef>,
    /// One attention-sink logit per query head (gpt-oss).
    pub sinks: Option<VecRef>,
    /// Sliding attention window of this layer (0: full attention).
    pub window: usize,
    pub bq: Option<VecRef>,
    pub bk: Option<VecRef>,
    pub bv: Option<VecRef>,
    pub q_norm: Option<VecRef>,
    pub k_norm: Option<VecRef>,
    pub ffn_norm: VecRef,
    pub ffn: Ffn,
}

pub struct Model {
    pub file: Arc<GgufFile>,
    pub spec: &'static ArchSpec,
    pub hp: HParams,
    pub tok_embd: WeightDesc,
    pub output_norm: VecRef,
    pub output: WeightDesc,
    pub layers: Vec<Layer>,
    vectors: Vec<Vec<f32>>,
}

struct Loader<'a> {
    file: &'a GgufFile,
    path: String,
    vectors: RefCell<Vec<Vec<f32>>>,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo, ArchError> {
        self.file
            .tensor(name)
            .ok_or_else(|| ArchError::MissingTensor { path: self.path.clone(), tensor: name.to_string() })
    }

    /// The tensor's shape must be `expected`, where trailing dimensions of size 1 count as
    /// absent on both sides (as llama.cpp reads them): a `[256, 1]` gate is a `[256]` vector.
    fn check_shape(&self, t: &TensorInfo, expected: &[u64]) -> Result<(), ArchError> {
        let trim = |s: &[u64]| s.len() - s.iter().rev().take_while(|&&d| d == 1).count();
        if t.shape[..trim(&t.shape)] != expected[..trim(expected)] {
            return Err(ArchError::BadTensorShape {
                path: self.path.clone(),
                tensor: t.name.clone(),
                found: t.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(())
    }

    /// A 2-D matrix `[cols, rows]` in ggml order.
    fn mat(&self, name: &str, cols: usize, rows: usize) -> Result<WeightDesc, ArchError> {
        let t = self.info(name)?;
        self.check_shape(t, &[cols as u64, rows as u64])?;
        Ok(WeightDesc { ty: t.ggml_type, rows, cols, offset: t.offset, bytes: t.size })
    }

    /// Slices of a stacked `[cols, rows, n]` tensor, one per expert.
    fn stacked(&self, name: &str, cols: usize, rows: usize, n: usize) -> Result<Vec<WeightDesc>, ArchError> {
        let t = self.info(name)?;
        self.check_shape(t, &[cols as u64, rows as u64, n as u64])?;
        let per = t.size / n as u64;
        Ok((0..n as u64)
            .map(|e| WeightDesc { ty: t.ggml_type, rows, cols, offset: t.offset + e * per, bytes: per })
            .collect())
    }

    /// A vector dequantized to f32.
    fn vec(&self, name: &str, len: usize) -> Result<VecRef, ArchError> {
        let t = self.info(name)?;
        self.check_shape(t, &[len as u64])?;
        let data = self.f32_data(t)?;
        let mut v = self.vectors.borrow_mut();
        v.push(data);
        Ok(VecRef((v.len() - 1) as u32))
    }

    /// The columns of a `[len, n]` tensor (one bias per expert), each dequantized to f32.
    fn vec_columns(&self, name: &str, len: usize, n: usize) -> Result<Vec<VecRef>, ArchError> {
        let t = self.info(name)?;
        self.check_shape(t, &[len as u64, n as u64])?;
        let data = self.f32_data(t)?;
        let mut v = self.vectors.borrow_mut();
        Ok(data
            .chunks_exact(len)
            .map(|c| {
                v.push(c.to_vec());
                VecRef((v.len() - 1) as u32)
            })
            .collect())
    }

    fn opt_vec(&self, name: &str, len: usize) -> Result<Option<VecRef>, ArchError> {
        if self.file.tensor(name).is_none() {
            return Ok(None);
        }
        self.vec(name, len).map(Some)
    }

    fn f32_data(&self, t: &TensorInfo) -> Result<Vec<f32>, ArchError> {
        let k = kernels(t.ggml_type).filter(|k| k.can_dequantize()).ok_or_else(|| ArchError::UnsupportedType {
            path: self.path.clone(),
            tensor: t.name.clone(),
            ty: t.ggml_type.name(),
            op: Op::GetRows,
            backend: "ggml",
        })?;
        let mut out = vec![0f32; t.n_elements() as usize];
        k.dequantize(self.file.tensor_data(t), &mut out);
        Ok(out)
    }

    fn experts(&self, l: usize, hp: &HParams, n_ff_exp: usize, biased: bool) -> Result<Vec<ExpertDesc>, ArchError> {
        let (d, n) = (hp.n_embd, hp.n_expert);
        if self.file.tensor(&tn(TensorKind::FfnUpExps, Some(l))).is_some() {
            let gate = self.stacked(&tn(TensorKind::FfnGateExps, Some(l)), d, n_ff_exp, n)?;
            let up = self.stacked(&tn(TensorKind::FfnUpExps, Some(l)), d, n_ff_exp, n)?;
            let down = self.stacked(&tn(TensorKind::FfnDownExps, Some(l)), n_ff_exp, d, n)?;
            let bias = if biased {
                let g = self.vec_columns(&tn(TensorKind::FfnGateExpsBias, Some(l)), n_ff_exp, n)?;
                let u = self.vec_columns(&tn(TensorKind::FfnUpExpsBias, Some(l)), n_ff_exp, n)?;
                let dn = self.vec_columns(&tn(TensorKind::FfnDownExpsBias, Some(l)), d, n)?;
                (0..n).map(|e| Some([g[e], u[e], dn[e]])).collect()
            } else {
                vec![None; n]
            };
            return Ok((0..n).map(|e| ExpertDesc { gate: gate[e], up: up[e], down: down[e], bias: bias[e] }).collect());
        }
        (0..n)
            .map(|e| {
                Ok(ExpertDesc {
                    gate: self.mat(&tn_expert(TensorKind::FfnGateExpert, l, e), d, n_ff_exp)?,
                    up: self.mat(&tn_expert(TensorKind::FfnUpExpert, l, e), d, n_ff_exp)?,
                    down: self.mat(&tn_expert(TensorKind::FfnDownExpert, l, e), n_ff_exp, d)?,
                    bias: None,
                })
            })
            .collect()
    }

    /// MLA's weights of layer `l` and the width of its attention output (`n_head · v_head`).
    fn mla(&self, l: usize, hp: &HParams, m: arch::Mla) -> Result<(MlaWeights, usize), ArchError> {
        let t = |k| tn(k, Some(l));
        let (d, h, r) = (hp.n_embd, hp.n_head, hp.n_rot);
        let q_width = h * (m.nope + r);
        let (q_a, q) = if m.q_lora > 0 {
            let q_a = self.mat(&t(TensorKind::AttnQA), d, m.q_lora)?;
            let q_a_norm = self.vec(&t(TensorKind::AttnQANorm), m.q_lora)?;
            (Some((q_a, q_a_norm)), self.mat(&t(TensorKind::AttnQB), m.q_lora, q_width)?)
        } else {
            (None, self.mat(&t(TensorKind::AttnQ), d, q_width)?)
        };
        let w = MlaWeights {
            q_a,
            q,
            kv_a: self.mat(&t(TensorKind::AttnKvAMqa), d, m.kv_lora + r)?,
            kv_a_norm: self.vec(&t(TensorKind::AttnKvANorm), m.kv_lora)?,
            k_b: self.stacked(&t(TensorKind::AttnKB), m.nope, m.kv_lora, h)?,
            v_b: self.stacked(&t(TensorKind::AttnVB), m.kv_lora, m.v_head, h)?,
        };
        Ok((w, h * m.v_head))
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
    /// Open and validate a GGUF model.
    pub fn load(path: &Path) -> Result<Model, ArchError> {
        Model::from_file(Arc::new(GgufFile::open(path)?))
    }

    /// Validate `file` as a model: every tensor the architecture needs is present with its shape.
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
        let ld = Loader { file: &file, path: path.clone(), vectors: RefCell::new(Vec::new()) };
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
        // `block_count` is the file's word: every layer has tensors, so no more than the file
        // holds are reserved (a count of 10^9 asked for 70 GB before the first tensor was checked).
        let mut layers = Vec::with_capacity(hp.n_layer.min(file.tensors().len()));
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
                QkNorm::PerHeadIfPresent => match ld.opt_vec(&t(TensorKind::AttnQNorm), hp.head_dim)? {
                    // One without the other is a broken file: name the missing one.
                    Some(qn) => (Some(qn), Some(ld.vec(&t(TensorKind::AttnKNorm), hp.head_dim)?)),
                    None if file.tensor(&t(TensorKind::AttnKNorm)).is_some() => {
                        return Err(ArchError::MissingTensor { path, tensor: t(TensorKind::AttnQNorm) })
                    }
                    None => (None, None),
                },
            };
            // Any MHA family's file may carry q/k/v biases; llama.cpp applies them wherever present.
            let (bq, bk, bv) = if spec.attention == Attention::Mha {
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
                let router_bias =
                    if spec.router_bias { Some(ld.vec(&t(TensorKind::FfnGateInpBias), hp.n_expert)?) } else { None };
                let selection_bias =
                    if spec.selection_bias { ld.opt_vec(&t(TensorKind::ExpProbsB), hp.n_expert)? } else { None };
                let experts = ld.experts(l, &hp, n_ff_exp, spec.expert_bias)?;
                let shared = if spec.shared_expert && hp.n_ff_shexp > 0 {
                    let f = hp.n_ff_shexp;
                    Some(SharedExpert {
                        gate_inp: match spec.shared_gate {
                            true => Some(ld.mat(&t(TensorKind::FfnGateInpShexp), d, 1)?),
                            false => None,
                        },
                        ffn: ExpertDesc {
                            gate: ld.mat(&t(TensorKind::FfnGateShexp), d, f)?,
                            up: ld.mat(&t(TensorKind::FfnUpShexp), d, f)?,
                            down: ld.mat(&t(TensorKind::FfnDownShexp), f, d)?,
                            bias: None,
                        },
                    })
                } else {
                    None
                };
                Ffn::Moe { router, router_bias, selection_bias, experts, shared }
            } else {
                let f = hp.n_ff;
                Ffn::Dense(ExpertDesc {
                    gate: ld.mat(&t(TensorKind::FfnGate), d, f)?,
                    up: ld.mat(&t(TensorKind::FfnUp), d, f)?,
                    down: ld.mat(&t(TensorKind::FfnDown), f, d)?,
                    bias: None,
                })
            };
            let (attn, o_dim) = match (spec.attention, hp.mla) {
                (Attention::Mla, Some(mla)) => {
                    let (a, o) = ld.mla(l, &hp, mla)?;
                    (AttnWeights::Mla(a), o)
                }
                _ => (
                    AttnWeights::Mha {
                        wq: ld.mat(&t(TensorKind::AttnQ), d, q)?,
                        wk: ld.mat(&t(TensorKind::AttnK), d, kv)?,
                        wv: ld.mat(&t(TensorKind::AttnV), d, kv)?,
                    },
                    q,
                ),
            };
            layers.push(Layer {
                attn_norm: ld.vec(&t(TensorKind::AttnNorm), d)?,
                attn,
                wo: ld.mat(&t(TensorKind::AttnOut), o_dim, d)?,
                bo: if spec.attn_out_bias { Some(ld.vec(&t(TensorKind::AttnOutBias), d)?) } else { None },
                sinks: if spec.sinks { Some(ld.vec(&t(TensorKind::AttnSinks), hp.n_head)?) } else { None },
                window: if spec.sliding_window.applies(l) { hp.n_swa } else { 0 },
                bq,
                bk,
                bv,
                q_norm,
                k_norm,
                ffn_norm: ld.vec(&t(spec.ffn_norm), d)?,
                ffn,
            });
        }
        let vectors = ld.vectors.into_inner();
        Ok(Model { file, spec, hp, tok_embd, output_norm, output, layers, vectors })
    }

    /// A norm weight or bias as f32.
    pub fn vector(&self, v: VecRef) -> &[f32] {
        &self.vectors[v.index()]
    }

    /// Layer `l`'s selection-only router bias (DeepSeek-V3's `exp_probs_b`), if it has one.
    pub fn selection_bias(&self, l: usize) -> Option<&[f32]> {
        match &self.layers.get(l)?.ffn {
            Ffn::Moe { selection_bias: Some(v), .. } => Some(self.vector(*v)),
            _ => None,
        }
    }

    /// Every vector, indexed by [`VecRef::index`].
    pub fn vectors(&self) -> &[Vec<f32>] {
        &self.vectors
    }

    /// Every matrix the forward pass multiplies by (routed experts included), each once.
    pub fn matrices(&self) -> Vec<WeightDesc> {
        residency::resident_set(self, Resident::All)
    }

    /// Whether `supports` (a backend's answer) covers every op this model needs on every weight's
    /// type; the error names the first tensor it cannot run.
    pub fn check_support(
        &self,
        backend: &'static str,
        supports: impl Fn(Op, GgmlType) -> bool,
    ) -> Result<(), ArchError> {
        let needs =
            std::iter::once((Op::GetRows, self.tok_embd)).chain(self.matrices().into_iter().map(|w| (Op::MatMul, w)));
        for (op, w) in needs {
            if !supports(op, w.ty) {
                return Err(ArchError::UnsupportedType {
                    path: self.file.path().display().to_string(),
                    tensor: self.tensor_name(&w),
                    ty: w.ty.name(),
                    op,
                    backend,
                });
            }
        }
        Ok(())
    }

    /// The name of the tensor holding `w` (an expert's slice names its stacked tensor).
    pub fn tensor_name(&self, w: &WeightDesc) -> String {
        let t = self.file.tensors().iter().find(|t| t.offset <= w.offset && w.offset < t.offset + t.size.max(1));
        t.map_or_else(|| format!("<weight at byte {}>", w.offset), |t| t.name.clone())
    }

    /// The bytes of a weight inside the mapping (ggml's plain layout).
    pub fn bytes_of(&self, w: &WeightDesc) -> &[u8] {
        &self.file.bytes()[w.offset as usize..(w.offset + w.bytes) as usize]
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
