//! Every kernel run once on the device against the CPU (`moerun device --self-test`): mat-vec
//! and row lookups for every type on weights quantized by ggml, RMSNorm, SwiGLU, add, scale and
//! RoPE, each compared with an f64 reference on the host (ggml's dequantization for the
//! weights). What a lent GPU machine runs first (`benches/device-check.sh`); needs a device.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::kernels::{self, ggml_type, FILES, TYPES};
use super::{probe, CudaError};
use crate::gguf::GgmlType;
use crate::rng::SplitMix64;

/// One kernel's check: its largest error against the host, relative to the reference's scale.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub kernel: String,
    pub max_rel_err: f64,
    pub tolerance: f64,
    pub ok: bool,
}

struct Dev {
    stream: Arc<CudaStream>,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    ordinal: usize,
}

impl Dev {
    fn err(&self, e: cudarc::driver::DriverError) -> CudaError {
        CudaError::Driver { ordinal: self.ordinal, message: e.to_string() }
    }

    fn function(&self, name: &str) -> Result<cudarc::driver::CudaFunction, CudaError> {
        for (_, m) in &self.modules {
            if let Ok(f) = m.load_function(name) {
                return Ok(f);
            }
        }
        Err(CudaError::Driver { ordinal: self.ordinal, message: format!("no kernel {name} in any module") })
    }
}

/// Largest |got - want| over the largest |want| (at least `floor`).
fn rel_err(got: &[f32], want: &[f64], floor: f64) -> f64 {
    let scale = want.iter().fold(floor, |m, w| m.max(w.abs()));
    got.iter().zip(want).fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs())) / scale
}

fn check(kernel: String, max_rel_err: f64, tolerance: f64) -> Check {
    Check { ok: max_rel_err <= tolerance, kernel, max_rel_err, tolerance }
}

/// Compiles (or takes from `cache`) every kernel for device `ordinal`, runs each on random data
/// and compares with the host.
pub fn self_test(ordinal: usize, cache: Option<&std::path::Path>) -> Result<Vec<Check>, CudaError> {
    let info = probe(ordinal)?;
    let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::Driver { ordinal, message: e.to_string() })?;
    let mut modules = Vec::new();
    for f in FILES {
        let c = kernels::compile(f, &info.arch(), cache)?;
        let m = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(c.ptx))
            .map_err(|e| CudaError::Driver { ordinal, message: format!("loading kernels/{}: {e}", f.file) })?;
        modules.push((f.file, m));
    }
    let dev = Dev { stream: ctx.default_stream(), modules, ordinal };
    let mut rng = SplitMix64::new(11);
    let mut out = Vec::new();
    for &name in TYPES {
        let ty = ggml_type(name).ok_or_else(|| CudaError::Driver { ordinal, message: format!("type {name}") })?;
        out.extend(check_type(&dev, &mut rng, name, ty)?);
    }
    out.extend(check_elementwise(&dev, &mut rng)?);
    Ok(out)
}

/// `matvec_<type>` (3 input rows) and `get_rows_<type>` on 64 rows of 512 values.
fn check_type(dev: &Dev, rng: &mut SplitMix64, name: &str, ty: GgmlType) -> Result<Vec<Check>, CudaError> {
    let (rows, cols, n_tok) = (64usize, 512usize, 3usize);
    let k = crate::ggml::kernels(ty)
        .ok_or_else(|| CudaError::Driver { ordinal: dev.ordinal, message: format!("ggml has no {name}") })?;
    let row_bytes = ty.row_bytes(cols as u64).unwrap_or(0) as usize;
    let mut w = vec![0u8; rows * row_bytes];
    let mut deq = vec![0f32; rows * cols];
    for r in 0..rows {
        let x: Vec<f32> = (0..cols).map(|_| rng.next_normal(1.0)).collect();
        k.quantize_row_any(&x, &mut w[r * row_bytes..(r + 1) * row_bytes]);
        k.dequantize(&w[r * row_bytes..(r + 1) * row_bytes], &mut deq[r * cols..(r + 1) * cols]);
    }
    let x: Vec<f32> = (0..n_tok * cols).map(|_| rng.next_normal(1.0)).collect();
    let want: Vec<f64> = (0..n_tok)
        .flat_map(|t| {
            let (x, deq) = (&x, &deq);
            (0..rows).map(move |r| (0..cols).map(|c| deq[r * cols + c] as f64 * x[t * cols + c] as f64).sum())
        })
        .collect();
    let s = &dev.stream;
    let e = |e| dev.err(e);
    let dw = s.clone_htod(&w).map_err(e)?;
    let dx = s.clone_htod(&x).map_err(e)?;
    let mut dy = s.alloc_zeros::<f32>(n_tok * rows).map_err(e)?;
    let f = dev.function(&format!("matvec_{name}"))?;
    let (r, c, t, stride_x, stride_y) = (rows as i32, cols as i32, n_tok as i32, cols as i64, rows as i64);
    let cfg = LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments match matvec_<type>'s signature: weights of `rows` rows of `cols`
    // values, `n_tok` input rows of `cols` f32 and `n_tok` output rows of `rows` f32.
    unsafe {
        s.launch_builder(&f)
            .arg(&dw)
            .arg(&dx)
            .arg(&mut dy)
            .arg(&r)
            .arg(&c)
            .arg(&t)
            .arg(&stride_x)
            .arg(&stride_y)
            .launch(cfg)
    }
    .map_err(e)?;
    let got = s.clone_dtoh(&dy).map_err(e)?;
    let mut checks = vec![check(format!("matvec_{name}"), rel_err(&got, &want, 1e-6), 1e-4)];
    // The tiled kernel on 70 rows of input (two token tiles, the second partial).
    let n_big = 70usize;
    let xb: Vec<f32> = (0..n_big * cols).map(|_| rng.next_normal(1.0)).collect();
    let want_b: Vec<f64> = (0..n_big)
        .flat_map(|t| {
            let (xb, deq) = (&xb, &deq);
            (0..rows).map(move |r| (0..cols).map(|c| deq[r * cols + c] as f64 * xb[t * cols + c] as f64).sum())
        })
        .collect();
    let dxb = s.clone_htod(&xb).map_err(e)?;
    let mut dyb = s.alloc_zeros::<f32>(n_big * rows).map_err(e)?;
    let f = dev.function(&format!("matmul_{name}"))?;
    let tb = n_big as i32;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(64) as u32, n_big.div_ceil(64) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matmul_<type> takes matvec's arguments; `n_big` input and output rows.
    unsafe {
        s.launch_builder(&f)
            .arg(&dw)
            .arg(&dxb)
            .arg(&mut dyb)
            .arg(&r)
            .arg(&c)
            .arg(&tb)
            .arg(&stride_x)
            .arg(&stride_y)
            .launch(cfg)
    }
    .map_err(e)?;
    let got = s.clone_dtoh(&dyb).map_err(e)?;
    checks.push(check(format!("matmul_{name}"), rel_err(&got, &want_b, 1e-6), 1e-4));
    // The grouped kernel: two "experts", the weight's rows 0..32 for input rows 0..40 and rows
    // 32..64 for input rows 40..70, each output row `half` wide.
    let half = rows / 2;
    let (w0, _g) = dw.device_ptr(s);
    let ws: Vec<u64> = vec![w0, w0 + (half * row_bytes) as u64];
    let (row0, counts): (Vec<i32>, Vec<i32>) = (vec![0, 40], vec![40, n_big as i32 - 40]);
    let want_g: Vec<f64> = (0..n_big)
        .flat_map(|t| {
            let first = if t < 40 { 0 } else { half };
            want_b[t * rows + first..t * rows + first + half].to_vec()
        })
        .collect();
    let (dws, drow0, dcounts) =
        (s.clone_htod(&ws).map_err(e)?, s.clone_htod(&row0).map_err(e)?, s.clone_htod(&counts).map_err(e)?);
    let mut dyg = s.alloc_zeros::<f32>(n_big * half).map_err(e)?;
    let f = dev.function(&format!("matmul_grouped_{name}"))?;
    let (hr, stride_g) = (half as i32, half as i64);
    let cfg = LaunchConfig {
        grid_dim: (half.div_ceil(64) as u32, 40usize.div_ceil(64) as u32, 2),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matmul_grouped_<type>(ws, x, y, row0, n, rows, cols, x_stride, y_stride): two
    // weight addresses inside `dw` (`half` rows each), input and output rows 0..70.
    unsafe {
        s.launch_builder(&f)
            .arg(&dws)
            .arg(&dxb)
            .arg(&mut dyg)
            .arg(&drow0)
            .arg(&dcounts)
            .arg(&hr)
            .arg(&c)
            .arg(&stride_x)
            .arg(&stride_g)
            .launch(cfg)
    }
    .map_err(e)?;
    let got = s.clone_dtoh(&dyg).map_err(e)?;
    checks.push(check(format!("matmul_grouped_{name}"), rel_err(&got, &want_g, 1e-6), 1e-4));
    let ids: Vec<i32> = vec![3, 0, 63, 17];
    let dids = s.clone_htod(&ids).map_err(e)?;
    let mut drows = s.alloc_zeros::<f32>(ids.len() * cols).map_err(e)?;
    let f = dev.function(&format!("get_rows_{name}"))?;
    let cfg = LaunchConfig { grid_dim: (2, ids.len() as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: get_rows_<type>(table, ids, out, cols) with `ids.len()` output rows of `cols` f32.
    unsafe { s.launch_builder(&f).arg(&dw).arg(&dids).arg(&mut drows).arg(&c).launch(cfg) }.map_err(e)?;
    let got = s.clone_dtoh(&drows).map_err(e)?;
    let want: Vec<f64> =
        ids.iter().flat_map(|&i| deq[i as usize * cols..(i as usize + 1) * cols].iter().map(|&v| v as f64)).collect();
    // Dequantization is exact but for fused multiply-adds (d * q + m).
    checks.push(check(format!("get_rows_{name}"), rel_err(&got, &want, 1e-6), 1e-6));
    Ok(checks)
}

/// RMSNorm, SwiGLU, add, scale and RoPE (both pairings) against f64 on the host.
fn check_elementwise(dev: &Dev, rng: &mut SplitMix64) -> Result<Vec<Check>, CudaError> {
    let s = &dev.stream;
    let e = |e| dev.err(e);
    let mut checks = Vec::new();
    let (rows, n) = (4usize, 1000usize);
    let x: Vec<f32> = (0..rows * n).map(|_| rng.next_normal(2.0)).collect();
    let w: Vec<f32> = (0..n).map(|_| rng.next_normal(1.0)).collect();
    let eps = 1e-6f32;
    let want: Vec<f64> = (0..rows)
        .flat_map(|r| {
            let row = &x[r * n..(r + 1) * n];
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
            let scale = 1.0 / (ms + eps as f64).sqrt();
            let w = &w;
            row.iter().enumerate().map(move |(i, &v)| v as f64 * scale * w[i] as f64).collect::<Vec<_>>()
        })
        .collect();
    let (dx, dw) = (s.clone_htod(&x).map_err(e)?, s.clone_htod(&w).map_err(e)?);
    let mut dy = s.alloc_zeros::<f32>(rows * n).map_err(e)?;
    let f = dev.function("rms_norm_f32")?;
    let cfg = LaunchConfig { grid_dim: (1, rows as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (ni, stride) = (n as i32, n as i64);
    // SAFETY: rms_norm_f32(x, x_stride, w, y, y_stride, n, eps) over `rows` rows of `n` f32.
    unsafe {
        s.launch_builder(&f).arg(&dx).arg(&stride).arg(&dw).arg(&mut dy).arg(&stride).arg(&ni).arg(&eps).launch(cfg)
    }
    .map_err(e)?;
    checks.push(check("rms_norm_f32".into(), rel_err(&s.clone_dtoh(&dy).map_err(e)?, &want, 1e-6), 1e-5));

    let len = rows * n;
    let g: Vec<f32> = (0..len).map(|_| rng.next_normal(2.0)).collect();
    let dg = s.clone_htod(&g).map_err(e)?;
    let cfg = LaunchConfig { grid_dim: (len.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let nl = len as i64;
    let f = dev.function("glu_f32")?;
    let (kind, alpha, limit) = (0i32, 0f32, 0f32);
    // SAFETY: glu_f32(gate, up, out, n, kind, alpha, limit) over `len` f32.
    unsafe {
        s.launch_builder(&f).arg(&dg).arg(&dx).arg(&mut dy).arg(&nl).arg(&kind).arg(&alpha).arg(&limit).launch(cfg)
    }
    .map_err(e)?;
    let want: Vec<f64> = g.iter().zip(&x).map(|(&g, &u)| g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64).collect();
    checks.push(check("glu_f32 (swiglu)".into(), rel_err(&s.clone_dtoh(&dy).map_err(e)?, &want, 1e-6), 1e-5));
    let f = dev.function("add_f32")?;
    // SAFETY: add_f32(a, b, out, n) over `len` f32.
    unsafe { s.launch_builder(&f).arg(&dg).arg(&dx).arg(&mut dy).arg(&nl).launch(cfg) }.map_err(e)?;
    let want: Vec<f64> = g.iter().zip(&x).map(|(&a, &b)| a as f64 + b as f64).collect();
    checks.push(check("add_f32".into(), rel_err(&s.clone_dtoh(&dy).map_err(e)?, &want, 1e-6), 1e-6));
    let f = dev.function("scale_f32")?;
    let k = 0.37f32;
    // SAFETY: scale_f32(x, s, n) in place over `len` f32.
    unsafe { s.launch_builder(&f).arg(&mut dy).arg(&k).arg(&nl).launch(cfg) }.map_err(e)?;
    let want: Vec<f64> = want.iter().map(|v| v * k as f64).collect();
    checks.push(check("scale_f32".into(), rel_err(&s.clone_dtoh(&dy).map_err(e)?, &want, 1e-6), 1e-6));

    // RoPE: 3 tokens at positions 5, 6, 7, 4 heads of 64 (the first 48 rotated).
    let (n_tok, n_heads, head, n_dims, base, fs, pos0) = (3usize, 4usize, 64usize, 48usize, 10000.0f32, 1.0f32, 5usize);
    for neox in [0i32, 1] {
        let v: Vec<f32> = (0..n_tok * n_heads * head).map(|_| rng.next_normal(1.0)).collect();
        let mut want: Vec<f64> = v.iter().map(|&a| a as f64).collect();
        for t in 0..n_tok {
            let p = (pos0 + t) as f64;
            for h in 0..n_heads {
                let o = (t * n_heads + h) * head;
                for i in 0..n_dims / 2 {
                    let theta = p * fs as f64 * (base as f64).powf(-2.0 * i as f64 / n_dims as f64);
                    let (a, b) = if neox == 1 { (i, i + n_dims / 2) } else { (2 * i, 2 * i + 1) };
                    let (x0, x1) = (v[o + a] as f64, v[o + b] as f64);
                    want[o + a] = x0 * theta.cos() - x1 * theta.sin();
                    want[o + b] = x0 * theta.sin() + x1 * theta.cos();
                }
            }
        }
        let mut dv = s.clone_htod(&v).map_err(e)?;
        let f = dev.function("rope_f32")?;
        let cfg = LaunchConfig {
            grid_dim: ((n_dims / 2).div_ceil(64) as u32, n_heads as u32, n_tok as u32),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        let (stride, hs, nd, p0) = ((n_heads * head) as i64, head as i32, n_dims as i32, pos0 as i32);
        let (ext, attn, c0, c1) = (0f32, 1f32, 0f32, 0f32);
        // SAFETY: rope_f32(x, row_stride, head_dim, n_dims, pos0, base, freq_scale, ext_factor,
        // attn_factor, corr0, corr1, neox) on `n_tok` rows of `n_heads` heads of `head` f32.
        unsafe {
            s.launch_builder(&f)
                .arg(&mut dv)
                .arg(&stride)
                .arg(&hs)
                .arg(&nd)
                .arg(&p0)
                .arg(&base)
                .arg(&fs)
                .arg(&ext)
                .arg(&attn)
                .arg(&c0)
                .arg(&c1)
                .arg(&neox)
                .launch(cfg)
        }
        .map_err(e)?;
        let got = s.clone_dtoh(&dv).map_err(e)?;
        let kind = if neox == 1 { "rope_f32 (neox)" } else { "rope_f32 (normal)" };
        checks.push(check(kind.into(), rel_err(&got, &want, 1e-6), 1e-5));
    }
    Ok(checks)
}

/// The CUDA backend on whole models (`backend::conformance`) against the CPU and plain
/// backends: every case all-resident, and a subset with experts held by the host — copied into
/// an arena of half the experts (`--gpu-budget 50%`), read in place (`--unified`), and computed
/// on the CPU (`--cpu-moe`; for the first layer only, `--n-cpu-moe 1`; the arena's misses,
/// `--cpu-misses always`). A case that fails to
/// run is a failed check naming why.
pub fn backend_checks(ordinal: usize, cache: Option<&std::path::Path>) -> Result<Vec<Check>, CudaError> {
    use crate::backend::conformance::{self, Case};
    use crate::engine::offload::Budget;
    let dir = tempfile::tempdir().map_err(|e| CudaError::Cache { path: std::env::temp_dir(), source: e })?;
    let base = super::CudaOptions { ordinal, threads: 2, kernel_cache: cache.map(Into::into), ..Default::default() };
    let half = Some(Budget::Share(0.5));
    let subset: Vec<Case> = conformance::cases()
        .into_iter()
        .filter(|c| c.cache || matches!(c.arch, "qwen3moe" | "gpt-oss" | "deepseek2"))
        .collect();
    let variants = [
        ("", base.clone(), conformance::cases()),
        (" [--gpu-budget 50%]", super::CudaOptions { gpu_budget: half, ..base.clone() }, subset.clone()),
        (" [--unified]", super::CudaOptions { unified: true, gpu_budget: half, ..base.clone() }, subset.clone()),
        (" [--cpu-moe]", super::CudaOptions { cpu_moe: true, ..base.clone() }, subset.clone()),
        (" [--n-cpu-moe 1]", super::CudaOptions { n_cpu_moe: 1, ..base.clone() }, subset.clone()),
        (
            " [--gpu-budget 50% --cpu-misses always]",
            super::CudaOptions { gpu_budget: half, cpu_misses: super::CpuMisses::Always, ..base.clone() },
            subset,
        ),
    ];
    let mut out = Vec::new();
    for (label, opts, cases) in variants {
        for case in cases {
            let mut make = || super::CudaBackend::new(opts.clone()).map_err(|e| e.to_string());
            match conformance::run(dir.path(), std::slice::from_ref(&case), 0.02, &mut make) {
                Ok(checks) => out.extend(checks.into_iter().map(|c| Check {
                    kernel: format!(
                        "{}{label} ({} rows; other top token {}, other experts {})",
                        c.what, c.rows, c.argmax_flips, c.route_flips
                    ),
                    max_rel_err: c.max_rel_err,
                    tolerance: c.tolerance,
                    ok: c.ok,
                })),
                Err(e) => out.push(Check {
                    kernel: format!("{}{label}: {e}", case.name()),
                    max_rel_err: f64::INFINITY,
                    tolerance: 0.02,
                    ok: false,
                }),
            }
        }
    }
    Ok(out)
}
