//! libllama's vocabulary, loaded alone (`vocab_only`) from a GGUF. The only file of `tokenizer`
//! that calls into C; every id it hands to libllama has been range-checked first.

use std::ffi::{c_char, CString};
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

/// Why libllama refused to tokenize; [`super::Tokenizer`] adds the file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenizeFailure {
    /// The text is longer than the `i32` byte count libllama takes.
    TooLong,
    /// libllama returned this code even after the buffer was grown as it asked.
    Code(i32),
}

/// Why the vocabulary did not load; [`super::Tokenizer`] adds the file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoadFailure {
    /// The path has an interior NUL byte and cannot become a C string.
    NulInPath,
    /// `llama_model_load_from_file` returned null (missing file, not a GGUF, unknown tokenizer…);
    /// libllama's own reason went to the log.
    Refused,
}

/// A `vocab_only` llama_model and its vocabulary. Immutable after [`LlamaVocab::load`].
pub(crate) struct LlamaVocab {
    model: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
    n_tokens: usize,
}

// SAFETY: after `llama_model_load_from_file` returns, libllama never mutates the model or its
// vocabulary through the const pointers we use (`llama_tokenize`, `llama_token_to_piece` and the
// `llama_vocab_*` getters take `const llama_vocab *`; the piece cache is built during load), and
// llama.h documents the tokenization API as thread-safe. The model is freed only in `Drop`, which
// needs exclusive ownership.
unsafe impl Send for LlamaVocab {}
// SAFETY: see `Send`: shared references only reach const, thread-safe libllama functions.
unsafe impl Sync for LlamaVocab {}

/// `tokenizer.chat_template`, read as a plain metadata key (see [`LlamaVocab::metadata_str`]).
const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

impl LlamaVocab {
    /// Loads only the vocabulary (and metadata) of the GGUF at `path`; no tensor is read.
    pub(crate) fn load(path: &Path) -> Result<LlamaVocab, LoadFailure> {
        crate::llama_log::init();
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| LoadFailure::NulInPath)?;
        // SAFETY: returns a plain struct by value; no preconditions.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.vocab_only = true;
        // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call; `params` comes
        // from `llama_model_default_params`. libllama catches its own exceptions and returns null.
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), params) };
        let model = NonNull::new(raw).ok_or(LoadFailure::Refused)?;
        // SAFETY: `model` is a live model returned by libllama.
        let vocab = NonNull::new(unsafe { sys::llama_model_get_vocab(model.as_ptr()) }.cast_mut());
        // SAFETY: `vocab` belongs to the live `model`.
        let n_tokens = vocab.map(|v| unsafe { sys::llama_vocab_n_tokens(v.as_ptr()) });
        match (vocab, n_tokens.map(usize::try_from)) {
            (Some(vocab), Some(Ok(n_tokens))) => Ok(LlamaVocab { model, vocab, n_tokens }),
            _ => {
                // SAFETY: `model` is live and owned by nobody else yet; freed once, here.
                unsafe { sys::llama_model_free(model.as_ptr()) };
                Err(LoadFailure::Refused)
            }
        }
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        self.vocab.as_ptr()
    }

    pub(crate) fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// `id` as a libllama token, if it names an entry of this vocabulary.
    fn checked(&self, id: u32) -> Option<sys::llama_token> {
        let token = sys::llama_token::try_from(id).ok()?;
        (usize::try_from(id).ok()? < self.n_tokens).then_some(token)
    }

    /// A special-token getter's answer, with `LLAMA_TOKEN_NULL` (-1) and junk mapped to `None`.
    fn special(&self, token: sys::llama_token) -> Option<u32> {
        let id = u32::try_from(token).ok()?;
        self.checked(id).map(|_| id)
    }

    pub(crate) fn bos(&self) -> Option<u32> {
        // SAFETY: `self.vocab` is live for `self`'s lifetime; getters only read.
        self.special(unsafe { sys::llama_vocab_bos(self.vocab()) })
    }

    pub(crate) fn eos(&self) -> Option<u32> {
        // SAFETY: as in `bos`.
        self.special(unsafe { sys::llama_vocab_eos(self.vocab()) })
    }

    pub(crate) fn eot(&self) -> Option<u32> {
        // SAFETY: as in `bos`.
        self.special(unsafe { sys::llama_vocab_eot(self.vocab()) })
    }

    pub(crate) fn add_bos(&self) -> bool {
        // SAFETY: as in `bos`.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab()) }
    }

    pub(crate) fn is_eog(&self, id: u32) -> bool {
        let Some(token) = self.checked(id) else {
            return false;
        };
        // SAFETY: as in `bos`; `token` is in range.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// Tokenizes `text`, growing the output buffer once if libllama asks for more room.
    pub(crate) fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizeFailure> {
        let text_len = i32::try_from(text.len()).map_err(|_| TokenizeFailure::TooLong)?;
        // Byte-level vocabularies never produce more tokens than bytes; two spare slots cover
        // BOS/EOS. Other vocabularies may ask for more, which the retry handles.
        let mut capacity = text.len().saturating_add(2).min(i32::MAX as usize);
        let mut last = 0;
        for _attempt in 0..2 {
            let mut tokens: Vec<sys::llama_token> = vec![0; capacity];
            let n_max = i32::try_from(tokens.len()).map_err(|_| TokenizeFailure::TooLong)?;
            // SAFETY: `text` points at `text_len` readable bytes (it need not be NUL-terminated);
            // `tokens` has room for `n_max` tokens; `self.vocab` is live.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr().cast::<c_char>(),
                    text_len,
                    tokens.as_mut_ptr(),
                    n_max,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                tokens.truncate(n as usize);
                return tokens.into_iter().map(|t| u32::try_from(t).map_err(|_| TokenizeFailure::Code(n))).collect();
            }
            last = n;
            if n == i32::MIN {
                break; // the result would not fit an i32 count
            }
            // Any other negative count is the capacity libllama needs.
            capacity = n.unsigned_abs() as usize;
        }
        Err(TokenizeFailure::Code(last))
    }

    /// Appends the bytes of token `id` to `out`; nothing for an id outside the vocabulary.
    /// `special`: render control tokens (`<|user|>`) instead of dropping them.
    pub(crate) fn append_piece(&self, id: u32, special: bool, out: &mut Vec<u8>) {
        // libllama indexes its piece cache with `.at()`, whose exception would cross the C
        // boundary: out-of-range ids must never reach it.
        let Some(token) = self.checked(id) else {
            return;
        };
        let mut buf = [0u8; 64];
        // SAFETY: `buf` has room for `buf.len()` bytes; libllama writes at most that many and
        // returns the count, or minus the size it needs; `token` is in range.
        let n = unsafe {
            sys::llama_token_to_piece(
                self.vocab(),
                token,
                buf.as_mut_ptr().cast::<c_char>(),
                buf.len() as i32,
                0,
                special,
            )
        };
        if n >= 0 {
            out.extend_from_slice(&buf[..n as usize]);
            return;
        }
        let mut big = vec![0u8; n.unsigned_abs() as usize];
        let len = i32::try_from(big.len()).unwrap_or(i32::MAX);
        // SAFETY: as above, with `big` of `len` bytes.
        let n = unsafe {
            sys::llama_token_to_piece(self.vocab(), token, big.as_mut_ptr().cast::<c_char>(), len, 0, special)
        };
        if n >= 0 {
            out.extend_from_slice(&big[..n as usize]);
        }
    }

    /// The GGUF's `tokenizer.chat_template`, if present.
    pub(crate) fn chat_template(&self) -> Option<String> {
        self.metadata_str(CHAT_TEMPLATE_KEY)
    }

    /// A string metadata value, read verbatim. (`llama_model_chat_template` is not used: for one
    /// family it answers a built-in template *name* when the key is missing, which is not Jinja.)
    fn metadata_str(&self, key: &str) -> Option<String> {
        let c_key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 4096];
        for _attempt in 0..2 {
            // SAFETY: `c_key` is NUL-terminated; `buf` has `buf.len()` writable bytes, and
            // libllama writes at most that many, NUL included (snprintf semantics); the model is
            // live.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.model.as_ptr(),
                    c_key.as_ptr(),
                    buf.as_mut_ptr().cast::<c_char>(),
                    buf.len(),
                )
            };
            let n = usize::try_from(n).ok()?; // -1: no such key
            if n < buf.len() {
                buf.truncate(n);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf = vec![0u8; n + 1];
        }
        None
    }
}

impl Drop for LlamaVocab {
    fn drop(&mut self) {
        // SAFETY: `model` came from `llama_model_load_from_file` and is freed exactly once, here.
        unsafe { sys::llama_model_free(self.model.as_ptr()) };
    }
}
