//! Reads and writes GGUF files over an mmap. Knows no model architectures and computes nothing.
//!
//! [`GgufFile::open`] maps a GGUF v2/v3 file and validates all of it before returning: the
//! header, every metadata value (counts and string lengths are bounded by the bytes left before
//! anything is allocated, strings are UTF-8, keys unique and non-empty, `general.alignment` a
//! power-of-two u32), and every tensor (a known ggml type, at most four nonzero dimensions, ne0 a
//! whole number of blocks, a byte size that fits `u64`, an aligned offset, data inside the file,
//! no two tensors sharing a byte, unique names). Each failure is a [`GgufError`] naming the file
//! and the field, key or tensor; nothing panics on bad input.
//!
//! [`GgufWriter`] builds small files in memory (tests, fixtures); [`GgufStreamWriter`] streams
//! multi-GB files to disk. Both lay data out like llama.cpp: tensors back to back in table order,
//! each padded to the alignment.
//!
//! Differences from llama.cpp's reader, all deliberate: nested arrays are accepted (up to 8
//! deep; llama.cpp refuses them), tensor offsets need not be packed in table order (only aligned
//! and disjoint), tensor names are not limited to 63 bytes, and dimensions of zero are rejected.

mod error;
mod reader;
pub mod sigbus;
mod types;
mod value;
mod writer;

pub use error::GgufError;
pub use reader::{GgufFile, TensorInfo};
pub use types::GgmlType;
pub use value::Value;
pub use writer::{GgufStreamWriter, GgufWriter};

#[cfg(test)]
mod tests;
