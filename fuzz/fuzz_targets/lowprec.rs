//! The low-precision sidecar loader (`LowPrecSidecar::open`) against a tiny synthetic model made
//! once per process. Input: when it starts with `GGUF`, a whole sidecar file; otherwise edits to
//! a valid sidecar of that model (so the fuzzer gets past the fingerprint checks): the first four
//! bytes cut the file (little-endian, modulo its length + 1; all ones keeps it whole), then each
//! five bytes write one byte (`offset: u32 le`, `value`). A sidecar either opens with every
//! expert's extents inside the file or fails with an error naming the file.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use moerun::gguf::GgmlType;
use moerun::lowprec::{self, LowPrecSidecar};
use moerun::model::{Ffn, Model};
use moerun::synth::SynthConfig;

struct Fixture {
    model: Model,
    valid: Vec<u8>,
    /// Where each input is written: one file per process, on tmpfs where there is one (left
    /// behind when the process ends: a few KB).
    input: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let base =
            if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        // The model is the same bytes in every process: one shared directory, each file written
        // under this process's name and renamed into place.
        let dir = base.join("moerun-fuzz-lowprec");
        std::fs::create_dir_all(&dir).expect("fuzz dir");
        let pid = std::process::id();
        // One MoE layer of two experts, rows of 64: a sidecar of a few KB.
        let cfg = SynthConfig::minimal("llama", GgmlType::Q8_0);
        let model_path = dir.join("tiny.gguf");
        let scratch = dir.join(format!("tiny.{pid}.gguf"));
        cfg.write(&scratch, &mut |_, _| {}).expect("synth model");
        std::fs::rename(&scratch, &model_path).expect("model in place");
        let model = Model::load(&model_path).expect("synth model loads");
        let sidecar = dir.join(format!("tiny.lowprec.{pid}.gguf"));
        lowprec::prepare(&model, GgmlType::Q4_0, &sidecar, &mut |_, _| {}).expect("prepare");
        let valid = std::fs::read(&sidecar).expect("read sidecar");
        LowPrecSidecar::open(&sidecar, &model).expect("the valid sidecar opens");
        std::fs::remove_file(&sidecar).expect("remove sidecar");
        Fixture { model, valid, input: dir.join(format!("input.{pid}.gguf")) }
    })
}

fn sidecar_bytes(valid: &[u8], data: &[u8]) -> Vec<u8> {
    if data.starts_with(b"GGUF") {
        return data.to_vec();
    }
    let mut out = valid.to_vec();
    let (cut, edits) = data.split_at(data.len().min(4));
    if cut.len() == 4 {
        let n = u32::from_le_bytes([cut[0], cut[1], cut[2], cut[3]]);
        if n != u32::MAX {
            out.truncate(n as usize % (valid.len() + 1));
        }
    }
    for e in edits.chunks_exact(5) {
        let at = u32::from_le_bytes([e[0], e[1], e[2], e[3]]) as usize;
        if let Some(b) = out.get_mut(at % valid.len().max(1)) {
            *b = e[4];
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let bytes = sidecar_bytes(&fx.valid, data);
    std::fs::write(&fx.input, &bytes).expect("write input");
    match LowPrecSidecar::open(&fx.input, &fx.model) {
        Ok(side) => {
            for (l, layer) in fx.model.layers.iter().enumerate() {
                let Ffn::Moe { experts, .. } = &layer.ffn else { continue };
                for e in 0..experts.len() {
                    for w in side.expert(l, e) {
                        assert_eq!(side.bytes_of(&w).len() as u64, w.bytes);
                    }
                }
            }
        }
        Err(e) => assert!(
            e.to_string().contains(&format!("input.{}.gguf", std::process::id())),
            "an error names the file: {e}"
        ),
    }
});
