//! The CUDA kernels' dequantization (`kernels/dequant.cuh`), built for the host by the system's
//! C++ compiler and compared with ggml's `dequantize_row_*` bit for bit, for every type the
//! kernels read: blocks quantized by ggml from random values, and blocks of random bytes (the
//! bit unpacking on every pattern). Runs without CUDA and without the `cuda` feature (issue 12:
//! every kernel checked against the CPU backend where no GPU is).

use std::path::Path;
use std::process::Command;

use moerun::gguf::GgmlType;
use moerun::rng::SplitMix64;

const TYPES: &[(&str, GgmlType)] = &[
    ("f32", GgmlType::F32),
    ("f16", GgmlType::F16),
    ("bf16", GgmlType::BF16),
    ("q4_0", GgmlType::Q4_0),
    ("q4_1", GgmlType::Q4_1),
    ("q5_0", GgmlType::Q5_0),
    ("q5_1", GgmlType::Q5_1),
    ("q8_0", GgmlType::Q8_0),
    ("mxfp4", GgmlType::MXFP4),
    ("q2_K", GgmlType::Q2_K),
    ("q3_K", GgmlType::Q3_K),
    ("q4_K", GgmlType::Q4_K),
    ("q5_K", GgmlType::Q5_K),
    ("q6_K", GgmlType::Q6_K),
];

/// The host build of tests/data/dequant_check.cpp.
fn checker(dir: &Path) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = dir.join("dequant_check");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(root.join("tests/data/dequant_check.cpp"))
        .output()
        .unwrap_or_else(|e| panic!("{cxx}: {e}"));
    assert!(out.status.success(), "{cxx}: {}", String::from_utf8_lossy(&out.stderr));
    exe
}

/// `bytes` of type `name` through the kernels' functions.
fn kernel_values(exe: &Path, dir: &Path, name: &str, bytes: &[u8]) -> Vec<f32> {
    let (inp, outp) = (dir.join(format!("{name}.in")), dir.join(format!("{name}.out")));
    std::fs::write(&inp, bytes).expect("write blocks");
    let st = Command::new(exe).arg(name).arg(&inp).arg(&outp).status().expect("run the checker");
    assert!(st.success(), "{name}: {st}");
    std::fs::read(&outp)
        .expect("values")
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn assert_same(name: &str, what: &str, ours: &[f32], ggml: &[f32]) {
    assert_eq!(ours.len(), ggml.len(), "{name} ({what}): value count");
    for (i, (a, b)) in ours.iter().zip(ggml).enumerate() {
        let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        assert!(same, "{name} ({what}): value {i} is {a} in the kernel, {b} in ggml");
    }
}

#[test]
fn kernel_dequantization_equals_ggml_bit_for_bit_for_every_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = checker(dir.path());
    let mut rng = SplitMix64::new(7);
    let n = 256 * 64; // 64 super-blocks, 512 blocks of 32
    for &(name, ty) in TYPES {
        let k = moerun::ggml::kernels(ty).unwrap_or_else(|| panic!("ggml has no kernels for {name}"));
        let row_bytes = ty.row_bytes(n as u64).expect("row size") as usize;
        // Values ggml quantizes: a spread of magnitudes, so scales differ block to block.
        let x: Vec<f32> = (0..n).map(|i| (rng.next_f64() as f32 * 2.0 - 1.0) * (1 + i / 256) as f32).collect();
        let mut q = vec![0u8; row_bytes];
        k.quantize_row_any(&x, &mut q);
        let mut want = vec![0f32; n];
        k.dequantize(&q, &mut want);
        assert_same(name, "quantized by ggml", &kernel_values(&exe, dir.path(), name, &q), &want);
        // Random bytes: every bit pattern of the packed fields.
        let raw: Vec<u8> = (0..row_bytes).map(|_| rng.next_u64() as u8).collect();
        k.dequantize(&raw, &mut want);
        assert_same(name, "random bytes", &kernel_values(&exe, dir.path(), name, &raw), &want);
    }
}
