//! libllama's log lines reach `tracing`, not stderr. Alone in its own test binary: `tracing`
//! caches each callsite's interest process-wide, so a parallel test that fires the same callsite
//! first without a subscriber would hide these events.

mod common;

use moerun::tokenizer::Tokenizer;

/// Collects formatted `tracing` output in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn libllama_logs_arrive_as_tracing_events() {
    let Some(dir) = common::fixtures() else { return };
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // Loading logs from the calling thread, so a thread-scoped subscriber sees all of it.
    tracing::subscriber::with_default(subscriber, || {
        Tokenizer::from_gguf(&dir.join("rustdoc-moe/rustdoc-moe-Q8_0.gguf")).expect("load vocabulary")
    });
    let log = String::from_utf8_lossy(&captured.0.lock().expect("log buffer")).into_owned();
    assert!(log.lines().any(|l| l.contains("llama_cpp:") && l.contains("general.name")), "{log}");
    assert!(log.lines().all(|l| !l.trim_end().ends_with("llama_cpp:")), "no empty events: {log}");
}
