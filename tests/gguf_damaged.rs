//! Damaged GGUF files: each is a valid file from `GgufWriter`, then truncated or patched. Every
//! one must open to an error whose message names the file and the field or tensor at fault.
//! Also opens the real fixtures and compares our reading with llama.cpp's own gguf reader.

mod common;

use std::ffi::{CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use moerun::gguf::{GgmlType, GgufFile, GgufWriter, Value};

/// The undamaged file: three tensors, strings, arrays and an explicit alignment.
fn base() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("llama".into()));
    w.add_metadata("general.name", Value::String("damaged-base".into()));
    w.set_alignment(32);
    let tokens = ["<s>", "hello", "wörld"].map(|s| Value::String(s.into()));
    w.add_metadata("tokenizer.ggml.tokens", Value::Array(tokens.to_vec()));
    w.add_metadata("test.scores", Value::Array(vec![Value::F32(0.5); 3]));
    w.add_metadata("test.count", Value::U32(7));
    w.add_metadata("test.limit", Value::U32(9));
    // Q8_0 [64, 2] = 136 bytes (padded to 160), F32 [8, 4] = 128, F16 [16, 2] = 64.
    let tensors = [
        ("blk.0.ffn_up.weight", GgmlType::Q8_0, [64u64, 2]),
        ("blk.1.ffn_up.weight", GgmlType::F32, [8, 4]),
        ("output.weight", GgmlType::F16, [16, 2]),
    ];
    for (name, ty, shape) in tensors {
        let size = ty.row_bytes(shape[0]).map_or(0, |r| r * shape[1]) as usize;
        w.add_tensor(name, ty, &shape, vec![0x5a; size]).expect("base tensor");
    }
    w.to_bytes()
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not in the base file", String::from_utf8_lossy(needle)))
}

/// Position of the length prefix of the GGUF string `s`.
fn string_at(bytes: &[u8], s: &str) -> usize {
    let mut encoded = (s.len() as u64).to_le_bytes().to_vec();
    encoded.extend_from_slice(s.as_bytes());
    find(bytes, &encoded)
}

/// Position just past the GGUF string `s`: a key's type tag, or a tensor's n_dims.
fn after(bytes: &[u8], s: &str) -> usize {
    string_at(bytes, s) + 8 + s.len()
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Position of a tensor's relative data offset (tensors here have two dimensions).
fn offset_field(bytes: &[u8], tensor: &str) -> usize {
    after(bytes, tensor) + 4 + 2 * 8 + 4
}

/// Truncates at `at` and claims only `n_kv` keys and no tensors, so the count checks (which
/// bound all keys by the bytes left) pass and the cut is found inside the key or value itself.
fn cut_to_first_keys(bytes: &mut Vec<u8>, at: usize, n_kv: u64) {
    bytes.truncate(at);
    put_u64(bytes, 8, 0);
    put_u64(bytes, 16, n_kv);
}

fn data_end(bytes: &[u8], tensor: &str) -> u64 {
    let f = open_bytes("probe", bytes).expect("base opens");
    let t = f.tensor(tensor).expect("tensor");
    t.offset + t.size
}

fn open_bytes(name: &str, bytes: &[u8]) -> Result<GgufFile, moerun::gguf::GgufError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(format!("{name}.gguf"));
    std::fs::write(&path, bytes).expect("write damaged file");
    GgufFile::open(&path)
}

type Mutate = fn(&mut Vec<u8>);

/// Every damage, the substring its error must contain, and nothing else: `check` adds the file.
#[rustfmt::skip]
const CASES: &[(&str, Mutate, &str)] = &[
    ("empty_file", |b| b.clear(), "file ends inside the magic number"),
    ("truncated_in_magic", |b| b.truncate(2), "file ends inside the magic number"),
    ("truncated_in_header", |b| b.truncate(12), "file ends inside the tensor count (at byte 8)"),
    ("truncated_in_kv_key", |b| cut_to_first_keys(b, string_at(b, "general.name") + 12, 2), "metadata key 1 is 12 bytes long"),
    ("truncated_in_kv_type", |b| b.truncate(after(b, "test.count") + 2), "file ends inside metadata key 'test.count' type"),
    ("truncated_in_kv_string", |b| cut_to_first_keys(b, after(b, "damaged-base") - 3, 2), "metadata key 'general.name' value is 12 bytes long, past the end"),
    ("truncated_in_array", |b| b.truncate(after(b, "test.scores") + 4 + 4 + 8 + 6), "metadata key 'test.scores' array length is 3, more than the file could hold"),
    ("truncated_in_array_string", |b| b.truncate(after(b, "hello") + 4), "metadata key 'tokenizer.ggml.tokens' value length"),
    ("truncated_in_tensor_dims", |b| b.truncate(after(b, "blk.1.ffn_up.weight") + 4 + 8 + 3), "file ends inside tensor 'blk.1.ffn_up.weight' dimension 1"),
    ("truncated_in_tensor_type", |b| b.truncate(after(b, "blk.1.ffn_up.weight") + 4 + 16 + 1), "file ends inside tensor 'blk.1.ffn_up.weight' type"),
    ("truncated_in_tensor_offset", |b| b.truncate(offset_field(b, "output.weight") + 5), "file ends inside tensor 'output.weight' offset"),
    ("truncated_in_tensor_name", |b| b.truncate(string_at(b, "output.weight") + 10), "tensor 2 name is 13 bytes long"),
    ("truncated_in_data", |b| { let end = data_end(b, "output.weight"); b.truncate(end as usize - 10) }, "tensor 'output.weight' ends at byte"),
    ("bad_magic", |b| b[..4].copy_from_slice(b"GGML"), "not a GGUF file (magic \"GGML\", expected \"GGUF\")"),
    ("version_1", |b| put_u32(b, 4, 1), "GGUF version 1 is not supported"),
    ("version_99", |b| put_u32(b, 4, 99), "GGUF version 99 is not supported"),
    ("version_big_endian", |b| put_u32(b, 4, 3u32.swap_bytes()), "big-endian"),
    ("huge_tensor_count", |b| put_u64(b, 8, u64::MAX), "the tensor count is 18446744073709551615, more than the file could hold"),
    ("huge_kv_count", |b| put_u64(b, 16, 1 << 40), "the metadata count is 1099511627776"),
    ("huge_key_length", |b| { let at = string_at(b, "test.count"); put_u64(b, at, 1 << 50) }, "metadata key 5 is 1125899906842624 bytes long"),
    ("huge_string_length", |b| { let at = string_at(b, "damaged-base"); put_u64(b, at, u64::MAX) }, "metadata key 'general.name' value is 18446744073709551615 bytes long"),
    ("huge_array_length", |b| { let at = after(b, "tokenizer.ggml.tokens") + 8; put_u64(b, at, 1 << 61) }, "metadata key 'tokenizer.ggml.tokens' array length is 2305843009213693952"),
    ("unknown_value_type", |b| { let at = after(b, "test.count"); put_u32(b, at, 13) }, "metadata key 'test.count' has unknown value type 13"),
    ("unknown_array_element_type", |b| { let at = after(b, "test.scores") + 4; put_u32(b, at, 77) }, "metadata key 'test.scores' has unknown value type 77"),
    ("arrays_nested_too_deep", |b| *b = nested_arrays(9), "metadata key 'deep' nests arrays 9 deep"),
    ("empty_key", |b| { let at = string_at(b, "test.limit"); put_u64(b, at, 0) }, "metadata key 6 is empty"),
    ("duplicate_key", |b| { let at = string_at(b, "test.limit") + 8; b[at..at + 10].copy_from_slice(b"test.count") }, "metadata key 'test.count' appears twice"),
    ("invalid_utf8_key", |b| { let at = string_at(b, "test.count") + 8; b[at] = 0xff }, "metadata key 5 is not valid UTF-8"),
    ("invalid_utf8_value", |b| { let at = string_at(b, "damaged-base") + 8; b[at + 1] = 0xc3 }, "metadata key 'general.name' value is not valid UTF-8"),
    ("invalid_utf8_in_array", |b| { let at = string_at(b, "wörld") + 8; b[at + 2] = b'A' }, "metadata key 'tokenizer.ggml.tokens' value is not valid UTF-8"),
    ("invalid_utf8_tensor_name", |b| { let at = string_at(b, "output.weight") + 8; b[at] = 0x80 }, "tensor 2 name is not valid UTF-8"),
    ("alignment_0", |b| { let at = after(b, "general.alignment") + 4; put_u32(b, at, 0) }, "general.alignment is 0, not a nonzero power of two"),
    ("alignment_3", |b| { let at = after(b, "general.alignment") + 4; put_u32(b, at, 3) }, "general.alignment is 3, not a nonzero power of two"),
    ("alignment_wrong_type", |b| { let at = after(b, "general.alignment"); put_u32(b, at, 5) }, "metadata key 'general.alignment' should be u32, found i32 32"),
    ("unknown_ggml_type", |b| { let at = after(b, "blk.0.ffn_up.weight") + 4 + 16; put_u32(b, at, 4) }, "tensor 'blk.0.ffn_up.weight' has unknown ggml type 4"),
    ("n_dims_5", |b| { let at = after(b, "blk.0.ffn_up.weight"); put_u32(b, at, 5) }, "tensor 'blk.0.ffn_up.weight' has a bad shape: 5 dimensions, at most 4 allowed"),
    ("zero_dim", |b| { let at = after(b, "blk.1.ffn_up.weight") + 4 + 8; put_u64(b, at, 0) }, "tensor 'blk.1.ffn_up.weight' has a bad shape: dimension 1 is zero"),
    ("ne0_not_multiple_of_block", |b| { let at = after(b, "blk.0.ffn_up.weight") + 4; put_u64(b, at, 48) }, "tensor 'blk.0.ffn_up.weight' has a bad shape: ne0 = 48 is not a multiple of the q8_0 block size 32"),
    ("element_count_overflow", |b| { let at = after(b, "blk.1.ffn_up.weight") + 4 + 8; put_u64(b, at, u64::MAX) }, "tensor 'blk.1.ffn_up.weight' has a bad shape: shape [8, 18446744073709551615] has more than"),
    ("byte_size_overflow", |b| { let at = after(b, "blk.1.ffn_up.weight") + 4; put_u64(b, at, 1 << 60) }, "tensor 'blk.1.ffn_up.weight' has a bad shape: shape [1152921504606846976, 4] of type f32 overflows"),
    ("offset_past_end", |b| { let at = offset_field(b, "output.weight"); put_u64(b, at, 1 << 20) }, "tensor 'output.weight' ends at byte"),
    ("offset_overflows_u64", |b| { let at = offset_field(b, "output.weight"); put_u64(b, at, u64::MAX - 31) }, "tensor 'output.weight' ends at byte 18446744073709551679, past the end"),
    ("overlapping_tensors", |b| { let at = offset_field(b, "blk.1.ffn_up.weight"); put_u64(b, at, 128) }, "tensors 'blk.0.ffn_up.weight' and 'blk.1.ffn_up.weight' overlap"),
    ("misaligned_offset", |b| { let at = offset_field(b, "blk.1.ffn_up.weight"); put_u64(b, at, 161) }, "tensor 'blk.1.ffn_up.weight' has data offset 161, not a multiple of the alignment 32"),
    ("duplicate_tensor", |b| { let at = string_at(b, "blk.1.ffn_up.weight") + 8; b[at + 4] = b'0' }, "tensor 'blk.0.ffn_up.weight' appears twice"),
];

/// A file with one key whose value is `depth` arrays nested in each other.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    b.extend_from_slice(b"deep");
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 1..depth {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b
}

/// Damages a copy of the base file, opens it, and returns why the outcome is wrong (if it is).
fn check(name: &str, mutate: Mutate, expected: &str) -> Result<(), String> {
    let mut bytes = base();
    mutate(&mut bytes);
    let outcome = catch_unwind(AssertUnwindSafe(|| open_bytes(name, &bytes)));
    match outcome {
        Err(_) => Err(format!("{name}: the reader panicked")),
        Ok(Ok(_)) => Err(format!("{name}: opened without error")),
        Ok(Err(e)) => {
            let msg = e.to_string();
            let file = format!("{name}.gguf: ");
            if msg.contains(&file) && msg.contains(expected) {
                Ok(())
            } else {
                Err(format!("{name}: got {msg:?}\n    wanted {file:?} and {expected:?}"))
            }
        }
    }
}

#[test]
fn damaged_files_fail_with_errors_naming_file_and_field() {
    let failures: Vec<String> =
        CASES.iter().filter_map(|(name, mutate, expected)| check(name, *mutate, expected).err()).collect();
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), CASES.len(), failures.join("\n"));
}

#[test]
fn damages_are_distinct_and_the_base_is_valid() {
    let base = base();
    open_bytes("base", &base).expect("the undamaged base file opens");
    let mut seen = std::collections::HashSet::new();
    for (name, mutate, _) in CASES {
        let mut bytes = base.clone();
        mutate(&mut bytes);
        assert_ne!(bytes, base, "{name} changes nothing");
        assert!(seen.insert(bytes), "{name} repeats an earlier case");
    }
    assert!(CASES.len() >= 24, "only {} damaged files", CASES.len());
    // The nesting limit is exact: one level less opens.
    let f = open_bytes("nested_8", &nested_arrays(8)).expect("8 levels are allowed");
    assert!(f.get("deep").and_then(Value::as_array).is_some());
}

fn fixture_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for sub in std::fs::read_dir(dir).expect("read fixtures").flatten() {
        for f in std::fs::read_dir(sub.path()).into_iter().flatten().flatten() {
            if f.path().extension().is_some_and(|e| e == "gguf") {
                files.push(f.path());
            }
        }
    }
    files.sort();
    files
}

#[test]
fn real_fixtures_open_and_fit_their_files() {
    let Some(dir) = common::fixtures() else { return };
    let rustdoc = GgufFile::open(dir.join("rustdoc-moe/rustdoc-moe-Q8_0.gguf")).expect("rustdoc-moe opens");
    assert_eq!(rustdoc.get_str("general.architecture").expect("arch"), Some("llama"));
    assert!(rustdoc.get_u64("llama.expert_count").expect("expert count").is_some());
    let files = fixture_files(&dir);
    assert!(files.len() >= 6, "fixtures: {files:?}");
    for path in files {
        let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let total: u64 = f.tensors().iter().map(|t| t.size).sum();
        assert!(total <= f.bytes().len() as u64, "{}", path.display());
        assert!(f.tensors().iter().any(|t| t.name.contains("_exps")), "{} has stacked experts", path.display());
        for t in f.tensors() {
            assert_eq!(f.tensor_data(t).len() as u64, t.size);
        }
    }
}

/// The fixtures, and the writer's output, read the same through llama.cpp's gguf reader.
#[test]
fn reading_agrees_with_llama_cpp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let written = dir.path().join("base.gguf");
    std::fs::write(&written, base()).expect("write base");
    // Every tensor type and every non-nested value kind (llama.cpp refuses nested arrays).
    let mut w = GgufWriter::new();
    w.set_alignment(64);
    let scalars = [
        Value::U8(1),
        Value::I8(-1),
        Value::U16(2),
        Value::I16(-2),
        Value::U32(3),
        Value::I32(-3),
        Value::F32(0.5),
        Value::Bool(true),
        Value::String("s".into()),
        Value::U64(4),
        Value::I64(-4),
        Value::F64(0.25),
    ];
    for (i, v) in scalars.into_iter().enumerate() {
        w.add_metadata(format!("test.scalar.{i}"), v.clone());
        w.add_metadata(format!("test.array.{i}"), Value::Array(vec![v; 3]));
    }
    for ty in GgmlType::ALL {
        let shape = [ty.block_size() * 3, 2, 1, 2];
        let size = ty.row_bytes(shape[0]).map_or(0, |r| r * 4) as usize;
        w.add_tensor(format!("t.{}", ty.name()), ty, &shape, vec![1; size]).expect("tensor");
    }
    let every_type = dir.path().join("every_type.gguf");
    w.write(&every_type).expect("write every_type");
    let mut files = vec![written, every_type];
    match common::fixtures() {
        Some(fixtures) => files.extend(fixture_files(&fixtures)),
        None => println!("comparing the writer's output only"),
    }
    for path in files {
        compare_with_llama_cpp(&path);
    }
}

fn compare_with_llama_cpp(path: &Path) {
    use llama_cpp_sys_2 as sys;
    let ours = GgufFile::open(path).unwrap_or_else(|e| panic!("{e}"));
    let c_path = CString::new(path.to_str().expect("utf-8 path")).expect("no NUL");
    let params = sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() };
    // SAFETY: a valid NUL-terminated path; with ctx null llama.cpp allocates no tensors.
    let ctx = unsafe { sys::gguf_init_from_file(c_path.as_ptr(), params) };
    assert!(!ctx.is_null(), "llama.cpp rejects {}", path.display());
    // SAFETY: `ctx` is a live context until gguf_free below; every id passed is below the
    // counts llama.cpp reports, and the returned strings live as long as `ctx`.
    unsafe {
        assert_eq!(sys::gguf_get_version(ctx), ours.version());
        assert_eq!(sys::gguf_get_alignment(ctx) as u64, ours.alignment());
        assert_eq!(sys::gguf_get_data_offset(ctx) as u64, ours.data_offset());
        assert_eq!(sys::gguf_get_n_kv(ctx), ours.metadata().len() as i64);
        for (i, (key, _)) in ours.metadata().iter().enumerate() {
            let theirs = CStr::from_ptr(sys::gguf_get_key(ctx, i as i64));
            assert_eq!(theirs.to_str(), Ok(key.as_str()));
        }
        assert_eq!(sys::gguf_get_n_tensors(ctx), ours.tensors().len() as i64);
        for (i, t) in ours.tensors().iter().enumerate() {
            let id = i as i64;
            assert_eq!(CStr::from_ptr(sys::gguf_get_tensor_name(ctx, id)).to_str(), Ok(t.name.as_str()));
            assert_eq!(sys::gguf_get_tensor_type(ctx, id), t.ggml_type as u32);
            assert_eq!(sys::gguf_get_tensor_offset(ctx, id) as u64 + ours.data_offset(), t.offset);
            assert_eq!(sys::gguf_get_tensor_size(ctx, id) as u64, t.size, "{}", t.name);
        }
        sys::gguf_free(ctx);
    }
}

/// Every prefix of the base file, and every byte of it set to a few values: the reader may accept
/// or refuse each, but never panics, and what it accepts can be read in full.
#[test]
fn no_truncation_or_byte_patch_panics() {
    let base = base();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sweep.gguf");
    let mut variants: Vec<Vec<u8>> = (0..base.len()).map(|n| base[..n].to_vec()).collect();
    for i in 0..base.len() {
        for v in [0x00, 0x01, 0x7f, 0x80, 0xff, base[i].wrapping_add(1)] {
            let mut b = base.clone();
            b[i] = v;
            variants.push(b);
        }
    }
    let mut refused = 0;
    for (n, bytes) in variants.iter().enumerate() {
        std::fs::write(&path, bytes).expect("write");
        let outcome = catch_unwind(AssertUnwindSafe(|| match GgufFile::open(&path) {
            Ok(f) => f.tensors().iter().all(|t| f.tensor_data(t).len() as u64 == t.size),
            Err(e) => e.to_string().contains("sweep.gguf: "),
        }));
        assert!(matches!(outcome, Ok(true)), "variant {n} panicked or lost the file name");
        refused += usize::from(GgufFile::open(&path).is_err());
    }
    assert!(refused > base.len(), "only {refused} of {} variants refused", variants.len());
}

/// GLM-4.5's block count includes its multi-token-prediction block: the synthetic file (one
/// such block counted, none written) loads its 2 layers; a count that leaves no layer, and a
/// vision model's multimodal RoPE sections, are refused naming the file and the key.
#[test]
fn glm4moe_block_count_less_nextn_and_refused_metadata_name_the_key() {
    use moerun::model::Model;
    use moerun::synth::SynthConfig;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("glm.gguf");
    let cfg = SynthConfig { n_layer: 2, ..SynthConfig::small("glm4moe", GgmlType::Q8_0) };
    cfg.write(&path, &mut |_, _| {}).expect("synth");
    let m = Model::load(&path).expect("glm4moe loads");
    assert_eq!((m.hp.n_layer, m.layers.len()), (2, 2));
    assert_eq!(m.hp.n_rot, m.hp.head_dim / 2, "half of each head rotated");
    assert!(m.experts(0).is_none() && m.experts(1).is_some(), "layer 0 dense, layer 1 MoE");
    // The DeepSeek-style FFN of glm4moe, deepseek and ernie4_5-moe as the synthesizer writes it
    // (what tests/reference_models.rs holds to llama.cpp): a shared expert and, where the family
    // has one, the selection bias, on the MoE layer.
    for (arch, bias) in [("glm4moe", true), ("deepseek", false), ("ernie4_5-moe", true)] {
        let p = dir.path().join(format!("{arch}.gguf"));
        SynthConfig { n_layer: 2, ..SynthConfig::small(arch, GgmlType::Q8_0) }
            .write(&p, &mut |_, _| {})
            .expect("synth");
        let m = Model::load(&p).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let moe = matches!(&m.layers[1].ffn, moerun::model::Ffn::Moe { shared: Some(_), selection_bias, .. }
            if selection_bias.is_some() == bias);
        assert!(m.experts(0).is_none() && moe, "{arch}");
    }
    let cases = [
        ("glm4moe.nextn_predict_layers", Value::U32(3), "nextn_predict_layers"),
        ("glm4moe.rope.dimension_sections", Value::Array(vec![Value::I32(8), Value::I32(8)]), "dimension_sections"),
    ];
    for (key, value, named) in cases {
        let bad = common::with_metadata(&path, &dir.path().join("bad.gguf"), key, value);
        let err = Model::load(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("bad.gguf") && err.contains(named), "{key}: {err}");
    }
}
