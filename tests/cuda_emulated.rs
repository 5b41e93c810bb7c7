//! The CUDA backend end to end without a GPU: `tests/emu` builds an emulated driver
//! (`libcuda.so`: the driver calls cudarc and the backend make, over host memory, with the
//! kernels of `kernels/*.cu` built for the host and run by a fiber emulation of CUDA's threads,
//! barriers and warp shuffles), and the real `moerun` binary loads it in place of NVIDIA's. What
//! runs is the product's code: cudarc, the backend's buffers, launches (every argument in the
//! order the kernel takes it), the expert arena and staging copies, unified-memory
//! registration, `--cpu-moe`. With `MOERUN_EMU_DEFER_COPIES` it also checks the ordering between
//! streams for copies out of page-locked memory (each runs as late as CUDA allows: a kernel not
//! ordered after its copy reads stale bytes); kernels themselves run at once. What the emulation
//! cannot show is speed; a lent GPU machine runs `benches/device-check.sh` for that.
//!
//! Built with `--features cuda` only; needs NVRTC (the backend compiles its kernels before
//! loading them: the emulated driver ignores the PTX) and a C++17 compiler.
#![cfg(feature = "cuda")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use moerun::backend::cuda::{kernels, library};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the emulated driver into `dir` (as `libcuda.so`): one translation unit per kernel
/// file, registering each of its entries by name.
fn build_driver(dir: &Path) {
    let mut sources = vec![root().join("tests/emu/driver.cpp")];
    for f in kernels::FILES {
        let mut tu = String::from("#include \"cuda_emu.h\"\n#include \"registry.h\"\n");
        for inc in ["kernels/prelude.cuh", "kernels/dequant.cuh", &format!("kernels/{}", f.file)] {
            tu += &format!("#include \"{}\"\n", root().join(inc).display());
        }
        for (i, e) in f.entry_names().iter().enumerate() {
            tu += &format!("static emu::Reg r{i}(\"{e}\", emu::wrap(&{e}));\n");
        }
        let p = dir.join(format!("{}.cpp", f.file));
        std::fs::write(&p, tu).expect("write a translation unit");
        sources.push(p);
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-Wall", "-Werror", "-I"])
        .arg(root().join("tests/emu"))
        .args(&sources)
        .arg("-o")
        .arg(dir.join("libcuda.so"))
        .output()
        .unwrap_or_else(|e| panic!("{cxx}: {e}"));
    assert!(out.status.success(), "building the emulated driver: {}", String::from_utf8_lossy(&out.stderr));
}

/// `moerun` with the emulated driver first on the library path.
fn moerun(driver: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut path = driver.display().to_string();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path = format!("{path}:{}", old.to_string_lossy());
    }
    let out = Command::new(env!("CARGO_BIN_EXE_moerun"))
        .args(args)
        .env("LD_LIBRARY_PATH", path)
        .envs(env.iter().copied())
        .output()
        .expect("run moerun");
    out
}

fn json_of(out: &Output, what: &str) -> serde_json::Value {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

struct Driver {
    _dir: tempfile::TempDir,
    path: PathBuf,
    kernel_cache: String,
}

/// The emulated driver, built for this test. With `MOERUN_EMU_DIR` set it is also built there and
/// kept, to run `moerun` under it by hand (`LD_LIBRARY_PATH=$MOERUN_EMU_DIR:…`).
fn driver() -> Option<Driver> {
    if !common::nvrtc_or_skip() {
        return None;
    }
    if let Some(keep) = std::env::var_os("MOERUN_EMU_DIR") {
        std::fs::create_dir_all(&keep).expect("MOERUN_EMU_DIR");
        build_driver(Path::new(&keep));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    build_driver(dir.path());
    let path = dir.path().to_path_buf();
    let kernel_cache = dir.path().join("kernels").display().to_string();
    Some(Driver { _dir: dir, path, kernel_cache })
}

/// Every kernel against the host, then whole synthetic models of every family through the CUDA
/// backend against the CPU and plain backends: all resident, `--gpu-budget 50%`, `--unified`,
/// `--cpu-moe` (`moerun device --self-test`, as a lent GPU runs it).
#[test]
fn the_self_test_passes_on_the_emulated_device() {
    let Some(d) = driver() else { return };
    let out = moerun(&d.path, &["device", "--self-test", "--kernel-cache", &d.kernel_cache], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("moerun emulated device") || text.contains("self-test:"), "{text}");
    assert!(text.contains("0 failed"), "{text}");
    assert!(text.contains("deepseek2") && text.contains("[--cpu-moe]") && text.contains("[--unified]"), "{text}");
}

/// The trained bundled model: greedy tokens on the (emulated) GPU are the CPU's; and bit for bit
/// the same logits whatever the GPU budget (with its predicted copies ahead of need), with an
/// expert cache in RAM (copied straight from its page-locked slots), read in place (`--unified`)
/// or on a device that says it is integrated.
#[test]
fn greedy_tokens_match_the_cpu_and_every_gpu_memory_setting_gives_the_same_logits() {
    let Some(d) = driver() else { return };
    let base = ["generate", "-p", "/// Returns the number of", "-n", "8", "--temp", "0", "--json"];
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        json_of(&moerun(&d.path, &args, env), &extra.join(" "))
    };
    let cpu = run(&["--device", "cpu"], &[]);
    let gpu = run(&["--device", "cuda"], &[]);
    assert_eq!(gpu["ids"], cpu["ids"], "greedy tokens, cuda vs cpu");
    assert_eq!(gpu["device"]["device"], "cuda:0 moerun emulated device");
    assert_eq!(gpu["device"]["copies"], 0, "every expert resident");
    // Copies out of page-locked memory run as late as CUDA allows, so a kernel queued without
    // waiting for its copy (a prefetch on another stream) reads a stale slot, and host bytes
    // rewritten under a pending copy abort the run.
    let late = [("MOERUN_EMU_DEFER_COPIES", "1")];
    let budget = run(&["--device", "cuda", "--gpu-budget", "40%"], &late);
    let dev = &budget["device"];
    assert!(dev["copies"].as_u64().unwrap_or(0) > 0, "{dev}");
    // The predictor is on by default with a GPU budget, and its copies get used.
    assert!(dev["prefetch_copies"].as_u64().unwrap_or(0) > 0, "{dev}");
    assert!(dev["prefetch_used"].as_u64().unwrap_or(0) > 0, "{dev}");
    let cached = run(&["--device", "cuda", "--memory-budget", "200MiB", "--gpu-budget", "40%"], &late);
    let dev = &cached["device"];
    assert_eq!(dev["direct_copies"], dev["copies"], "copies straight from the page-locked cache: {dev}");
    let tight = run(&["--device", "cuda", "--expert-budget", "30%", "--gpu-budget", "20%", "--profile", "off"], &late);
    let unified = run(&["--device", "cuda", "--memory-budget", "200MiB", "--unified"], &[]);
    let integrated = run(&["--device", "cuda", "--memory-budget", "200MiB"], &[("MOERUN_EMU_INTEGRATED", "1")]);
    let cpu_moe = run(&["--device", "cuda", "--cpu-moe"], &[]);
    for (name, r) in [
        ("--gpu-budget 40%", &budget),
        ("+ expert cache", &cached),
        ("a small expert cache and GPU budget", &tight),
        ("--unified", &unified),
        ("integrated", &integrated),
    ] {
        assert_eq!(r["ids"], gpu["ids"], "{name}: tokens");
        assert_eq!(r["top_logits"], gpu["top_logits"], "{name}: logits, bit for bit");
    }
    assert_eq!(unified["device"]["copies"], 0, "read in place: {}", unified["device"]);
    assert_eq!(integrated["device"]["copies"], 0, "read in place: {}", integrated["device"]);
    assert_eq!(cpu_moe["ids"], cpu["ids"], "--cpu-moe: tokens");
    assert!(cpu_moe["device"]["host_computed"].as_u64().unwrap_or(0) > 0, "{}", cpu_moe["device"]);
    // The first three layers' experts on the CPU, the rest resident on the device.
    let split = run(&["--device", "cuda", "--n-cpu-moe", "3"], &[]);
    let dev = &split["device"];
    assert_eq!(split["ids"], cpu["ids"], "--n-cpu-moe 3: tokens");
    assert!(dev["host_computed"].as_u64().unwrap_or(0) > 0, "{dev}");
    assert_eq!(dev["copies"], 0, "the other layers' experts are resident: {dev}");
    assert!(dev["weight_bytes"].as_u64() < gpu["device"]["weight_bytes"].as_u64(), "{dev}");
    // The arena's misses computed on the CPU while the device runs the hits: only predicted
    // experts are copied; and the planner's split by measured rates.
    let misses = run(&["--device", "cuda", "--gpu-budget", "40%", "--cpu-misses", "always"], &late);
    let dev = &misses["device"];
    assert_eq!(misses["ids"], cpu["ids"], "--cpu-misses always: tokens");
    assert!(dev["cpu_misses"].as_u64().unwrap_or(0) > 0, "{dev}");
    assert_eq!(dev["host_computed"], dev["cpu_misses"], "{dev}");
    assert_eq!(dev["copies"], dev["prefetch_copies"], "no demand copies: {dev}");
    assert!(dev["expert_hits"].as_u64().unwrap_or(0) > 0, "prefetched experts are hits: {dev}");
    let auto = run(&["--device", "cuda", "--gpu-budget", "40%", "--cpu-misses", "auto"], &late);
    assert_eq!(auto["ids"], cpu["ids"], "--cpu-misses auto: tokens");
}

/// The front door's device choice: `--device cuda` on a machine without the driver fails naming
/// it; the default falls back to the CPU with one line.
#[test]
fn without_a_driver_the_default_is_the_cpu_and_cuda_asked_for_fails() {
    let empty = tempfile::tempdir().expect("tempdir");
    let gen = ["generate", "-p", "Hi", "-n", "1", "--temp", "0"];
    let asked = moerun(empty.path(), &[&gen[..], &["--device", "cuda"]].concat(), &[]);
    let err = String::from_utf8_lossy(&asked.stderr);
    if library("cuda").is_ok() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    assert!(!asked.status.success() && err.contains("--device cuda:0") && err.contains("driver"), "{err}");
    let default = moerun(empty.path(), &gen, &[]);
    let err = String::from_utf8_lossy(&default.stderr);
    assert!(default.status.success(), "{err}");
    assert!(err.contains("running on the CPU"), "{err}");
}

/// gpt-oss's sliding-window layers keep a ring of window + batch positions in GPU memory, as on
/// the CPU: with 4-token batches the ring (16 + 4) wraps twice over 52 positions, and every logit
/// equals the full-length cache's bit for bit (`--swa-full`), the tokens the CPU's.
#[test]
fn sliding_window_layers_keep_a_ring_on_the_gpu() {
    let Some(fixtures) = common::fixtures() else { return };
    let Some(d) = driver() else { return };
    let model = fixtures.join("../fixtures-next/gptoss-tiny/gptoss-tiny-Q8_0.gguf");
    let model = model.display().to_string();
    let prompt = "The quick brown fox jumps over the lazy dog and then";
    let base = ["generate", "-m", &model, "-p", prompt, "-n", "40", "--temp", "0", "--ignore-eos", "-c", "128"];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(&["--json", "-b", "4"]);
        args.extend_from_slice(extra);
        json_of(&moerun(&d.path, &args, &[]), &extra.join(" "))
    };
    let ring = run(&["--device", "cuda"]);
    let full = run(&["--device", "cuda", "--swa-full"]);
    let cpu = run(&["--device", "cpu"]);
    assert_eq!(ring["ids"].as_array().map(Vec::len), Some(40), "{ring}");
    assert_eq!(ring["ids"], full["ids"], "ring vs full length: tokens");
    assert_eq!(ring["top_logits"], full["top_logits"], "ring vs full length: logits, bit for bit");
    assert_eq!(ring["ids"], cpu["ids"], "cuda vs cpu: tokens");
}

/// llama.cpp's reference cases on the (emulated) GPU: every random-weight fixture, each family
/// being added included (`moerun device --oracle`, as a lent GPU runs it). The trained model's
/// greedy continuations are checked above against the CPU (its eight long references take the
/// emulation minutes).
#[test]
fn the_fixtures_match_llama_cpp_on_the_emulated_device() {
    let Some(fixtures) = common::fixtures() else { return };
    let Some(d) = driver() else { return };
    let mut args = vec!["device".to_string(), "--kernel-cache".into(), d.kernel_cache.clone()];
    for dir in ["mixtral-tiny", "qwen3moe-tiny"] {
        args.extend(["--oracle".into(), fixtures.join(dir).display().to_string()]);
    }
    args.extend(["--oracle".into(), fixtures.join("../fixtures-next").display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = moerun(&d.path, &args, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(" 0 failed") && text.contains("deepseek2-tiny") && text.contains("gptoss-tiny"), "{text}");
}

/// A GPU budget too small for one layer's experts fails before anything runs, naming the flag
/// and what it holds.
#[test]
fn a_gpu_budget_too_small_for_one_layer_is_refused_naming_the_flag() {
    let Some(d) = driver() else { return };
    let out = moerun(&d.path, &["generate", "-p", "Hi", "-n", "1", "--device", "cuda", "--gpu-budget", "512KiB"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--gpu-budget of 524288 bytes holds 3 expert slots") && err.contains("need 6"), "{err}");
}
