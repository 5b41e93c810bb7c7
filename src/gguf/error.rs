//! The errors of the `gguf` room. Reader errors name the file and the field, key or tensor at
//! fault; writer errors name the key or tensor the caller passed.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing a GGUF file.
///
/// Offsets are absolute byte positions in the file unless a variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{}: not a GGUF file (magic \"{}\", expected \"GGUF\")",
        .path.display(),
        .found.escape_ascii()
    )]
    BadMagic { path: PathBuf, found: [u8; 4] },

    #[error(
        "{}: GGUF version {version} is not supported (only 2 and 3{})",
        .path.display(),
        if .version & 0xFFFF == 0 { "; this looks like a big-endian file" } else { "" }
    )]
    UnsupportedVersion { path: PathBuf, version: u32 },

    #[error(
        "{}: the file changed on disk since it was loaded ({what}); put the loaded file back, or \
         restart moerun to load the new one",
        .path.display()
    )]
    Changed { path: PathBuf, what: String },

    #[error("{}: file ends inside {what} (at byte {offset})", .path.display())]
    Truncated { path: PathBuf, what: String, offset: u64 },

    #[error("{}: {what} is {count}, more than the file could hold", .path.display())]
    CountTooLarge { path: PathBuf, what: String, count: u64 },

    #[error("{}: {what} is {len} bytes long, past the end of the file", .path.display())]
    StringTooLong { path: PathBuf, what: String, len: u64 },

    #[error("{}: {what} is not valid UTF-8", .path.display())]
    BadUtf8 { path: PathBuf, what: String },

    #[error("{}: metadata key {index} is empty", .path.display())]
    EmptyKey { path: PathBuf, index: u64 },

    #[error("{}: metadata key '{key}' has unknown value type {ty}", .path.display())]
    UnknownValueType { path: PathBuf, key: String, ty: u32 },

    #[error(
        "{}: metadata key '{key}' nests arrays {depth} deep (at most {max} allowed)",
        .path.display(),
        max = super::value::MAX_ARRAY_DEPTH
    )]
    ArrayTooDeep { path: PathBuf, key: String, depth: usize },

    #[error("{}: tensor '{tensor}' has unknown ggml type {ty}", .path.display())]
    UnknownGgmlType { path: PathBuf, tensor: String, ty: u32 },

    #[error("{}: tensor '{tensor}' has a bad shape: {reason}", .path.display())]
    BadShape { path: PathBuf, tensor: String, reason: String },

    #[error(
        "{}: tensor '{tensor}' ends at byte {end}, past the end of the file ({file_len} bytes)",
        .path.display(),
        end = u128::from(*.offset) + u128::from(*.size)
    )]
    TensorOutOfBounds { path: PathBuf, tensor: String, offset: u64, size: u64, file_len: u64 },

    #[error("{}: tensors '{a}' and '{b}' overlap", .path.display())]
    OverlappingTensors { path: PathBuf, a: String, b: String },

    #[error(
        "{}: tensor '{tensor}' has data offset {offset}, not a multiple of the alignment {alignment}",
        .path.display()
    )]
    Misaligned { path: PathBuf, tensor: String, offset: u64, alignment: u64 },

    #[error("{}: tensor '{tensor}' appears twice", .path.display())]
    DuplicateTensor { path: PathBuf, tensor: String },

    #[error("{}: metadata key '{key}' appears twice", .path.display())]
    DuplicateKey { path: PathBuf, key: String },

    #[error("{}: general.alignment is {value}, not a nonzero power of two", .path.display())]
    BadAlignment { path: PathBuf, value: u64 },

    #[error("{}: metadata key '{key}' should be {expected}, found {found}", .path.display())]
    Metadata { path: PathBuf, key: String, expected: &'static str, found: String },

    /// The writer was given a tensor it cannot store (no file exists yet, so no path).
    #[error("cannot add tensor '{tensor}': {reason}")]
    InvalidTensor { tensor: String, reason: String },

    /// The writer was given a metadata value GGUF cannot encode (no file exists yet, so no path).
    #[error("cannot add metadata key '{key}': {reason}")]
    InvalidMetadata { key: String, reason: String },

    /// The streaming writer was driven out of order (wrong tensor, too many bytes, early finish).
    #[error("{}: {reason}", .path.display())]
    StreamOrder { path: PathBuf, reason: String },
}
