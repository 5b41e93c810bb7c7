//! A SIGBUS inside a model file's mapping (the file was cut while a weight was being read through
//! it) is reported naming the file before the process dies, instead of a bare "Bus error". A
//! process cannot go on after such a fault; runs that must outlive a file changing under them
//! read experts through the expert cache, whose reads fail one request instead (`check_unchanged`
//! refuses a changed file between requests).
//!
//! Invariant: the handler only reads atomics and calls `write` and `sigaction`-free code paths
//! (async-signal-safe); mappings register and unregister themselves (`GgufFile`), the binary
//! installs the handler once (`install`).

use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// Mappings the reporter knows at once; more are simply not named.
const SLOTS: usize = 32;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    msg: AtomicPtr<u8>,
    msg_len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // only an initializer for the array below
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    msg: AtomicPtr::new(std::ptr::null_mut()),
    msg_len: AtomicUsize::new(0),
};
static MAPPINGS: [Slot; SLOTS] = [EMPTY; SLOTS];

/// Records the mapping `[start, start + len)` of `path`; its slot, if one was free.
pub(crate) fn register(start: usize, len: usize, path: &Path) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let msg = format!(
        "\nmoerun: {} was cut or changed on disk while it was being read through its memory map \
         (SIGBUS); the process cannot go on. Keep model files unchanged while moerun runs, or \
         give an expert budget (--expert-budget/--memory-budget): its reads fail one request \
         instead.\n",
        path.display()
    );
    // Leaked on purpose: a handler may be reading it at any time; a few hundred bytes per file.
    let msg: &'static mut [u8] = Box::leak(msg.into_bytes().into_boxed_slice());
    for (i, s) in MAPPINGS.iter().enumerate() {
        if s.start.compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            s.msg.store(msg.as_mut_ptr(), Ordering::Relaxed);
            s.msg_len.store(msg.len(), Ordering::Relaxed);
            s.end.store(start + len, Ordering::Relaxed);
            s.start.store(start, Ordering::Release);
            return Some(i);
        }
    }
    None
}

pub(crate) fn unregister(i: usize) {
    if let Some(s) = MAPPINGS.get(i) {
        s.end.store(0, Ordering::Relaxed);
        s.start.store(0, Ordering::Release);
    }
}

/// Installs the reporter for SIGBUS (once per process; the front doors call it). Faults outside
/// every registered mapping get the default action, unreported.
pub fn install() {
    // SAFETY: `on_sigbus` is async-signal-safe (atomics and write(2) only); the sigaction
    // struct is fully initialised (zeroed, then the fields set).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
        sa.sa_sigaction = handler as *const () as usize;
        // One shot: the handler returns, the access faults again, the default action ends it.
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    if info.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &MAPPINGS {
        let start = s.start.load(Ordering::Acquire);
        if start == 0 || start == usize::MAX || addr < start || addr >= s.end.load(Ordering::Relaxed) {
            continue;
        }
        let (p, n) = (s.msg.load(Ordering::Relaxed), s.msg_len.load(Ordering::Relaxed));
        if !p.is_null() {
            // SAFETY: `p..p + n` is a leaked, never-freed message; write(2) is async-signal-safe.
            unsafe { libc::write(2, p as *const libc::c_void, n) };
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_register_and_free_their_slots() {
        let a = register(0x1000, 0x2000, Path::new("a.gguf")).expect("a slot");
        let b = register(0x8000, 0x1000, Path::new("b.gguf")).expect("a slot");
        assert_ne!(a, b);
        assert_eq!(MAPPINGS[a].end.load(Ordering::Relaxed), 0x3000);
        unregister(a);
        assert_eq!(MAPPINGS[a].start.load(Ordering::Relaxed), 0);
        unregister(b);
        assert!(register(0x1000, 0, Path::new("empty")).is_none());
    }
}
