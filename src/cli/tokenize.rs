//! `moerun tokenize`: text → ids and pieces.

use std::path::PathBuf;

use moerun::tokenizer::{EncodeOptions, Tokenizer};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model whose vocabulary to use (default: the bundled model).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Model path (positional form); the text follows it.
    #[arg(value_name = "MODEL_OR_TEXT", num_args = 1..=2, required = true)]
    args: Vec<String>,
    /// Print JSON: {"ids": [...], "pieces": [...]}.
    #[arg(long)]
    json: bool,
    /// Do not add BOS even if the model's metadata asks for it.
    #[arg(long)]
    no_bos: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // `tokenize MODEL TEXT` or `tokenize [-m MODEL] TEXT`.
    let (model, text) = match (a.model, a.args.as_slice()) {
        (Some(m), [t]) => (Some(m), t.clone()),
        (None, [m, t]) => (Some(PathBuf::from(m)), t.clone()),
        (None, [t]) => (None, t.clone()),
        _ => anyhow::bail!("usage: moerun tokenize [MODEL] TEXT (or -m MODEL TEXT)"),
    };
    let path = super::model_path(model.as_deref())?;
    let tok = Tokenizer::from_gguf(&path)?;
    let ids = tok.encode(&text, EncodeOptions { add_bos: !a.no_bos && tok.add_bos_default(), parse_special: true })?;
    let pieces: Vec<String> = ids.iter().map(|&id| tok.token_str(id)).collect();
    if a.json {
        println!("{}", serde_json::json!({ "ids": ids, "pieces": pieces }));
    } else {
        for (id, p) in ids.iter().zip(&pieces) {
            println!("{id:>8} {p:?}");
        }
    }
    Ok(())
}
