//! The ggml tensor types a GGUF file may name: their wire ids, block sizes and block byte sizes.
//! The table mirrors ggml's `type_traits` (ggml/src/ggml.c); a unit test pins it to the C library.

/// A ggml tensor element type, numbered as in `enum ggml_type`.
///
/// Ids 4, 5 and 31–33, 36–38 were removed from ggml and are not accepted. Types ggml added after
/// MXFP4 (NVFP4 = 40, Q1_0 = 41, Q2_0 = 42) are not in this table yet: files using them are
/// rejected with [`GgufError::UnknownGgmlType`](super::GgufError::UnknownGgmlType).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ2_XXS = 16,
    IQ2_XS = 17,
    IQ3_XXS = 18,
    IQ1_S = 19,
    IQ4_NL = 20,
    IQ3_S = 21,
    IQ2_S = 22,
    IQ4_XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1_M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
}

/// One row of the table: (type, ggml name, elements per block, bytes per block).
/// Byte sizes follow the `block_*` structs of ggml/src/ggml-common.h.
const TABLE: [(GgmlType, &str, u64, u64); 32] = {
    use GgmlType::*;
    const QK_K: u64 = 256;
    [
        (F32, "f32", 1, 4),
        (F16, "f16", 1, 2),
        (Q4_0, "q4_0", 32, 2 + 16),
        (Q4_1, "q4_1", 32, 2 * 2 + 16),
        (Q5_0, "q5_0", 32, 2 + 4 + 16),
        (Q5_1, "q5_1", 32, 2 * 2 + 4 + 16),
        (Q8_0, "q8_0", 32, 2 + 32),
        (Q8_1, "q8_1", 32, 2 * 2 + 32),
        (Q2_K, "q2_K", QK_K, 2 * 2 + QK_K / 16 + QK_K / 4),
        (Q3_K, "q3_K", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
        (Q4_K, "q4_K", QK_K, 2 * 2 + 12 + QK_K / 2),
        (Q5_K, "q5_K", QK_K, 2 * 2 + 12 + QK_K / 2 + QK_K / 8),
        (Q6_K, "q6_K", QK_K, 2 + QK_K / 16 + 3 * QK_K / 4),
        (Q8_K, "q8_K", QK_K, 4 + QK_K + QK_K / 16 * 2),
        (IQ2_XXS, "iq2_xxs", QK_K, 2 + QK_K / 8 * 2),
        (IQ2_XS, "iq2_xs", QK_K, 2 + QK_K / 8 * 2 + QK_K / 32),
        (IQ3_XXS, "iq3_xxs", QK_K, 2 + 3 * (QK_K / 8)),
        (IQ1_S, "iq1_s", QK_K, 2 + QK_K / 8 + QK_K / 16),
        (IQ4_NL, "iq4_nl", 32, 2 + 16),
        (IQ3_S, "iq3_s", QK_K, 2 + 13 * (QK_K / 32) + QK_K / 64),
        (IQ2_S, "iq2_s", QK_K, 2 + QK_K / 4 + QK_K / 16),
        (IQ4_XS, "iq4_xs", QK_K, 2 + 2 + QK_K / 64 + QK_K / 2),
        (I8, "i8", 1, 1),
        (I16, "i16", 1, 2),
        (I32, "i32", 1, 4),
        (I64, "i64", 1, 8),
        (F64, "f64", 1, 8),
        (IQ1_M, "iq1_m", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
        (BF16, "bf16", 1, 2),
        (TQ1_0, "tq1_0", QK_K, 2 + QK_K / 64 + (QK_K - 4 * QK_K / 64) / 5),
        (TQ2_0, "tq2_0", QK_K, 2 + QK_K / 4),
        (MXFP4, "mxfp4", 32, 1 + 16),
    ]
};

impl GgmlType {
    /// Every type in the table, in id order.
    pub const ALL: [GgmlType; 32] = {
        let mut all = [GgmlType::F32; 32];
        let mut i = 0;
        while i < TABLE.len() {
            all[i] = TABLE[i].0;
            i += 1;
        }
        all
    };

    /// The type with ggml id `v`, or `None` for removed and unknown ids.
    pub fn from_u32(v: u32) -> Option<GgmlType> {
        Self::ALL.iter().copied().find(|t| *t as u32 == v)
    }

    fn row(self) -> &'static (GgmlType, &'static str, u64, u64) {
        // The table lists every variant, so the search always succeeds; the fallback only keeps
        // this function total if a variant were ever added without a row (a test catches that).
        TABLE.iter().find(|r| r.0 == self).unwrap_or(&TABLE[0])
    }

    /// Elements per block (1 for plain types, 32 for the legacy quants, 256 for K/IQ quants).
    pub fn block_size(self) -> u64 {
        self.row().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.row().3
    }

    /// ggml's name for the type: "f32", "q4_0", "q4_K", "iq4_xs", "bf16", "mxfp4", ...
    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// The type whose name is `s`, ignoring ASCII case ("Q4_K" and "q4_k" both give `Q4_K`).
    pub fn parse(s: &str) -> Option<GgmlType> {
        TABLE.iter().find(|r| r.1.eq_ignore_ascii_case(s)).map(|r| r.0)
    }

    /// Bytes taken by `n_elems` consecutive elements; `None` if `n_elems` is not a whole number
    /// of blocks (or the byte count overflows `u64`).
    pub fn row_bytes(self, n_elems: u64) -> Option<u64> {
        if !n_elems.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_elems / self.block_size()).checked_mul(self.type_size())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Most dimensions a ggml tensor has.
pub(crate) const MAX_DIMS: usize = 4;

/// Byte size of a tensor of type `ty` and ggml-order `shape`, or why the shape is invalid.
/// Shared by the reader and the writer so both accept exactly the same tensors.
pub(crate) fn tensor_size(ty: GgmlType, shape: &[u64]) -> Result<u64, String> {
    if shape.len() > MAX_DIMS {
        return Err(format!("{} dimensions, at most {MAX_DIMS} allowed", shape.len()));
    }
    let mut n_elems: u64 = 1;
    for (i, &ne) in shape.iter().enumerate() {
        if ne == 0 {
            return Err(format!("dimension {i} is zero"));
        }
        // ggml stores dimensions as i64.
        n_elems = n_elems
            .checked_mul(ne)
            .filter(|n| i64::try_from(*n).is_ok())
            .ok_or_else(|| format!("shape {shape:?} has more than {} elements", i64::MAX))?;
    }
    let ne0 = shape.first().copied().unwrap_or(1);
    if !ne0.is_multiple_of(ty.block_size()) {
        return Err(format!("ne0 = {ne0} is not a multiple of the {} block size {}", ty.name(), ty.block_size()));
    }
    // ne0 is a whole number of blocks, so the element count is too.
    (n_elems / ty.block_size())
        .checked_mul(ty.type_size())
        .ok_or_else(|| format!("shape {shape:?} of type {} overflows the byte size", ty.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins every row of our table to the ggml library we link.
    #[test]
    fn table_matches_ggml() {
        for t in GgmlType::ALL {
            let id = t as u32 as llama_cpp_sys_2::ggml_type;
            // SAFETY: `id` is a valid `enum ggml_type` value below GGML_TYPE_COUNT; both functions
            // only index ggml's static type_traits table.
            let (blck, size) = unsafe { (llama_cpp_sys_2::ggml_blck_size(id), llama_cpp_sys_2::ggml_type_size(id)) };
            assert_eq!(t.block_size() as i64, blck, "{t} block size");
            assert_eq!(t.type_size() as usize, size, "{t} type size");
            // SAFETY: as above; ggml_type_name returns a static NUL-terminated string.
            let name = unsafe { std::ffi::CStr::from_ptr(llama_cpp_sys_2::ggml_type_name(id)) };
            assert_eq!(Ok(t.name()), name.to_str(), "{t} name");
        }
    }

    #[test]
    fn ids_names_and_parse_round_trip() {
        for (i, t) in GgmlType::ALL.iter().enumerate() {
            assert_eq!(TABLE[i].0, *t);
            assert_eq!(GgmlType::from_u32(*t as u32), Some(*t));
            assert_eq!(GgmlType::parse(t.name()), Some(*t));
            assert_eq!(GgmlType::parse(&t.name().to_uppercase()), Some(*t));
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 40, 43, u32::MAX] {
            assert_eq!(GgmlType::from_u32(removed), None, "id {removed}");
        }
        assert_eq!(GgmlType::parse("Q4_k"), Some(GgmlType::Q4_K));
        assert_eq!(GgmlType::parse("q4"), None);
    }

    #[test]
    fn row_bytes_and_tensor_size() {
        assert_eq!(GgmlType::Q8_0.row_bytes(64), Some(68));
        assert_eq!(GgmlType::Q8_0.row_bytes(33), None);
        assert_eq!(GgmlType::Q4_K.row_bytes(512), Some(288));
        assert_eq!(GgmlType::F32.row_bytes(u64::MAX), None);
        assert_eq!(tensor_size(GgmlType::F16, &[3, 5, 7]), Ok(3 * 5 * 7 * 2));
        assert_eq!(tensor_size(GgmlType::Q8_0, &[32, 4, 2, 2]), Ok(34 * 16));
        assert_eq!(tensor_size(GgmlType::F32, &[]), Ok(4));
        assert!(tensor_size(GgmlType::F32, &[1, 1, 1, 1, 1]).unwrap_err().contains("5 dimensions"));
        assert!(tensor_size(GgmlType::F32, &[4, 0]).unwrap_err().contains("dimension 1 is zero"));
        assert!(tensor_size(GgmlType::Q4_0, &[48]).unwrap_err().contains("not a multiple"));
        assert!(tensor_size(GgmlType::F32, &[1 << 32, 1 << 32]).unwrap_err().contains("elements"));
        assert!(tensor_size(GgmlType::F64, &[1 << 62]).unwrap_err().contains("overflows"));
    }
}
