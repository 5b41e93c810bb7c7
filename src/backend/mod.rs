//! Compute backends behind one trait. A backend owns its buffers (activations, KV, copies of
//! weights) and its kernels, and answers `supports(op, dtype)`; it never decides where an expert
//! lives or which kernel a layer should fall back to. `layers::Forward` is written once against
//! [`Backend`].
//!
//! - [`cpu`]: ggml's per-type kernels on a persistent thread pool (the product on a CPU).
//! - [`plain`]: f32 throughout with naive loops — a comparator for tests, not for speed.
//! - `cuda` (`--features cuda`): its `Mat` is a device address or host bytes copied into its
//!   expert arena on use, its `Act` a device buffer, its `Kv` lives in GPU memory, and `read` is
//!   its sync point.
//!
//! [`conformance`] runs whole models through any backend against the CPU and plain ones.

pub mod conformance;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod plain;

use std::borrow::Cow;
use std::sync::Arc;

use crate::arch::{Glu, RopeStyle};
use crate::gguf::GgmlType;
use crate::model::{Model, Residency, Resident, VecRef, WeightDesc};

/// The weight operations whose kernels depend on the weight's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Matrix × vector(s) over a weight of the given type.
    MatMul,
    /// Rows of a weight as f32 (embedding lookup).
    GetRows,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::MatMul => f.write_str("mat_mul"),
            Op::GetRows => f.write_str("get_rows"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{path}: could not allocate {bytes} bytes for resident weights: {reason}")]
    Resident { path: String, bytes: u64, reason: String },
    #[error("the {backend} backend could not allocate {bytes} bytes for {what}")]
    Alloc { backend: &'static str, what: &'static str, bytes: u64 },
    #[error(transparent)]
    Unsupported(#[from] crate::arch::ArchError),
    #[error(
        "--gpu-budget of {budget} bytes holds {slots} expert slots of {slot} bytes, but one layer's \
         experts need {need} (three matrices for each of top_k); give a larger --gpu-budget"
    )]
    GpuBudget { budget: u64, slot: u64, slots: usize, need: usize },
    #[error("the device failed: {0}")]
    Device(String),
}

/// What a device backend reports of its memory and copies (`moerun bench`, `/v1/moe/stats`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DeviceStats {
    pub device: String,
    /// Weights copied to the device at load (dense, and experts when all are resident).
    pub weight_bytes: u64,
    /// The expert slot arena (host-held experts copied on use).
    pub arena_bytes: u64,
    /// Device memory in use, as the driver says (every process's).
    pub memory_in_use_bytes: u64,
    /// Lookups of host-held experts in the arena, and hits among them.
    pub expert_lookups: u64,
    pub expert_hits: u64,
    /// Host-to-device copies of experts and their bytes.
    pub copies: u64,
    pub bytes_copied: u64,
    /// Time the copy stream spent copying.
    pub copy_busy_s: f64,
    /// Copies made ahead of need on a prediction (counted in `copies` too), their bytes, and how
    /// many of them a later lookup used.
    pub prefetch_copies: u64,
    pub prefetch_bytes: u64,
    pub prefetch_used: u64,
    /// Copies that went straight from page-locked host memory (an expert cache's slots), with
    /// no staging.
    pub direct_copies: u64,
    /// Expert jobs computed on the CPU (`--cpu-moe`, `--n-cpu-moe`, `--cpu-misses`).
    pub host_computed: u64,
    /// Of those, misses of the arena the planner sent to the CPU instead of copying them
    /// (`--cpu-misses`; counted as lookups that missed).
    pub cpu_misses: u64,
    /// Kernel launches.
    pub launches: u64,
}

/// Rotary embedding parameters of a model.
#[derive(Debug, Clone, Copy)]
pub struct Rope {
    pub style: RopeStyle,
    pub n_dims: usize,
    pub freq_base: f32,
    pub freq_scale: f32,
    /// YaRN: 1 mixes interpolated and extrapolated angles across `corr_dims`; 0 is plain scaling.
    pub ext_factor: f32,
    /// Multiplies cos and sin (YaRN's magnitude correction is applied on top when
    /// `ext_factor` ≠ 0).
    pub attn_factor: f32,
    pub corr_dims: [f32; 2],
}

/// Storage type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
pub enum KvType {
    #[default]
    F16,
    F32,
}

impl KvType {
    pub fn ggml(self) -> GgmlType {
        match self {
            KvType::F16 => GgmlType::F16,
            KvType::F32 => GgmlType::F32,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }
}

/// Where attention's values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Values {
    /// A value row per kv head of `head_dim`, stored beside the keys.
    #[default]
    Separate,
    /// The value of a kv head is the first `n` elements of its key (DeepSeek's MLA: the key is
    /// `[latent | k_pe]`, the value the latent); only keys are stored.
    KeyPrefix(usize),
}

impl Values {
    /// Width of one head's value.
    pub fn dim(self, head_dim: usize) -> usize {
        match self {
            Values::Separate => head_dim,
            Values::KeyPrefix(n) => n,
        }
    }
}

/// Shape of one session's KV cache.
#[derive(Debug, Clone, Copy)]
pub struct KvConfig {
    pub ty: KvType,
    pub n_layer: usize,
    pub n_ctx: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub values: Values,
    /// Sliding-window layers hold only the positions their window and one batch can reach (a
    /// ring), as llama.cpp's SWA cache does; `None` keeps every layer full length (`--swa-full`).
    pub ring: Option<KvRing>,
}

/// Which layers of a [`KvConfig`] are rings, and how long.
#[derive(Debug, Clone, Copy)]
pub struct KvRing {
    pub layers: crate::arch::SlidingWindow,
    /// Positions a ring holds: the window plus the largest batch (a batch stores all its rows
    /// before any of them attends).
    pub len: usize,
    /// The attention window of those layers.
    pub window: usize,
}

impl KvConfig {
    /// Positions layer `l` holds.
    pub fn layer_len(&self, l: usize) -> usize {
        match self.ring {
            Some(r) if r.layers.applies(l) => r.len.min(self.n_ctx),
            _ => self.n_ctx,
        }
    }

    /// Bytes of K and V for every layer and position.
    pub fn bytes(&self) -> u64 {
        let rows = match self.values {
            Values::Separate => 2,
            Values::KeyPrefix(_) => 1,
        };
        let positions: usize = (0..self.n_layer).map(|l| self.layer_len(l)).sum();
        (rows * positions * self.n_head_kv * self.head_dim * self.ty.bytes()) as u64
    }

    /// Whether a cache that stored positions `0..held` still holds everything a session cut back
    /// to its first `keep` positions needs: each ring must still hold the window before `keep`.
    pub fn can_keep(&self, held: usize, keep: usize) -> bool {
        self.ring.is_none_or(|r| keep.saturating_sub(r.window) >= held.saturating_sub(r.len.min(self.n_ctx)))
    }
}

/// Attention's shape: a row of the fused projection is `[q (n_head·head_dim) | k | v]`, k
/// `n_head_kv·head_dim`, v `n_head_kv·head_dim` with [`Values::Separate`] and absent with
/// [`Values::KeyPrefix`].
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub values: Values,
    pub scale: f32,
    /// Sliding window: a query at position q sees keys at p with `q - p < window` (0: all).
    pub window: usize,
}

impl AttnShape {
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
    /// Width of one head's value (and of its output).
    pub fn v_dim(&self) -> usize {
        self.values.dim(self.head_dim)
    }
    /// Width of the value columns of a `qkv` row (0 when the values are key prefixes).
    pub fn v_cols(&self) -> usize {
        match self.values {
            Values::Separate => self.kv_dim(),
            Values::KeyPrefix(_) => 0,
        }
    }
    /// Width of an output row: every query head's value-sized output.
    pub fn out_dim(&self) -> usize {
        self.n_head * self.v_dim()
    }
}

/// `n` blocks of `width` columns in every row of an activation, block `i` starting at column
/// `col + i·stride` (the heads of a projection, or a part of each head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub n: usize,
    pub col: usize,
    pub stride: usize,
    pub width: usize,
}

impl Heads {
    /// The columns of block `i`.
    pub fn cols(&self, i: usize) -> std::ops::Range<usize> {
        let c = self.col + i * self.stride;
        c..c + self.width
    }
}

/// Activations in host memory: `rows × cols` f32, row-major (the host backends' `Act`).
#[derive(Debug, Clone, Default)]
pub struct HostAct {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl HostAct {
    /// Reshape to `rows × cols` (contents unspecified).
    pub fn resize(&mut self, rows: usize, cols: usize) {
        self.data.resize(rows * cols, 0.0);
        self.rows = rows;
        self.cols = cols;
    }

    /// Every value, row by row: a host backend's [`Backend::read`].
    pub fn values(&self) -> &[f32] {
        &self.data[..self.rows * self.cols]
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// [`Backend::add_bias`] for host backends.
    pub fn add_bias(&mut self, col: usize, b: &[f32]) {
        for t in 0..self.rows {
            self.row_mut(t)[col..col + b.len()].iter_mut().zip(b).for_each(|(x, b)| *x += b);
        }
    }

    /// [`Backend::copy_rows`] for host backends.
    pub fn copy_rows(&mut self, x: &HostAct, rows: std::ops::Range<usize>) {
        self.resize(rows.len(), x.cols);
        self.data.copy_from_slice(&x.data[rows.start * x.cols..rows.end * x.cols]);
    }

    /// [`Backend::copy_heads`] for host backends.
    pub fn copy_heads(&mut self, x: &HostAct, from: Heads, to: Heads) {
        for t in 0..x.rows {
            for i in 0..from.n {
                self.row_mut(t)[to.cols(i)].copy_from_slice(&x.row(t)[from.cols(i)]);
            }
        }
    }

    /// [`Backend::add`] for host backends.
    pub fn add(&mut self, y: &HostAct) {
        self.data.iter_mut().zip(&y.data).for_each(|(x, y)| *x += y);
    }

    /// [`Backend::combine`] for host backends: `self` becomes `[n_tok, y.cols]`.
    pub fn combine(&mut self, y: &HostAct, assign: &[(u32, f32)], done: &[bool], n_tok: usize) {
        self.resize(n_tok, y.cols);
        self.data.iter_mut().for_each(|v| *v = 0.0);
        for (a, &(t, w)) in assign.iter().enumerate() {
            if done[a] {
                self.row_mut(t as usize).iter_mut().zip(y.row(a)).for_each(|(o, &y)| *o += y * w);
            }
        }
    }
}

/// The rows of one expert in a batch of expert FFNs: row `out_rows[i]` of the output is
/// `down(glu(gate·x, up·x))` for row `tokens[i]` of the input (each projection plus its bias,
/// if any).
pub struct ExpertJob<'w, 's, B: Backend + ?Sized> {
    /// gate, up, down.
    pub mats: [B::Mat<'w>; 3],
    /// gate, up and down biases (gpt-oss).
    pub bias: Option<[B::Vector<'w>; 3]>,
    pub glu: Glu,
    /// A dense FFN or shared expert (every token through one expert: llama.cpp's `mul_mat`,
    /// whose batches may take other kernels than a routed expert's `mul_mat_id`).
    pub dense: bool,
    pub tokens: &'s [u32],
    pub out_rows: &'s [u32],
}

/// A device that runs the layers' operations. Activations, KV and weight copies are its own
/// handles; host memory appears only through `read` (a sync point) and `host_mat` (a view of
/// plain ggml bytes the host holds: the mapping, a cache slot).
///
/// Operations take `&mut self` (a backend keeps scratch buffers) and may be queued: their results
/// are guaranteed visible only through `read`.
pub trait Backend: 'static {
    /// A weight matrix the backend can multiply by, borrowed from wherever it lives.
    type Mat<'a>: Copy
    where
        Self: 'a;
    /// A small f32 vector (norm weight, bias) on the device.
    type Vector<'a>: Copy
    where
        Self: 'a;
    /// The weights the backend took from a model (its copies, and views of the rest).
    type Weights;
    /// f32 activations, `rows × cols`.
    type Act: Default;
    /// One session's keys and values, in the backend's memory.
    type Kv;
    /// Held across a run of operations with host work between them (see [`Backend::hot`]).
    type Hot;

    fn name(&self) -> &'static str;
    /// Whether `op` runs on weights of type `ty`.
    fn supports(&self, op: Op, ty: GgmlType) -> bool;

    /// Take `model`'s weights: copy those `residency` selects into the backend's memory (in
    /// whatever layout its kernels prefer) and view the rest where they are.
    fn take_weights(&mut self, model: &Arc<Model>, residency: Residency) -> Result<Self::Weights, BackendError>;
    /// What was copied (`Auto` resolved) and how many bytes that holds.
    fn resident(weights: &Self::Weights) -> (Resident, u64);
    fn mat<'a>(weights: &'a Self::Weights, w: &WeightDesc) -> Self::Mat<'a>;
    fn vector<'a>(weights: &'a Self::Weights, v: VecRef) -> Self::Vector<'a>;
    /// A view of `w`'s bytes in ggml's plain layout, held in host memory.
    fn host_mat<'a>(w: &WeightDesc, bytes: &'a [u8]) -> Self::Mat<'a>;
    /// Whether this backend holds a resident copy of `w` rearranged (the CPU backend repacks
    /// Q4_0 and MXFP4 for ggml's interleaved kernels): then a cached copy must be rearranged the
    /// same way (`prepare_host_mat`) to compute exactly as the resident one.
    fn prepares_host_mat(w: &WeightDesc) -> bool {
        let _ = w;
        false
    }
    /// Rearrange `w`'s plain bytes in host memory, in place, as `prepares_host_mat` says; the
    /// bytes are then viewed with `host_mat_prepared`. Called from any thread.
    fn prepare_host_mat(w: &WeightDesc, bytes: &mut [u8]) {
        let _ = (w, bytes);
    }
    /// A view of bytes `prepare_host_mat` rearranged.
    fn host_mat_prepared<'a>(w: &WeightDesc, bytes: &'a [u8]) -> Self::Mat<'a> {
        Self::host_mat(w, bytes)
    }

    /// Host memory experts will be viewed in (an expert cache's slot arenas, as (address,
    /// length)): a device with unified memory maps it and reads it in place; a discrete one
    /// page-locks it, so copies out of it go straight to the device. The caller keeps it alive
    /// as long as the backend; bytes are viewed through `host_mat` only once landed, and
    /// rewritten only after [`Backend::release_host_bytes`].
    fn use_host_memory(&mut self, regions: &[(*const u8, usize)]) {
        let _ = regions;
    }

    /// Return once nothing queued still reads host bytes handed to an operation (a device
    /// copying or reading them in place, asynchronously): after it, the caller may rewrite them.
    /// The forward pass calls it before every provider call that may refill an expert slot.
    fn release_host_bytes(&mut self) {}

    /// Whether this backend keeps host-held experts in a cache of its own (a GPU's slot arena
    /// under a budget), so that [`Backend::prefetch`] can move them ahead of need.
    fn caches_experts(&self) -> bool {
        false
    }

    /// Start moving `mats` (predicted experts' matrices, in host memory) into the backend's own
    /// expert cache, behind the work already queued and never in its way; returns at once. A
    /// backend without such a cache ignores it. Never changes an answer.
    fn prefetch(&mut self, mats: &[Self::Mat<'_>]) {
        let _ = mats;
    }

    /// The first error the device met since the last call (an operation cannot fail where it
    /// runs; a device backend keeps the error, skips what follows, and reports it here).
    fn take_error(&mut self) -> Option<BackendError> {
        None
    }

    /// The device's memory and copy counters, for backends that have them.
    fn device_stats(&self) -> Option<DeviceStats> {
        None
    }

    /// Keep the backend ready for a run of operations with host work between them (a
    /// generation: sampling, streaming, the next token) until the guard drops: the CPU backend
    /// keeps its threads spinning instead of letting them sleep.
    fn hot(&self) -> Self::Hot;

    /// Reshape `a` to `rows × cols` (contents unspecified).
    fn resize(&self, a: &mut Self::Act, rows: usize, cols: usize);
    /// The values of `a` on the host, once everything queued before has run.
    fn read<'a>(&mut self, a: &'a Self::Act) -> Cow<'a, [f32]>;

    fn new_kv(&self, cfg: &KvConfig) -> Result<Self::Kv, BackendError>;

    /// `out = x[rows]`.
    fn copy_rows(&mut self, x: &Self::Act, rows: std::ops::Range<usize>, out: &mut Self::Act);
    /// `out[i] = w.row(ids[i])` as f32.
    fn get_rows(&mut self, w: Self::Mat<'_>, ids: &[u32], out: &mut Self::Act);
    /// `out = x / sqrt(mean(x²) + eps) · w`, row by row (`out` takes `x`'s shape).
    fn rms_norm(&mut self, x: &Self::Act, w: Self::Vector<'_>, eps: f32, out: &mut Self::Act);
    /// The same RMS norm in place over `n_heads` slices of `head_dim` from column `col` of every
    /// row (`head_dim` = the whole projection for a norm over it).
    fn rms_norm_heads(
        &mut self,
        x: &mut Self::Act,
        col: usize,
        n_heads: usize,
        head_dim: usize,
        w: Self::Vector<'_>,
        eps: f32,
    );
    /// `out[t] = [w_0·x[t] | w_1·x[t] | …]`: every weight applied to every row of `x`, outputs side
    /// by side, as one parallel job.
    fn matmul(&mut self, x: &Self::Act, ws: &[Self::Mat<'_>], out: &mut Self::Act);
    /// `x[t][col..col + b.len()] += b` for every row.
    fn add_bias(&mut self, x: &mut Self::Act, col: usize, b: Self::Vector<'_>);
    /// Rotate the first `rope.n_dims` columns of `n_heads` heads spaced `head_dim` apart from
    /// column `col` (the last head need only hold those); row `t` sits at position `pos0 + t`.
    fn rope(&mut self, x: &mut Self::Act, col: usize, n_heads: usize, head_dim: usize, pos0: usize, rope: &Rope);
    /// Store row `t`'s k and v (from `qkv`) at position `pos0 + t` of `layer`, then attend each
    /// query over positions `0..=pos0 + t` (causal; within `shape.window` if set); `sinks`, one
    /// logit per query head, join each head's softmax with no value (gpt-oss). `out` is
    /// `[rows, shape.out_dim()]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        kv: &mut Self::Kv,
        layer: usize,
        qkv: &Self::Act,
        shape: &AttnShape,
        sinks: Option<Self::Vector<'_>>,
        pos0: usize,
        out: &mut Self::Act,
    );
    /// SwiGLU expert FFNs for every job (see [`ExpertJob`]) into rows of `y`, which the caller
    /// has shaped; rows no job names are left as they are.
    fn expert_ffn(&mut self, x: &Self::Act, jobs: &[ExpertJob<'_, '_, Self>], y: &mut Self::Act);
    /// `out[t] = Σ w · y[a]` over the assignments `a = (t, w)` with `done[a]`, summed per token in
    /// assignment order (`out` is `[n_tok, y.cols]`, zero where a token has none).
    fn combine(&mut self, y: &Self::Act, assign: &[(u32, f32)], done: &[bool], n_tok: usize, out: &mut Self::Act);
    /// `out[t][to.cols(i)] = x[t][from.cols(i)]` for every block `i` (`out` keeps its shape, which
    /// the caller set, and its other columns).
    fn copy_heads(&mut self, x: &Self::Act, from: Heads, out: &mut Self::Act, to: Heads);
    /// `out[t][to.cols(i)] = ws[i] · x[t][from.cols(i)]`: one weight per block (per head), as
    /// ggml's batched `mul_mat` over a 3-D weight (`out` keeps its shape and other columns).
    fn matmul_heads(&mut self, x: &Self::Act, from: Heads, ws: &[Self::Mat<'_>], out: &mut Self::Act, to: Heads);
    /// `x += y`.
    fn add(&mut self, x: &mut Self::Act, y: &Self::Act);
    /// `x += y`, then `out = rms_norm(x) · w`: a residual add and the norm after it, which a
    /// device does in one pass. The same values as `add` then `rms_norm`.
    fn add_rms_norm(&mut self, x: &mut Self::Act, y: &Self::Act, w: Self::Vector<'_>, eps: f32, out: &mut Self::Act) {
        self.add(x, y);
        self.rms_norm(x, w, eps, out);
    }
}
