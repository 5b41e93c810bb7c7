//! The CUDA backend's foundations (issue 12, in progress): finding a device without letting a
//! missing library panic, and the kernels of `kernels/*.cu`, compiled by NVRTC for an
//! architecture at first use and cached on disk (`kernels`). The `Backend` implementation over
//! them (device buffers, the GPU expert arena, the copy stream) is not here yet; until it is, the
//! front doors run on the CPU.
//!
//! Built only with `--features cuda`: cudarc loads the driver and NVRTC at run time, so the build
//! needs no CUDA install. cudarc panics when a library it needs is absent, so every entry here
//! first checks that the library opens (`library`).
//!
//! Invariant: nothing here calls into cudarc before `library` found what that call loads.

pub mod backend;
pub mod kernels;
pub mod selftest;

pub use backend::{CpuMisses, CudaBackend, CudaOptions};

use std::ffi::CString;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver ({0})")]
    NoDriver(String),
    #[error(
        "no NVRTC library ({0}): install the CUDA toolkit, or `pip install nvidia-cuda-nvrtc-cu12` \
         and put its nvidia/cuda_nvrtc/lib on LD_LIBRARY_PATH"
    )]
    NoNvrtc(String),
    #[error("CUDA device {ordinal}: {message}")]
    Driver { ordinal: usize, message: String },
    #[error("NVRTC could not compile kernels/{file} for {arch}: {log}")]
    Compile { file: String, arch: String, log: String },
    #[error("kernel cache {}: {source}", .path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The name of the first of cudarc's candidates for `lib` that opens, or why none did.
pub fn library(lib: &str) -> Result<String, String> {
    let names = cudarc::get_lib_name_candidates(lib);
    for name in &names {
        let Ok(c) = CString::new(name.as_str()) else { continue };
        // SAFETY: dlopen of a NUL-terminated name; the handle is closed at once (cudarc opens
        // its own), and the library's initializers are the ones cudarc would run anyway.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !h.is_null() {
            // SAFETY: `h` came from dlopen above and is closed once.
            unsafe { libc::dlclose(h) };
            return Ok(name.clone());
        }
    }
    Err(format!("none of {} opens from the library path", names.first().map_or("it", String::as_str)))
}

/// One CUDA device as the backend sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor): 8.7 is Jetson Orin, 8.9 an RTX 40, 9.0 an H100/H200.
    pub compute_capability: (i32, i32),
    pub memory_bytes: u64,
    /// CPU and GPU share DRAM (Jetson): experts are kept once, no host-to-device copies.
    pub integrated: bool,
}

impl DeviceInfo {
    /// The NVRTC architecture for this device's kernels (`sm_87`, …).
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

/// Device `ordinal`, or why there is none (no driver, no such device): never a panic.
pub fn probe(ordinal: usize) -> Result<DeviceInfo, CudaError> {
    library("cuda").map_err(CudaError::NoDriver)?;
    let err = |e: cudarc::driver::DriverError| CudaError::Driver { ordinal, message: e.to_string() };
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(err)?;
    let integrated =
        ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_INTEGRATED).map_err(err)?;
    Ok(DeviceInfo {
        ordinal,
        name: ctx.name().map_err(err)?,
        compute_capability: ctx.compute_capability().map_err(err)?,
        memory_bytes: ctx.total_mem().map_err(err)? as u64,
        integrated: integrated != 0,
    })
}
