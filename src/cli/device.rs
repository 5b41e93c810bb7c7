//! `moerun device`: which accelerator this build and machine have, and the CUDA kernels compiled
//! by NVRTC for it (or for the architectures named) — what CI runs without a GPU, and the first
//! thing a lent GPU machine runs.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Compile every kernel for these architectures (e.g. sm_87,sm_89,sm_90) instead of the
    /// device's; no device is needed.
    #[arg(long, value_delimiter = ',', value_name = "ARCH,...")]
    arch: Vec<String>,
    /// Where compiled kernels are cached (default: ~/.cache/moerun/kernels); `off` compiles anew.
    #[arg(long, value_name = "DIR|off")]
    kernel_cache: Option<String>,
    /// Write the PTX of each file and architecture into this folder.
    #[arg(long, value_name = "DIR")]
    ptx_out: Option<PathBuf>,
    /// The CUDA device to probe.
    #[arg(long, default_value_t = 0)]
    ordinal: usize,
    /// Run every kernel once on the device against the CPU (needs a GPU); JSON with --json.
    #[arg(long)]
    self_test: bool,
    /// Write the self-test's checks to this JSON file.
    #[arg(long, value_name = "FILE", requires = "self_test")]
    json: Option<PathBuf>,
    /// Run llama.cpp's reference cases in these folders (a fixtures folder, or one of its model
    /// folders: GGUF files beside their `*.ref.json`) on the device, every weight resident.
    #[arg(long, value_name = "DIR")]
    oracle: Vec<PathBuf>,
}

#[cfg(not(feature = "cuda"))]
pub fn run(a: Args) -> anyhow::Result<()> {
    let _ = (a.arch, a.kernel_cache, a.ptx_out, a.ordinal, a.json);
    println!("device: cpu (this moerun was built without --features cuda)");
    anyhow::ensure!(!a.self_test, "--self-test needs a moerun built with --features cuda");
    anyhow::ensure!(a.oracle.is_empty(), "--oracle needs a moerun built with --features cuda");
    Ok(())
}

#[cfg(feature = "cuda")]
pub fn run(a: Args) -> anyhow::Result<()> {
    use anyhow::Context;
    use moerun::backend::cuda::{kernels, probe};
    let archs = if a.arch.is_empty() {
        match probe(a.ordinal) {
            Ok(d) => {
                println!(
                    "device: cuda:{} {} (compute {}.{}, {:.1} GiB{})",
                    d.ordinal,
                    d.name,
                    d.compute_capability.0,
                    d.compute_capability.1,
                    d.memory_bytes as f64 / (1u64 << 30) as f64,
                    if d.integrated { ", integrated: memory shared with the CPU" } else { "" }
                );
                vec![d.arch()]
            }
            Err(e) => {
                println!("device: cpu ({e})");
                anyhow::ensure!(!a.self_test, "--self-test needs a CUDA device: {e}");
                return Ok(());
            }
        }
    } else {
        a.arch.clone()
    };
    let cache = match a.kernel_cache.as_deref() {
        Some("off") => None,
        Some(d) => Some(PathBuf::from(d)),
        None => kernels::default_cache(),
    };
    if a.self_test {
        self_test(&a, cache.as_deref())?;
    }
    if !a.oracle.is_empty() {
        oracle(&a, cache.as_deref())?;
    }
    if a.self_test || !a.oracle.is_empty() {
        return Ok(());
    }
    let (major, minor) = kernels::nvrtc_version()?;
    println!("NVRTC {major}.{minor}; kernels for {}", archs.join(", "));
    for arch in &archs {
        for f in kernels::FILES {
            let c = kernels::compile(f, arch, cache.as_deref())?;
            let names = f.entry_names();
            let missing: Vec<&String> = names.iter().filter(|e| !c.ptx.contains(&format!(".entry {e}("))).collect();
            anyhow::ensure!(missing.is_empty(), "kernels/{}: no entry {missing:?} in the PTX for {arch}", f.file);
            println!(
                "  {arch} {:<16} {:>3} entries {:>8} bytes of PTX  {:>7.1} ms{}",
                f.file,
                names.len(),
                c.ptx.len(),
                1000.0 * c.seconds,
                if c.cached { " (cached)" } else { "" }
            );
            if let Some(dir) = &a.ptx_out {
                let p = dir.join(format!("{}.{arch}.ptx", f.file.trim_end_matches(".cu")));
                moerun::atomic::write(&p, c.ptx.as_bytes()).with_context(|| format!("writing {}", p.display()))?;
            }
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn self_test(a: &Args, cache: Option<&std::path::Path>) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let mut checks = moerun::backend::cuda::selftest::self_test(a.ordinal, cache)?;
    let kernels = checks.len();
    checks.extend(moerun::backend::cuda::selftest::backend_checks(a.ordinal, cache)?);
    for c in &checks {
        println!(
            "  {:<22} max error {:>9.2e} of the reference's scale (tolerance {:.0e}) {}",
            c.kernel,
            c.max_rel_err,
            c.tolerance,
            if c.ok { "ok" } else { "FAILED" }
        );
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    println!(
        "self-test: {kernels} kernel checks and {} whole-model checks in {:.2} s, {failed} failed",
        checks.len() - kernels,
        t0.elapsed().as_secs_f64()
    );
    if let Some(p) = &a.json {
        moerun::atomic::write(p, serde_json::to_string_pretty(&checks)?.as_bytes())?;
    }
    anyhow::ensure!(failed == 0, "{failed} checks differ from the CPU");
    Ok(())
}

/// llama.cpp's reference cases on the device (`--oracle`).
#[cfg(feature = "cuda")]
fn oracle(a: &Args, cache: Option<&std::path::Path>) -> anyhow::Result<()> {
    use moerun::backend::cuda::{CudaBackend, CudaOptions};
    use moerun::oracle::{check_pairs, device_tolerance, ref_pairs, ref_pairs_in, DEVICE};
    let opts =
        CudaOptions { ordinal: a.ordinal, kernel_cache: cache.map(Into::into), threads: 2, ..Default::default() };
    let mut failed = 0;
    let mut checked = 0;
    for dir in &a.oracle {
        let mut pairs = ref_pairs_in(dir)?;
        if pairs.is_empty() {
            pairs = ref_pairs(dir)?;
        }
        for pair in pairs {
            let tol = device_tolerance(&pair.0);
            let out = check_pairs(vec![pair], &mut || CudaBackend::new(opts.clone()).map_err(|e| e.to_string()), tol);
            for (model, prompt, worst) in &out.worst {
                let prompt: String = prompt.chars().take(40).collect();
                println!(
                    "  {model:<28} {prompt:<44?} top-20 logits within {worst:.4} of llama.cpp (tolerance {})",
                    tol.logit
                );
            }
            for f in &out.failures {
                println!("  FAILED {f}");
            }
            checked += out.checked;
            failed += out.failures.len();
        }
    }
    println!(
        "oracle: {checked} llama.cpp reference cases on the device (logits within {} of llama.cpp's, {} on the trained model, and its greedy continuations), {failed} failed",
        DEVICE.logit, DEVICE.trained_logit
    );
    anyhow::ensure!(failed == 0, "{failed} reference cases differ from llama.cpp");
    Ok(())
}
