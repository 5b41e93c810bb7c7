//! Probe (ignored): our engine vs the linked libllama, prompt by prompt and prefix by prefix.

mod common;

use std::sync::Arc;

use moerun::engine::{Engine, EngineConfig};
use moerun::layers::Logits;
use moerun::model::Model;

fn maxdiff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
#[ignore]
fn probe_vs_libllama() {
    let Some(root) = common::fixtures() else { return };
    let fa: i32 = std::env::var("FA").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    for (gguf, r) in common::ref_pairs(&root) {
        let name = gguf.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if !name.starts_with("rustdoc-moe") {
            continue;
        }
        let mut lr = common::llama_ref::LlamaRef::new(&gguf, 256, fa);
        let model = Arc::new(Model::load(&gguf).unwrap());
        let mut eng = Engine::new(model, EngineConfig { threads: 1, ..Default::default() });
        let nv = lr.n_vocab();
        for c in &r.cases {
            let ids = &c.prompt_ids;
            let theirs = lr.eval(ids);
            let last = &theirs[(ids.len() - 1) * nv..];
            let vs_fixture = c
                .last_top20_ids
                .iter()
                .zip(&c.last_top20_logits)
                .map(|(&i, &w)| (last[i as usize] - w).abs())
                .fold(0f32, f32::max);
            let mut sess = eng.new_session();
            let ours = eng.eval(&mut sess, ids, Logits::All).unwrap();
            let per_pos: Vec<String> =
                (0..ids.len()).map(|p| format!("{:.3}", maxdiff(&ours[p * nv..(p + 1) * nv], &theirs[p * nv..(p + 1) * nv]))).collect();
            println!("n={:2} lib-vs-fixture {:.4} ours-vs-lib per pos {:?}  {:?}", ids.len(), vs_fixture, per_pos, c.prompt_text);
            // prefixes decoded as their own batch
            let mut pre = Vec::new();
            for k in 1..=ids.len() {
                let t = lr.eval(&ids[..k]);
                let mut s2 = eng.new_session();
                let o = eng.eval(&mut s2, &ids[..k], Logits::Last).unwrap();
                pre.push(format!("{:.3}", maxdiff(&o, &t[(k - 1) * nv..])));
            }
            println!("      prefix-batches last-diff {:?}", pre);
        }
    }
}

struct Routes(Vec<(usize, usize, moerun::layers::Route)>);
impl moerun::layers::RouteObserver for Routes {
    fn route(&mut self, l: usize, t: usize, r: &moerun::layers::Route) {
        self.0.push((l, t, r.clone()));
    }
}

/// Routing and per-layer tensors: ours vs libllama's, for one prompt.
#[test]
#[ignore]
fn probe_routes() {
    let Some(root) = common::fixtures() else { return };
    let want: usize = std::env::var("CASE").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    for (gguf, r) in common::ref_pairs(&root) {
        let name = gguf.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if !name.starts_with("rustdoc-moe") {
            continue;
        }
        let mut lr = common::llama_ref::LlamaRef::new(&gguf, 256, 1);
        let model = Arc::new(Model::load(&gguf).unwrap());
        let mut eng = Engine::new(model.clone(), EngineConfig { threads: 1, ..Default::default() });
        let c = &r.cases[want];
        let ids = &c.prompt_ids;
        let (_, cap) = lr.eval_capture(ids, &["ffn_moe_topk", "ffn_moe_weights_norm", "ffn_moe_logits", "ffn_moe_probs"]);
        let mut names: Vec<_> = cap.keys().cloned().collect();
        names.sort();
        println!("captured {:?}", names);
        let mut routes = Routes(Vec::new());
        let mut sess = eng.new_session();
        eng.eval_with(&mut sess, ids, Logits::All, &moerun::layers::MappedExperts(&model), &mut routes).unwrap();
        let ne = model.hp.n_expert;
        for (l, t, rt) in &routes.0 {
            let (_, topk) = &cap[&format!("ffn_moe_topk-{l}")];
            let (_, w) = &cap[&format!("ffn_moe_weights_norm-{l}")];
            let (_, lg) = &cap[&format!("ffn_moe_logits-{l}")];
            let k = rt.experts.len();
            let theirs: Vec<u32> = topk[t * k..(t + 1) * k].iter().map(|&v| v as u32).collect();
            let tw = &w[t * k..(t + 1) * k];
            let wd = rt.weights.iter().zip(tw).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let tl = &lg[t * ne..(t + 1) * ne];
            let mut sl = tl.to_vec();
            sl.sort_by(|a, b| b.total_cmp(a));
            let flag = if theirs != rt.experts || wd > 0.0 { "  <<<" } else { "" };
            println!("l{l} t{t:2} ours {:?} {:?} lib {:?} {:?} wdiff {wd:e} gap23 {:.2e}{flag}", rt.experts, rt.weights, theirs, tw, sl[k - 1] - sl[k]);
        }
    }
}

fn diff_rows(a: &[f32], b: &[f32], w: usize) -> Vec<String> {
    a.chunks(w).zip(b.chunks(w)).map(|(x, y)| format!("{:.1e}", maxdiff(x, y))).collect()
}

/// Op by op on libllama's own inputs: router matmul, attention.
#[test]
#[ignore]
fn probe_ops() {
    use moerun::backend::cpu::{matmul, QActs, ThreadPool};
    use moerun::engine::kv::{KvCache, KvType};
    let Some(root) = common::fixtures() else { return };
    let want: usize = std::env::var("CASE").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    for (gguf, r) in common::ref_pairs(&root) {
        let name = gguf.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if !name.starts_with("rustdoc-moe") {
            continue;
        }
        let mut lr = common::llama_ref::LlamaRef::new(&gguf, 256, 1);
        let m = Model::load(&gguf).unwrap();
        let hp = &m.hp;
        let c = &r.cases[want];
        let ids = &c.prompt_ids;
        let n = ids.len();
        let (_, cap) = lr.eval_capture(ids, &[""]);
        let mut names: Vec<_> = cap.iter().filter(|(k, _)| k.ends_with("-0")).map(|(k, v)| format!("{k}{:?}", v.0)).collect();
        names.sort();
        println!("layer-0 tensors {names:?}");
        let pool = ThreadPool::new(1);
        let mut acts = QActs::new();
        for (l, layer) in m.layers.iter().enumerate() {
            if let moerun::model::Ffn::Moe { router, .. } = &layer.ffn {
                let x = &cap[&format!("ffn_norm-{l}")].1;
                let mut out = vec![0f32; n * hp.n_expert];
                matmul(&pool, m.mat(router), x, &mut acts, &mut out);
                println!("l{l} router  {:?}", diff_rows(&out, &cap[&format!("ffn_moe_logits-{l}")].1, hp.n_expert));
            }
            {
                let d = hp.n_embd;
                let mut h = vec![0f32; n * d];
                let src = if l == 0 { None } else { Some(&cap[&format!("l_out-{}", l - 1)].1) };
                if let Some(src) = src {
                    for t in 0..n {
                        moerun::backend::cpu::ops::rms_norm(&src[t * d..(t + 1) * d], &layer.attn_norm, hp.rms_eps, &mut h[t * d..(t + 1) * d]);
                    }
                    println!("l{l} attn_nrm{:?}", diff_rows(&h, &cap[&format!("attn_norm-{l}")].1, d));
                }
                let fi = &cap[&format!("ffn_inp-{l}")].1;
                for t in 0..n {
                    moerun::backend::cpu::ops::rms_norm(&fi[t * d..(t + 1) * d], &layer.ffn_norm, hp.rms_eps, &mut h[t * d..(t + 1) * d]);
                }
                println!("l{l} ffn_nrm {:?}", diff_rows(&h, &cap[&format!("ffn_norm-{l}")].1, d));
                // q, k projections + rope from libllama's attn_norm
                let an = &cap[&format!("attn_norm-{l}")].1;
                let hd = hp.head_dim;
                for (w, name, nh) in [(&layer.wq, "Qcur", hp.n_head), (&layer.wk, "Kcur", hp.n_head_kv), (&layer.wv, "Vcur", hp.n_head_kv)] {
                    let mut o = vec![0f32; n * nh * hd];
                    matmul(&pool, m.mat(w), an, &mut acts, &mut o);
                    if name != "Vcur" {
                        let rope = moerun::backend::cpu::ops::Rope { style: m.spec.rope, n_dims: hp.n_rot, freq_base: hp.rope_freq_base, freq_scale: hp.rope_freq_scale };
                        let mut ang = vec![0f32; hp.n_rot];
                        for t in 0..n {
                            rope.angles(t, &mut ang);
                            o[t * nh * hd..(t + 1) * nh * hd].chunks_exact_mut(hd).for_each(|hh| rope.apply(hh, &ang));
                        }
                    }
                    println!("l{l} {name}    {:?}", diff_rows(&o, &cap[&format!("{name}-{l}")].1, nh * hd));
                }
            }
            // attention from libllama's roped q, k, v
            let (q, k, v) = (&cap[&format!("Qcur-{l}")].1, &cap[&format!("Kcur-{l}")].1, &cap[&format!("Vcur-{l}")].1);
            let hd = hp.head_dim;
            let (qd, kvd) = (hp.n_head * hd, hp.n_head_kv * hd);
            let mut kv = KvCache::new(KvType::F16, hp.n_layer, 256, hp.n_head_kv, hd);
            for t in 0..n {
                kv.store(l, t, &k[t * kvd..(t + 1) * kvd], &v[t * kvd..(t + 1) * kvd]);
            }
            let kq = moerun::backend::cpu::kernels(moerun::gguf::GgmlType::F16).unwrap();
            let mut att = vec![0f32; n * qd];
            let mut qc = vec![0u8; kq.act_row_bytes(hd)];
            let mut acc = vec![0f32; hd];
            let mut acc16 = vec![0u16; hd];
            for t in 0..n {
                for h in 0..hp.n_head {
                    kq.quantize_act(&q[t * qd + h * hd..t * qd + (h + 1) * hd], &mut qc);
                    kv.attend(l, h / (hp.n_head / hp.n_head_kv), t + 1, &qc, hp.attn_scale, &mut acc, &mut acc16);
                    att[t * qd + h * hd..t * qd + (h + 1) * hd].copy_from_slice(&acc);
                }
            }
            if let Some((_, lib)) = cap.get(&format!("kqv_out-{l}")) {
                println!("l{l} attn    {:?}", diff_rows(&att, lib, qd));
                let mut o = vec![0f32; n * hp.n_embd];
                matmul(&pool, m.mat(&layer.wo), lib, &mut acts, &mut o);
                println!("l{l} wo      {:?}", diff_rows(&o, &cap[&format!("attn_out-{l}")].1, hp.n_embd));
            }
            // experts from libllama's ffn_norm and selection
            if let moerun::model::Ffn::Moe { experts, .. } = &layer.ffn {
                let x = &cap[&format!("ffn_norm-{l}")].1;
                let topk = &cap[&format!("ffn_moe_topk-{l}")].1;
                let k = hp.n_expert_used;
                let d = hp.n_embd;
                let nff = experts[0].gate.rows;
                let (mut g, mut u, mut sw, mut dn) = (vec![0f32; n * k * nff], vec![0f32; n * k * nff], vec![0f32; n * k * nff], vec![0f32; n * k * d]);
                for t in 0..n {
                    for j in 0..k {
                        let e = topk[t * k + j] as usize;
                        let ex = &experts[e];
                        let xs = &x[t * d..(t + 1) * d];
                        let i = t * k + j;
                        matmul(&pool, ex.gate.mat(m.bytes_of(&ex.gate)), xs, &mut acts, &mut g[i * nff..(i + 1) * nff]);
                        matmul(&pool, ex.up.mat(m.bytes_of(&ex.up)), xs, &mut acts, &mut u[i * nff..(i + 1) * nff]);
                        let libsw = &cap[&format!("ffn_moe_swiglu-{l}")].1[i * nff..(i + 1) * nff];
                        for c in 0..nff {
                            sw[i * nff + c] = moerun::backend::cpu::ops::silu(g[i * nff + c]) * u[i * nff + c];
                        }
                        // down on libllama's own swiglu output
                        matmul(&pool, ex.down.mat(m.bytes_of(&ex.down)), libsw, &mut acts, &mut dn[i * d..(i + 1) * d]);
                    }
                }
                println!("l{l} gate    {:?}", diff_rows(&g, &cap[&format!("ffn_moe_gate-{l}")].1, k * nff));
                println!("l{l} up      {:?}", diff_rows(&u, &cap[&format!("ffn_moe_up-{l}")].1, k * nff));
                println!("l{l} swiglu  {:?}", diff_rows(&sw, &cap[&format!("ffn_moe_swiglu-{l}")].1, k * nff));
                println!("l{l} down    {:?}", diff_rows(&dn, &cap[&format!("ffn_moe_down-{l}")].1, k * d));
            }
        }
    }
}
