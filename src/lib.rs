//! moerun: run Mixture-of-Experts GGUF models larger than device memory.
//!
//! See `ARCHITECTURE.md` for the code map.

pub mod gguf;
pub mod llama_log;
pub mod tokenizer;
