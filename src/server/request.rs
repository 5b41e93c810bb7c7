//! A request body → what the engine is asked for: the JSON parse and every check the handlers
//! make before a job is queued. Pure functions of the request (and the context size), so the
//! fuzz target `server_request` runs exactly what a handler runs, without a model or a socket.

use serde::de::DeserializeOwned;

use super::openai::{ApiError, Content, Params, Prompt, RequestMessage, Stop};
use crate::chat::ChatError;
use crate::engine::SamplerConfig;
use crate::tokenizer::{ChatMessage, TokenizerError};

/// A request body as `T`, or OpenAI's 400 naming what did not parse.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("We could not parse the JSON body of your request: {e}")))
}

/// A chat request's messages as the template sees them: at least one; a content given as parts
/// keeps its text parts, joined.
pub fn chat_messages(messages: Vec<RequestMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "`messages` must hold at least one message"));
    }
    Ok(messages.into_iter().map(|m| ChatMessage::new(m.role, text_of(m.content))).collect())
}

/// The text of a message: the string, or its text parts joined.
fn text_of(content: Option<Content>) -> String {
    match content {
        None => String::new(),
        Some(Content::Text(s)) => s,
        Some(Content::Parts(parts)) => parts.into_iter().filter(|p| p.kind == "text").filter_map(|p| p.text).collect(),
    }
}

/// Why a chat prompt could not be made. A template that ran past its bounds is the model file's
/// fault, not the request's (500); anything else, a template's `raise_exception` on the
/// messages included, is the request's (400).
pub fn chat_error(e: ChatError) -> ApiError {
    match &e {
        ChatError::Tokenizer(TokenizerError::TemplateLimit { .. }) => ApiError::internal(e.to_string()),
        _ => ApiError::bad_request(e.to_string()),
    }
}

/// A completion's prompt as ids: one text (through `encode`) or ids, none outside the
/// vocabulary of `n_vocab`, and not empty.
pub fn completion_prompt(
    prompt: Prompt,
    n_vocab: usize,
    encode: impl Fn(&str) -> Result<Vec<u32>, ApiError>,
) -> Result<Vec<u32>, ApiError> {
    let prompt = match prompt {
        Prompt::Text(t) => encode(&t)?,
        Prompt::Texts(v) if v.len() == 1 => encode(&v[0])?,
        Prompt::Texts(_) => return Err(ApiError::invalid_param("prompt", "only one prompt per request is supported")),
        Prompt::Ids(ids) => ids,
    };
    if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= n_vocab) {
        return Err(ApiError::invalid_param("prompt", format!("token id {bad} is outside the vocabulary")));
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    Ok(prompt)
}

/// What a job runs with, from the request's parameters.
#[derive(Debug, Clone)]
pub struct JobSettings {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

/// Validates the sampling fields and fits `max_tokens` to the room a prompt of `prompt_len`
/// tokens leaves in a context of `n_ctx`; `seed` is asked only when the request names none.
pub fn job_settings(
    p: Params,
    n_ctx: usize,
    prompt_len: usize,
    seed: impl FnOnce() -> u64,
) -> Result<JobSettings, ApiError> {
    if p.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid_param("n", "only n = 1 is supported"));
    }
    if let Some(t) = p.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        return Err(ApiError::invalid_param("temperature", format!("temperature must be between 0 and 2, not {t}")));
    }
    if let Some(t) = p.top_p.filter(|t| !(*t > 0.0 && *t <= 1.0)) {
        return Err(ApiError::invalid_param("top_p", format!("top_p must be in (0, 1], not {t}")));
    }
    let stop = p.stop.map(Stop::into_vec).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::invalid_param("stop", "at most 4 stop sequences are allowed"));
    }
    let asked = p.max_completion_tokens.or(p.max_tokens);
    if asked == Some(0) {
        return Err(ApiError::invalid_param("max_tokens", "max_tokens must be at least 1"));
    }
    if prompt_len >= n_ctx {
        return Err(ApiError::context_exceeded(format!(
            "This model's maximum context length is {n_ctx} tokens, but the prompt is {prompt_len} tokens"
        )));
    }
    let room = n_ctx - prompt_len;
    let max_tokens = asked.map_or(room, |n| n.min(room as u64) as usize);
    let d = SamplerConfig::default();
    let sampler = SamplerConfig {
        temperature: p.temperature.unwrap_or(d.temperature),
        top_p: p.top_p.unwrap_or(d.top_p),
        top_k: p.top_k.unwrap_or(d.top_k),
        min_p: p.min_p.unwrap_or(d.min_p),
        repeat_penalty: p.repeat_penalty.unwrap_or(d.repeat_penalty),
        seed: p.seed.map_or_else(seed, |s| s as u64),
        ..d
    };
    Ok(JobSettings { max_tokens, sampler, stop, ignore_eos: p.ignore_eos })
}
