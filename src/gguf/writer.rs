//! Writes GGUF v3 files in llama.cpp's layout: header, tensor table, then each tensor's data in
//! table order, each padded to the alignment. Writers only produce files the reader accepts.

use std::collections::HashSet;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::reader::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT};
use super::types::tensor_size;
use super::value::ValueType;
use super::{GgmlType, GgufError, Value};

/// The GGUF version both writers produce.
const VERSION: u32 = 3;

/// Builds a GGUF file in memory, then writes it out whole. For files too big to hold in memory
/// use [`GgufStreamWriter`].
#[derive(Debug, Clone, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(Desc, Vec<u8>)>,
}

/// A tensor as the header describes it.
#[derive(Debug, Clone)]
struct Desc {
    name: String,
    ty: GgmlType,
    shape: Vec<u64>,
    size: u64,
}

impl GgufWriter {
    /// An empty version-3 file with the default alignment (32).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the data alignment, stored as the `general.alignment` key (which is also how the
    /// writer reads it back when laying out the data).
    ///
    /// # Panics
    /// If `a` is not a power of two that fits a `u32` (GGUF stores it as one).
    pub fn set_alignment(&mut self, a: u64) {
        let a = u32::try_from(a).ok().filter(|a| a.is_power_of_two());
        let Some(a) = a else { panic!("GGUF alignment must be a power of two below 2^32") };
        self.add_metadata(ALIGNMENT_KEY, Value::U32(a));
    }

    /// Adds a key, or replaces its value if the key is already there (keeping its position).
    ///
    /// # Panics
    /// If GGUF cannot encode the pair (see [`Self::try_add_metadata`]); these are programming
    /// errors in the caller, never properties of an input file.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: Value) {
        if let Err(e) = self.try_add_metadata(key, value) {
            panic!("{e}");
        }
    }

    /// Like [`Self::add_metadata`], but returns an error for an empty key, an array mixing
    /// element kinds or nested too deep, or a `general.alignment` that is not a power-of-two u32.
    pub fn try_add_metadata(&mut self, key: impl Into<String>, value: Value) -> Result<(), GgufError> {
        let key = key.into();
        check_metadata(&key, &value)?;
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        Ok(())
    }

    /// Appends a tensor. Fails if the name is taken, the shape is invalid for the type, or
    /// `data` is not exactly the tensor's byte size.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        shape: &[u64],
        data: Vec<u8>,
    ) -> Result<(), GgufError> {
        let name = name.into();
        if self.tensors.iter().any(|(d, _)| d.name == name) {
            return Err(GgufError::InvalidTensor { tensor: name, reason: "name already added".into() });
        }
        let desc = describe_tensor(name, ty, shape)?;
        if data.len() as u64 != desc.size {
            return Err(GgufError::InvalidTensor {
                reason: format!("data is {} bytes, {} {:?} needs {}", data.len(), ty.name(), shape, desc.size),
                tensor: desc.name,
            });
        }
        self.tensors.push((desc, data));
        Ok(())
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = self.write_into(&mut out) {
            // `Write for Vec<u8>` never returns an error.
            unreachable!("writing to a Vec failed: {e}");
        }
        out
    }

    /// Writes the file to `path`, replacing it atomically (a crash or a full disk leaves the
    /// old file, never half a new one).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io { path: path.into(), source };
        let mut out = BufWriter::new(crate::atomic::Staged::new(path).map_err(io)?);
        self.write_into(&mut out).map_err(io)?;
        out.into_inner().map_err(|e| io(e.into_error()))?.commit(path).map_err(io)
    }

    fn write_into(&self, out: &mut impl Write) -> io::Result<()> {
        let alignment = alignment_of(&self.metadata);
        let descs: Vec<&Desc> = self.tensors.iter().map(|(d, _)| d).collect();
        write_header(out, &self.metadata, &descs, alignment)?;
        for (desc, data) in &self.tensors {
            out.write_all(data)?;
            write_padding(out, desc.size, alignment)?;
        }
        Ok(())
    }
}

/// Streams a GGUF file to disk: the header and tensor table first, then each tensor's data in
/// table order, in as many chunks as the caller likes. Memory use is independent of file size.
///
/// Dropping the writer without [`Self::finish`] leaves an incomplete file behind.
#[derive(Debug)]
pub struct GgufStreamWriter {
    path: PathBuf,
    /// A temporary file beside `path`, renamed over it by `finish`.
    out: BufWriter<crate::atomic::Staged>,
    tensors: Vec<Desc>,
    alignment: u64,
    /// Index of the tensor being filled (== tensors.len() once all are complete).
    current: usize,
    /// Bytes of `tensors[current]` written so far.
    filled: u64,
}

impl GgufStreamWriter {
    /// Creates `path` and writes the header and tensor table. Metadata keys must be unique and
    /// encodable; tensor descriptors are `(name, type, shape)` in the order their data will come.
    pub fn new<K, N, S>(
        path: impl AsRef<Path>,
        metadata: &[(K, Value)],
        tensors: &[(N, GgmlType, S)],
    ) -> Result<Self, GgufError>
    where
        K: AsRef<str>,
        N: AsRef<str>,
        S: AsRef<[u64]>,
    {
        let path = path.as_ref().to_path_buf();
        let mut keys = HashSet::new();
        let mut owned_metadata = Vec::with_capacity(metadata.len());
        for (key, value) in metadata {
            let key = key.as_ref();
            check_metadata(key, value)?;
            if !keys.insert(key) {
                return Err(GgufError::InvalidMetadata { key: key.into(), reason: "key given twice".into() });
            }
            owned_metadata.push((key.to_string(), value.clone()));
        }
        let mut names = HashSet::new();
        let mut descs = Vec::with_capacity(tensors.len());
        for (name, ty, shape) in tensors {
            let name = name.as_ref();
            if !names.insert(name) {
                return Err(GgufError::InvalidTensor { tensor: name.into(), reason: "name given twice".into() });
            }
            descs.push(describe_tensor(name.to_string(), *ty, shape.as_ref())?);
        }
        let alignment = alignment_of(&owned_metadata);
        let io = |source| GgufError::Io { path: path.clone(), source };
        let mut out = BufWriter::with_capacity(1 << 20, crate::atomic::Staged::new(&path).map_err(io)?);
        let desc_refs: Vec<&Desc> = descs.iter().collect();
        write_header(&mut out, &owned_metadata, &desc_refs, alignment).map_err(io)?;
        Ok(GgufStreamWriter { path, out, tensors: descs, alignment, current: 0, filled: 0 })
    }

    /// Appends `data` to tensor `index`. Tensors are filled in table order: `index` must be the
    /// first tensor not yet complete, and its total must come out exactly at its byte size.
    pub fn write_tensor_data(&mut self, index: usize, data: &[u8]) -> Result<(), GgufError> {
        let Some(desc) = self.tensors.get(self.current) else {
            return Err(self.misuse(format!("all {} tensors are already written", self.tensors.len())));
        };
        if index != self.current {
            let reason = match self.tensors.get(index) {
                None => format!("no tensor {index} (the table has {})", self.tensors.len()),
                Some(t) if index < self.current => {
                    format!("tensor '{}' is already complete", t.name)
                }
                Some(t) => format!(
                    "tensor '{}' written before tensor '{}' is complete ({} of {} bytes)",
                    t.name, desc.name, self.filled, desc.size
                ),
            };
            return Err(self.misuse(reason));
        }
        let size = desc.size;
        if self.filled + data.len() as u64 > size {
            let reason =
                format!("tensor '{}' is {} bytes, but {} were given", desc.name, size, self.filled + data.len() as u64);
            return Err(self.misuse(reason));
        }
        let io = |source| GgufError::Io { path: self.path.clone(), source };
        self.out.write_all(data).map_err(io)?;
        self.filled += data.len() as u64;
        if self.filled == size {
            write_padding(&mut self.out, size, self.alignment).map_err(io)?;
            self.current += 1;
            self.filled = 0;
        }
        Ok(())
    }

    /// Checks every tensor was written in full, then syncs the file and renames it into place
    /// (until then `path` is untouched; a writer dropped unfinished leaves nothing behind).
    pub fn finish(self) -> Result<(), GgufError> {
        if let Some(desc) = self.tensors.get(self.current) {
            let reason = format!("finished with tensor '{}' at {} of {} bytes", desc.name, self.filled, desc.size);
            return Err(self.misuse(reason));
        }
        let path = self.path;
        let io = |source| GgufError::Io { path: path.clone(), source };
        self.out.into_inner().map_err(|e| io(e.into_error()))?.commit(&path).map_err(io)
    }

    fn misuse(&self, reason: String) -> GgufError {
        GgufError::StreamOrder { path: self.path.clone(), reason }
    }
}

/// Why GGUF cannot store this pair, if it cannot.
fn check_metadata(key: &str, value: &Value) -> Result<(), GgufError> {
    let invalid = |reason: String| GgufError::InvalidMetadata { key: key.into(), reason };
    if key.is_empty() {
        return Err(invalid("the key is empty".into()));
    }
    value.check_encodable().map_err(invalid)?;
    if key == ALIGNMENT_KEY && !matches!(value, Value::U32(a) if a.is_power_of_two()) {
        return Err(invalid(format!("must be a power-of-two u32, not {value:?}")));
    }
    Ok(())
}

fn describe_tensor(name: String, ty: GgmlType, shape: &[u64]) -> Result<Desc, GgufError> {
    match tensor_size(ty, shape) {
        Ok(size) => Ok(Desc { name, ty, shape: shape.to_vec(), size }),
        Err(reason) => Err(GgufError::InvalidTensor { tensor: name, reason }),
    }
}

/// The alignment the metadata asks for (checked by `check_metadata` when it was added).
fn alignment_of(metadata: &[(String, Value)]) -> u64 {
    match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        Some((_, Value::U32(a))) => u64::from(*a),
        _ => DEFAULT_ALIGNMENT,
    }
}

/// Zeros from `written` up to the next multiple of `alignment`.
fn write_padding(out: &mut impl Write, written: u64, alignment: u64) -> io::Result<()> {
    const ZEROS: [u8; 256] = [0; 256];
    let mut pad = written.next_multiple_of(alignment) - written;
    while pad > 0 {
        let n = pad.min(ZEROS.len() as u64);
        out.write_all(&ZEROS[..n as usize])?;
        pad -= n;
    }
    Ok(())
}

/// Magic, version, counts, metadata, tensor table and the padding up to the data section.
/// Tensor offsets are laid out back to back, each padded to `alignment`.
fn write_header(
    out: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[&Desc],
    alignment: u64,
) -> io::Result<()> {
    let mut w = Counting { out, written: 0 };
    w.put(b"GGUF")?;
    w.put(&VERSION.to_le_bytes())?;
    w.put(&(tensors.len() as u64).to_le_bytes())?;
    w.put(&(metadata.len() as u64).to_le_bytes())?;
    for (key, value) in metadata {
        w.string(key)?;
        w.put(&(value.value_type() as u32).to_le_bytes())?;
        w.payload(value)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        w.string(&t.name)?;
        w.put(&(t.shape.len() as u32).to_le_bytes())?;
        for d in &t.shape {
            w.put(&d.to_le_bytes())?;
        }
        w.put(&(t.ty as u32).to_le_bytes())?;
        w.put(&offset.to_le_bytes())?;
        offset += t.size.next_multiple_of(alignment);
    }
    let written = w.written;
    write_padding(out, written, alignment)
}

/// A writer that counts bytes, for the header's final padding.
struct Counting<'a, W: Write> {
    out: &'a mut W,
    written: u64,
}

impl<W: Write> Counting<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.written += bytes.len() as u64;
        self.out.write_all(bytes)
    }

    fn string(&mut self, s: &str) -> io::Result<()> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s.as_bytes())
    }

    /// A value without its type tag. An empty array is written with element type u8: the
    /// `Value` model keeps no element type for it.
    fn payload(&mut self, value: &Value) -> io::Result<()> {
        match value {
            Value::U8(v) => self.put(&v.to_le_bytes()),
            Value::I8(v) => self.put(&v.to_le_bytes()),
            Value::U16(v) => self.put(&v.to_le_bytes()),
            Value::I16(v) => self.put(&v.to_le_bytes()),
            Value::U32(v) => self.put(&v.to_le_bytes()),
            Value::I32(v) => self.put(&v.to_le_bytes()),
            Value::F32(v) => self.put(&v.to_le_bytes()),
            Value::Bool(v) => self.put(&[u8::from(*v)]),
            Value::String(s) => self.string(s),
            Value::U64(v) => self.put(&v.to_le_bytes()),
            Value::I64(v) => self.put(&v.to_le_bytes()),
            Value::F64(v) => self.put(&v.to_le_bytes()),
            Value::Array(items) => {
                let elem = items.first().map_or(ValueType::U8, Value::value_type);
                self.put(&(elem as u32).to_le_bytes())?;
                self.put(&(items.len() as u64).to_le_bytes())?;
                items.iter().try_for_each(|v| self.payload(v))
            }
        }
    }
}
