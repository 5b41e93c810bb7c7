//! Routes libllama's and ggml's log output into `tracing`. After [`init`], nothing from llama.cpp
//! reaches stdout or stderr directly.
//!
//! llama.cpp logs in fragments: a line may arrive in several calls, later ones marked
//! `GGML_LOG_LEVEL_CONT`. Fragments are joined per thread and emitted one event per complete line,
//! under the target `llama_cpp` (filter with e.g. `RUST_LOG=llama_cpp=warn`).
//!
//! Levels: libllama's INFO is diagnostic chatter (a hundred lines per model load: every metadata
//! key, the vocabulary's special tokens), so it maps to `debug`, and its DEBUG to `trace`; WARN and
//! ERROR map to themselves.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::sync::Once;

use llama_cpp_sys_2 as sys;

static INIT: Once = Once::new();

/// Installs the log callback, then calls `llama_backend_init`, each exactly once per process.
/// Idempotent and thread-safe; call it before any other libllama function.
pub fn init() {
    INIT.call_once(|| {
        // SAFETY: `log_callback` matches `ggml_log_callback` and never unwinds; it ignores the
        // user-data pointer, so null is fine. llama.h says the logger state is global and not
        // thread-safe: `Once` makes this the only call made by this crate.
        unsafe { sys::llama_log_set(Some(log_callback), std::ptr::null_mut()) };
        // SAFETY: no arguments; called once, after the logger is in place so that whatever it
        // prints goes through `tracing` too.
        unsafe { sys::llama_backend_init() };
    });
}

/// The level a pending line was opened with, before `CONT` fragments were appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    /// `None` for `GGML_LOG_LEVEL_CONT`: the fragment continues the pending line.
    fn from_ggml(level: sys::ggml_log_level) -> Option<Level> {
        match level {
            sys::GGML_LOG_LEVEL_CONT => None,
            sys::GGML_LOG_LEVEL_ERROR => Some(Level::Error),
            sys::GGML_LOG_LEVEL_WARN => Some(Level::Warn),
            sys::GGML_LOG_LEVEL_INFO => Some(Level::Info),
            // DEBUG, NONE and anything a newer llama.cpp may add.
            _ => Some(Level::Debug),
        }
    }
}

/// Joins fragments into lines. Pure; the callback feeds it and emits what it returns.
#[derive(Debug)]
struct LineBuffer {
    level: Level,
    text: String,
}

impl LineBuffer {
    const fn new() -> LineBuffer {
        LineBuffer { level: Level::Info, text: String::new() }
    }

    /// Adds one fragment; calls `emit` for every line it completes (without the newline, empty
    /// lines skipped). A fragment with a level of its own first flushes an unfinished line.
    fn push(&mut self, level: Option<Level>, fragment: &str, emit: &mut dyn FnMut(Level, &str)) {
        if let Some(level) = level {
            self.flush(emit);
            self.level = level;
        }
        self.text.push_str(fragment);
        while let Some(end) = self.text.find('\n') {
            let line = self.text[..end].trim_end_matches('\r');
            if !line.is_empty() {
                emit(self.level, line);
            }
            self.text.drain(..=end);
        }
    }

    fn flush(&mut self, emit: &mut dyn FnMut(Level, &str)) {
        if !self.text.trim().is_empty() {
            emit(self.level, &self.text);
        }
        self.text.clear();
    }
}

thread_local! {
    static PENDING: RefCell<LineBuffer> = const { RefCell::new(LineBuffer::new()) };
}

fn emit(level: Level, line: &str) {
    match level {
        Level::Error => tracing::error!(target: "llama_cpp", "{line}"),
        Level::Warn => tracing::warn!(target: "llama_cpp", "{line}"),
        Level::Info => tracing::debug!(target: "llama_cpp", "{line}"),
        Level::Debug => tracing::trace!(target: "llama_cpp", "{line}"),
    }
}

unsafe extern "C" fn log_callback(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string that lives for the duration of the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    // A panic must not unwind into C; a failed log line is not worth aborting for.
    let _ = std::panic::catch_unwind(|| {
        // `try_with`: during thread teardown the buffer may already be gone; drop the line then.
        let _ = PENDING.try_with(|pending| {
            if let Ok(mut pending) = pending.try_borrow_mut() {
                pending.push(Level::from_ggml(level), &text, &mut emit);
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(fragments: &[(Option<Level>, &str)]) -> Vec<(Level, String)> {
        let mut out = Vec::new();
        let mut buf = LineBuffer::new();
        for &(level, text) in fragments {
            buf.push(level, text, &mut |l, s| out.push((l, s.to_owned())));
        }
        buf.flush(&mut |l, s| out.push((l, s.to_owned())));
        out
    }

    #[test]
    fn fragments_join_into_lines() {
        let got = lines(&[
            (Some(Level::Info), "loading"),
            (None, "..."),
            (None, " done\nsecond line\n"),
            (Some(Level::Warn), "careful\n"),
            (Some(Level::Error), "\n"),
            (Some(Level::Debug), "unterminated"),
        ]);
        let want = [
            (Level::Info, "loading... done"),
            (Level::Info, "second line"),
            (Level::Warn, "careful"),
            (Level::Debug, "unterminated"),
        ];
        let want: Vec<_> = want.iter().map(|&(l, s)| (l, s.to_owned())).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_new_level_flushes_an_unfinished_line() {
        let got = lines(&[(Some(Level::Warn), "half"), (Some(Level::Info), "next\n")]);
        assert_eq!(got, vec![(Level::Warn, "half".to_owned()), (Level::Info, "next".to_owned())]);
    }

    #[test]
    fn init_is_idempotent() {
        init();
        init();
    }
}
