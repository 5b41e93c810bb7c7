//! Shared test helpers: fixture discovery and reference files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `../shared/fixtures`, or `None` (after saying so) when the folder is absent. Under CI (the
/// `CI` environment variable set) a missing folder fails the test instead: there the oracle
/// checks must run, not skip.
pub fn fixtures() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if p.is_dir() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{} not found, and CI is set: the fixture tests must run here", p.display());
    }
    eprintln!("skipped: {} not found", p.display());
    None
}

pub use moerun::oracle::RefFile;

/// Whether NVRTC opens (the CUDA tests need it to compile kernels); without it a test says it
/// skipped, except under CI, where it fails.
#[cfg(feature = "cuda")]
pub fn nvrtc_or_skip() -> bool {
    match moerun::backend::cuda::library("nvrtc") {
        Ok(_) => true,
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: no NVRTC ({why})");
            false
        }
        Err(why) => panic!("CI needs NVRTC: {why}"),
    }
}

/// Every `(gguf, ref)` pair under the fixtures folder, sorted.
pub fn ref_pairs(root: &Path) -> Vec<(PathBuf, RefFile)> {
    moerun::oracle::ref_pairs(root).unwrap_or_else(|e| panic!("{e}"))
}

/// The `(gguf, ref)` pairs of one fixture folder, sorted.
pub fn ref_pairs_in(dir: &Path) -> Vec<(PathBuf, RefFile)> {
    moerun::oracle::ref_pairs_in(dir).unwrap_or_else(|e| panic!("{e}"))
}

/// A copy of the GGUF at `src`, written to `dest`, with metadata `key` set to `value` (added if
/// absent; everything else, tensors included, as in `src`).
pub fn with_metadata(src: &Path, dest: &Path, key: &str, value: moerun::gguf::Value) -> PathBuf {
    let f = moerun::gguf::GgufFile::open(src).expect("source GGUF");
    let mut w = moerun::gguf::GgufWriter::new();
    for (k, v) in f.metadata() {
        if k != key && k != "general.alignment" {
            w.add_metadata(k.clone(), v.clone());
        }
    }
    w.add_metadata(key, value);
    for t in f.tensors() {
        w.add_tensor(t.name.clone(), t.ggml_type, &t.shape, f.tensor_data(t).to_vec()).expect("tensor");
    }
    w.write(dest).expect("write");
    dest.to_path_buf()
}
