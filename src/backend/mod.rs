//! Compute backends. A backend owns buffers and kernels and answers `supports(op, dtype)`;
//! it never decides where an expert lives or which kernel a layer should fall back to.

pub mod cpu;

use crate::gguf::GgmlType;

/// The operations a backend may be asked to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Matrix × vector(s) over a weight of the given type.
    MatMul,
    /// Dequantize rows of a weight into f32 (embedding lookup).
    GetRows,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::MatMul => f.write_str("mat_mul"),
            Op::GetRows => f.write_str("get_rows"),
        }
    }
}

/// Whether the CPU backend can run `op` on weights of type `ty`.
pub fn cpu_supports(op: Op, ty: GgmlType) -> bool {
    cpu::kernels(ty).is_some_and(|k| match op {
        Op::MatMul => k.can_matmul(),
        Op::GetRows => k.can_dequantize(),
    })
}
