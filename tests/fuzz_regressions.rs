//! What the fuzz targets in `fuzz/` found (issue 13), each pinned down: a model file's metadata
//! that aborted the process (an allocation sized by a header field) or panicked must be an
//! error naming the file. The inputs are rebuilt from a tiny synthetic model, not copied from
//! the fuzzer's artifacts, so each says what it damages.

mod common;

use std::path::{Path, PathBuf};

use moerun::gguf::{GgmlType, Value};
use moerun::model::Model;
use moerun::synth::SynthConfig;

/// A one-layer llama MoE of two experts (rows of 64): small enough to rewrite per case.
fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    SynthConfig::minimal("llama", GgmlType::Q8_0).write(&path, &mut |_, _| {}).expect("synth");
    path
}

/// `src` with the metadata key `key` set to `value` (added if absent), written as `name`.
fn with_key(src: &Path, name: &str, key: &str, value: Value) -> PathBuf {
    common::with_metadata(src, &src.with_file_name(name), key, value)
}

/// Loads `path`, which must fail with an error naming it and containing `expect`.
fn check(path: &Path, expect: &str) {
    let err = match Model::load(path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    };
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(err.contains(&*name), "{err}");
    assert!(err.contains(expect), "{err}");
}

/// fuzz/gguf: `block_count` of 2^40 reserved a `Vec` of that many layers (70 GB for 10^9) before
/// the first layer's tensors were looked for: the allocator aborted the process.
#[test]
fn a_huge_block_count_is_a_missing_tensor_not_an_abort() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = tiny_model(dir.path());
    Model::load(&src).expect("the undamaged model loads");
    let path = with_key(&src, "many-layers.gguf", "llama.block_count", Value::U64(1 << 40));
    check(&path, "blk.1.");
}
