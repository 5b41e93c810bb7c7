//! Low-precision expert copies (HOBBIT's second precision, DESIGN.md §3): writing and verifying
//! the sidecar GGUF that holds every routed expert requantized to one low type.
//! Invariant: knows tensor names only through `arch` and never runs inference; a sidecar is handed
//! out only after [`LowPrecSidecar::open`] has checked that it was made from this model, is whole,
//! and holds every expert at the declared type and shape.
//!
//! Layout: one tensor per MoE layer and matrix, named like llama.cpp's stacked experts
//! (`blk.N.ffn_{gate,up,down}_exps.weight`, shape `[cols, rows, n_expert]`), also when the source
//! model stores one tensor per expert, so expert `e` of a matrix is always the `e`-th equal slice.
//! Values go high type → f32 (our ggml `to_float` kernels) → low type (`ggml_quantize_chunk`).

use std::path::{Path, PathBuf};

use llama_cpp_sys_2 as sys;

use crate::arch::{tn, tn_expert, TensorKind};
use crate::ggml::{kernels, Kernels};
use crate::gguf::{GgmlType, GgufError, GgufFile, GgufStreamWriter, TensorInfo, Value};
use crate::model::{ExpertDesc, Model, WeightDesc};

/// Metadata keys of a sidecar.
pub const KEY_VERSION: &str = "moerun.sidecar.version";
pub const KEY_LOW_TYPE: &str = "moerun.sidecar.low_type";
pub const KEY_SOURCE_FILE_BYTES: &str = "moerun.sidecar.source_file_bytes";
pub const KEY_SOURCE_FINGERPRINT: &str = "moerun.sidecar.source_fingerprint";

/// The sidecar format this code writes and reads.
pub const VERSION: u64 = 1;

/// The stacked tensor kinds of the sidecar, in expert-matrix order (gate, up, down).
const STACKED: [TensorKind; 3] = [TensorKind::FfnGateExps, TensorKind::FfnUpExps, TensorKind::FfnDownExps];
/// The old per-expert kinds, same order.
const PER_EXPERT: [TensorKind; 3] = [TensorKind::FfnGateExpert, TensorKind::FfnUpExpert, TensorKind::FfnDownExpert];

/// f32 values requantized per chunk (4 MiB of f32 scratch).
const CHUNK_VALUES: usize = 1 << 20;
/// Most threads the requantization uses.
const MAX_THREADS: usize = 4;

/// Everything that can go wrong preparing or opening a sidecar. Each variant names the file and
/// the key or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum LowPrecError {
    #[error("cannot make {low} expert copies: {reason}")]
    LowType { low: &'static str, reason: String },

    #[error("{}: the model has no MoE layers, so there are no experts to requantize", .path.display())]
    NoExperts { path: PathBuf },

    #[error("{}: tensor '{tensor}' has rows of {cols} values, not a whole number of {low} blocks of {block}", .path.display())]
    RowNotBlocks { path: PathBuf, tensor: String, cols: usize, low: &'static str, block: u64 },

    #[error("{}: tensor '{tensor}' is {ty}, which moerun cannot dequantize", .path.display())]
    SourceType { path: PathBuf, tensor: String, ty: &'static str },

    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Gguf(#[from] GgufError),

    #[error("{}: not a moerun low-precision sidecar (no '{key}' metadata)", .path.display())]
    NotSidecar { path: PathBuf, key: &'static str },

    #[error("{}: metadata '{key}' {reason}", .path.display())]
    BadKey { path: PathBuf, key: &'static str, reason: String },

    #[error("{}: made for a different model ({what} {found}, this model {expected})", .path.display())]
    WrongModel { path: PathBuf, what: &'static str, found: String, expected: String },

    #[error("{}: tensor '{tensor}' is missing", .path.display())]
    MissingTensor { path: PathBuf, tensor: String },

    #[error("{}: tensor '{tensor}' {reason}", .path.display())]
    BadTensor { path: PathBuf, tensor: String, reason: String },
}

/// One sidecar tensor: matrix `which` (0 gate, 1 up, 2 down) of every expert of MoE layer `layer`.
#[derive(Debug, Clone)]
struct Planned {
    layer: usize,
    which: usize,
    name: String,
    cols: usize,
    rows: usize,
    n_expert: usize,
}

impl Planned {
    fn shape(&self) -> [u64; 3] {
        [self.cols as u64, self.rows as u64, self.n_expert as u64]
    }
}

fn mats(e: &ExpertDesc) -> [WeightDesc; 3] {
    [e.gate, e.up, e.down]
}

/// The sidecar's tensors for `model`, in file order; empty if the model has no MoE layer.
fn plan(model: &Model) -> Vec<Planned> {
    let mut out = Vec::new();
    for l in 0..model.layers.len() {
        let Some(ex) = model.experts(l) else { continue };
        let Some(first) = ex.first() else { continue };
        for (which, w) in mats(first).into_iter().enumerate() {
            out.push(Planned {
                layer: l,
                which,
                name: tn(STACKED[which], Some(l)),
                cols: w.cols,
                rows: w.rows,
                n_expert: ex.len(),
            });
        }
    }
    out
}

/// The source model's routed-expert tensors of layer `l` (stacked or per-expert, as stored).
fn source_tensors(model: &Model, l: usize, n_expert: usize) -> Vec<&TensorInfo> {
    let f = &model.file;
    if f.tensor(&tn(TensorKind::FfnUpExps, Some(l))).is_some() {
        return STACKED.iter().filter_map(|&k| f.tensor(&tn(k, Some(l)))).collect();
    }
    PER_EXPERT
        .iter()
        .flat_map(|&k| (0..n_expert).map(move |e| tn_expert(k, l, e)))
        .filter_map(|n| f.tensor(&n))
        .collect()
}

/// FNV-1a, 64 bit: stable across platforms and releases (unlike `DefaultHasher`).
struct Fnv(u64);

impl Fnv {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ x as u64).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes(s.as_bytes());
    }
}

/// Bytes sampled from each end of every source expert tensor for the fingerprint.
const SAMPLE: usize = 64;

/// Identifies the source model cheaply: its architecture, layer and expert counts, and each
/// routed-expert tensor's name, type, shape and offset, plus the first and last [`SAMPLE`] bytes
/// of its data (a few pages in all), so that two models with identical tensor tables — a base
/// model and its fine-tune at the same quantization — still differ.
pub fn fingerprint(model: &Model) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.str(model.spec.name);
    h.u64(model.hp.n_layer as u64);
    h.u64(model.hp.n_expert as u64);
    for l in 0..model.layers.len() {
        let Some(ex) = model.experts(l) else { continue };
        h.u64(l as u64);
        for t in source_tensors(model, l, ex.len()) {
            h.str(&t.name);
            h.u64(t.ggml_type as u64);
            h.u64(t.shape.len() as u64);
            t.shape.iter().for_each(|&d| h.u64(d));
            h.u64(t.offset);
            let data = model.file.tensor_data(t);
            let n = data.len().min(SAMPLE);
            h.bytes(&data[..n]);
            h.bytes(&data[data.len() - n..]);
        }
    }
    h.0
}

/// Whether `ggml_quantize_chunk` can produce `low` without an importance matrix, and moerun can
/// multiply by it; the reason if not.
fn check_low_type(low: GgmlType) -> Result<(), LowPrecError> {
    use GgmlType::*;
    let refuse = |reason: &str| Err(LowPrecError::LowType { low: low.name(), reason: reason.into() });
    // The types `ggml_quantize_chunk` has a case for (anything else aborts inside ggml).
    let quantizable = matches!(
        low,
        F32 | F16
            | BF16
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | MXFP4
            | Q2_K
            | Q3_K
            | Q4_K
            | Q5_K
            | Q6_K
            | TQ1_0
            | TQ2_0
            | IQ2_XXS
            | IQ2_XS
            | IQ3_XXS
            | IQ3_S
            | IQ2_S
            | IQ1_S
            | IQ1_M
            | IQ4_NL
            | IQ4_XS
    );
    if !quantizable {
        return refuse("ggml cannot quantize to it");
    }
    // SAFETY: `low` is a valid ggml type id; the function only compares it with constants.
    if unsafe { sys::ggml_quantize_requires_imatrix(low as u32 as sys::ggml_type) } {
        return refuse("ggml needs an importance matrix for it, and moerun has none (try q2_K or iq3_xxs)");
    }
    if !kernels(low).is_some_and(|k| k.can_matmul() && k.can_dequantize()) {
        return refuse("moerun has no CPU kernels to multiply by it");
    }
    Ok(())
}

/// Requantizes `n` rows of `cols` values from `src` (rows of `k.ty`) into `dst` (rows of `low`),
/// splitting the rows over up to `threads` threads. `f32` is scratch for at least `n * cols`
/// values. `ggml_quantize_init(low)` must have run.
fn requantize_rows(
    k: &Kernels,
    low: GgmlType,
    cols: usize,
    src: &[u8],
    f32: &mut [f32],
    dst: &mut [u8],
    threads: usize,
) {
    let (src_rb, low_rb) =
        (k.ty.row_bytes(cols as u64).unwrap_or(0) as usize, low.row_bytes(cols as u64).unwrap_or(0) as usize);
    let n = src.len() / src_rb.max(1);
    assert!(src_rb > 0 && low_rb > 0 && src.len() == n * src_rb && dst.len() == n * low_rb && f32.len() >= n * cols);
    let per = n.div_ceil(threads.max(1)).max(1);
    let work = |src: &[u8], f32: &mut [f32], dst: &mut [u8]| {
        let rows = src.len() / src_rb;
        for (row, out) in src.chunks_exact(src_rb).zip(f32.chunks_exact_mut(cols)) {
            k.dequantize(row, out);
        }
        // SAFETY: `f32` holds `rows * cols` values written just above and `dst` exactly `rows`
        // rows of `low` of `cols` values (both asserted through the split); with start = 0 ggml
        // reads f32[..rows*cols] and writes dst[..rows*low_rb]. `low` passed `check_low_type`
        // (a type with a `ggml_quantize_chunk` case that needs no imatrix, so null is allowed) and
        // its tables were initialised by `ggml_quantize_init` before any thread started.
        let written = unsafe {
            sys::ggml_quantize_chunk(
                low as u32 as sys::ggml_type,
                f32.as_ptr(),
                dst.as_mut_ptr().cast(),
                0,
                rows as i64,
                cols as i64,
                std::ptr::null(),
            )
        };
        debug_assert_eq!(written, dst.len());
    };
    if threads <= 1 || n <= 1 {
        work(src, &mut f32[..n * cols], dst);
        return;
    }
    std::thread::scope(|s| {
        let parts =
            src.chunks(per * src_rb).zip(f32[..n * cols].chunks_mut(per * cols)).zip(dst.chunks_mut(per * low_rb));
        for ((src, f32), dst) in parts {
            s.spawn(move || work(src, f32, dst));
        }
    });
}

/// Writes a sidecar at `out` holding every routed expert of `model` requantized to `low`,
/// calling `progress(source_bytes_done, source_bytes_total)` as it goes. The file is written
/// under a temporary name next to `out` and renamed when complete, so `out` is never half-written.
pub fn prepare(
    model: &Model,
    low: GgmlType,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), LowPrecError> {
    let src_path = model.file.path().to_path_buf();
    check_low_type(low)?;
    let plan = plan(model);
    if plan.is_empty() {
        return Err(LowPrecError::NoExperts { path: src_path });
    }
    for p in &plan {
        if !(p.cols as u64).is_multiple_of(low.block_size()) {
            return Err(LowPrecError::RowNotBlocks {
                path: src_path,
                tensor: p.name.clone(),
                cols: p.cols,
                low: low.name(),
                block: low.block_size(),
            });
        }
        let ex = model.experts(p.layer).unwrap_or_default();
        if let Some(w) =
            ex.iter().map(|e| mats(e)[p.which]).find(|w| !kernels(w.ty).is_some_and(|k| k.can_dequantize()))
        {
            return Err(LowPrecError::SourceType { path: src_path, tensor: p.name.clone(), ty: w.ty.name() });
        }
    }
    // SAFETY: `low` is a valid ggml type; ggml_quantize_init builds its lookup tables once under a
    // mutex (a no-op for types without tables).
    unsafe { sys::ggml_quantize_init(low as u32 as sys::ggml_type) };

    let metadata = [
        ("general.architecture", Value::String(model.spec.name.to_string())),
        (KEY_VERSION, Value::U32(VERSION as u32)),
        (KEY_LOW_TYPE, Value::String(low.name().to_string())),
        (KEY_SOURCE_FILE_BYTES, Value::U64(model.file.bytes().len() as u64)),
        (KEY_SOURCE_FINGERPRINT, Value::U64(fingerprint(model))),
    ];
    let descs: Vec<(&str, GgmlType, [u64; 3])> = plan.iter().map(|p| (p.name.as_str(), low, p.shape())).collect();
    let tmp = partial_path(out);
    let result = write_sidecar(model, low, &plan, &metadata, &descs, &tmp, progress).and_then(|()| {
        std::fs::rename(&tmp, out).map_err(|source| LowPrecError::Io { path: out.to_path_buf(), source })
    });
    if result.is_err() {
        // Best effort: the error that matters is the one being returned.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `out` with `.partial` appended to its file name.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

fn write_sidecar(
    model: &Model,
    low: GgmlType,
    plan: &[Planned],
    metadata: &[(&str, Value)],
    descs: &[(&str, GgmlType, [u64; 3])],
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), LowPrecError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_THREADS);
    let total = model.expert_bytes();
    let mut w = GgufStreamWriter::new(path, metadata, descs)?;
    let max_cols = plan.iter().map(|p| p.cols).max().unwrap_or(0);
    let mut f32 = vec![0f32; CHUNK_VALUES.max(max_cols)];
    let mut dst = Vec::new();
    let mut done = 0u64;
    progress(done, total);
    for (i, p) in plan.iter().enumerate() {
        let chunk_rows = (CHUNK_VALUES / p.cols).max(1);
        let low_rb = low.row_bytes(p.cols as u64).unwrap_or(0) as usize;
        for e in model.experts(p.layer).unwrap_or_default() {
            let m = mats(e)[p.which];
            // Checked in `prepare`: every source type here has kernels that dequantize.
            let Some(k) = kernels(m.ty) else { continue };
            let src = model.bytes_of(&m);
            let src_rb = src.len() / m.rows.max(1);
            for r0 in (0..m.rows).step_by(chunk_rows) {
                let n = chunk_rows.min(m.rows - r0);
                dst.resize(n * low_rb, 0);
                let rows = &src[r0 * src_rb..(r0 + n) * src_rb];
                requantize_rows(k, low, p.cols, rows, &mut f32, &mut dst, threads);
                w.write_tensor_data(i, &dst)?;
                done += rows.len() as u64;
                progress(done, total);
            }
        }
    }
    w.finish()?;
    Ok(())
}

/// A verified sidecar: the low-precision copy of every routed expert of one model.
#[derive(Debug)]
pub struct LowPrecSidecar {
    file: GgufFile,
    low: GgmlType,
    /// Per layer: `None` for dense layers, else each expert's (gate, up, down) inside the sidecar.
    experts: Vec<Option<Vec<[WeightDesc; 3]>>>,
    bytes_per_expert: u64,
}

impl LowPrecSidecar {
    /// Opens the sidecar at `path` and checks it belongs to `model`: format version, source
    /// fingerprint and file size, and every expert of every MoE layer present at the declared low
    /// type with the model's shapes. Nothing else in the file is accepted.
    pub fn open(path: &Path, model: &Model) -> Result<LowPrecSidecar, LowPrecError> {
        let file = GgufFile::open(path)?;
        let p = || path.to_path_buf();
        let version = file.get_u64(KEY_VERSION)?.ok_or(LowPrecError::NotSidecar { path: p(), key: KEY_VERSION })?;
        if version != VERSION {
            return Err(LowPrecError::BadKey {
                path: p(),
                key: KEY_VERSION,
                reason: format!("is {version}; this moerun reads version {VERSION} (prepare the sidecar again)"),
            });
        }
        let low_name = file.get_str(KEY_LOW_TYPE)?.ok_or(LowPrecError::NotSidecar { path: p(), key: KEY_LOW_TYPE })?;
        let low = GgmlType::parse(low_name).ok_or_else(|| LowPrecError::BadKey {
            path: p(),
            key: KEY_LOW_TYPE,
            reason: format!("names '{low_name}', which is not a ggml type"),
        })?;
        if let Err(LowPrecError::LowType { reason, .. }) = check_low_type(low) {
            return Err(LowPrecError::BadKey { path: p(), key: KEY_LOW_TYPE, reason: format!("is {low}: {reason}") });
        }
        let expected = fingerprint(model);
        let found = file
            .get_u64(KEY_SOURCE_FINGERPRINT)?
            .ok_or(LowPrecError::NotSidecar { path: p(), key: KEY_SOURCE_FINGERPRINT })?;
        if found != expected {
            return Err(LowPrecError::WrongModel {
                path: p(),
                what: "fingerprint",
                found: format!("{found:016x}"),
                expected: format!("{expected:016x}"),
            });
        }
        let expected = model.file.bytes().len() as u64;
        let found = file
            .get_u64(KEY_SOURCE_FILE_BYTES)?
            .ok_or(LowPrecError::NotSidecar { path: p(), key: KEY_SOURCE_FILE_BYTES })?;
        if found != expected {
            return Err(LowPrecError::WrongModel {
                path: p(),
                what: "source file bytes",
                found: found.to_string(),
                expected: expected.to_string(),
            });
        }

        let plan = plan(model);
        if let Some(extra) = file.tensors().iter().find(|t| !plan.iter().any(|p| p.name == t.name)) {
            return Err(LowPrecError::BadTensor {
                path: p(),
                tensor: extra.name.clone(),
                reason: "is not a routed-expert tensor of this model".into(),
            });
        }
        let mut experts: Vec<Option<Vec<[WeightDesc; 3]>>> = vec![None; model.layers.len()];
        for pl in &plan {
            let bad = |reason: String| LowPrecError::BadTensor { path: p(), tensor: pl.name.clone(), reason };
            let t = file
                .tensor(&pl.name)
                .ok_or_else(|| LowPrecError::MissingTensor { path: p(), tensor: pl.name.clone() })?;
            if t.ggml_type != low {
                return Err(bad(format!("is {}, but {KEY_LOW_TYPE} says {low}", t.ggml_type)));
            }
            if t.shape != pl.shape() {
                return Err(bad(format!("has shape {:?}, this model's experts need {:?}", t.shape, pl.shape())));
            }
            let per = low.row_bytes(pl.cols as u64).unwrap_or(0) * pl.rows as u64;
            if per == 0 || t.size != per * pl.n_expert as u64 {
                return Err(bad(format!("is {} bytes, {} experts of {} bytes expected", t.size, pl.n_expert, per)));
            }
            let layer = experts[pl.layer].get_or_insert_with(|| {
                vec![[WeightDesc { ty: low, rows: 0, cols: 0, offset: 0, bytes: 0 }; 3]; pl.n_expert]
            });
            for (e, slot) in layer.iter_mut().enumerate() {
                slot[pl.which] =
                    WeightDesc { ty: low, rows: pl.rows, cols: pl.cols, offset: t.offset + e as u64 * per, bytes: per };
            }
        }
        let bytes_per_expert = experts.iter().flatten().flatten().next().map_or(0, |m| m.iter().map(|w| w.bytes).sum());
        Ok(LowPrecSidecar { file, low, experts, bytes_per_expert })
    }

    /// The type every expert is stored at.
    pub fn low_type(&self) -> GgmlType {
        self.low
    }

    /// Expert `e` of MoE layer `layer`: its (gate, up, down) byte extents inside the sidecar file
    /// (absolute offsets, like the model's own `WeightDesc`s), for the same I/O path.
    ///
    /// # Panics
    /// If `layer` is not a MoE layer of the model the sidecar was opened for, or `e` is not one
    /// of its experts (indexing errors, like a slice's).
    pub fn expert(&self, layer: usize, e: usize) -> [WeightDesc; 3] {
        match self.experts.get(layer) {
            Some(Some(ex)) => ex[e],
            _ => panic!("layer {layer} has no routed experts"),
        }
    }

    /// Bytes of one expert's three matrices at the low type (every MoE layer has the same shape).
    pub fn bytes_per_expert(&self) -> u64 {
        self.bytes_per_expert
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The sidecar's mapping (for reading experts through `expert`'s extents).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The bytes of a weight inside the sidecar mapping.
    pub fn bytes_of(&self, w: &WeightDesc) -> &[u8] {
        &self.file.bytes()[w.offset as usize..(w.offset + w.bytes) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_types_ggml_cannot_make_alone_are_refused() {
        for (ty, why) in [
            (GgmlType::IQ2_XXS, "importance matrix"),
            (GgmlType::IQ1_S, "importance matrix"),
            (GgmlType::Q8_K, "cannot quantize"),
            (GgmlType::I32, "cannot quantize"),
        ] {
            let err = check_low_type(ty).expect_err(ty.name());
            assert!(err.to_string().contains(why) && err.to_string().contains(ty.name()), "{err}");
        }
        for ty in [GgmlType::Q4_0, GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::IQ3_XXS, GgmlType::F16] {
            check_low_type(ty).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Splitting rows over threads writes the same bytes as one thread, and equals quantizing the
    /// dequantized rows one at a time with the type's own `from_float`.
    #[test]
    fn threaded_requantization_matches_row_by_row() {
        let (cols, n) = (256usize, 37usize);
        let mut rng = crate::rng::SplitMix64::new(3);
        let x: Vec<f32> = (0..cols * n).map(|_| rng.next_normal(0.05)).collect();
        let high = kernels(GgmlType::Q8_0).expect("q8_0");
        let rb = GgmlType::Q8_0.row_bytes(cols as u64).expect("rb") as usize;
        let mut src = vec![0u8; rb * n];
        for (r, out) in x.chunks_exact(cols).zip(src.chunks_exact_mut(rb)) {
            high.quantize_row(r, out);
        }
        for low in [GgmlType::Q4_0, GgmlType::Q2_K] {
            check_low_type(low).expect("supported");
            // SAFETY: valid type id; builds ggml's tables once.
            unsafe { sys::ggml_quantize_init(low as u32 as sys::ggml_type) };
            let lrb = low.row_bytes(cols as u64).expect("lrb") as usize;
            let mut scratch = vec![0f32; cols * n];
            let (mut one, mut two) = (vec![0u8; lrb * n], vec![0u8; lrb * n]);
            requantize_rows(high, low, cols, &src, &mut scratch, &mut one, 1);
            requantize_rows(high, low, cols, &src, &mut scratch, &mut two, 3);
            assert_eq!(one, two, "{low}");
            let lk = kernels(low).expect("low kernels");
            let mut row = vec![0f32; cols];
            let mut q = vec![0u8; lrb];
            for r in 0..n {
                high.dequantize(&src[r * rb..(r + 1) * rb], &mut row);
                lk.quantize_row(&row, &mut q);
                assert_eq!(q, one[r * lrb..(r + 1) * lrb], "{low} row {r}");
            }
        }
    }

    #[test]
    fn partial_name_sits_beside_the_output() {
        assert_eq!(partial_path(Path::new("/a/b.lowprec.gguf")), Path::new("/a/b.lowprec.gguf.partial"));
    }
}
