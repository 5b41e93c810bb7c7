//! `moerun prepare` and the low-precision sidecar end to end: synthetic and bundled models
//! requantized to low types, the error of the low experts against the high ones, and a clear
//! error for every kind of damaged or foreign sidecar.

use std::path::{Path, PathBuf};
use std::process::Command;

use moerun::arch::{tn, tn_expert, TensorKind};
use moerun::ggml::kernels;
use moerun::gguf::{GgmlType, GgufFile, GgufWriter, Value};
use moerun::lowprec::{self, LowPrecSidecar, KEY_LOW_TYPE, KEY_SOURCE_FILE_BYTES, KEY_VERSION};
use moerun::model::{Model, WeightDesc};
use moerun::synth::SynthConfig;

const BUNDLED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/rustdoc-moe-Q8_0.gguf");

/// Two MoE layers of four experts, rows of 256 and 512 values (whole K-quant blocks).
fn tiny(seed: u64) -> SynthConfig {
    SynthConfig {
        n_head: 4,
        n_head_kv: 2,
        head_dim: 64,
        n_ff_shexp: 0,
        n_vocab: 300,
        n_ctx: 128,
        seed,
        ..SynthConfig::small("llama", GgmlType::Q8_0)
    }
}

fn load(path: &Path) -> Model {
    Model::load(path).unwrap_or_else(|e| panic!("{e}"))
}

fn synth(dir: &Path, name: &str, cfg: SynthConfig) -> PathBuf {
    let path = dir.join(name);
    cfg.write(&path, &mut |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
    path
}

/// Prepares `model` to `low` at `out`, checking progress ends at the expert bytes, then opens it.
fn prepare(model: &Model, low: GgmlType, out: &Path) -> LowPrecSidecar {
    let mut last = (0, 1);
    lowprec::prepare(model, low, out, &mut |d, t| last = (d, t)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(last, (model.expert_bytes(), model.expert_bytes()), "progress ends at the expert bytes");
    let partial = format!("{}.partial", out.display());
    assert!(!Path::new(&partial).exists(), "{partial} left behind");
    LowPrecSidecar::open(out, model).unwrap_or_else(|e| panic!("{e}"))
}

fn dequantize(w: &WeightDesc, bytes: &[u8]) -> Vec<f32> {
    let k = kernels(w.ty).expect("kernels");
    let rb = bytes.len() / w.rows;
    let mut out = vec![0f32; w.rows * w.cols];
    for (row, o) in bytes.chunks_exact(rb).zip(out.chunks_exact_mut(w.cols)) {
        k.dequantize(row, o);
    }
    out
}

/// Σ(low − high)² / Σ high² over every expert matrix, after checking each sidecar extent has the
/// model's shape at the low type.
fn nmse(model: &Model, side: &LowPrecSidecar) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for l in 0..model.layers.len() {
        let Some(ex) = model.experts(l) else { continue };
        for (e, hi) in ex.iter().enumerate() {
            let lo = side.expert(l, e);
            for (h, w) in [hi.gate, hi.up, hi.down].iter().zip(&lo) {
                assert_eq!((w.ty, w.rows, w.cols), (side.low_type(), h.rows, h.cols), "layer {l} expert {e}");
                let (a, b) = (dequantize(h, model.bytes_of(h)), dequantize(w, side.bytes_of(w)));
                for (x, y) in a.iter().zip(&b) {
                    err += (*x as f64 - *y as f64).powi(2);
                    norm += (*x as f64).powi(2);
                }
            }
        }
    }
    err / norm
}

/// Measured on the tiny synthetic model (Gaussian rows, from Q8_0): q4_0 0.0067, q3_K 0.0213,
/// q2_K 0.0824; bounds leave 2–3× margin.
const BOUNDS: &[(GgmlType, f64)] = &[(GgmlType::Q4_0, 0.02), (GgmlType::Q3_K, 0.05), (GgmlType::Q2_K, 0.2)];

#[test]
fn tiny_model_low_experts_are_close_to_the_high_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = load(&synth(dir.path(), "tiny.gguf", tiny(7)));
    for &(low, bound) in BOUNDS {
        let side = prepare(&model, low, &dir.path().join(format!("tiny.{low}.lowprec.gguf")));
        assert_eq!(side.low_type(), low);
        let per = low.row_bytes(256).expect("rb") * 512 * 2 + low.row_bytes(512).expect("rb") * 256;
        assert_eq!(side.bytes_per_expert(), per, "{low}");
        let [g, u, d] = side.expert(1, 3);
        assert_eq!((g.bytes + u.bytes + d.bytes, d.rows, d.cols), (per, 256, 512), "{low}");
        let e = nmse(&model, &side);
        eprintln!("tiny {low}: NMSE {e:.4}");
        assert!(e < bound && e > 0.0, "{low}: NMSE {e} (bound {bound})");
    }
}

/// A source with one tensor per expert (the old layout) gives the same low experts as the stacked
/// source with the same values, stored stacked.
#[test]
fn per_expert_source_gives_the_same_stacked_sidecar_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stacked_path = synth(dir.path(), "stacked.gguf", tiny(7));
    let split_path = dir.path().join("split.gguf");
    let src = GgufFile::open(&stacked_path).expect("open");
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata() {
        w.add_metadata(k.clone(), v.clone());
    }
    let split = |l| {
        [
            (TensorKind::FfnGateExps, TensorKind::FfnGateExpert),
            (TensorKind::FfnUpExps, TensorKind::FfnUpExpert),
            (TensorKind::FfnDownExps, TensorKind::FfnDownExpert),
        ]
        .map(|(s, e)| (tn(s, Some(l)), e))
    };
    for t in src.tensors() {
        let data = src.tensor_data(t);
        let per_expert = (0..2).flat_map(split).find(|(name, _)| *name == t.name);
        match per_expert {
            Some((_, kind)) => {
                let layer: usize = t.name[4..].split('.').next().and_then(|s| s.parse().ok()).expect("layer");
                let n = t.shape[2] as usize;
                for (e, chunk) in data.chunks_exact(data.len() / n).enumerate() {
                    w.add_tensor(tn_expert(kind, layer, e), t.ggml_type, &t.shape[..2], chunk.to_vec()).expect("add");
                }
            }
            None => w.add_tensor(t.name.clone(), t.ggml_type, &t.shape, data.to_vec()).expect("add"),
        }
    }
    w.write(&split_path).expect("write");
    assert!(GgufFile::open(&split_path).expect("open").tensor("blk.1.ffn_down.3.weight").is_some());

    let (a, b) = (load(&stacked_path), load(&split_path));
    let (sa, sb) =
        (prepare(&a, GgmlType::Q4_0, &dir.path().join("a.lp")), prepare(&b, GgmlType::Q4_0, &dir.path().join("b.lp")));
    assert!(sb.file().tensor("blk.0.ffn_gate_exps.weight").is_some(), "stored stacked");
    for l in 0..2 {
        for e in 0..4 {
            for (x, y) in sa.expert(l, e).iter().zip(&sb.expert(l, e)) {
                assert_eq!(sa.bytes_of(x), sb.bytes_of(y), "layer {l} expert {e}");
            }
        }
    }
    // Same values, different tables: each sidecar belongs to its own model only.
    let err = LowPrecSidecar::open(sa.path(), &b).expect_err("foreign sidecar");
    assert!(err.to_string().contains("made for a different model"), "{err}");
}

#[test]
fn bundled_rustdoc_moe_prepares_to_q4_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = load(Path::new(BUNDLED));
    let side = prepare(&model, GgmlType::Q4_0, &dir.path().join("rustdoc.q4_0.lowprec.gguf"));
    // 256×512 gate/up and 512×256 down: 3 × 131072 values in 18-byte blocks of 32.
    assert_eq!(side.bytes_per_expert(), 3 * 131072 / 32 * 18);
    let e = nmse(&model, &side);
    eprintln!("rustdoc-moe q4_0: NMSE {e:.4}");
    assert!(e < 0.02, "NMSE {e}");
}

#[test]
fn types_and_shapes_that_cannot_be_made_are_refused_before_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let narrow =
        load(&synth(dir.path(), "narrow.gguf", SynthConfig { n_embd: 64, n_head: 4, head_dim: 16, ..tiny(7) }));
    let wide = load(&synth(dir.path(), "wide.gguf", tiny(7)));
    let out = dir.path().join("out.gguf");
    for (model, low, expected) in [
        (
            &narrow,
            GgmlType::Q2_K,
            "blk.0.ffn_gate_exps.weight' has rows of 64 values, not a whole number of q2_K blocks",
        ),
        (&wide, GgmlType::IQ2_XXS, "importance matrix"),
        (&wide, GgmlType::Q8_K, "ggml cannot quantize to it"),
    ] {
        let err = lowprec::prepare(model, low, &out, &mut |_, _| {}).expect_err(low.name());
        assert!(err.to_string().contains(expected), "{low}: {err}");
        assert!(!out.exists() && !dir.path().join("out.gguf.partial").exists(), "{low}: nothing written");
    }
}

/// Rewrites the GGUF at `path` with its metadata and tensors edited by `edit`.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, GgmlType, Vec<u64>, Vec<u8>)>)) {
    let f = GgufFile::open(path).expect("open");
    let mut meta = f.metadata().to_vec();
    let mut tensors: Vec<_> =
        f.tensors().iter().map(|t| (t.name.clone(), t.ggml_type, t.shape.clone(), f.tensor_data(t).to_vec())).collect();
    drop(f);
    edit(&mut meta, &mut tensors);
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.add_metadata(k, v);
    }
    for (name, ty, shape, data) in tensors {
        w.add_tensor(name, ty, &shape, data).expect("add");
    }
    w.write(path).expect("write");
}

fn set_key(path: &Path, key: &str, value: Value) {
    rewrite(path, |meta, _| meta.iter_mut().filter(|(k, _)| k == key).for_each(|(_, v)| *v = value.clone()));
}

struct Fixture {
    dir: tempfile::TempDir,
    model_path: PathBuf,
    model: Model,
    good: PathBuf,
}

/// Copies the good sidecar to `<name>.lowprec.gguf`, damages it with `mutate`, and expects
/// `open` to fail with a message naming the file and containing `expected`.
fn check(fx: &Fixture, name: &str, mutate: impl FnOnce(&Path), expected: &str) {
    let path = fx.dir.path().join(format!("{}.lowprec.gguf", name.replace(' ', "-")));
    std::fs::copy(&fx.good, &path).expect("copy");
    mutate(&path);
    let err = match LowPrecSidecar::open(&path, &fx.model) {
        Ok(_) => panic!("{name}: damaged sidecar accepted"),
        Err(e) => e.to_string(),
    };
    let file = path.file_name().and_then(|n| n.to_str()).expect("utf-8 name");
    eprintln!("{name}: {err}");
    assert!(err.contains(file), "{name}: error does not name the file: {err}");
    assert!(err.contains(expected), "{name}: expected '{expected}' in: {err}");
}

#[test]
fn damaged_and_foreign_sidecars_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_path = synth(dir.path(), "tiny.gguf", tiny(7));
    let model = load(&model_path);
    let good = dir.path().join("good.lowprec.gguf");
    prepare(&model, GgmlType::Q4_0, &good);
    let fx = Fixture { dir, model_path, model, good };
    let other = |cfg: SynthConfig| {
        move |p: &Path| {
            let src = p.with_extension("src.gguf");
            cfg.write(&src, &mut |_, _| {}).expect("write");
            lowprec::prepare(&load(&src), GgmlType::Q4_0, p, &mut |_, _| {}).expect("prepare");
        }
    };

    check(&fx, "other model same shapes", other(tiny(8)), "made for a different model (fingerprint");
    check(
        &fx,
        "other model more experts",
        other(SynthConfig { n_expert: 8, ..tiny(7) }),
        "made for a different model (fingerprint",
    );
    check(
        &fx,
        "other model fewer layers",
        other(SynthConfig { n_layer: 1, ..tiny(7) }),
        "made for a different model (fingerprint",
    );
    check(
        &fx,
        "truncated",
        |p| {
            let f = std::fs::OpenOptions::new().write(true).open(p).expect("open");
            let len = f.metadata().expect("len").len();
            f.set_len(len - 4096).expect("truncate");
        },
        "past the end of the file",
    );
    check(&fx, "empty", |p| std::fs::write(p, b"").expect("write"), "file ends inside");
    check(
        &fx,
        "the model itself",
        |p| {
            std::fs::copy(&fx.model_path, p).expect("copy");
        },
        "not a moerun low-precision sidecar (no 'moerun.sidecar.version'",
    );
    check(
        &fx,
        "one tensor missing",
        |p| rewrite(p, |_, t| t.retain(|x| x.0 != "blk.1.ffn_down_exps.weight")),
        "tensor 'blk.1.ffn_down_exps.weight' is missing",
    );
    check(
        &fx,
        "extra tensor",
        |p| rewrite(p, |_, t| t.push(("output.weight".into(), GgmlType::F32, vec![4], vec![0; 16]))),
        "tensor 'output.weight' is not a routed-expert tensor",
    );
    check(
        &fx,
        "wrong shape",
        |p| {
            rewrite(p, |_, t| {
                let x = t.iter_mut().find(|x| x.0 == "blk.0.ffn_up_exps.weight").expect("tensor");
                x.2 = vec![256, 256, 8];
            })
        },
        "blk.0.ffn_up_exps.weight' has shape [256, 256, 8], this model's experts need [256, 512, 4]",
    );
    check(
        &fx,
        "wrong tensor type",
        |p| {
            rewrite(p, |_, t| {
                let x = t.iter_mut().find(|x| x.0 == "blk.1.ffn_gate_exps.weight").expect("tensor");
                x.1 = GgmlType::IQ4_NL; // same block bytes as q4_0
            })
        },
        "blk.1.ffn_gate_exps.weight' is iq4_nl, but moerun.sidecar.low_type says q4_0",
    );
    check(
        &fx,
        "wrong low type",
        |p| set_key(p, KEY_LOW_TYPE, Value::String("q4_1".into())),
        "is q4_0, but moerun.sidecar.low_type says q4_1",
    );
    check(
        &fx,
        "unknown low type",
        |p| set_key(p, KEY_LOW_TYPE, Value::String("q9_9".into())),
        "'moerun.sidecar.low_type' names 'q9_9', which is not a ggml type",
    );
    check(
        &fx,
        "low type needing an imatrix",
        |p| set_key(p, KEY_LOW_TYPE, Value::String("iq2_xxs".into())),
        "'moerun.sidecar.low_type' is iq2_xxs",
    );
    check(
        &fx,
        "wrong version",
        |p| set_key(p, KEY_VERSION, Value::U32(2)),
        "'moerun.sidecar.version' is 2; this moerun reads version 1",
    );
    check(
        &fx,
        "version of the wrong type",
        |p| set_key(p, KEY_VERSION, Value::String("1".into())),
        "'moerun.sidecar.version' should be a non-negative integer",
    );
    check(
        &fx,
        "source size differs",
        |p| set_key(p, KEY_SOURCE_FILE_BYTES, Value::U64(12345)),
        "made for a different model (source file bytes 12345",
    );
}

#[test]
fn cli_prepare_prints_sizes_and_refuses_unknown_types() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rd.q2_K.lowprec.gguf");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_moerun")).args(args).output().expect("run moerun");
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (ok, stderr) = run(&["prepare", BUNDLED, "--low", "q2_K", "-o", out.to_str().expect("utf-8")]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("per expert: q8_0 0.398 MiB -> q2_K 0.123 MiB"), "{stderr}");
    let model = load(Path::new(BUNDLED));
    let side = LowPrecSidecar::open(&out, &model).unwrap_or_else(|e| panic!("{e}"));
    // Measured 0.0876 (q4_0 gives 0.0074 on the same experts).
    let e = nmse(&model, &side);
    eprintln!("rustdoc-moe q2_K: NMSE {e:.4}");
    assert!(e < 0.15, "NMSE {e}");
    // Without -o the sidecar goes beside the model, named after it and the low type.
    let tiny_path = synth(dir.path(), "tiny-Q8_0.gguf", tiny(7));
    let (ok, stderr) = run(&["prepare", tiny_path.to_str().expect("utf-8"), "--low", "q3_k"]);
    assert!(ok, "{stderr}");
    let beside = dir.path().join("tiny-Q8_0.q3_K.lowprec.gguf");
    assert!(stderr.contains(&format!("wrote {}", beside.display())), "{stderr}");
    assert_eq!(LowPrecSidecar::open(&beside, &load(&tiny_path)).map(|s| s.low_type()).ok(), Some(GgmlType::Q3_K));
    let (ok, stderr) = run(&["prepare", "--low", "q7_0", "-o", out.to_str().expect("utf-8")]);
    assert!(!ok && stderr.contains("unknown ggml type 'q7_0'"), "{stderr}");
}
