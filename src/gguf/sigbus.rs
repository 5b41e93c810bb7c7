//! A SIGBUS inside a model file's mapping (the file was cut while a weight was being read through
//! it) is reported naming the file before the process dies, instead of a bare "Bus error". A
//! process cannot go on after such a fault; runs that must outlive a file changing under them
//! read experts through the expert cache, whose reads fail one request instead (`check_unchanged`
//! refuses a changed file between requests).
//!
//! Invariant: the handler only reads atomics and static memory and calls `write(2)`
//! (async-signal-safe); nothing is allocated per mapping, so nothing leaks; mappings register and
//! unregister themselves (`GgufFile`), the binary installs the handler once (`install`).

use std::cell::UnsafeCell;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Mappings the reporter knows at once; more are simply not named.
const SLOTS: usize = 32;
/// Bytes of a path kept per mapping (a longer one is cut, ending in "...").
const PATH_BYTES: usize = 480;

/// One mapping: its address range and its file's path, in static memory (nothing to free, so
/// nothing for a handler to read after it is gone). `start` is 0 when free and `usize::MAX`
/// while being filled; the handler reads only a published slot.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    path_len: AtomicUsize,
    path: UnsafeCell<[u8; PATH_BYTES]>,
}

// SAFETY: `path` is written only by the thread that claimed the slot (CAS of `start` from 0 to
// usize::MAX) before it publishes `start` with Release; readers read it only after an Acquire
// load of a published `start`, and a slot is reclaimed only after `unregister`.
unsafe impl Sync for Slot {}

#[allow(clippy::declare_interior_mutable_const)] // only an initializer for the array below
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    path_len: AtomicUsize::new(0),
    path: UnsafeCell::new([0; PATH_BYTES]),
};
static MAPPINGS: [Slot; SLOTS] = [EMPTY; SLOTS];

const BEFORE: &[u8] = b"\nmoerun: ";
const AFTER: &[u8] = b" was cut or changed on disk while it was being read through its memory map \
    (SIGBUS); the process cannot go on. Keep model files unchanged while moerun runs, or give an \
    expert budget (--expert-budget/--memory-budget): its reads fail one request instead.\n";

/// Records the mapping `[start, start + len)` of `path`; its slot, if one was free.
pub(crate) fn register(start: usize, len: usize, path: &Path) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let text = path.display().to_string();
    let mut bytes = text.as_bytes();
    let cut = bytes.len() > PATH_BYTES;
    if cut {
        bytes = &bytes[..PATH_BYTES - 3];
    }
    for (i, s) in MAPPINGS.iter().enumerate() {
        if s.start.compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            // SAFETY: this thread owns the slot until it publishes `start` below (see `Slot`).
            let buf = unsafe { &mut *s.path.get() };
            buf[..bytes.len()].copy_from_slice(bytes);
            let mut n = bytes.len();
            if cut {
                buf[n..n + 3].copy_from_slice(b"...");
                n += 3;
            }
            s.path_len.store(n, Ordering::Relaxed);
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
        let n = s.path_len.load(Ordering::Relaxed).min(PATH_BYTES);
        // SAFETY: write(2) is async-signal-safe; the slot is published (see `Slot`), so its
        // first `n` path bytes are initialised static memory.
        unsafe {
            libc::write(2, BEFORE.as_ptr().cast(), BEFORE.len());
            libc::write(2, s.path.get().cast::<u8>().cast(), n);
            libc::write(2, AFTER.as_ptr().cast(), AFTER.len());
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
        assert_eq!(MAPPINGS[a].path_len.load(Ordering::Relaxed), "a.gguf".len());
        unregister(a);
        assert_eq!(MAPPINGS[a].start.load(Ordering::Relaxed), 0);
        unregister(b);
        assert!(register(0x1000, 0, Path::new("empty")).is_none());
    }
}
