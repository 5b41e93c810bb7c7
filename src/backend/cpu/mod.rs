//! The CPU backend: ggml's per-type kernels over borrowed weight views, a persistent thread
//! pool, and the element-wise ops. Never decides where a weight lives.

pub mod ggml;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod repack;

pub use ggml::{kernels, Kernels};
pub use matmul::{matmul, matmul_batch, MatJob, MatRef, QActs, SharedOut};
pub use pool::ThreadPool;
