//! The kernel sources (`kernels/*.cu`, each compiled after `kernels/prelude.cuh` and
//! `kernels/dequant.cuh`, ggml's block layouts and their values), compiled by
//! NVRTC to PTX for one architecture and cached on disk, keyed by the source's hash, the
//! architecture and NVRTC's version: a device compiles each file once (about 40 ms a kernel on
//! an H200), and a new source or driver recompiles.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{library, CudaError};
use crate::gguf::GgmlType;

const PRELUDE: &str = include_str!("../../../kernels/prelude.cuh");
const DEQUANT: &str = include_str!("../../../kernels/dequant.cuh");

/// The types every generic kernel (`matvec_*`, `get_rows_*`) is instantiated for, as named in
/// `dequant.cuh`'s `MR_FOR_EACH_TYPE`.
pub const TYPES: &[&str] =
    &["f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "mxfp4", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"];

/// The kernels' name of a ggml type (`q4_K`, …), for the types they read.
pub fn kernel_type(ty: GgmlType) -> Option<&'static str> {
    TYPES.iter().copied().find(|t| ggml_type(t) == Some(ty))
}

/// The ggml type of a kernel type name.
pub fn ggml_type(name: &str) -> Option<GgmlType> {
    Some(match name {
        "f32" => GgmlType::F32,
        "f16" => GgmlType::F16,
        "bf16" => GgmlType::BF16,
        "q4_0" => GgmlType::Q4_0,
        "q4_1" => GgmlType::Q4_1,
        "q5_0" => GgmlType::Q5_0,
        "q5_1" => GgmlType::Q5_1,
        "q8_0" => GgmlType::Q8_0,
        "mxfp4" => GgmlType::MXFP4,
        "q2_K" => GgmlType::Q2_K,
        "q3_K" => GgmlType::Q3_K,
        "q4_K" => GgmlType::Q4_K,
        "q5_K" => GgmlType::Q5_K,
        "q6_K" => GgmlType::Q6_K,
        _ => return None,
    })
}

/// One kernel file: its name under `kernels/`, its source and the entry points it defines
/// (`{type}` stands for each of [`TYPES`]).
pub struct KernelFile {
    pub file: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

impl KernelFile {
    /// Every entry point, `{type}` expanded.
    pub fn entry_names(&self) -> Vec<String> {
        self.entries
            .iter()
            .flat_map(|e| match e.contains("{type}") {
                true => TYPES.iter().map(|t| e.replace("{type}", t)).collect::<Vec<_>>(),
                false => vec![e.to_string()],
            })
            .collect()
    }
}

/// Every kernel file.
pub const FILES: &[KernelFile] = &[
    KernelFile {
        file: "matvec.cu",
        source: include_str!("../../../kernels/matvec.cu"),
        entries: &["matvec_{type}", "matvec_grouped_{type}"],
    },
    KernelFile {
        file: "matmul.cu",
        source: include_str!("../../../kernels/matmul.cu"),
        entries: &["matmul_{type}", "matmul_grouped_{type}"],
    },
    KernelFile {
        file: "norm.cu",
        source: include_str!("../../../kernels/norm.cu"),
        entries: &["rms_norm_f32", "add_rms_norm_f32"],
    },
    KernelFile {
        file: "elementwise.cu",
        source: include_str!("../../../kernels/elementwise.cu"),
        entries: &[
            "add_f32",
            "scale_f32",
            "glu_f32",
            "add_bias_f32",
            "add_bias_grouped_f32",
            "gather_rows_f32",
            "scatter_rows_f32",
            "combine_f32",
            "copy_cols_f32",
            "round_act_f32",
            "get_rows_{type}",
        ],
    },
    KernelFile { file: "rope.cu", source: include_str!("../../../kernels/rope.cu"), entries: &["rope_f32"] },
    KernelFile {
        file: "attention.cu",
        source: include_str!("../../../kernels/attention.cu"),
        entries: &[
            "kv_store_f16",
            "kv_store_f32",
            "attn_f16_2",
            "attn_f16_4",
            "attn_f16_8",
            "attn_f16_20",
            "attn_f32_2",
            "attn_f32_4",
            "attn_f32_8",
            "attn_f32_20",
        ],
    },
];

/// The architectures CI compiles every kernel for: Jetson Orin, RTX 40, H100/H200.
pub const CI_ARCHS: &[&str] = &["sm_87", "sm_89", "sm_90"];

/// NVRTC's (major, minor) version, once its library is known to open.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    library("nvrtc").map_err(CudaError::NoNvrtc)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC writes two ints through valid pointers; the library opens (checked above).
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::NoNvrtc(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok((major, minor))
}

/// A compiled file: its PTX, and whether it came from the cache.
pub struct Compiled {
    pub ptx: String,
    pub cached: bool,
    pub seconds: f64,
}

/// `f` compiled for `arch` (`sm_87`, …): from `cache` when it holds this source, architecture and
/// NVRTC version, else by NVRTC (then stored there, atomically). `cache: None` always compiles.
pub fn compile(f: &KernelFile, arch: &str, cache: Option<&Path>) -> Result<Compiled, CudaError> {
    let version = nvrtc_version()?;
    let t0 = Instant::now();
    let source = format!("{PRELUDE}\n{DEQUANT}\n#line 1 \"{}\"\n{}", f.file, f.source);
    let key = cache
        .map(|dir| dir.join(format!("{}-{arch}-nvrtc{}.{}-{:016x}.ptx", f.file, version.0, version.1, fnv(&source))));
    if let Some(p) = &key {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            return Ok(Compiled { ptx, cached: true, seconds: t0.elapsed().as_secs_f64() });
        }
    }
    // PTX for the virtual architecture, so the driver assembles it for the exact device.
    let Some(n) = arch.strip_prefix("sm_").filter(|n| n.len() >= 2 && n.bytes().all(|b| b.is_ascii_alphanumeric()))
    else {
        return Err(CudaError::Compile {
            file: f.file.into(),
            arch: arch.into(),
            log: "not an sm_XY architecture".into(),
        });
    };
    let opts = cudarc::nvrtc::CompileOptions {
        name: Some(f.file.to_string()),
        options: vec!["--std=c++17".into(), format!("--gpu-architecture=compute_{n}")],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(&source, opts).map_err(|e| CudaError::Compile {
        file: f.file.into(),
        arch: arch.into(),
        log: match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => other.to_string(),
        },
    })?;
    let ptx = ptx.to_src();
    if let Some(p) = &key {
        if let Err(source) = crate::atomic::write(p, ptx.as_bytes()) {
            return Err(CudaError::Cache { path: p.clone(), source });
        }
    }
    Ok(Compiled { ptx, cached: false, seconds: t0.elapsed().as_secs_f64() })
}

/// Where compiled kernels are kept: `$XDG_CACHE_HOME/moerun/kernels` or `~/.cache/moerun/kernels`.
pub fn default_cache() -> Option<PathBuf> {
    crate::experts::profile::default_dir().and_then(|d| d.parent().map(|p| p.join("kernels")))
}

/// FNV-1a of a text (the cache key; not a security boundary).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}
