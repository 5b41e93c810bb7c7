//! Text ⇄ token ids exactly as llama.cpp does it, streaming-safe detokenization, and chat
//! templates. Reads only the vocabulary and metadata of a GGUF; never touches weights.
//!
//! Tokenization is libllama's own (its vocabulary loaded with `vocab_only`, in `vocab.rs`), so the
//! ids match llama.cpp's for every vocabulary type and pre-tokenizer it knows. Detokenization
//! concatenates raw token bytes; [`StreamDecoder`] emits them as complete UTF-8 only. Chat
//! templates are rendered by minijinja configured like transformers' jinja2 (`template/`).

mod stream;
mod template;
mod vocab;

use std::fmt;
use std::path::Path;

pub use stream::StreamDecoder;
pub use template::{ChatMessage, ChatTemplate, TemplateLimit};

use vocab::{LlamaVocab, LoadFailure, TokenizeFailure};

/// Which step of a chat template failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateStage {
    /// The source does not compile.
    Syntax,
    /// Rendering failed, including the template's own `raise_exception(msg)`.
    Render,
}

impl fmt::Display for TemplateStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TemplateStage::Syntax => "syntax error",
            TemplateStage::Render => "render error",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{file}: the path contains a NUL byte and cannot be passed to libllama")]
    NulInPath { file: String },
    #[error("{file}: libllama could not load the vocabulary (see the llama_cpp log for why)")]
    Load { file: String },
    #[error("{file}: a text of {len} bytes is too long to tokenize (libllama takes < 2 GiB)")]
    TextTooLong { file: String, len: usize },
    #[error("{file}: libllama failed to tokenize a text of {len} bytes (returned {code})")]
    Tokenize { file: String, len: usize, code: i32 },
    /// `origin` is "chat template" for [`ChatTemplate::new`], "<file>: tokenizer.chat_template"
    /// for a GGUF's own template; `detail` is minijinja's message (with the template's
    /// `raise_exception` text, where that is the cause).
    #[error("{origin}: {stage}: {detail}")]
    Template { origin: String, stage: TemplateStage, detail: String },
    /// A render ran past one of the bounds every chat template runs under (the template comes
    /// from the model file: untrusted code). `origin` as for `Template`.
    #[error("{origin}: render stopped at the {limit}: the template loops, writes or recurses far more than a chat prompt needs")]
    TemplateLimit { origin: String, limit: TemplateLimit },
}

/// How [`Tokenizer::encode`] treats BOS and special-token text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Let libllama add BOS (and EOS/SEP where the vocabulary asks for them), as it does when
    /// `add_special` is true. Use [`Tokenizer::add_bos_default`] for the model's own preference.
    pub add_bos: bool,
    /// Recognise special-token text such as `<|user|>` as the special token; when false it is
    /// tokenized as plain text.
    pub parse_special: bool,
}

/// A GGUF's vocabulary and chat template. `Send + Sync`: share it behind an `Arc`.
pub struct Tokenizer {
    vocab: LlamaVocab,
    /// The file's name, for error messages.
    file: String,
    chat_template: Option<ChatTemplate>,
    /// Why the GGUF's template did not compile, when it has one that does not.
    chat_template_error: Option<TokenizerError>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("file", &self.file)
            .field("n_vocab", &self.n_vocab())
            .field("chat_template", &self.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads the vocabulary and chat template of the GGUF at `path` (no tensor data is read).
    ///
    /// A chat template that does not compile does not fail the load (the model still tokenizes):
    /// it is logged, [`Tokenizer::chat_template`] is `None`, and
    /// [`Tokenizer::chat_template_error`] says why.
    pub fn from_gguf(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let file =
            path.file_name().map_or_else(|| path.display().to_string(), |name| name.to_string_lossy().into_owned());
        let vocab = LlamaVocab::load(path).map_err(|failure| match failure {
            LoadFailure::NulInPath => TokenizerError::NulInPath { file: file.clone() },
            LoadFailure::Refused => TokenizerError::Load { file: file.clone() },
        })?;
        let mut tokenizer = Tokenizer { vocab, file, chat_template: None, chat_template_error: None };
        if let Some(source) = tokenizer.vocab.chat_template() {
            let bos = tokenizer.bos().map(|id| tokenizer.token_str(id)).unwrap_or_default();
            let eos = tokenizer.eos().map(|id| tokenizer.token_str(id)).unwrap_or_default();
            let origin = format!("{}: tokenizer.chat_template", tokenizer.file);
            match ChatTemplate::with_origin(&source, &bos, &eos, origin) {
                Ok(template) => tokenizer.chat_template = Some(template),
                Err(err) => {
                    tracing::warn!("{err}; chat formatting is unavailable for this model");
                    tokenizer.chat_template_error = Some(err);
                }
            }
        }
        Ok(tokenizer)
    }

    /// Tokenizes `text` as llama.cpp's `llama_tokenize` does.
    pub fn encode(&self, text: &str, opts: EncodeOptions) -> Result<Vec<u32>, TokenizerError> {
        self.vocab.tokenize(text, opts.add_bos, opts.parse_special).map_err(|failure| match failure {
            TokenizeFailure::TooLong => TokenizerError::TextTooLong { file: self.file.clone(), len: text.len() },
            TokenizeFailure::Code(code) => TokenizerError::Tokenize { file: self.file.clone(), len: text.len(), code },
        })
    }

    /// Whether the model wants BOS prepended: `tokenizer.ggml.add_bos_token` if the GGUF has it,
    /// else libllama's default for the vocabulary type and pre-tokenizer.
    pub fn add_bos_default(&self) -> bool {
        self.vocab.add_bos()
    }

    pub fn bos(&self) -> Option<u32> {
        self.vocab.bos()
    }

    pub fn eos(&self) -> Option<u32> {
        self.vocab.eos()
    }

    /// End of turn, where the vocabulary has one (e.g. `<|end|>`, `<|im_end|>`).
    pub fn eot(&self) -> Option<u32> {
        self.vocab.eot()
    }

    /// End of generation: EOS, EOT and whatever else libllama counts as a stop token.
    pub fn is_eog(&self, id: u32) -> bool {
        self.vocab.is_eog(id)
    }

    pub fn n_vocab(&self) -> usize {
        self.vocab.n_tokens()
    }

    /// The raw bytes of token `id` (possibly part of a UTF-8 character); empty for an id outside
    /// the vocabulary. `render_special`: control tokens give their text instead of nothing.
    pub fn piece_bytes(&self, id: u32, render_special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        self.vocab.append_piece(id, render_special, &mut out);
        out
    }

    /// Token `id`'s text, special tokens rendered; invalid UTF-8 becomes U+FFFD.
    pub fn token_str(&self, id: u32) -> String {
        String::from_utf8_lossy(&self.piece_bytes(id, true)).into_owned()
    }

    /// The concatenated bytes of `ids` (special tokens rendered) as UTF-8; only bytes that are
    /// invalid in the whole become U+FFFD. Ids outside the vocabulary contribute nothing.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            self.append_piece(id, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The GGUF's `tokenizer.chat_template`, compiled, with this vocabulary's BOS/EOS text.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Why the GGUF's chat template did not compile; `None` if it compiled or there is none.
    pub fn chat_template_error(&self) -> Option<&TokenizerError> {
        self.chat_template_error.as_ref()
    }

    /// The piece of `id` as `decode` renders it (special tokens shown), appended to `out`.
    fn append_piece(&self, id: u32, out: &mut Vec<u8>) {
        self.vocab.append_piece(id, true, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn missing_file_is_a_load_error_naming_it() {
        let err = Tokenizer::from_gguf(Path::new("/nonexistent/dir/missing-model.gguf")).expect_err("no such file");
        assert!(matches!(err, TokenizerError::Load { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "missing-model.gguf: libllama could not load the vocabulary (see the llama_cpp log for why)"
        );
    }

    #[test]
    fn not_a_gguf_is_a_load_error() {
        let path = std::env::temp_dir().join(format!("moerun-not-a-gguf-{}.gguf", std::process::id()));
        std::fs::write(&path, b"this is not a GGUF file at all, just text\n").expect("temp file");
        let result = Tokenizer::from_gguf(&path);
        let _ = std::fs::remove_file(&path);
        assert!(matches!(result, Err(TokenizerError::Load { .. })), "{result:?}");
    }

    #[test]
    fn nul_in_path_is_reported() {
        let err = Tokenizer::from_gguf(Path::new("bad\0name.gguf")).expect_err("NUL in path");
        assert!(matches!(err, TokenizerError::NulInPath { .. }), "{err:?}");
    }
}
