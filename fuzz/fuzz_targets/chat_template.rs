//! The chat-template renderer given a hostile template and messages. Input: the template source,
//! then NUL-separated message contents (roles alternate user/assistant); `add_generation_prompt`
//! is the last byte's low bit. Every render must end in text or an error — quickly, within its
//! bounds — and a panic inside minijinja (which `render` turns into an error) is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moerun::tokenizer::{ChatMessage, ChatTemplate, TokenizerError};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let source = parts.next().unwrap_or_default();
    let messages: Vec<ChatMessage> = parts
        .enumerate()
        .map(|(i, content)| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, content))
        .collect();
    let add_generation_prompt = data.last().is_some_and(|b| b & 1 == 1);
    let Ok(template) = ChatTemplate::new(source, "<s>", "</s>") else { return };
    match template.render(&messages, add_generation_prompt) {
        Ok(_) | Err(TokenizerError::TemplateLimit { .. }) => {}
        Err(TokenizerError::Template { detail, .. }) => {
            assert!(!detail.starts_with("the template engine panicked"), "{detail}\n--- template:\n{source}");
        }
        Err(other) => panic!("unexpected error kind: {other}"),
    }
});
