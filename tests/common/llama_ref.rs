//! Reference only: run the linked libllama itself on a prompt (one batch, CPU, 1 thread, KV f16,
//! no BOS) and return its logits for every position, to compare our engine against op by op.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::path::Path;

use llama_cpp_sys_2 as sys;

/// A loaded libllama model and context.
pub struct LlamaRef {
    model: *mut sys::llama_model,
    ctx: *mut sys::llama_context,
    n_vocab: usize,
    /// Boxed so its address stays fixed: libllama holds it as the eval callback's user data.
    cap: Box<Capture>,
}

impl LlamaRef {
    /// Load `path` with a context of `n_ctx` positions and flash attention `fa`
    /// (`sys::LLAMA_FLASH_ATTN_TYPE_*`).
    pub fn new(path: &Path, n_ctx: u32, fa: sys::llama_flash_attn_type) -> LlamaRef {
        let c = CString::new(path.to_str().expect("utf-8 path")).expect("no NUL");
        // SAFETY: plain C calls with valid, NUL-terminated arguments; null results are checked.
        unsafe {
            sys::llama_backend_init();
            let mut mp = sys::llama_model_default_params();
            mp.n_gpu_layers = 0;
            let model = sys::llama_model_load_from_file(c.as_ptr(), mp);
            assert!(!model.is_null(), "libllama could not load {}", path.display());
            let mut cp = sys::llama_context_default_params();
            cp.n_ctx = n_ctx;
            cp.n_batch = n_ctx;
            cp.n_ubatch = n_ctx;
            cp.n_threads = 1;
            cp.n_threads_batch = 1;
            cp.flash_attn_type = fa;
            cp.type_k = sys::GGML_TYPE_F16;
            cp.type_v = sys::GGML_TYPE_F16;
            let mut cap = Box::new(Capture { prefixes: Vec::new(), out: HashMap::new() });
            cp.cb_eval = Some(capture_cb);
            cp.cb_eval_user_data = (&mut *cap as *mut Capture).cast();
            let ctx = sys::llama_init_from_model(model, cp);
            assert!(!ctx.is_null(), "libllama could not make a context");
            let vocab = sys::llama_model_get_vocab(model);
            let n_vocab = sys::llama_vocab_n_tokens(vocab) as usize;
            LlamaRef { model, ctx, n_vocab, cap }
        }
    }

    /// Logits `[ids.len() × n_vocab]` of `ids` decoded as one batch from position 0.
    pub fn eval(&mut self, ids: &[u32]) -> Vec<f32> {
        let n = ids.len();
        let mut out = Vec::with_capacity(n * self.n_vocab);
        // SAFETY: the batch is sized for `n` tokens of one sequence and filled within bounds;
        // logits pointers come from libllama for rows we requested.
        unsafe {
            sys::llama_memory_clear(sys::llama_get_memory(self.ctx), true);
            let b = sys::llama_batch_init(n as i32, 0, 1);
            for (i, &id) in ids.iter().enumerate() {
                *b.token.add(i) = id as i32;
                *b.pos.add(i) = i as i32;
                *b.n_seq_id.add(i) = 1;
                **b.seq_id.add(i) = 0;
                *b.logits.add(i) = 1;
            }
            let mut bb = b;
            bb.n_tokens = n as i32;
            let rc = sys::llama_decode(self.ctx, bb);
            assert_eq!(rc, 0, "llama_decode failed");
            for i in 0..n {
                let p = sys::llama_get_logits_ith(self.ctx, i as i32);
                assert!(!p.is_null());
                out.extend_from_slice(std::slice::from_raw_parts(p, self.n_vocab));
            }
            sys::llama_batch_free(b);
        }
        out
    }

    /// Like `eval`, also capturing every graph tensor whose name starts with one of `prefixes`
    /// (F32 and I32 tensors, contiguous), as `name → (ne, values)`.
    pub fn eval_capture(
        &mut self,
        ids: &[u32],
        prefixes: &[&str],
    ) -> (Vec<f32>, HashMap<String, (Vec<i64>, Vec<f32>)>) {
        self.cap.prefixes = prefixes.iter().map(|s| s.to_string()).collect();
        self.cap.out.clear();
        let logits = self.eval(ids);
        self.cap.prefixes.clear();
        (logits, std::mem::take(&mut self.cap.out))
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }
}

impl Drop for LlamaRef {
    fn drop(&mut self) {
        // SAFETY: both pointers came from libllama and are freed once.
        unsafe {
            sys::llama_free(self.ctx);
            sys::llama_model_free(self.model);
        }
    }
}

struct Capture {
    prefixes: Vec<String>,
    out: HashMap<String, (Vec<i64>, Vec<f32>)>,
}

unsafe extern "C" fn capture_cb(t: *mut sys::ggml_tensor, ask: bool, ud: *mut std::ffi::c_void) -> bool {
    // SAFETY: libllama passes a live tensor and our `Capture` as user data.
    let (t, cap) = unsafe { (&*t, &mut *(ud as *mut Capture)) };
    // SAFETY: ggml tensor names are NUL-terminated within the array.
    let name = unsafe { std::ffi::CStr::from_ptr(t.name.as_ptr()) }.to_string_lossy().into_owned();
    let want = cap.prefixes.iter().any(|p| name.starts_with(p.as_str()));
    if ask {
        return want;
    }
    if want && (t.type_ == sys::GGML_TYPE_F32 || t.type_ == sys::GGML_TYPE_I32) {
        let n: i64 = t.ne.iter().product();
        let mut vals = Vec::with_capacity(n as usize);
        let [n0, n1, n2, n3] = t.ne;
        for i3 in 0..n3 {
            for i2 in 0..n2 {
                for i1 in 0..n1 {
                    for i0 in 0..n0 {
                        let off = i0 as usize * t.nb[0]
                            + i1 as usize * t.nb[1]
                            + i2 as usize * t.nb[2]
                            + i3 as usize * t.nb[3];
                        // SAFETY: CPU backend: `data` is host memory covering these strides.
                        let p = unsafe { (t.data as *const u8).add(off) };
                        let v = if t.type_ == sys::GGML_TYPE_F32 {
                            unsafe { *(p as *const f32) }
                        } else {
                            unsafe { *(p as *const i32) as f32 }
                        };
                        vals.push(v);
                    }
                }
            }
        }
        cap.out.insert(name, (t.ne.to_vec(), vals));
    }
    true
}
