//! Parses and validates a GGUF file over an mmap. After `open` succeeds every tensor's bytes lie
//! inside the mapping, aligned and disjoint, so tensor access is infallible and zero-copy.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::types::{tensor_size, MAX_DIMS};
use super::value::{ValueType, MAX_ARRAY_DEPTH};
use super::{GgmlType, GgufError, Value};

/// The metadata key that sets the data alignment.
pub(crate) const ALIGNMENT_KEY: &str = "general.alignment";
/// Alignment used when a file has no `general.alignment`.
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub ggml_type: GgmlType,
    /// ggml order: `shape[0]` (ne0) varies fastest, as GGUF stores it.
    pub shape: Vec<u64>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Byte length of the data, computed from type and shape.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements (1 for a tensor with no dimensions).
    pub fn n_elements(&self) -> u64 {
        // The reader and writer reject shapes whose product overflows, so this cannot wrap for
        // tables they produced; saturate for hand-built values.
        self.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).unwrap_or(u64::MAX)
    }
}

/// An open, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    header: Header,
    /// The open file and what it was when mapped (`None` for [`GgufFile::from_bytes`]).
    origin: Option<Origin>,
}

/// What [`GgufFile::check_unchanged`] compares the file with.
struct Origin {
    file: File,
    /// The modification time last seen with the loaded contents.
    mtime: std::sync::Mutex<Option<std::time::SystemTime>>,
    digest: u64,
    /// This mapping's entry in the SIGBUS reporter.
    sigbus: Option<usize>,
}

impl Drop for GgufFile {
    fn drop(&mut self) {
        if let Some(i) = self.origin.as_ref().and_then(|o| o.sigbus) {
            super::sigbus::unregister(i);
        }
    }
}

/// Bytes of the header hashed by [`digest`] (at most), and the samples of tensor data.
const DIGEST_HEADER: u64 = 16 << 20;
const DIGEST_SAMPLES: u64 = 64;
const DIGEST_SAMPLE: u64 = 4096;

/// A hash of a GGUF file's header and of 64 pages spread evenly over its tensor data, read
/// through `read(offset, buf)`: changes when the file is rewritten with other contents.
fn digest(
    len: u64,
    data_offset: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; data_offset.min(DIGEST_HEADER).min(len) as usize];
    read(0, &mut buf)?;
    h.write(&buf);
    let data = len.saturating_sub(data_offset);
    if data > 0 {
        let step = (data / DIGEST_SAMPLES).max(1);
        let mut at = data_offset;
        let mut page = [0u8; DIGEST_SAMPLE as usize];
        while at < len {
            let n = DIGEST_SAMPLE.min(len - at) as usize;
            read(at, &mut page[..n])?;
            h.write(&page[..n]);
            at += step;
        }
    }
    h.write_u64(len);
    Ok(h.finish())
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Metadata can hold hundreds of thousands of vocabulary strings: show only the counts.
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("n_metadata", &self.header.metadata.len())
            .field("n_tensors", &self.header.tensors.len())
            .field("alignment", &self.header.alignment)
            .field("data_offset", &self.header.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Maps the file, parses its header and tensor table and validates them (see the module docs
    /// of [`super`] for the checks).
    ///
    /// The file must not be modified or truncated while the returned value is alive: the tensor
    /// data is read straight from the mapping.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io { path: path.clone(), source };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the mapping is read-only and private to this value. Its soundness rests on the
        // file not being changed by anyone while mapped, which `open` documents as the caller's
        // promise (the same contract as every mmap-based model loader); a change is caught
        // between requests (`check_unchanged`) and a cut under a read is reported (`sigbus`).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = parse(&path, &mmap)?;
        let len = mmap.len() as u64;
        let mtime = file.metadata().and_then(|m| m.modified()).ok();
        let digest = digest(len, header.data_offset, |at, buf| {
            buf.copy_from_slice(&mmap[at as usize..at as usize + buf.len()]);
            Ok(())
        })
        .map_err(io)?;
        let sigbus = super::sigbus::register(mmap.as_ptr() as usize, mmap.len(), &path);
        let origin = Origin { file, mtime: std::sync::Mutex::new(mtime), digest, sigbus };
        Ok(GgufFile { path, mmap, header, origin: Some(origin) })
    }

    /// Checks that the file on disk still holds what was loaded: an error naming the file when
    /// it was truncated, grown or rewritten in place since (it is compared through the open
    /// file, so a file replaced by a rename, whose old contents the mapping keeps, is unchanged).
    /// A file rewritten with the same contents (a new modification time, the same size and
    /// digest) passes. One `fstat` when nothing changed.
    pub fn check_unchanged(&self) -> Result<(), GgufError> {
        use std::os::unix::fs::FileExt;
        let Some(o) = &self.origin else { return Ok(()) };
        let io = |source| GgufError::Io { path: self.path.clone(), source };
        let meta = o.file.metadata().map_err(io)?;
        let changed = |what: String| GgufError::Changed { path: self.path.clone(), what };
        // The mapping is as long as the file was when loaded.
        let len = self.mmap.len() as u64;
        if meta.len() != len {
            return Err(changed(format!("it is {} bytes now, {len} when loaded", meta.len())));
        }
        let mtime = meta.modified().ok();
        let mut seen = o.mtime.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == mtime {
            return Ok(());
        }
        // Read through the file, not the mapping: a file cut meanwhile must not fault.
        let now = digest(len, self.header.data_offset, |at, buf| o.file.read_exact_at(buf, at)).map_err(io)?;
        if now != o.digest {
            return Err(changed("it was rewritten with other contents".into()));
        }
        *seen = mtime;
        Ok(())
    }

    /// As [`GgufFile::open`], for a file's bytes held in memory (`path` names it in errors): the
    /// bytes are parsed and validated as `open` does, then copied into a private read-only
    /// anonymous mapping, so every invariant of an opened file holds. For tests and fuzzing.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: &[u8]) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let header = parse(&path, bytes)?;
        let io = |source| GgufError::Io { path: path.clone(), source };
        // A valid file holds at least its magic and version: the length is never zero.
        let mut map = memmap2::MmapOptions::new().len(bytes.len()).map_anon().map_err(io)?;
        map.copy_from_slice(bytes);
        let mmap = map.make_read_only().map_err(io)?;
        Ok(GgufFile { path, mmap, header, origin: None })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.header.version
    }

    pub fn alignment(&self) -> u64 {
        self.header.alignment
    }

    /// Absolute start of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.header.data_offset
    }

    /// All key/value pairs in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.header.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.header.key_index.get(key).map(|&i| &self.header.metadata[i].1)
    }

    /// A non-negative integer of any width; `Ok(None)` if the key is absent.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get_typed(key, "a non-negative integer", Value::as_u64)
    }

    /// A float or integer; `Ok(None)` if the key is absent.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        self.get_typed(key, "a number", Value::as_f32)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.get_typed(key, "a bool", Value::as_bool)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.get_typed(key, "a string", Value::as_str)
    }

    fn get_typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        convert: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, GgufError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        match convert(value) {
            Some(v) => Ok(Some(v)),
            None => Err(GgufError::Metadata {
                path: self.path.clone(),
                key: key.to_string(),
                expected,
                found: describe(value),
            }),
        }
    }

    /// The tensor table in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensor_index.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The tensor's bytes, straight from the mapping.
    ///
    /// # Panics
    /// If `t` does not describe a range of this file (it came from another file): `open` has
    /// checked every tensor of this file's own table.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = t.offset as usize;
        let end = t.offset.saturating_add(t.size) as usize;
        &self.mmap[start..end]
    }

    /// The whole mapping.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// Hint that `len` bytes from `offset` will be read soon: the kernel starts reading them
    /// ahead. Out-of-range requests and refusals are ignored (it is only a hint).
    pub fn will_need(&self, offset: u64, len: u64) {
        if let Some((o, l)) = self.range(offset, len) {
            let _ = self.mmap.advise_range(memmap2::Advice::WillNeed, o, l);
        }
    }

    /// Drop the pages of `len` bytes from `offset` from this process's memory (after copying
    /// them out): they stay in the page cache while the kernel likes, and a later read faults
    /// them in again from the file with the same bytes.
    pub fn release(&self, offset: u64, len: u64) {
        if let Some((o, l)) = self.range(offset, len) {
            // SAFETY: the mapping is a read-only shared file mapping: MADV_DONTNEED only unmaps
            // its pages, and any later access re-reads the unchanged file, so every `&[u8]`
            // handed out keeps its contents.
            let _ = unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, o, l) };
        }
    }

    fn range(&self, offset: u64, len: u64) -> Option<(usize, usize)> {
        let end = offset.checked_add(len)?;
        (end <= self.mmap.len() as u64 && len > 0).then_some((offset as usize, len as usize))
    }
}

/// A value's kind, plus the value itself when it is short, for error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() > 32 => {
            format!("string {:?}...", s.chars().take(32).collect::<String>())
        }
        Value::String(s) => format!("string {s:?}"),
        Value::Array(a) => format!("an array of {} values", a.len()),
        Value::Bool(b) => format!("bool {b}"),
        Value::F32(x) => format!("f32 {x}"),
        Value::F64(x) => format!("f64 {x}"),
        Value::U64(u) => format!("u64 {u}"),
        // Every kind left is an integer that fits an i64.
        other => format!("{} {}", other.type_name(), other.as_i64().unwrap_or_default()),
    }
}

/// Everything `parse` learns from the header.
struct Header {
    version: u32,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

/// Fewest bytes one tensor-table entry takes: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_LEN: u64 = 8 + 4 + 4 + 8;
/// Fewest bytes one key/value pair takes: key length, type, a one-byte value.
const MIN_KV_LEN: u64 = 8 + 4 + 1;

fn parse(path: &Path, bytes: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor { path, bytes, pos: 0 };

    let magic = c.take(4, || "the magic number".into())?;
    if magic != b"GGUF" {
        let mut found = [0u8; 4];
        found.copy_from_slice(magic);
        return Err(GgufError::BadMagic { path: path.into(), found });
    }
    let version = c.u32(|| "the version".into())?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion { path: path.into(), version });
    }
    let n_tensors = c.u64(|| "the tensor count".into())?;
    let n_kv = c.u64(|| "the metadata count".into())?;
    c.check_count(n_kv, MIN_KV_LEN, || "the metadata count".into())?;
    c.check_count(n_tensors, MIN_TENSOR_INFO_LEN, || "the tensor count".into())?;

    // Both counts are now bounded by the file length, so these allocations are too.
    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut key_index = HashMap::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = c.string(|| format!("metadata key {i}"))?;
        if key.is_empty() {
            return Err(GgufError::EmptyKey { path: path.into(), index: i });
        }
        if key_index.contains_key(&key) {
            return Err(GgufError::DuplicateKey { path: path.into(), key });
        }
        let ty = c.value_type(&key)?;
        let value = c.value(ty, &key, 0)?;
        key_index.insert(key.clone(), metadata.len());
        metadata.push((key, value));
    }

    let alignment = match key_index.get(ALIGNMENT_KEY).map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(Value::U32(a)) => return Err(GgufError::BadAlignment { path: path.into(), value: u64::from(*a) }),
        Some(other) => {
            return Err(GgufError::Metadata {
                path: path.into(),
                key: ALIGNMENT_KEY.into(),
                expected: "u32",
                found: describe(other),
            })
        }
    };

    // The table first; offsets are checked once the data section's start is known.
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
    let mut rel_offsets = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(|| format!("tensor {i} name"))?;
        if tensor_index.contains_key(&name) {
            return Err(GgufError::DuplicateTensor { path: path.into(), tensor: name });
        }
        let n_dims = c.u32(|| format!("tensor '{name}' n_dims"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::BadShape {
                path: path.into(),
                tensor: name,
                reason: format!("{n_dims} dimensions, at most {MAX_DIMS} allowed"),
            });
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            shape.push(c.u64(|| format!("tensor '{name}' dimension {d}"))?);
        }
        let ty = c.u32(|| format!("tensor '{name}' type"))?;
        let Some(ggml_type) = GgmlType::from_u32(ty) else {
            return Err(GgufError::UnknownGgmlType { path: path.into(), tensor: name, ty });
        };
        let size = tensor_size(ggml_type, &shape).map_err(|reason| GgufError::BadShape {
            path: path.into(),
            tensor: name.clone(),
            reason,
        })?;
        rel_offsets.push(c.u64(|| format!("tensor '{name}' offset"))?);
        tensor_index.insert(name.clone(), tensors.len());
        tensors.push(TensorInfo { name, ggml_type, shape, offset: 0, size });
    }

    // Like llama.cpp, pad the header only when there is a data section.
    let header_end = c.pos as u64;
    let data_offset = if tensors.is_empty() { header_end } else { align_up(header_end, alignment) };
    let file_len = bytes.len() as u64;
    for (t, rel) in tensors.iter_mut().zip(rel_offsets) {
        if !rel.is_multiple_of(alignment) {
            return Err(GgufError::Misaligned { path: path.into(), tensor: t.name.clone(), offset: rel, alignment });
        }
        t.offset = data_offset.saturating_add(rel);
        if t.offset.checked_add(t.size).is_none_or(|end| end > file_len) {
            return Err(GgufError::TensorOutOfBounds {
                path: path.into(),
                tensor: t.name.clone(),
                offset: t.offset,
                size: t.size,
                file_len,
            });
        }
    }
    check_disjoint(path, &tensors)?;

    Ok(Header { version, metadata, key_index, tensors, tensor_index, alignment, data_offset })
}

/// `x` rounded up to a multiple of the power of two `a`, saturating at the top of `u64`.
fn align_up(x: u64, a: u64) -> u64 {
    x.checked_next_multiple_of(a).unwrap_or(u64::MAX)
}

/// Fails on the first pair of tensors whose byte ranges share a byte. Sizes are never zero
/// (zero dimensions are rejected), so every range is non-empty.
fn check_disjoint(path: &Path, tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    // The tensor reaching furthest so far; a later start before its end overlaps it.
    let mut furthest: Option<&TensorInfo> = None;
    for t in by_offset {
        if let Some(f) = furthest {
            if t.offset < f.offset + f.size {
                return Err(GgufError::OverlappingTensors { path: path.into(), a: f.name.clone(), b: t.name.clone() });
            }
        }
        if furthest.is_none_or(|f| t.offset + t.size > f.offset + f.size) {
            furthest = Some(t);
        }
    }
    Ok(())
}

/// A bounds-checked little-endian reader over the mapped bytes. Every failed read names the
/// field it was reading; the `what` closures run only on failure.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated { path: self.path.into(), what: what(), offset: self.pos as u64 });
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Fails unless `count` items of at least `min_len` bytes each fit in the rest of the file.
    fn check_count(&self, count: u64, min_len: u64, what: impl FnOnce() -> String) -> Result<(), GgufError> {
        if count.checked_mul(min_len).is_none_or(|n| n > self.remaining()) {
            return Err(GgufError::CountTooLarge { path: self.path.into(), what: what(), count });
        }
        Ok(())
    }

    fn string(&mut self, what: impl Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(|| format!("{} length", what()))?;
        if len > self.remaining() {
            return Err(GgufError::StringTooLong { path: self.path.into(), what: what(), len });
        }
        let raw = self.take(len, &what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| GgufError::BadUtf8 { path: self.path.into(), what: what() })
    }

    fn value_type(&mut self, key: &str) -> Result<ValueType, GgufError> {
        let ty = self.u32(|| format!("metadata key '{key}' type"))?;
        ValueType::from_u32(ty).ok_or_else(|| GgufError::UnknownValueType {
            path: self.path.into(),
            key: key.into(),
            ty,
        })
    }

    /// One value of type `ty`; `depth` counts the arrays already around it.
    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value, GgufError> {
        let what = || format!("metadata key '{key}' value");
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            // Like llama.cpp, any nonzero byte is true.
            ValueType::Bool => Value::Bool(u8::from_le_bytes(self.array(what)?) != 0),
            ValueType::String => Value::String(self.string(what)?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Array => {
                if depth + 1 > MAX_ARRAY_DEPTH {
                    return Err(GgufError::ArrayTooDeep { path: self.path.into(), key: key.into(), depth: depth + 1 });
                }
                let elem = self.value_type(key)?;
                let len_what = || format!("metadata key '{key}' array length");
                let n = self.u64(len_what)?;
                self.check_count(n, elem.min_encoded_len(), len_what)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
        })
    }
}
