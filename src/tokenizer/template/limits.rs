//! The bounds one render runs under. A chat template comes from a model file, so it is untrusted
//! code: it may loop without end, write gigabytes, or recurse. Data and the output writer only;
//! `mod.rs` applies them and turns a breach into [`TemplateLimit`].
//!
//! - **Fuel** (minijinja's instruction count): a base plus an allowance per message, so a long
//!   conversation renders and a nested loop stops within a fraction of a second.
//! - **Output**: a base plus a multiple of the messages' bytes; the writer refuses the first
//!   write past it, so a template that writes without end stops there rather than when memory
//!   runs out.
//! - **Recursion**: minijinja's own limit (500, the most it allows without `stacker`), set
//!   explicitly so it cannot silently change.
//! - **Sizes**: a width, indent or count argument of a filter, and what `join`/`replace` build,
//!   are bounded (`bounded.rs`): `" ".repeat(10^15)` aborts the process, which no `Result` and no
//!   `catch_unwind` can catch.
//!
//! Not bounded: memory held in variables. Fuel counts instructions, not bytes, so a template
//! that doubles a string in a loop (`{% set ns.s = ns.s ~ ns.s %}`, 40 times) still exhausts
//! memory, and one that builds a 100 MB string per iteration without writing it runs
//! fuel × that long. minijinja has no hook on `~`/`+` and no byte budget.
//! - No loader: `include`/`import`/`extends` can name only the template itself, never a file.

use std::fmt;
use std::io;

use super::ChatMessage;

/// Instructions any render may execute. Real templates (tests/data/chat_templates: gpt-oss,
/// DeepSeek V3.1 and R1, Kimi K2, the bundled model's) use 90–280 for a system prompt and one
/// turn: over 350× headroom. At about 20 ns an instruction, the base is a few milliseconds.
pub(super) const FUEL_BASE: u64 = 100_000;
/// Instructions allowed per message on top of [`FUEL_BASE`]. The same templates use 21–70 per
/// message over a 2,000-turn conversation (DeepSeek V3.1's the most): over 140× headroom.
pub(super) const FUEL_PER_MESSAGE: u64 = 10_000;
/// Bytes any render may write.
pub(super) const OUTPUT_BASE: usize = 4 << 20;
/// Bytes allowed per byte of the messages (their roles and contents) on top of [`OUTPUT_BASE`]:
/// a template may repeat a message a few times, not thousands.
pub(super) const OUTPUT_PER_INPUT_BYTE: usize = 8;
/// Depth of nested blocks, calls and includes: minijinja's maximum without `stacker`.
pub(super) const RECURSION: usize = 500;
/// The largest indent or field width a filter may be asked for.
pub(super) const MAX_WIDTH: usize = 10_000;
/// The most groups `batch`/`slice` may make (minijinja's own bound on `range`).
pub(super) const MAX_COUNT: usize = 100_000;
/// The largest string `join`/`replace` may build (minijinja bounds `'x' * n` at 100 MB).
pub(super) const MAX_VALUE_BYTES: usize = 64 << 20;

/// Which bound a render ran into, with the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateLimit {
    /// Instructions executed (minijinja's fuel).
    Fuel(u64),
    /// Bytes written.
    Output(usize),
    /// Nesting of blocks, calls and includes.
    Recursion(usize),
}

impl fmt::Display for TemplateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateLimit::Fuel(n) => write!(f, "fuel limit ({n} instructions)"),
            TemplateLimit::Output(n) => write!(f, "output limit ({n} bytes)"),
            TemplateLimit::Recursion(n) => write!(f, "recursion limit (depth {n})"),
        }
    }
}

/// The bounds of one render of `messages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RenderLimits {
    pub fuel: u64,
    pub output_bytes: usize,
}

impl RenderLimits {
    pub fn for_messages(messages: &[ChatMessage]) -> RenderLimits {
        let input: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
        RenderLimits {
            fuel: FUEL_BASE.saturating_add(FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64)),
            output_bytes: OUTPUT_BASE.saturating_add(OUTPUT_PER_INPUT_BYTE.saturating_mul(input)),
        }
    }
}

/// The render's output, refusing every write that would take it past `cap` bytes.
pub(super) struct CappedOutput {
    buf: Vec<u8>,
    cap: usize,
    overflowed: bool,
}

impl CappedOutput {
    pub fn new(cap: usize) -> CappedOutput {
        CappedOutput { buf: Vec::new(), cap, overflowed: false }
    }

    /// Whether a write was refused.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

impl io::Write for CappedOutput {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if bytes.len() > self.cap - self.buf.len() {
            self.overflowed = true;
            return Err(io::Error::other(format!("the output would pass {} bytes", self.cap)));
        }
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn capped_output_refuses_the_write_past_its_cap_and_keeps_what_fit() {
        let mut out = CappedOutput::new(5);
        out.write_all(b"abc").expect("fits");
        assert!(out.write_all(b"def").is_err());
        assert!(out.overflowed());
        out.write_all(b"de").expect("still fits");
        assert_eq!(out.into_bytes(), b"abcde");
    }

    #[test]
    fn limits_grow_with_the_conversation() {
        let none = RenderLimits::for_messages(&[]);
        assert_eq!(none, RenderLimits { fuel: FUEL_BASE, output_bytes: OUTPUT_BASE });
        let two = RenderLimits::for_messages(&[ChatMessage::new("user", "hello"), ChatMessage::new("assistant", "")]);
        assert_eq!(two.fuel, FUEL_BASE + 2 * FUEL_PER_MESSAGE);
        assert_eq!(two.output_bytes, OUTPUT_BASE + 8 * (4 + 5 + 9));
    }
}
