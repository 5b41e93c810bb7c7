//! Issue 12, what CI can check without a GPU: every kernel in `kernels/` compiles by NVRTC for
//! Jetson Orin (sm_87), RTX 40 (sm_89) and H100/H200 (sm_90) with every entry point present, and
//! the on-disk cache returns the same PTX without compiling. Built with `--features cuda` only;
//! NVRTC comes from the CUDA toolkit or the `nvidia-cuda-nvrtc-cu12` wheel on LD_LIBRARY_PATH
//! (`.ci/run` installs it). Without NVRTC the test says so and passes, except under CI.
#![cfg(feature = "cuda")]

mod common;

use moerun::backend::cuda::{kernels, probe, CudaError};

#[test]
fn every_kernel_compiles_for_every_ci_architecture_with_its_entries() {
    if !common::nvrtc_or_skip() {
        return;
    }
    for arch in kernels::CI_ARCHS {
        for f in kernels::FILES {
            let c = kernels::compile(f, arch, None).unwrap_or_else(|e| panic!("{e}"));
            assert!(!c.cached);
            let virt = arch.replace("sm_", "compute_");
            assert!(c.ptx.contains(&format!(".target sm_{}", &virt["compute_".len()..])), "kernels/{}: {arch}", f.file);
            for e in f.entry_names() {
                assert!(c.ptx.contains(&format!(".entry {e}(")), "kernels/{} for {arch}: no entry {e}", f.file);
            }
        }
    }
}

#[test]
fn compiled_kernels_are_cached_by_source_arch_and_nvrtc_version() {
    if !common::nvrtc_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let f = &kernels::FILES[0];
    let first = kernels::compile(f, "sm_90", Some(dir.path())).expect("compile");
    let again = kernels::compile(f, "sm_90", Some(dir.path())).expect("from the cache");
    assert!(!first.cached && again.cached);
    assert_eq!(first.ptx, again.ptx);
    let other = kernels::compile(f, "sm_87", Some(dir.path())).expect("another arch");
    assert!(!other.cached, "a different architecture is a different entry");
    assert_eq!(std::fs::read_dir(dir.path()).expect("cache dir").count(), 2);
    let err = kernels::compile(f, "gfx1100", None).err().expect("not a CUDA arch").to_string();
    assert!(err.contains("gfx1100"), "{err}");
}

#[test]
fn no_device_is_an_error_not_a_panic() {
    // On a machine with a GPU this finds it; without one (CI) the driver is missing or has no
    // device, and either way the answer is a value.
    match probe(0) {
        Ok(d) => assert!(d.arch().starts_with("sm_"), "{d:?}"),
        Err(CudaError::NoDriver(why)) => assert!(why.contains("libcuda"), "{why}"),
        Err(e) => assert!(e.to_string().contains("CUDA device 0"), "{e}"),
    }
}
