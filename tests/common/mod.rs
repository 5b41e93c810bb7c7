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

#[derive(serde::Deserialize, Debug)]
pub struct RefFile {
    pub model: String,
    pub cases: Vec<RefCase>,
}

#[derive(serde::Deserialize, Debug)]
pub struct RefCase {
    pub prompt_text: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub last_top20_ids: Vec<u32>,
    pub last_top20_logits: Vec<f32>,
    pub all_positions_argmax: Vec<u32>,
    pub last_margin: f32,
    #[serde(default)]
    pub greedy_margins: Vec<f32>,
}

/// Every `(gguf, ref)` pair under the fixtures folder, sorted.
pub fn ref_pairs(root: &Path) -> Vec<(PathBuf, RefFile)> {
    let mut dirs: Vec<_> = std::fs::read_dir(root).expect("read fixtures").flatten().map(|e| e.path()).collect();
    dirs.sort();
    dirs.into_iter().filter(|d| d.is_dir()).flat_map(|d| ref_pairs_in(&d)).collect()
}

/// The `(gguf, ref)` pairs of one fixture folder, sorted.
pub fn ref_pairs_in(dir: &Path) -> Vec<(PathBuf, RefFile)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir).expect("read dir").flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if let Some(stem) = name.strip_suffix(".ref.json") {
            let gguf = dir.join(format!("{stem}.gguf"));
            let text = std::fs::read_to_string(&f).expect("read ref");
            let r: RefFile = serde_json::from_str(&text).expect("parse ref");
            out.push((gguf, r));
        }
    }
    out
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
