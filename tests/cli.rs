//! The front door as a user meets it: the `moerun` binary on the fixture models.

mod common;

use std::path::Path;
use std::process::Command;

use moerun::gguf::GgufFile;

/// The user's cache directory as the tests' binary sees it (routing profiles go there).
fn cache_home() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("moerun-cli-tests-{}", std::process::id()))
}

fn moerun(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moerun"))
        .args(args)
        .env("XDG_CACHE_HOME", cache_home())
        .output()
        .expect("run moerun");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> serde_json::Value {
    let (ok, stdout, stderr) = moerun(args);
    assert!(ok, "moerun {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("moerun {args:?}: bad JSON ({e}): {stdout}"))
}

#[test]
fn tokenize_matches_llama_cpp_on_every_fixture_prompt() {
    let Some(root) = common::fixtures() else { return };
    let mut n = 0;
    for (gguf, r) in common::ref_pairs(&root) {
        for c in &r.cases {
            let v = json(&["tokenize", gguf.to_str().expect("utf-8 path"), &c.prompt_text, "--no-bos", "--json"]);
            let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).expect("ids");
            assert_eq!(ids, c.prompt_ids, "{} {:?}", gguf.display(), c.prompt_text);
            n += 1;
        }
    }
    assert!(n >= 23, "only {n} prompts checked");
}

/// (file, architecture, layers, experts, experts used)
const MODELS: &[(&str, &str, u64, u64, u64)] = &[
    ("rustdoc-moe/rustdoc-moe-Q8_0.gguf", "llama", 6, 8, 2),
    ("mixtral-tiny/mixtral-tiny-Q8_0.gguf", "llama", 2, 4, 2),
    ("mixtral-tiny/mixtral-tiny-Q4_0.gguf", "llama", 2, 4, 2),
    ("mixtral-tiny/mixtral-tiny-Q4_K_M.gguf", "llama", 2, 4, 2),
    ("qwen3moe-tiny/qwen3moe-tiny-Q8_0.gguf", "qwen3moe", 2, 8, 2),
    ("qwen3moe-tiny/qwen3moe-tiny-Q4_K_M.gguf", "qwen3moe", 2, 8, 2),
];

#[test]
fn inspect_reports_architecture_and_bytes_that_add_up() {
    let Some(root) = common::fixtures() else { return };
    for &(file, arch, layers, experts, used) in MODELS {
        let path = root.join(file);
        let v = json(&["inspect", path.to_str().expect("utf-8 path"), "--json"]);
        assert_eq!(v["architecture"], arch, "{file}");
        assert_eq!(v["n_layers"], layers, "{file}");
        assert_eq!(v["n_experts"], experts, "{file}");
        assert_eq!(v["n_experts_used"], used, "{file}");
        let g = GgufFile::open(&path).expect("open fixture");
        let tensor_bytes: u64 = g.tensors().iter().map(|t| t.size).sum();
        let total = v["bytes_total"].as_u64().expect("bytes_total");
        assert_eq!(total, tensor_bytes, "{file}: bytes_total is the tensor data");
        assert_eq!(
            v["bytes_dense"].as_u64().expect("dense") + v["bytes_experts"].as_u64().expect("experts"),
            total,
            "{file}"
        );
        let data_len = std::fs::metadata(&path).expect("stat").len() - g.data_offset();
        assert!(
            total <= data_len && data_len - total < 32 * g.tensors().len() as u64,
            "{file}: {total} vs data section {data_len}"
        );
        let per = v["bytes_per_expert"].as_u64().expect("per expert");
        assert_eq!(per * layers * experts, v["bytes_experts"].as_u64().expect("experts"), "{file}");
    }
}

#[test]
fn inspect_without_a_model_uses_the_bundled_one() {
    let v = json(&["inspect", "--json"]);
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["name"], "rustdoc-moe");
}

/// From an empty prompt the bundled model ends after a few tokens; `--ignore-eos` (llama.cpp's
/// flag: end tokens are never chosen) carries the same greedy run on to the asked length.
#[test]
fn ignore_eos_generates_past_the_end_token() {
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "-p", "", "-n", "40", "--temp", "0", "--json", "-t", "2"];
        args.extend_from_slice(extra);
        let v = json(&args);
        let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).expect("ids");
        (v["stop"].as_str().unwrap_or_default().to_string(), ids)
    };
    let (stop, ended) = run(&[]);
    assert_eq!(stop, "eog", "the bundled model should end on its own here: {ended:?}");
    assert!(ended.len() < 40);
    let (stop, carried) = run(&["--ignore-eos"]);
    assert_eq!(stop, "length");
    assert_eq!(carried.len(), 40);
    assert_eq!(&carried[..ended.len()], &ended[..], "the same greedy run up to the end token");
}

#[test]
fn generate_json_gives_llama_cpp_greedy_tokens() {
    let Some(root) = common::fixtures() else { return };
    let (gguf, r) =
        common::ref_pairs(&root).into_iter().find(|(g, _)| g.ends_with("rustdoc-moe-Q8_0.gguf")).expect("rustdoc ref");
    let c = &r.cases[0];
    let v = json(&[
        "generate",
        "-m",
        gguf.to_str().expect("utf-8"),
        "-p",
        &c.prompt_text,
        "-n",
        "32",
        "--temp",
        "0",
        "--no-bos",
        "--json",
        "-t",
        "2",
    ]);
    let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).expect("ids");
    assert_eq!(ids, c.greedy_ids);
    let top: Vec<(u32, f32)> = serde_json::from_value(v["top_logits"].clone()).expect("top_logits");
    assert_eq!(top.len(), 20);
    assert_eq!(top[0].0, c.last_top20_ids[0]);
    assert!(v["decode_tok_s"].as_f64().expect("decode_tok_s") > 0.0);
}

#[test]
fn damaged_or_foreign_files_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/rustdoc-moe-Q8_0.gguf");
    let bytes = std::fs::read(&bundled).expect("read bundled model");
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let (ok, _, err) = moerun(&["inspect", cut.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("cut.gguf") && err.contains("past the end"), "{err}");
    let missing = dir.path().join("nope.gguf");
    let (ok, _, err) = moerun(&["inspect", missing.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("nope.gguf"), "{err}");
    // A valid GGUF of an architecture we do not run.
    let mut w = moerun::gguf::GgufWriter::new();
    w.add_metadata("general.architecture", moerun::gguf::Value::String("mamba9".into()));
    let foreign = dir.path().join("foreign.gguf");
    w.write(&foreign).expect("write");
    let (ok, _, err) = moerun(&["inspect", foreign.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("foreign.gguf") && err.contains("unknown architecture 'mamba9'"), "{err}");
}

#[test]
fn generate_with_an_expert_cache_gives_the_same_tokens_and_reports_the_cache() {
    let args = [
        "generate",
        "-p",
        "Iterators in Rust are lazy, which means",
        "-n",
        "24",
        "--temp",
        "0",
        "--no-bos",
        "--json",
        "-t",
        "2",
    ];
    let plain = json(&args);
    let mut with_cache = args.to_vec();
    with_cache.extend(["--expert-budget", "25%", "--policy", "hobbit"]);
    let cached = json(&with_cache);
    assert_eq!(plain["ids"], cached["ids"]);
    assert!(plain["expert_cache"].is_null());
    let hit = cached["expert_cache"]["hit_rate"].as_f64().expect("hit_rate");
    assert!((0.0..1.0).contains(&hit), "{hit}");
    assert!(cached["expert_cache"]["bytes_read_high"].as_u64().expect("bytes") > 0);
    // The predictor is on by default with a budget, and reports itself; the run's routing
    // profile is saved in the user's cache directory, and the next run warms from it.
    let p = &cached["expert_cache"]["predictor"];
    assert_eq!(p["distance"], 1, "{p}");
    assert!(p["recall"].as_f64().is_some_and(|r| r > 0.5), "{p}");
    assert!(p["per_distance"].as_array().is_some_and(|d| d.len() == 1), "{p}");
    assert!(cached["expert_cache"]["stall_ms_per_token"].as_f64().is_some());
    let dir = cache_home().join("moerun/profiles");
    let saved: Vec<_> = std::fs::read_dir(&dir).expect("profile dir").flatten().collect();
    assert_eq!(saved.len(), 1, "one profile for one model in {}", dir.display());
    let again = json(&with_cache);
    assert_eq!(again["ids"], plain["ids"]);
    assert!(again["expert_cache"]["bytes_warmed"].as_u64().expect("warmed") > 0, "{}", again["expert_cache"]);
    with_cache.extend(["--predict", "off", "--profile", "off"]);
    let bare = json(&with_cache);
    assert!(bare["expert_cache"]["predictor"].is_null() && bare["expert_cache"]["bytes_warmed"] == 0);
    let _ = std::fs::remove_dir_all(cache_home());
    let (ok, _, err) = moerun(&["generate", "-p", "x", "--expert-budget", "12 parsecs"]);
    assert!(!ok && err.contains("parsecs"), "{err}");
    let (ok, _, err) = moerun(&["generate", "-p", "x", "--expert-budget", "25%", "--predict", "7"]);
    assert!(!ok && err.contains("--predict '7'"), "{err}");
}

/// Issue 13, item 5: a run with `--memory-budget` stays inside what the budget allows (resident
/// memory sampled by the kernel: `VmHWM`), where the same run without it does not; a budget too
/// small for one layer's experts fails before any weight is copied; a budget past the memory
/// this process may take is refused.
#[test]
fn a_memory_budget_bounds_resident_memory_and_an_impossible_one_fails_before_loading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("olmoe-1L.gguf");
    let m = model.to_str().expect("utf-8 path");
    // One OLMoE layer at real shapes: 226 MiB of experts, 120 MiB of dense weights.
    let (ok, _, err) = moerun(&["synth", "--preset", "olmoe", "--layers", "1", "-o", m]);
    assert!(ok, "{err}");
    let run = [
        "generate",
        "-m",
        m,
        "--prompt-tokens",
        "8",
        "-n",
        "8",
        "--temp",
        "0",
        "--json",
        "-t",
        "2",
        "--profile",
        "off",
    ];
    let mut budgeted = run.to_vec();
    budgeted.extend(["--memory-budget", "300MiB"]);
    let b = json(&budgeted);
    let mem = &b["memory"];
    let peak = mem["peak_rss_bytes"].as_u64().expect("peak RSS");
    let bound = mem["bound_bytes"].as_u64().expect("bound");
    assert!(peak <= bound, "peak RSS {peak} past the bound {bound}: {mem}");
    assert!(peak as f64 <= 1.1 * (300u64 << 20) as f64, "peak RSS {peak} past the budget + 10%: {mem}");
    // Without the budget every expert is copied: the bound is what the budget bought.
    let free = json(&run);
    assert!(free["memory"]["peak_rss_bytes"].as_u64().expect("peak RSS") > bound, "{}", free["memory"]);
    assert_eq!(free["ids"], b["ids"], "the budget never changes the answer");

    let mut small = run.to_vec();
    small.extend(["--memory-budget", "240MiB", "-v"]);
    let (ok, _, err) = moerun(&small);
    assert!(!ok && err.contains("--memory-budget 240MiB") && err.contains("top_k"), "{err}");
    assert!(!err.contains("MiB) resident"), "no weight may be copied before the budget is refused: {err}");
    let (ok, _, err) = moerun(&["generate", "-p", "x", "--memory-budget", "100TiB"]);
    assert!(!ok && err.contains("more than this process may take"), "{err}");
}

/// Issue 13, item 4: SIGTERM to `moerun serve` in the middle of a streamed answer: the answer
/// still ends properly (within the grace period), then the process exits 0.
#[test]
fn sigterm_mid_answer_lets_it_finish_and_exits_cleanly() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = Command::new(env!("CARGO_BIN_EXE_moerun"))
        .args(["serve", "--port", "0", "-t", "1", "--ctx-size", "1024", "--shutdown-grace", "60", "--profile", "off"])
        .env("XDG_CACHE_HOME", cache_home())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start moerun serve");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("the serving line");
    let addr = line.split("http://").nth(1).and_then(|r| r.split('/').next()).expect("an address").to_string();
    let mut sock = std::net::TcpStream::connect(&addr).expect("connect");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(60))).expect("timeout");
    let body = r#"{"prompt": "The borrow checker", "max_tokens": 600, "ignore_eos": true, "stream": true}"#;
    write!(
        sock,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"text\"") {
        let n = sock.read(&mut buf).expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    sock.read_to_end(&mut seen).expect("the rest of the stream");
    let text = String::from_utf8_lossy(&seen);
    // The answer ran to its length (the body is chunked: `[DONE]` comes before the last chunk),
    // with no error object (`"error":{`; a sampled token may well be the word "error").
    assert!(
        text.contains("\"finish_reason\":\"length\"") && text.contains("data: [DONE]") && !text.contains("\"error\":{"),
        "{text}"
    );
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "moerun serve did not stop");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    assert!(status.success() && err.contains("moerun: stopped"), "{status:?}: {err}");
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `size` bytes at a new folder under `parent`; None when this user cannot mount (not root).
    fn mount(parent: &Path, size: usize) -> Option<Tmpfs> {
        let dir = parent.join("small-disk");
        std::fs::create_dir_all(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Issue 13, item 4: writing sidecars, bench results, routing traces and profiles onto a full
/// disk fails naming the file and leaves no half-written file (nor a temp file); a file that was
/// there before is kept whole. Needs root for the tmpfs (CI runs as root).
#[test]
fn a_full_disk_leaves_no_half_written_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(disk) = Tmpfs::mount(dir.path(), 512 << 10) else {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root: mounting a tmpfs must work");
        eprintln!("skipped: cannot mount a tmpfs (not root)");
        return;
    };
    let full = disk.0.clone();
    let at = |name: &str| full.join(name).to_string_lossy().into_owned();
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(&full)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    std::fs::write(full.join("bench.json"), b"old").expect("old result");
    std::fs::write(full.join("trace.jsonl"), b"old").expect("old trace");
    // A sidecar of several MB cannot fit in 512 KiB.
    let (ok, _, err) = moerun(&["prepare", "--low", "q4_0", "-o", &at("side.gguf")]);
    assert!(!ok && err.contains("side.gguf"), "{err}");
    // Fill what is left, then write results, a trace and a profile.
    let filler = vec![7u8; 4096];
    let mut f = std::fs::File::create(full.join("filler")).expect("filler");
    while std::io::Write::write_all(&mut f, &filler).is_ok() {}
    drop(f);
    let (ok, _, err) = moerun(&["bench", "-p", "8", "-n", "4", "-r", "1", "--json", &at("bench.json")]);
    assert!(!ok && err.contains("bench.json"), "{err}");
    let (ok, _, err) = moerun(&["generate", "-p", "fn main", "-n", "8", "--trace", &at("trace.jsonl")]);
    assert!(!ok && err.contains("trace.jsonl"), "{err}");
    let (_, _, err) =
        moerun(&["generate", "-p", "fn main", "-n", "8", "--expert-budget", "50%", "--profile", &at("p.json")]);
    assert!(!full.join("p.json").exists(), "no half profile: {err}");
    assert_eq!(std::fs::read(full.join("bench.json")).expect("old result"), b"old");
    assert_eq!(std::fs::read(full.join("trace.jsonl")).expect("old trace"), b"old");
    assert_eq!(listing(), ["bench.json", "filler", "trace.jsonl"], "nothing half-written, no temp file");
}

/// Issue 13, item 4: a model file cut while its experts are read through the memory map (no
/// expert cache) ends the process with a message naming the file, not a bare "Bus error".
#[test]
fn a_file_cut_under_its_memory_map_is_reported_by_name() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("mapped.gguf");
    let m = model.to_str().expect("utf-8 path");
    let (ok, _, err) = moerun(&["synth", "--preset", "olmoe", "--layers", "1", "-o", m]);
    assert!(ok, "{err}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_moerun"))
        .args([
            "generate",
            "-m",
            m,
            "--resident",
            "none",
            "--prompt-tokens",
            "4",
            "-n",
            "2000",
            "--ignore-eos",
            "-t",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start moerun generate");
    // The first generated text: the experts are being read through the mapping.
    let mut first = [0u8; 1];
    child.stdout.as_mut().expect("stdout").read_exact(&mut first).expect("some output");
    let len = std::fs::metadata(&model).expect("stat").len();
    std::fs::OpenOptions::new().write(true).open(&model).and_then(|f| f.set_len(len / 4)).expect("cut");
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a read past the cut must end the run: {err}");
    assert!(err.contains("mapped.gguf was cut or changed on disk"), "{:?}: {err}", out.status);
}
