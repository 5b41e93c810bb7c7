//! `moerun inspect`: what a model is and where its bytes go.

use std::collections::BTreeMap;
use std::path::PathBuf;

use moerun::model::{Ffn, Model};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model (default: the bundled model).
    model: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct QuantEntry {
    tensors: usize,
    bytes: u64,
}

#[derive(Serialize)]
struct Report {
    file: String,
    file_bytes: u64,
    gguf_version: u32,
    architecture: String,
    name: Option<String>,
    n_layers: usize,
    n_moe_layers: usize,
    n_embd: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    n_experts: usize,
    n_experts_used: usize,
    n_experts_shared: usize,
    n_ff_exp: usize,
    n_vocab: usize,
    context_length: usize,
    n_tensors: usize,
    bytes_total: u64,
    bytes_dense: u64,
    bytes_experts: u64,
    bytes_per_expert: u64,
    active_bytes_per_token: u64,
    quant_mix: BTreeMap<String, QuantEntry>,
    tokenizer_model: Option<String>,
    tokenizer_pre: Option<String>,
    has_chat_template: bool,
}

fn report(path: &std::path::Path) -> anyhow::Result<Report> {
    let m = Model::load(path)?;
    let f = &m.file;
    let hp = &m.hp;
    let mut quant_mix = BTreeMap::new();
    for t in f.tensors() {
        let e = quant_mix.entry(t.ggml_type.name().to_string()).or_insert(QuantEntry { tensors: 0, bytes: 0 });
        e.tensors += 1;
        e.bytes += t.size;
    }
    let n_moe_layers = m.layers.iter().filter(|l| matches!(l.ffn, Ffn::Moe { .. })).count();
    let n_shared = m.layers.iter().any(|l| matches!(&l.ffn, Ffn::Moe { shared: Some(_), .. })) as usize;
    let bytes_experts = m.expert_bytes();
    let n_expert_slices = (n_moe_layers * hp.n_expert).max(1) as u64;
    let get = |k: &str| f.get_str(k).ok().flatten().map(str::to_string);
    Ok(Report {
        file: path.display().to_string(),
        file_bytes: f.bytes().len() as u64,
        gguf_version: f.version(),
        architecture: m.spec.name.to_string(),
        name: get("general.name"),
        n_layers: hp.n_layer,
        n_moe_layers,
        n_embd: hp.n_embd,
        n_head: hp.n_head,
        n_head_kv: hp.n_head_kv,
        head_dim: hp.head_dim,
        n_experts: hp.n_expert,
        n_experts_used: hp.n_expert_used,
        n_experts_shared: n_shared,
        n_ff_exp: hp.n_ff_exp,
        n_vocab: hp.n_vocab,
        context_length: hp.n_ctx_train,
        n_tensors: f.tensors().len(),
        bytes_total: m.total_bytes(),
        bytes_dense: m.total_bytes() - bytes_experts,
        bytes_experts,
        bytes_per_expert: bytes_experts / n_expert_slices,
        active_bytes_per_token: m.active_bytes_per_token(),
        quant_mix,
        tokenizer_model: get("tokenizer.ggml.model"),
        tokenizer_pre: get("tokenizer.ggml.pre"),
        has_chat_template: f.get("tokenizer.chat_template").is_some(),
    })
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = super::model_path(a.model.as_deref())?;
    let r = report(&path)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("{}", r.file);
    println!(
        "  architecture      {} (GGUF v{}){}",
        r.architecture,
        r.gguf_version,
        r.name.as_ref().map(|n| format!(", \"{n}\"")).unwrap_or_default()
    );
    println!(
        "  layers            {} ({} MoE), hidden {}, heads {}/{} kv, head dim {}",
        r.n_layers, r.n_moe_layers, r.n_embd, r.n_head, r.n_head_kv, r.head_dim
    );
    println!(
        "  experts           {} per layer, {} used per token, {} shared, FFN {}",
        r.n_experts, r.n_experts_used, r.n_experts_shared, r.n_ff_exp
    );
    println!("  vocab / context   {} / {}", r.n_vocab, r.context_length);
    println!(
        "  bytes             total {}, dense {}, experts {} ({:.1}%)",
        mib(r.bytes_total),
        mib(r.bytes_dense),
        mib(r.bytes_experts),
        100.0 * r.bytes_experts as f64 / r.bytes_total.max(1) as f64
    );
    println!("  per expert        {}", mib(r.bytes_per_expert));
    println!("  active per token  {}", mib(r.active_bytes_per_token));
    let mix: Vec<String> =
        r.quant_mix.iter().map(|(t, e)| format!("{t}: {} tensors, {}", e.tensors, mib(e.bytes))).collect();
    println!("  quant mix         {}", mix.join("; "));
    println!(
        "  tokenizer         {} (pre: {}), chat template: {}",
        r.tokenizer_model.as_deref().unwrap_or("none"),
        r.tokenizer_pre.as_deref().unwrap_or("-"),
        if r.has_chat_template { "yes" } else { "no" }
    );
    Ok(())
}
