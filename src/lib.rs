//! moerun: run Mixture-of-Experts GGUF models larger than device memory.
//!
//! See `ARCHITECTURE.md` for the code map.

pub mod arch;
pub mod backend;
pub mod engine;
pub mod gguf;
pub mod io;
pub mod layers;
pub mod llama_log;
pub mod model;
pub mod reference;
pub mod rng;
pub mod synth;
pub mod tokenizer;
