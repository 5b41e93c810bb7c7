//! Our bindings to ggml's per-type traits (`to_float`, `from_float`, `vec_dot`) and its vector helpers,
//! through `llama-cpp-sys-2`: what every room that converts or multiplies GGUF data calls (the CPU
//! backends, `lowprec`, `synth`, model validation). Holds no state beyond a once-built table of
//! function pointers.

use std::sync::OnceLock;

use llama_cpp_sys_2 as sys;

use crate::gguf::GgmlType;

type VecDot =
    unsafe extern "C" fn(i32, *mut f32, usize, *const std::ffi::c_void, usize, *const std::ffi::c_void, usize, i32);
type FromFloat = unsafe extern "C" fn(*const f32, *mut std::ffi::c_void, i64);
type ToFloat = unsafe extern "C" fn(*const std::ffi::c_void, *mut f32, i64);

/// ggml's kernels for one weight type.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub ty: GgmlType,
    /// The type activations are converted to before `vec_dot` (Q8_0 for Q4_0, Q8_K for K-quants …).
    pub vec_dot_type: GgmlType,
    vec_dot: Option<VecDot>,
    to_float: Option<ToFloat>,
    /// `from_float` of `vec_dot_type` (quantizes f32 activations).
    act_from_float: Option<FromFloat>,
    /// `from_float` of this type itself (used to store values of this type, e.g. f16 KV rows).
    from_float: Option<FromFloat>,
}

impl Kernels {
    pub fn can_matmul(&self) -> bool {
        self.vec_dot.is_some() && (self.vec_dot_type == GgmlType::F32 || self.act_from_float.is_some())
    }

    pub fn can_dequantize(&self) -> bool {
        self.to_float.is_some() || self.ty == GgmlType::F32
    }

    /// Bytes one activation row of `n` elements takes once converted to `vec_dot_type`.
    pub fn act_row_bytes(&self, n: usize) -> usize {
        self.vec_dot_type.row_bytes(n as u64).unwrap_or(0) as usize
    }

    /// Convert an f32 activation row into `vec_dot_type` (into `out`, `act_row_bytes` long).
    pub fn quantize_act(&self, x: &[f32], out: &mut [u8]) {
        assert_eq!(out.len(), self.act_row_bytes(x.len()));
        if self.vec_dot_type == GgmlType::F32 {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_ne_bytes());
            }
            return;
        }
        let f = self.act_from_float.expect("quantize_act on a type without from_float");
        // SAFETY: `out` holds exactly the bytes ggml writes for `x.len()` elements of
        // `vec_dot_type` (asserted above); ggml reads `x.len()` floats from `x`.
        unsafe { f(x.as_ptr(), out.as_mut_ptr().cast(), x.len() as i64) }
    }

    /// Dot product of one weight row (`n` elements of `ty`) with one converted activation row.
    #[inline]
    pub fn dot(&self, n: usize, row: &[u8], act: &[u8]) -> f32 {
        debug_assert_eq!(row.len() as u64, self.ty.row_bytes(n as u64).unwrap_or(0));
        debug_assert_eq!(act.len(), self.act_row_bytes(n));
        let f = self.vec_dot.expect("dot on a type without vec_dot");
        let mut s = 0f32;
        // SAFETY: both rows hold `n` elements of their types (checked by the callers'
        // row-size arithmetic, asserted in debug builds); ggml writes one float to `s`.
        unsafe { f(n as i32, &mut s, 0, row.as_ptr().cast(), 0, act.as_ptr().cast(), 0, 1) };
        s
    }

    /// Dequantize `out.len()` elements from `row` into f32.
    pub fn dequantize(&self, row: &[u8], out: &mut [f32]) {
        assert_eq!(row.len() as u64, self.ty.row_bytes(out.len() as u64).unwrap_or(u64::MAX));
        if self.ty == GgmlType::F32 {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            }
            return;
        }
        let f = self.to_float.expect("dequantize on a type without to_float");
        // SAFETY: `row` holds exactly `out.len()` elements of `ty` (asserted above).
        unsafe { f(row.as_ptr().cast(), out.as_mut_ptr(), out.len() as i64) }
    }

    /// Store f32 values as this type, F32 included (`out` must be `row_bytes(x.len())` long).
    pub fn quantize_row_any(&self, x: &[f32], out: &mut [u8]) {
        if self.ty == GgmlType::F32 {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_ne_bytes());
            }
        } else {
            self.quantize_row(x, out);
        }
    }

    /// Quantize f32 values into this type (`out` must be `row_bytes(x.len())` long).
    pub fn quantize_row(&self, x: &[f32], out: &mut [u8]) {
        assert_eq!(out.len() as u64, self.ty.row_bytes(x.len() as u64).unwrap_or(u64::MAX));
        let f = self.from_float.expect("quantize_row on a type without from_float");
        // SAFETY: sizes asserted above.
        unsafe { f(x.as_ptr(), out.as_mut_ptr().cast(), x.len() as i64) }
    }
}

fn table() -> &'static Vec<Option<Kernels>> {
    static TABLE: OnceLock<Vec<Option<Kernels>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        // SAFETY: ggml_cpu_init only fills ggml's internal lookup tables; it is idempotent.
        unsafe { sys::ggml_cpu_init() };
        (0..64u32)
            .map(|i| {
                let ty = GgmlType::from_u32(i)?;
                // SAFETY: `i` is a valid ggml type id (from_u32 accepted it); both calls return
                // pointers to static tables inside ggml.
                let (cpu, base) =
                    unsafe { (sys::ggml_get_type_traits_cpu(i).as_ref()?, sys::ggml_get_type_traits(i).as_ref()?) };
                let vec_dot_type = GgmlType::from_u32(cpu.vec_dot_type).unwrap_or(GgmlType::F32);
                // SAFETY: as above, for the activation type.
                let act_from_float =
                    unsafe { sys::ggml_get_type_traits_cpu(vec_dot_type as u32).as_ref() }.and_then(|t| t.from_float);
                Some(Kernels {
                    ty,
                    vec_dot_type,
                    vec_dot: cpu.vec_dot,
                    to_float: base.to_float,
                    act_from_float,
                    from_float: cpu.from_float,
                })
            })
            .collect()
    })
}

/// ggml's kernels for `ty`, if ggml has a CPU implementation for it.
pub fn kernels(ty: GgmlType) -> Option<&'static Kernels> {
    table().get(ty as usize).and_then(|k| k.as_ref())
}

// ggml-cpu's vector kernels (C linkage in vec.cpp, not in the generated bindings). We call them
// instead of porting them: their SIMD `expf`/`silu` approximations differ from libm by ulps, and
// this model turns such ulps into visible logit differences.
extern "C" {
    fn ggml_vec_soft_max_f32(n: i32, y: *mut f32, x: *const f32, max: f32) -> f64;
    fn ggml_vec_swiglu_f32(n: i32, y: *mut f32, x: *const f32, g: *const f32);
}

/// `y[i] = exp(x[i] - max)` with ggml's vector `expf`; returns Σ y in ggml's summation order.
pub fn vec_soft_max(y: &mut [f32], x: &[f32], max: f32) -> f64 {
    assert_eq!(y.len(), x.len());
    // SAFETY: both slices hold `y.len()` floats; ggml reads `x` and writes `y` in bounds (they
    // may not alias: `y` is a unique borrow).
    unsafe { ggml_vec_soft_max_f32(y.len() as i32, y.as_mut_ptr(), x.as_ptr(), max) }
}

/// `y[i] = silu(x[i]) * g[i]` with ggml's vector `silu`.
pub fn vec_swiglu(y: &mut [f32], x: &[f32], g: &[f32]) {
    assert!(x.len() == y.len() && g.len() == y.len());
    // SAFETY: all three slices hold `y.len()` floats; ggml writes only `y`.
    unsafe { ggml_vec_swiglu_f32(y.len() as i32, y.as_mut_ptr(), x.as_ptr(), g.as_ptr()) }
}

/// f32 → f16 bits, rounding like ggml.
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// f16 bits → f32.
#[inline]
pub fn f16_to_f32(x: u16) -> f32 {
    half::f16::from_bits(x).to_f32()
}
