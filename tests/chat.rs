//! `moerun chat` (issue 5): conversations over one session with the bundled model — KV reuse,
//! dropping the oldest turns — and the binary driven through a pipe and a pseudo-terminal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use moerun::chat::{reuse_prefix, ChatError, ChatFormat, Conversation, Turn};
use moerun::engine::{Engine, EngineConfig, Flow, GenerateOptions, SamplerConfig};
use moerun::model::Model;
use moerun::tokenizer::Tokenizer;

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/rustdoc-moe-Q8_0.gguf")
}

fn format() -> ChatFormat {
    ChatFormat::new(Arc::new(Tokenizer::from_gguf(&bundled()).expect("tokenizer"))).expect("format")
}

#[test]
fn the_second_turn_reuses_the_first_turns_kv() {
    let fmt = format();
    let tok = Arc::clone(fmt.tokenizer());
    let mut engine =
        Engine::new(Arc::new(Model::load(&bundled()).unwrap()), EngineConfig { threads: 1, ..Default::default() })
            .unwrap();
    let mut sess = engine.new_session().unwrap();
    let mut conv = Conversation::new(Some("You answer questions about Rust.".into()));
    let is_eog = |id: u32| tok.is_eog(id);
    let opts = GenerateOptions { max_tokens: 40, sampler: SamplerConfig::greedy(), is_eog: &is_eog };

    let p1 = conv.prompt("What is a trait?", &fmt, 200).unwrap();
    assert_eq!(p1.dropped_turns, 0);
    // The template writes no BOS, so exactly one is added.
    let bos = tok.bos().unwrap();
    assert_eq!(p1.ids[0], bos);
    assert_ne!(p1.ids[1], bos);
    assert_eq!(reuse_prefix(&mut sess, &p1.ids), 0);
    let g = engine.generate(&mut sess, &p1.ids, &opts, &mut |_| Flow::Continue).unwrap();
    conv.push(Turn { user: "What is a trait?".into(), assistant: tok.decode(&g.ids) });

    let p2 = conv.prompt("And a struct?", &fmt, 200).unwrap();
    assert!(p2.ids.starts_with(&p1.ids));
    let reused = reuse_prefix(&mut sess, &p2.ids);
    // The whole first prompt and (as the answer re-tokenizes the same way) the answer are kept.
    assert!(reused >= p1.ids.len() + g.ids.len() - 1, "reused {reused} of {}", p2.ids.len());
    let g2 = engine.generate(&mut sess, &p2.ids[reused..], &opts, &mut |_| Flow::Continue).unwrap();
    assert!(!g2.ids.is_empty());
    assert_eq!(sess.tokens[..p2.ids.len()], p2.ids[..]);
}

#[test]
fn the_oldest_turns_go_when_the_context_is_full() {
    let fmt = format();
    let mut conv = Conversation::new(Some("Be brief.".into()));
    for i in 0..10 {
        conv.push(Turn {
            user: format!("Question number {i} about lifetimes?"),
            assistant: format!("Answer number {i}: they are regions."),
        });
    }
    let all = conv.prompt("Last question?", &fmt, 10_000).unwrap();
    assert_eq!(all.dropped_turns, 0);
    let fit = conv.prompt("Last question?", &fmt, all.ids.len() / 2).unwrap();
    assert!(
        fit.dropped_turns > 0 && fit.ids.len() <= all.ids.len() / 2,
        "{} dropped, {} tokens",
        fit.dropped_turns,
        fit.ids.len()
    );
    assert_eq!(conv.turns().len(), 10 - fit.dropped_turns);
    // The newest turns are the ones kept.
    assert_eq!(conv.turns().last().unwrap().user, "Question number 9 about lifetimes?");
    // A message that cannot fit even alone is refused, not truncated.
    let long = "word ".repeat(500);
    assert!(matches!(conv.prompt(&long, &fmt, 100), Err(ChatError::TooLong { limit: 100, .. })));
}

/// Runs `moerun chat ARGS` with `input` on a pipe; (stdout, stderr).
fn chat_piped(args: &[&str], input: &str) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moerun"))
        .arg("chat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run moerun");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    (stdout, stderr)
}

#[test]
fn piped_chat_prints_answers_on_stdout_and_the_rest_on_stderr() {
    let (stdout, stderr) =
        chat_piped(&["--temp", "0", "-t", "1"], "What is a trait?\n\n/stats\nWhat is a crate?\n/quit\nnot read\n");
    assert!(stdout.contains("trait"), "{stdout}");
    assert_eq!(stderr.matches("expert hit rate n/a").count(), 2, "{stderr}");
    assert!(stderr.contains("expert cache none yet"), "{stderr}");
    // The second answer reused the first turn's K/V.
    let second = stderr.lines().filter(|l| l.contains("tok/s,")).nth(1).unwrap();
    assert!(!second.contains("(0 reused)"), "{second}");
    assert!(!stdout.contains("expert") && !stdout.contains(">>>"), "{stdout}");
}

#[test]
fn piped_chat_drops_old_turns_when_the_context_fills() {
    let input = "What is a trait?\nWhat is a struct?\nWhat is an enum?\nWhat is a closure?\nWhat is a macro?\n";
    let (stdout, stderr) = chat_piped(&["--temp", "0", "-t", "1", "-c", "96"], input);
    assert!(stderr.contains("(context full: dropped the oldest"), "{stderr}");
    assert_eq!(stderr.matches("tok/s,").count(), 5, "every message answered:\n{stderr}\n{stdout}");
}

#[test]
fn chat_in_a_pseudo_terminal() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chat_pty.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_moerun"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("python3 runs the pty driver");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("chat session 1: ok") && stdout.contains("chat session 2: ok"), "{stdout}");
}
