//! Chat templates are code from the model file (issue 13): every render is bounded in fuel,
//! output and recursion, a size argument cannot abort the process, and a template that runs into
//! a bound fails fast with an error naming the bound and the file — in the library and in
//! `moerun chat`. Real templates (tests/data/chat_templates) still render long conversations.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moerun::chat::ChatFormat;
use moerun::gguf::Value;
use moerun::tokenizer::{ChatMessage, ChatTemplate, TemplateLimit, TokenizerError};

const BUNDLED: &str = "models/rustdoc-moe-Q8_0.gguf";
/// Far more than any bounded render takes (milliseconds), far less than an unbounded one (the
/// nested loop ran over 60 s before the bounds).
const FAST: Duration = Duration::from_secs(3);

fn conversation(turns: usize) -> Vec<ChatMessage> {
    let mut m = vec![ChatMessage::new("system", "You are terse.")];
    for i in 0..turns {
        m.push(ChatMessage::new("user", format!("Question {i}: what does this code do?")));
        m.push(ChatMessage::new("assistant", format!("Answer {i}: it renders a template.")));
    }
    m.push(ChatMessage::new("user", "And the last one?"));
    m
}

const NESTED_LOOPS: &str = "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}";
const GIGABYTES: &str = "{% for a in range(100000) %}{{ 'x' * 10000000 }}{% endfor %}";
const RECURSION: &str = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";

/// What rendering a hostile `source` must end in.
enum Expect {
    Limit(fn(&TemplateLimit) -> bool),
    /// A render error whose text holds this.
    Error(&'static str),
}

/// Renders `source` with one short message on a thread with a 2 MiB stack (a tokio worker's),
/// and checks it fails as `expect` says, within [`FAST`].
fn check(source: &str, expect: Expect) {
    let source = source.to_owned();
    let started = Instant::now();
    let err = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let template = ChatTemplate::new(&source, "<s>", "</s>").expect("compiles");
            template.render(&conversation(0), true).expect_err("a hostile template fails")
        })
        .expect("thread")
        .join()
        .expect("no panic");
    assert!(started.elapsed() < FAST, "took {:?}: {err}", started.elapsed());
    match (expect, &err) {
        (Expect::Limit(which), TokenizerError::TemplateLimit { origin, limit }) => {
            assert!(which(limit), "{err}");
            assert_eq!(origin, "chat template");
            assert!(err.to_string().contains(&limit.to_string()), "{err}");
        }
        (Expect::Error(text), TokenizerError::Template { .. }) => assert!(err.to_string().contains(text), "{err}"),
        _ => panic!("unexpected error: {err:?}"),
    }
}

#[test]
fn nested_loops_stop_at_the_fuel_limit() {
    check(NESTED_LOOPS, Expect::Limit(|l| matches!(l, TemplateLimit::Fuel(_))));
    check(
        "{% for a in range(100000) %}{% set y = a * 2 %}{% endfor %}",
        Expect::Limit(|l| matches!(l, TemplateLimit::Fuel(_))),
    );
}

#[test]
fn a_gigabyte_of_output_stops_at_the_output_limit() {
    check(GIGABYTES, Expect::Limit(|l| matches!(l, TemplateLimit::Output(_))));
}

#[test]
fn deep_recursion_stops_at_the_recursion_limit() {
    check(RECURSION, Expect::Limit(|l| matches!(l, TemplateLimit::Recursion(_))));
    // A template including itself (the only template the environment knows: there is no loader).
    check("{% include 'chat_template' %}", Expect::Limit(|l| matches!(l, TemplateLimit::Recursion(_))));
}

#[test]
fn no_file_is_reachable_from_a_template() {
    check("{% include '/etc/passwd' %}", Expect::Error("template not found"));
    check("{% extends '../../Cargo.toml' %}", Expect::Error("template not found"));
}

/// Each of these asked the allocator for terabytes (an abort no `Result` can catch) or panicked
/// inside minijinja before the bounds.
#[test]
fn size_arguments_are_bounded_not_fatal() {
    for source in [
        "{{ 'x' | indent(1000000000000) }}",
        "{{ messages | tojson(indent=1000000000000) }}",
        "{{ '%1000000000000s' | format('x') }}",
        "{{ '%*s' | format(1000000000000, 'x') }}",
        "{{ '{:>1000000000000}'.format('x') }}",
        "{{ [1] | batch(1000000000000, 'x') | list }}",
        "{{ [1] | slice(1000000000000, 'x') | list }}",
        "{{ range(100000) | join('x' * 99999999) }}",
        "{{ ('x' * 99999999).join(range(100000)) }}",
        "{{ ('x' * 1000) | replace('', 'x' * 99999999) }}",
        "{{ ('x' * 1000).replace('', 'x' * 99999999) }}",
    ] {
        check(source, Expect::Error("larger than a chat template may ask for"));
    }
    check("{{ '%.60000f' | format(1.5) }}", Expect::Error("larger than a chat template may ask for"));
    // minijinja panics on this ("capacity overflow"): the panic fails the render, not the thread.
    check("{{ ([1, 2] * 1000000000000000000) | list }}", Expect::Error("panicked"));
}

#[test]
fn bounded_builtins_still_work() {
    let template = ChatTemplate::new(
        "{{ 'a\nb' | indent(2, true) }}|{{ [1, 2, 3] | batch(2) | list }}|{{ [1, 2] | join(', ') }}|\
         {{ '-'.join(['a', 'b']) }}|{{ 'abc'.replace('b', 'XX') }}|{{ 'abc' | replace('b', 'Y') }}|\
         {{ '%3d|%-4s|%.2f' | format(7, 'ab', 1.5) }}|{{ '{:>4}'.format('x') }}|{{ [1] | tojson(indent=1) }}",
        "",
        "",
    )
    .expect("compiles");
    assert_eq!(
        template.render(&[], false).expect("renders"),
        "  a\n  b|[[1, 2], [3]]|1, 2|a-b|aXXc|aYc|  7|ab  |1.50|   x|[\n 1\n]"
    );
}

fn real_templates() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat_templates");
    let mut found: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("tests/data/chat_templates")
        .map(|e| {
            let path = e.expect("entry").path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&path).expect("read"))
        })
        .collect();
    found.sort();
    assert!(found.len() >= 5, "{found:?}");
    found
}

/// Real templates (gpt-oss, DeepSeek V3.1 and R1, Kimi K2, the bundled model's) use at most
/// 280 instructions for a short chat and 70 per message: a 2,000-turn conversation renders with
/// the same bounds that stop the hostile ones.
#[test]
fn real_templates_render_long_conversations() {
    for (name, source) in real_templates() {
        let template = ChatTemplate::new(&source, "<s>", "</s>").expect(&name);
        for turns in [0, 1, 2000] {
            let text = template.render(&conversation(turns), true).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(text.contains("And the last one?"), "{name}");
            if turns > 0 {
                assert!(text.contains(&format!("Question {}", turns - 1)), "{name}");
            }
        }
    }
}

/// The bundled model with its chat template replaced by `template`, as `name` in `dir`.
fn model_with_template(dir: &Path, name: &str, template: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(BUNDLED);
    common::with_metadata(&src, &dir.join(name), "tokenizer.chat_template", Value::String(template.into()))
}

#[test]
fn a_model_files_template_past_a_limit_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (template, limit) in [(NESTED_LOOPS, "fuel limit"), (GIGABYTES, "output limit"), (RECURSION, "recursion limit")]
    {
        let path = model_with_template(dir.path(), "hostile.gguf", template);
        let tok = moerun::tokenizer::Tokenizer::from_gguf(&path).expect("tokenizer");
        let format = ChatFormat::new(Arc::new(tok)).expect("format");
        let started = Instant::now();
        let err = format.encode(&conversation(1)).expect_err("hostile template").to_string();
        assert!(started.elapsed() < FAST, "{:?}", started.elapsed());
        assert!(err.starts_with("hostile.gguf: tokenizer.chat_template: render stopped at the "), "{err}");
        assert!(err.contains(limit), "{err}");
    }
}

/// `moerun chat` with such a model ends with the error, naming the file and the limit, instead
/// of rendering for a minute.
#[test]
fn moerun_chat_names_the_file_and_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = model_with_template(dir.path(), "looping-template.gguf", NESTED_LOOPS);
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_moerun"))
        .args(["chat", "-t", "1", "-m"])
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(b"Hello?\n")?;
            child.wait_with_output()
        })
        .expect("run moerun chat");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
    assert!(
        stderr.contains("looping-template.gguf: tokenizer.chat_template: render stopped at the fuel limit"),
        "{stderr}"
    );
}
