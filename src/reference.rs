//! Reference only: the linked libllama running a model end to end, for side-by-side benchmarks
//! (`moerun bench --compare`) and oracle tests. Nothing in the product path calls this module;
//! moerun's own inference is `engine`.

use std::ffi::CString;
use std::path::Path;

use llama_cpp_sys_2 as sys;

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("{path}: libllama could not load the model")]
    Load { path: String },
    #[error("libllama could not create a context")]
    Context,
    #[error("llama_decode failed with code {0}")]
    Decode(i32),
    #[error("path is not valid UTF-8 or contains NUL: {0}")]
    Path(String),
}

/// Settings for the reference context.
#[derive(Debug, Clone, Copy)]
pub struct ReferenceConfig {
    pub n_ctx: u32,
    pub threads: i32,
    /// llama.cpp's default: copy weights into repacked CPU buffers (`use_extra_bufts`). Off, it
    /// reads every weight through the mmap, as it must when the model exceeds RAM.
    pub repack: bool,
}

/// A libllama model and context.
pub struct LlamaReference {
    model: *mut sys::llama_model,
    ctx: *mut sys::llama_context,
    n_vocab: usize,
    n_past: i32,
}

impl LlamaReference {
    pub fn load(path: &Path, cfg: ReferenceConfig) -> Result<LlamaReference, ReferenceError> {
        crate::llama_log::init();
        let c = path
            .to_str()
            .and_then(|s| CString::new(s).ok())
            .ok_or_else(|| ReferenceError::Path(path.display().to_string()))?;
        // SAFETY: plain C calls with valid, NUL-terminated arguments; null results are checked
        // before use and freed in Drop.
        unsafe {
            let mut mp = sys::llama_model_default_params();
            mp.n_gpu_layers = 0;
            mp.use_extra_bufts = cfg.repack;
            let model = sys::llama_model_load_from_file(c.as_ptr(), mp);
            if model.is_null() {
                return Err(ReferenceError::Load { path: path.display().to_string() });
            }
            let mut cp = sys::llama_context_default_params();
            cp.n_ctx = cfg.n_ctx;
            cp.n_batch = cfg.n_ctx;
            cp.n_ubatch = cfg.n_ctx.min(512);
            cp.n_threads = cfg.threads;
            cp.n_threads_batch = cfg.threads;
            cp.type_k = sys::GGML_TYPE_F16;
            cp.type_v = sys::GGML_TYPE_F16;
            let ctx = sys::llama_init_from_model(model, cp);
            if ctx.is_null() {
                sys::llama_model_free(model);
                return Err(ReferenceError::Context);
            }
            let vocab = sys::llama_model_get_vocab(model);
            let n_vocab = sys::llama_vocab_n_tokens(vocab) as usize;
            Ok(LlamaReference { model, ctx, n_vocab, n_past: 0 })
        }
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Forget all tokens.
    pub fn clear(&mut self) {
        // SAFETY: `ctx` is live.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx), true) };
        self.n_past = 0;
    }

    /// Decode `ids` as one batch after what the context holds; returns the last token's logits.
    pub fn decode(&mut self, ids: &[u32]) -> Result<Vec<f32>, ReferenceError> {
        let n = ids.len();
        // SAFETY: the batch is sized for `n` tokens of one sequence and filled within bounds; the
        // logits pointer is libllama's row for the last token, which we asked for.
        unsafe {
            let mut b = sys::llama_batch_init(n as i32, 0, 1);
            for (i, &id) in ids.iter().enumerate() {
                *b.token.add(i) = id as i32;
                *b.pos.add(i) = self.n_past + i as i32;
                *b.n_seq_id.add(i) = 1;
                **b.seq_id.add(i) = 0;
                *b.logits.add(i) = (i + 1 == n) as i8;
            }
            b.n_tokens = n as i32;
            let rc = sys::llama_decode(self.ctx, b);
            if rc != 0 {
                sys::llama_batch_free(b);
                return Err(ReferenceError::Decode(rc));
            }
            self.n_past += n as i32;
            let p = sys::llama_get_logits_ith(self.ctx, -1);
            let out = if p.is_null() { Vec::new() } else { std::slice::from_raw_parts(p, self.n_vocab).to_vec() };
            sys::llama_batch_free(b);
            Ok(out)
        }
    }
}

impl Drop for LlamaReference {
    fn drop(&mut self) {
        // SAFETY: both pointers came from libllama and are freed once.
        unsafe {
            sys::llama_free(self.ctx);
            sys::llama_model_free(self.model);
        }
    }
}
