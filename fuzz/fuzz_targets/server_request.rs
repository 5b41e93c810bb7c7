//! The server's request bodies: `/v1/chat/completions` and `/v1/completions` JSON with every
//! parameter, parsed and checked exactly as the handlers do (`server::request`), the chat
//! messages rendered through ChatML — everything before the job is queued, without a model.
//! The first byte picks the route; an error must serialize as OpenAI's error JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moerun::server::openai::{ApiError, ChatRequest, CompletionRequest};
use moerun::server::request;
use moerun::tokenizer::ChatTemplate;

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const N_CTX: usize = 4096;
const N_VOCAB: usize = 300;

fn chat(body: &[u8]) -> Result<(), ApiError> {
    let req: ChatRequest = request::parse(body)?;
    let messages = request::chat_messages(req.messages)?;
    let template = ChatTemplate::new(CHATML, "<s>", "</s>").expect("ChatML compiles");
    let text = template.render(&messages, true).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // A byte-level vocabulary stands in for the tokenizer.
    let settings = request::job_settings(req.params, N_CTX, text.len(), || 7)?;
    assert!(settings.max_tokens >= 1 && settings.max_tokens + text.len() <= N_CTX);
    Ok(())
}

fn completion(body: &[u8]) -> Result<(), ApiError> {
    let req: CompletionRequest = request::parse(body)?;
    let prompt = request::completion_prompt(req.prompt, N_VOCAB, |t| Ok(t.bytes().map(u32::from).collect()))?;
    assert!(!prompt.is_empty() && prompt.iter().all(|&id| (id as usize) < N_VOCAB));
    let settings = request::job_settings(req.params, N_CTX, prompt.len(), || 7)?;
    assert!(settings.max_tokens >= 1 && settings.max_tokens + prompt.len() <= N_CTX);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else { return };
    let result = if route & 1 == 0 { chat(body) } else { completion(body) };
    if let Err(e) = result {
        assert!((400..600).contains(&e.status.as_u16()));
        let json = e.body().to_string();
        assert!(json.starts_with("{\"error\":"), "{json}");
    }
});
