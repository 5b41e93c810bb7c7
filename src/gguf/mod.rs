//! GGUF reading and writing (filled in).
