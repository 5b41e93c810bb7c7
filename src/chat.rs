//! Chat turns over one engine session: the model's template renders the conversation, the K/V of
//! what the session already holds is reused, and the oldest turns are dropped when the context
//! would overflow. Shared by the terminal chat and the server. Knows no terminal and no HTTP.
//!
//! Invariant: a prompt is always tokenized from the whole rendered conversation; reuse is decided
//! by comparing token ids ([`reuse_prefix`]), never by assuming what the session holds.

use std::sync::Arc;

use crate::engine::Session;
use crate::tokenizer::{ChatMessage, ChatTemplate, EncodeOptions, Tokenizer, TokenizerError};

/// The template used when a GGUF has none (llama.cpp falls back to ChatML too).
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("the prompt is {tokens} tokens, more than the {limit} that fit in the context (with room for an answer)")]
    TooLong { tokens: usize, limit: usize },
}

/// Messages → prompt token ids, the way llama.cpp's server does it.
pub struct ChatFormat {
    tok: Arc<Tokenizer>,
    /// ChatML, when the model has no usable template of its own.
    fallback: Option<ChatTemplate>,
}

impl ChatFormat {
    pub fn new(tok: Arc<Tokenizer>) -> Result<ChatFormat, ChatError> {
        let fallback = match tok.chat_template() {
            Some(_) => None,
            None => {
                tracing::warn!("the model has no usable chat template; using ChatML");
                let bos = tok.bos().map(|id| tok.token_str(id)).unwrap_or_default();
                let eos = tok.eos().map(|id| tok.token_str(id)).unwrap_or_default();
                Some(ChatTemplate::new(CHATML, &bos, &eos)?)
            }
        };
        Ok(ChatFormat { tok, fallback })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tok
    }

    /// Whether the model's own template is used (false: the ChatML fallback).
    pub fn uses_model_template(&self) -> bool {
        self.fallback.is_none()
    }

    /// A splitter for the answer to `prompt` (its ids), in the reasoning format of the model's
    /// template (none for the ChatML fallback).
    pub fn splitter(&self, prompt: &[u32]) -> crate::reasoning::ReasoningSplitter {
        use crate::reasoning::{ReasoningFormat, ReasoningSplitter};
        let format = match (&self.fallback, self.tok.chat_template()) {
            (None, Some(t)) => t.reasoning(),
            _ => ReasoningFormat::None,
        };
        let tail = self.tok.decode(&prompt[prompt.len().saturating_sub(16)..]);
        ReasoningSplitter::new(format, &tail)
    }

    /// Renders `messages` (opening the assistant's turn) and tokenizes the text. A template that
    /// writes the BOS itself gets no second one; otherwise the model's BOS preference applies.
    pub fn encode(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ChatError> {
        let template = match (&self.fallback, self.tok.chat_template()) {
            (Some(t), _) | (None, Some(t)) => t,
            // `new` sets the fallback exactly when the tokenizer has no template.
            (None, None) => unreachable!("ChatFormat::new keeps a fallback template"),
        };
        let text = template.render(messages, true)?;
        let bos_text = self.tok.bos().map(|id| self.tok.token_str(id));
        let has_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(&b));
        let add_bos = !has_bos && self.tok.add_bos_default();
        Ok(self.tok.encode(&text, EncodeOptions { add_bos, parse_special: true })?)
    }
}

/// Keeps the longest common prefix of what `sess` holds and `prompt`, drops the rest, and returns
/// how many tokens of `prompt` are already evaluated. Always leaves at least one prompt token to
/// evaluate, because the engine needs logits after the last one.
pub fn reuse_prefix<B: crate::backend::Backend>(sess: &mut Session<B>, prompt: &[u32]) -> usize {
    let common = sess.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    let keep = common.min(prompt.len().saturating_sub(1));
    sess.truncate(keep);
    sess.tokens.len()
}

/// One exchange of the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub user: String,
    pub assistant: String,
}

/// The next prompt, and how many old turns had to go to fit it.
#[derive(Debug, Clone)]
pub struct TurnPrompt {
    pub ids: Vec<u32>,
    pub dropped_turns: usize,
}

/// A multi-turn conversation: an optional system message and the turns so far.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    system: Option<String>,
    turns: Vec<Turn>,
}

impl Conversation {
    pub fn new(system: Option<String>) -> Conversation {
        Conversation { system, turns: Vec::new() }
    }

    pub fn turns(&self) -> &[Turn] {
        &self.turns
    }

    /// Forgets every turn (the system message stays).
    pub fn reset(&mut self) {
        self.turns.clear();
    }

    pub fn push(&mut self, turn: Turn) {
        self.turns.push(turn);
    }

    /// The messages for a prompt that ends with `user`'s new message.
    pub fn messages(&self, user: &str) -> Vec<ChatMessage> {
        let mut m = Vec::with_capacity(2 * self.turns.len() + 2);
        if let Some(s) = &self.system {
            m.push(ChatMessage::new("system", s.as_str()));
        }
        for t in &self.turns {
            m.push(ChatMessage::new("user", t.user.as_str()));
            m.push(ChatMessage::new("assistant", t.assistant.as_str()));
        }
        m.push(ChatMessage::new("user", user));
        m
    }

    /// The prompt for `user`'s next message, at most `max_prompt` tokens: the oldest turns are
    /// dropped (for good) until it fits. `TooLong` if even the system message and `user` alone
    /// do not fit.
    pub fn prompt(&mut self, user: &str, fmt: &ChatFormat, max_prompt: usize) -> Result<TurnPrompt, ChatError> {
        let mut dropped_turns = 0;
        loop {
            let ids = fmt.encode(&self.messages(user))?;
            if ids.len() <= max_prompt {
                return Ok(TurnPrompt { ids, dropped_turns });
            }
            if self.turns.is_empty() {
                return Err(ChatError::TooLong { tokens: ids.len(), limit: max_prompt });
            }
            self.turns.remove(0);
            dropped_turns += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::KvCache;
    use crate::backend::{KvConfig, KvType, Values};

    fn check(held: &[u32], prompt: &[u32], reused: usize) {
        let cfg = KvConfig {
            ty: KvType::F32,
            n_layer: 1,
            n_ctx: 16,
            n_head_kv: 1,
            head_dim: 4,
            values: Values::Separate,
            ring: None,
        };
        let mut sess: Session = Session { kv: KvCache::new(&cfg), tokens: held.to_vec(), kv_config: cfg };
        assert_eq!(reuse_prefix(&mut sess, prompt), reused, "held {held:?}, prompt {prompt:?}");
        assert_eq!(sess.tokens, &prompt[..reused]);
    }

    #[test]
    fn reuse_keeps_the_common_prefix_and_one_token_to_evaluate() {
        check(&[], &[1, 2, 3], 0);
        check(&[1, 2, 3], &[1, 2, 3, 4, 5], 3);
        check(&[1, 2, 9, 9], &[1, 2, 3], 2);
        // The same prompt again: the last token is evaluated again for its logits.
        check(&[1, 2, 3], &[1, 2, 3], 2);
        check(&[1, 2, 3, 4], &[1, 2], 1);
        check(&[5], &[1], 0);
    }

    /// A sliding-window ring keeps only its last `len` positions: a cut that would need a
    /// position it has overwritten starts over (as llama.cpp re-processes the prompt then).
    #[test]
    fn a_cut_behind_what_a_ring_holds_starts_over() {
        let cfg = KvConfig {
            ty: KvType::F32,
            n_layer: 2,
            n_ctx: 128,
            n_head_kv: 1,
            head_dim: 4,
            values: Values::Separate,
            ring: Some(crate::backend::KvRing { layers: crate::arch::SlidingWindow::EvenLayers, len: 24, window: 16 }),
        };
        let held: Vec<u32> = (0..100).collect();
        let reuse = |prompt: Vec<u32>| {
            let mut sess: Session = Session { kv: KvCache::new(&cfg), tokens: held.clone(), kv_config: cfg };
            let n = reuse_prefix(&mut sess, &prompt);
            assert_eq!(sess.tokens.len(), n);
            n
        };
        // The window before 99 (83..99) is still held (76..100): kept.
        assert_eq!(reuse((0..99).chain([7, 7]).collect()), 99);
        // The window before 90 (74..90) is not: everything goes.
        assert_eq!(reuse((0..90).chain([7]).collect()), 0);
        assert_eq!(cfg.bytes(), (2 * (24 + 128) * 4 * 4) as u64);
    }
}
