//! moerun: run Mixture-of-Experts GGUF models larger than device memory.
//!
//! See `ARCHITECTURE.md` for the code map.

pub mod arch;
pub mod atomic;
pub mod backend;
pub mod chat;
pub mod devices;
pub mod engine;
pub mod experts;
pub mod ggml;
pub mod gguf;
pub mod io;
pub mod layers;
pub mod llama_log;
pub mod lowprec;
pub mod model;
pub mod oracle;
pub mod predict;
pub mod reasoning;
pub mod reference;
pub mod rng;
pub mod server;
pub mod stats;
pub mod synth;
pub mod sysmem;
pub mod tokenizer;
