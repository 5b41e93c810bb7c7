//! Round trips through the writers and the reader. Damaged files are in `tests/gguf_damaged.rs`.

use super::*;

fn every_value_kind() -> Vec<(String, Value)> {
    let kinds = vec![
        ("u8", Value::U8(200)),
        ("i8", Value::I8(-100)),
        ("u16", Value::U16(60_000)),
        ("i16", Value::I16(-30_000)),
        ("u32", Value::U32(4_000_000_000)),
        ("i32", Value::I32(-2_000_000_000)),
        ("f32", Value::F32(-1.5e-3)),
        ("bool", Value::Bool(true)),
        ("string", Value::String("héllo ✓ \0 world".into())),
        ("empty_string", Value::String(String::new())),
        ("u64", Value::U64(u64::MAX)),
        ("i64", Value::I64(i64::MIN)),
        ("f64", Value::F64(std::f64::consts::PI)),
        ("arr_u8", Value::Array(vec![Value::U8(1), Value::U8(2)])),
        ("arr_i8", Value::Array(vec![Value::I8(-1)])),
        ("arr_u16", Value::Array(vec![Value::U16(7); 3])),
        ("arr_i16", Value::Array(vec![Value::I16(-7); 3])),
        ("arr_u32", Value::Array(vec![Value::U32(9), Value::U32(10)])),
        ("arr_i32", Value::Array(vec![Value::I32(-9), Value::I32(10)])),
        ("arr_f32", Value::Array(vec![Value::F32(0.25), Value::F32(-8.0)])),
        ("arr_bool", Value::Array(vec![Value::Bool(false), Value::Bool(true)])),
        ("arr_string", Value::Array(vec![Value::String("a".into()), Value::String("bc".into())])),
        ("arr_u64", Value::Array(vec![Value::U64(1 << 40)])),
        ("arr_i64", Value::Array(vec![Value::I64(-(1 << 40))])),
        ("arr_f64", Value::Array(vec![Value::F64(1e300)])),
        // An empty array reads back as an empty array (its element type is not kept).
        ("arr_empty", Value::Array(vec![])),
        (
            "arr_nested",
            Value::Array(vec![
                Value::Array(vec![Value::U32(1), Value::U32(2)]),
                Value::Array(vec![Value::String("x".into())]),
                Value::Array(vec![]),
                Value::Array(vec![Value::Array(vec![Value::F64(0.5)])]),
            ]),
        ),
    ];
    kinds.into_iter().map(|(k, v)| (format!("test.{k}"), v)).collect()
}

/// A small tensor of `ty` (two blocks by three rows) filled with a recognisable pattern.
fn sample_tensor(i: usize, ty: GgmlType) -> (String, Vec<u64>, Vec<u8>) {
    let shape = vec![ty.block_size() * 2, 3];
    let size = ty.row_bytes(shape[0]).map_or(0, |r| r * 3) as usize;
    let data = (0..size).map(|j| (j * 7 + i) as u8).collect();
    (format!("t.{i}.{}", ty.name()), shape, data)
}

fn writer_with_everything() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("test".into()));
    for (k, v) in every_value_kind() {
        w.add_metadata(k, v);
    }
    for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
        let (name, shape, data) = sample_tensor(i, ty);
        w.add_tensor(name, ty, &shape, data).expect("valid tensor");
    }
    w
}

#[test]
fn round_trip_every_value_kind_and_every_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("all.gguf");
    writer_with_everything().write(&path).expect("write");

    let f = GgufFile::open(&path).expect("open");
    assert_eq!(f.path(), path);
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset() % 32, 0);
    assert_eq!(f.get_str("general.architecture").expect("str"), Some("test"));

    let expected = every_value_kind();
    assert_eq!(&f.metadata()[1..], &expected[..], "metadata in order, values exact");
    for (k, v) in &expected {
        assert_eq!(f.get(k), Some(v), "{k}");
    }

    assert_eq!(f.tensors().len(), GgmlType::ALL.len());
    let mut prev_end = f.data_offset();
    for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
        let (name, shape, data) = sample_tensor(i, ty);
        let t = f.tensor(&name).expect("tensor by name");
        assert_eq!(&f.tensors()[i], t, "table order");
        assert_eq!((t.ggml_type, &t.shape, t.size), (ty, &shape, data.len() as u64));
        assert_eq!(t.n_elements(), shape[0] * 3);
        assert_eq!(t.offset % 32, 0);
        assert!(t.offset >= prev_end, "packed in order");
        prev_end = t.offset + t.size;
        assert_eq!(f.tensor_data(t), &data[..], "{name} data");
    }
    assert!(prev_end <= f.bytes().len() as u64);
    assert!(f.tensor("missing").is_none());
    assert_eq!(std::fs::read(&path).expect("read"), writer_with_everything().to_bytes());
}

#[test]
fn typed_getters_convert_or_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("getters.gguf");
    let mut w = GgufWriter::new();
    w.add_metadata("n", Value::U32(8));
    w.add_metadata("neg", Value::I32(-1));
    w.add_metadata("eps", Value::F32(1e-5));
    w.add_metadata("flag", Value::Bool(true));
    w.add_metadata("name", Value::String("llama".into()));
    w.write(&path).expect("write");
    let f = GgufFile::open(&path).expect("open");

    assert_eq!(f.get_u64("n").expect("u64"), Some(8));
    assert_eq!(f.get_f32("n").expect("f32 from int"), Some(8.0));
    assert_eq!(f.get_f32("eps").expect("f32"), Some(1e-5));
    assert_eq!(f.get_bool("flag").expect("bool"), Some(true));
    assert_eq!(f.get_str("name").expect("str"), Some("llama"));
    assert_eq!(f.get_u64("absent").expect("absent is not an error"), None);

    let err = f.get_u64("neg").expect_err("negative").to_string();
    assert!(err.contains("getters.gguf") && err.contains("'neg'") && err.contains("i32 -1"), "{err}");
    let err = f.get_str("n").expect_err("not a string").to_string();
    assert!(err.contains("'n' should be a string, found u32 8"), "{err}");
    let err = f.get_bool("name").expect_err("not a bool");
    assert!(matches!(err, GgufError::Metadata { ref key, .. } if key == "name"), "{err}");
}

#[test]
fn stream_writer_matches_in_memory_writer_in_any_chunking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = writer_with_everything();
    w.set_alignment(64);
    let expected = w.to_bytes();

    let path = dir.path().join("stream.gguf");
    let mut metadata = vec![("general.architecture".to_string(), Value::String("test".into()))];
    metadata.extend(every_value_kind());
    metadata.push(("general.alignment".into(), Value::U32(64)));
    let tensors: Vec<_> = GgmlType::ALL.into_iter().enumerate().map(|(i, ty)| (sample_tensor(i, ty), ty)).collect();
    let descs: Vec<(&str, GgmlType, &[u64])> =
        tensors.iter().map(|((n, s, _), ty)| (n.as_str(), *ty, s.as_slice())).collect();
    let mut s = GgufStreamWriter::new(&path, &metadata, &descs).expect("stream header");
    for (i, ((_, _, data), _)) in tensors.iter().enumerate() {
        // Odd chunk sizes, so padding happens only after a tensor's last byte.
        for chunk in data.chunks(13 + i) {
            s.write_tensor_data(i, chunk).expect("chunk");
        }
    }
    s.finish().expect("finish");
    assert_eq!(std::fs::read(&path).expect("read"), expected);

    let f = GgufFile::open(&path).expect("open");
    assert_eq!(f.alignment(), 64);
    assert!(f.tensors().iter().all(|t| t.offset % 64 == 0));
}

#[test]
fn stream_writer_refuses_misuse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("misuse.gguf");
    let no_metadata: &[(&str, Value)] = &[];
    let descs = [("a", GgmlType::F32, vec![4u64]), ("b", GgmlType::F32, vec![2u64])];
    let mut s = GgufStreamWriter::new(&path, no_metadata, &descs).expect("header");
    let msg = |e: GgufError| e.to_string();
    assert!(msg(s.write_tensor_data(1, &[0; 8]).expect_err("b before a")).contains("'b' written before"));
    assert!(msg(s.write_tensor_data(0, &[0; 20]).expect_err("too long")).contains("16 bytes"));
    s.write_tensor_data(0, &[1; 16]).expect("a");
    assert!(msg(s.write_tensor_data(0, &[0; 1]).expect_err("a again")).contains("already complete"));
    assert!(msg(s.write_tensor_data(7, &[0; 1]).expect_err("no such")).contains("no tensor 7"));
    s.write_tensor_data(1, &[2; 4]).expect("half of b");
    let err = msg(s.finish().expect_err("b incomplete"));
    assert!(err.contains("misuse.gguf") && err.contains("'b' at 4 of 8 bytes"), "{err}");

    let dup = [("a", GgmlType::F32, vec![4u64]), ("a", GgmlType::F32, vec![4u64])];
    assert!(GgufStreamWriter::new(&path, no_metadata, &dup).is_err());
    let dup_keys = [("k", Value::U8(1)), ("k", Value::U8(2))];
    let no_tensors: &[(&str, GgmlType, &[u64])] = &[];
    assert!(GgufStreamWriter::new(&path, &dup_keys, no_tensors).is_err());
}

#[test]
fn writer_refuses_what_gguf_cannot_hold() {
    let mut w = GgufWriter::new();
    let err = w.add_tensor("x", GgmlType::Q8_0, &[32, 2], vec![0; 67]).expect_err("short");
    assert_eq!(err.to_string(), "cannot add tensor 'x': data is 67 bytes, q8_0 [32, 2] needs 68");
    let err = w.add_tensor("x", GgmlType::Q4_K, &[128], vec![]).expect_err("partial block");
    assert!(err.to_string().contains("not a multiple of the q4_K block size 256"), "{err}");
    assert!(w.add_tensor("x", GgmlType::F32, &[1, 1, 1, 1, 1], vec![0; 4]).is_err());
    w.add_tensor("x", GgmlType::Q8_0, &[32, 2], vec![0; 68]).expect("valid");
    let err = w.add_tensor("x", GgmlType::F32, &[1], vec![0; 4]).expect_err("dup");
    assert!(err.to_string().contains("'x': name already added"));

    let mixed = Value::Array(vec![Value::U8(1), Value::String("s".into())]);
    assert!(w.try_add_metadata("k", mixed).is_err());
    assert!(w.try_add_metadata("", Value::U8(1)).is_err());
    assert!(w.try_add_metadata("general.alignment", Value::U32(48)).is_err());
    assert!(w.try_add_metadata("general.alignment", Value::U64(64)).is_err());

    // Replacing a key keeps one entry in its first position.
    w.add_metadata("a", Value::U8(1));
    w.add_metadata("b", Value::U8(2));
    w.add_metadata("a", Value::U8(3));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replace.gguf");
    w.write(&path).expect("write");
    let f = GgufFile::open(&path).expect("open");
    let keys: Vec<_> = f.metadata().iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    assert_eq!(keys, vec![("a", Value::U8(3)), ("b", Value::U8(2))]);
}

#[test]
fn reads_version_2_and_files_without_tensors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = GgufWriter::new();
    w.add_metadata("general.name", Value::String("v2".into()));
    w.add_tensor("t", GgmlType::F16, &[8], vec![1; 16]).expect("tensor");
    let mut bytes = w.to_bytes();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let path = dir.path().join("v2.gguf");
    std::fs::write(&path, &bytes).expect("write");
    let f = GgufFile::open(&path).expect("v2 opens");
    assert_eq!(f.version(), 2);
    assert_eq!(f.tensor_data(&f.tensors()[0]), &[1; 16]);

    let empty = dir.path().join("empty.gguf");
    GgufWriter::new().write(&empty).expect("write");
    let f = GgufFile::open(&empty).expect("no tensors, no metadata");
    assert!(f.metadata().is_empty() && f.tensors().is_empty());
    assert_eq!(f.data_offset(), 24);
}

#[test]
fn from_bytes_reads_as_open_does_and_names_the_path_in_errors() {
    let bytes = writer_with_everything().to_bytes();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("all.gguf");
    std::fs::write(&path, &bytes).expect("write");
    let (a, b) = (GgufFile::open(&path).expect("open"), GgufFile::from_bytes("mem.gguf", &bytes).expect("from_bytes"));
    assert_eq!(a.metadata(), b.metadata());
    assert_eq!(a.tensors(), b.tensors());
    assert_eq!(a.bytes(), b.bytes());
    for t in b.tensors() {
        assert_eq!(a.tensor_data(t), b.tensor_data(t));
    }
    let err = GgufFile::from_bytes("mem.gguf", &bytes[..bytes.len() / 2]).expect_err("truncated");
    assert!(err.to_string().contains("mem.gguf"), "{err}");
    assert!(GgufFile::from_bytes("empty.gguf", &[]).is_err());
}

#[test]
fn check_unchanged_names_a_cut_grown_or_rewritten_file_and_passes_the_same_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("watched.gguf");
    writer_with_everything().write(&path).expect("write");
    let bytes = std::fs::read(&path).expect("read");
    let f = GgufFile::open(&path).expect("open");
    f.check_unchanged().expect("unchanged");
    let set = |b: &[u8]| std::fs::write(&path, b).expect("write");
    let mut grown = bytes.clone();
    grown.extend_from_slice(&[0; 4096]);
    set(&grown);
    let err = f.check_unchanged().expect_err("grown").to_string();
    assert!(err.contains("watched.gguf") && err.contains("bytes now"), "{err}");
    // The same bytes back (a new modification time): unchanged.
    set(&bytes);
    std::thread::sleep(std::time::Duration::from_millis(10));
    set(&bytes);
    f.check_unchanged().expect("the same bytes");
    // A metadata byte changed in place: other contents.
    let mut other = bytes.clone();
    other[40] ^= 0xff;
    std::thread::sleep(std::time::Duration::from_millis(10));
    set(&other);
    let err = f.check_unchanged().expect_err("rewritten").to_string();
    assert!(err.contains("other contents"), "{err}");
    set(&bytes);
    f.check_unchanged().expect("put back");
    // Files read from memory have nothing on disk to compare.
    let mem = GgufFile::from_bytes("mem.gguf", &bytes).expect("from bytes");
    mem.check_unchanged().expect("in memory");
}
