//! Chat templates: HF-style Jinja rendered by minijinja, set up the way transformers sets up
//! jinja2 so that a GGUF's `tokenizer.chat_template` renders byte for byte as in Python.
//! Renders text only; never tokenizes.
//!
//! This file: [`ChatMessage`], [`ChatTemplate`] (compiled once, rendered per conversation) and the
//! errors of both steps. The environment they run in is `env.rs` (jinja2 as transformers sets it
//! up), with Python's `json.dumps` as `tojson` in `pyjson.rs` and `strftime_now` in `strftime.rs`;
//! the bounds every render runs under (fuel, output, recursion) are in `limits.rs`.

mod bounded;
mod env;
mod limits;
mod pyjson;
mod strftime;

use std::fmt::{self, Write as _};
use std::panic::{catch_unwind, AssertUnwindSafe};

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::{TemplateStage, TokenizerError};
use env::hf_environment;
pub use limits::TemplateLimit;
use limits::{CappedOutput, RenderLimits};

/// One message of a conversation, as HF templates see it (`message['role']`, `message.content`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template plus the `bos_token` / `eos_token` strings it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the source came from, for error messages ("chat template", "x.gguf: tokenizer.…").
    origin: String,
    bos_token: String,
    eos_token: String,
    /// How the model marks reasoning in its answers, as the source implies.
    reasoning: crate::reasoning::ReasoningFormat,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The name the source is registered under; it appears in minijinja's error locations.
const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source` once; a syntax error is `TokenizerError::Template { stage: Syntax, .. }`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, TokenizerError> {
        ChatTemplate::with_origin(source, bos_token, eos_token, "chat template".to_owned())
    }

    /// As [`ChatTemplate::new`], naming the template's origin in errors.
    pub(crate) fn with_origin(
        source: &str,
        bos_token: &str,
        eos_token: &str,
        origin: String,
    ) -> Result<ChatTemplate, TokenizerError> {
        let mut env = hf_environment();
        if let Err(err) = env.add_template_owned(TEMPLATE_NAME, source.to_owned()) {
            return Err(template_error(&origin, TemplateStage::Syntax, &err));
        }
        let reasoning = crate::reasoning::ReasoningFormat::detect(Some(source));
        Ok(ChatTemplate { env, origin, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned(), reasoning })
    }

    /// How answers rendered for this template mark their reasoning.
    pub fn reasoning(&self) -> crate::reasoning::ReasoningFormat {
        self.reasoning
    }

    /// Renders `messages`; `add_generation_prompt` asks the template to open the assistant's turn.
    /// A failure (including the template's own `raise_exception`) is
    /// `TokenizerError::Template { stage: Render, .. }` with the message in `detail`; a render
    /// that runs past its fuel, output or recursion bound (see `limits.rs`) is
    /// `TokenizerError::TemplateLimit`, and stops as soon as it does.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TokenizerError> {
        let fail = |err: Error| template_error(&self.origin, TemplateStage::Render, &err);
        let limits = RenderLimits::for_messages(messages);
        // A clone shares the compiled template and the function tables (they sit behind `Arc`s);
        // only the fuel differs from render to render.
        let mut env = self.env.clone();
        env.set_fuel(Some(limits.fuel));
        let template = env.get_template(TEMPLATE_NAME).map_err(fail)?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let mut out = CappedOutput::new(limits.output_bytes);
        // minijinja is not expected to panic, but the template is untrusted input: a panic on some
        // corner of it fails this render, not the server thread that asked for it.
        let rendered = catch_unwind(AssertUnwindSafe(|| template.render_captured_to(ctx, &mut out).map(drop)));
        let limit = |limit| TokenizerError::TemplateLimit { origin: self.origin.clone(), limit };
        match rendered {
            Ok(Ok(())) => String::from_utf8(out.into_bytes()).map_err(|_| TokenizerError::Template {
                origin: self.origin.clone(),
                stage: TemplateStage::Render,
                detail: "the output is not UTF-8".to_owned(),
            }),
            Ok(Err(_)) if out.overflowed() => Err(limit(TemplateLimit::Output(limits.output_bytes))),
            Ok(Err(err)) if caused_by(&err, |e| e.kind() == ErrorKind::OutOfFuel) => {
                Err(limit(TemplateLimit::Fuel(limits.fuel)))
            }
            Ok(Err(err)) if caused_by(&err, is_recursion_error) => {
                Err(limit(TemplateLimit::Recursion(limits::RECURSION)))
            }
            Ok(Err(err)) => Err(fail(err)),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(TokenizerError::Template {
                    origin: self.origin.clone(),
                    stage: TemplateStage::Render,
                    detail: format!("the template engine panicked: {what}"),
                })
            }
        }
    }
}

/// Whether `err` or an error it wraps (an `include` wraps the included template's) is `what`.
fn caused_by(err: &Error, what: impl Fn(&Error) -> bool) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if e.downcast_ref::<Error>().is_some_and(&what) {
            return true;
        }
        next = e.source();
    }
    false
}

/// minijinja reports a too-deep render as an `InvalidOperation` with this message (its parser's
/// own depth limit is a syntax error, reported as such).
fn is_recursion_error(err: &Error) -> bool {
    err.kind() == ErrorKind::InvalidOperation && err.detail() == Some("recursion limit exceeded")
}

fn template_error(origin: &str, stage: TemplateStage, err: &Error) -> TokenizerError {
    let mut detail = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let _ = write!(detail, ": {cause}");
        source = cause.source();
    }
    TokenizerError::Template { origin: origin.to_owned(), stage, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs.iter().map(|&(role, content)| ChatMessage::new(role, content)).collect()
    }

    /// Renders `source` with `<s>`/`</s>` as BOS/EOS and compares with `expect`, which was
    /// produced by Python jinja2 set up as transformers does.
    pub(super) fn check(source: &str, messages: &[ChatMessage], add_generation_prompt: bool, expect: &str) {
        let template = ChatTemplate::new(source, "<s>", "</s>").expect("template compiles");
        let got = template.render(messages, add_generation_prompt).expect("template renders");
        assert_eq!(got, expect);
    }

    /// ChatML with a default system prompt; block tags are indented (lstrip_blocks) and followed
    /// by newlines (trim_blocks); `loop.first`, `loop.last`, `.strip()`.
    const CHATML: &str = "{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'].strip() }}<|im_end|>
    {% if not loop.last %}
{{ '' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
";

    fn conversation() -> Vec<ChatMessage> {
        msgs(&[("user", "  Hi there!\n"), ("assistant", "Hello."), ("user", "What is 2+2?  ")])
    }

    #[test]
    fn chatml_with_generation_prompt() {
        check(
            CHATML,
            &conversation(),
            true,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi there!<|im_end|>\n\n\
             <|im_start|>assistant\nHello.<|im_end|>\n\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n",
        );
    }

    #[test]
    fn chatml_without_generation_prompt() {
        check(
            CHATML,
            &conversation(),
            false,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi there!<|im_end|>\n\n\
             <|im_start|>assistant\nHello.<|im_end|>\n\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n",
        );
    }

    /// Mistral-Instruct's template: `bos_token`, `eos_token`, role alternation enforced with
    /// `raise_exception`.
    pub(super) const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    #[test]
    fn mistral_renders_bos_and_eos() {
        check(MISTRAL, &conversation(), true, "<s>[INST]   Hi there!\n [/INST]Hello.</s>[INST] What is 2+2?   [/INST]");
    }

    #[test]
    fn syntax_errors_are_reported_not_panicked() {
        for source in ["{% for m in messages %}{{ m.role }}", "{{ messages[0] ", "{% if %}x{% endif %}", "{% endfor %}"]
        {
            let err = ChatTemplate::new(source, "", "").expect_err(source);
            let TokenizerError::Template { stage, origin, .. } = &err else {
                panic!("expected a template error for {source:?}, got {err:?}");
            };
            assert_eq!(*stage, TemplateStage::Syntax, "{source:?}");
            assert_eq!(origin, "chat template");
            assert!(err.to_string().starts_with("chat template: syntax error: "), "{err}");
        }
    }

    #[test]
    fn render_errors_are_reported_not_panicked() {
        let template = ChatTemplate::new("{{ messages[0].content.nope() }}", "", "").expect("compiles");
        let err = template.render(&msgs(&[("user", "x")]), false).expect_err("unknown method");
        assert!(matches!(err, TokenizerError::Template { stage: TemplateStage::Render, .. }), "{err:?}");
        // An undefined name is empty, as in jinja2; attribute access on it is an error.
        let template = ChatTemplate::new("[{{ tools }}]{{ tools.x }}", "", "").expect("compiles");
        assert!(template.render(&[], false).is_err());
    }
}
