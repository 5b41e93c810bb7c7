//! Route handlers: check the key, parse and validate the body (`request`), tokenize, queue a
//! `Job`, and turn the worker's events into a JSON response or an SSE stream. Never touches the
//! engine.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::Stream;

use super::openai::*;
use super::request::{self, JobSettings};
use super::worker::{Event, Job};
use super::AppState;
use crate::reasoning::{ReasoningFormat, ReasoningSplitter};
use crate::stats::ExpertCacheStats;
use crate::tokenizer::EncodeOptions;

type St = State<Arc<AppState>>;

/// Every route but `/health` needs `Authorization: Bearer <key>` when the server has a key.
pub async fn require_key(State(st): St, req: Request, next: Next) -> Response {
    let Some(key) = &st.api_key else {
        return next.run(req).await;
    };
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match given.and_then(|v| v.strip_prefix("Bearer ")) {
        Some(token) if constant_time_eq(token.trim().as_bytes(), key.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::unauthorized("Incorrect API key provided").into_response(),
        None => ApiError::unauthorized("Missing API key: send `Authorization: Bearer <key>`").into_response(),
    }
}

/// Oversize bodies announced by `Content-Length` (up to this many bytes) are read to their end
/// before the 413 goes out, within [`DRAIN_TIME`].
const DRAIN_MAX: u64 = 16 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// A body announced past the limit is answered 413 — after reading it (bounded): a client still
/// sending when the server closes meets a reset connection and never reads its answer (what
/// nginx's lingering close avoids).
pub async fn drain_oversize(State(st): St, req: Request, next: Next) -> Response {
    let announced = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    match announced {
        Some(n) if n > st.max_body as u64 => {
            if n <= DRAIN_MAX {
                use tokio_stream::StreamExt;
                let mut data = req.into_body().into_data_stream();
                let _ = tokio::time::timeout(DRAIN_TIME, async { while let Some(Ok(_)) = data.next().await {} }).await;
            }
            ApiError::too_large(st.max_body).into_response()
        }
        _ => next.run(req).await,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

pub async fn no_route(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

pub async fn wrong_method(method: axum::http::Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

pub async fn models(State(st): St) -> Json<ModelList> {
    let card = ModelCard { id: st.model_id.clone(), object: "model", created: st.created, owned_by: "moerun" };
    Json(ModelList { object: "list", data: vec![card] })
}

pub async fn moe_stats(State(st): St) -> Json<serde_json::Value> {
    let s = st.stats.lock();
    let c = &s.counters;
    Json(serde_json::json!({
        "model": st.model_id,
        "uptime_s": st.started.elapsed().as_secs_f64(),
        "engine": {
            "busy": s.busy,
            "queued": st.queue.waiting(),
            "queue_capacity": st.queue.capacity(),
            "n_ctx": st.n_ctx,
            "threads": st.threads,
        },
        "requests": {
            "total": c.requests,
            "completed": c.completed,
            "cancelled": c.cancelled,
            "failed": c.failed,
            "rejected": s.rejected,
        },
        "tokens": {
            "prompt": c.prompt_tokens,
            "prompt_reused": c.prompt_tokens_reused,
            "generated": c.generated_tokens,
        },
        "throughput": {
            "prefill_tok_s": c.prefill_tok_s(),
            "decode_tok_s": c.decode_tok_s(),
        },
        "moe": st.facts,
        "device": s.device,
        "expert_cache": s.cache.as_ref().map(|o| ExpertCacheStats::of(o, c.prompt_tokens + c.generated_tokens)).unwrap_or_else(ExpertCacheStats::absent),
    }))
}

pub async fn chat_completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    chat_inner(st, body).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    completion_inner(st, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_inner(st: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(&st, body)?;
    st.check_model(req.params.model.as_deref())?;
    let messages = request::chat_messages(req.messages)?;
    // Rendering (bounded, but a model's template may spend its whole fuel) and tokenizing a
    // large body are CPU work: off the runtime's threads, which only move bytes.
    let state = Arc::clone(&st);
    let prompt = tokio::task::spawn_blocking(move || state.format.encode(&messages))
        .await
        .map_err(|_| ApiError::internal("rendering the chat template failed"))?
        .map_err(request::chat_error)?;
    let reply = st.reply("chatcmpl", &req.params);
    let splitter = st.format.splitter(&prompt);
    let rx = st.submit(prompt, req.params, splitter)?;
    if reply.stream {
        Ok(sse(rx, reply, Kind::Chat))
    } else {
        let (text, reasoning, finish, usage) = collect(rx).await?;
        let reasoning_content = (!reasoning.is_empty()).then_some(reasoning);
        let choice = ChatChoice {
            index: 0,
            message: AssistantMessage { role: "assistant", content: text, reasoning_content },
            logprobs: None,
            finish_reason: finish,
        };
        let body = ChatCompletion {
            id: reply.id,
            object: "chat.completion",
            created: reply.created,
            model: reply.model,
            choices: vec![choice],
            usage,
        };
        Ok(Json(body).into_response())
    }
}

async fn completion_inner(st: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(&st, body)?;
    st.check_model(req.params.model.as_deref())?;
    let tok = st.format.tokenizer();
    let encode = |text: &str| {
        tok.encode(text, EncodeOptions { add_bos: tok.add_bos_default(), parse_special: true })
            .map_err(|e| ApiError::bad_request(e.to_string()))
    };
    let prompt = request::completion_prompt(req.prompt, tok.n_vocab(), encode)?;
    let reply = st.reply("cmpl", &req.params);
    // A plain completion is raw text: nothing is taken out as reasoning.
    let rx = st.submit(prompt, req.params, ReasoningSplitter::new(ReasoningFormat::None, ""))?;
    if reply.stream {
        Ok(sse(rx, reply, Kind::Text))
    } else {
        let (text, _, finish, usage) = collect(rx).await?;
        let choice = TextChoice { index: 0, text, logprobs: None, finish_reason: Some(finish) };
        let body = TextCompletion {
            id: reply.id,
            object: "text_completion",
            created: reply.created,
            model: reply.model,
            choices: vec![choice],
            usage: Some(usage),
        };
        Ok(Json(body).into_response())
    }
}

fn parse_body<T: DeserializeOwned>(st: &AppState, body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(st.max_body),
        _ => ApiError::bad_request(r.body_text()),
    })?;
    request::parse(&bytes)
}

/// The identity of one response, fixed before the job is queued.
struct Reply {
    id: String,
    created: u64,
    model: String,
    stream: bool,
    include_usage: bool,
}

impl AppState {
    fn check_model(&self, asked: Option<&str>) -> Result<(), ApiError> {
        match asked {
            None => Ok(()),
            Some(m) if m == self.model_id || self.aliases.iter().any(|a| a == m) => Ok(()),
            Some(m) => Err(ApiError::model_not_found(m, &self.model_id)),
        }
    }

    fn reply(&self, prefix: &str, p: &Params) -> Reply {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        Reply {
            id: format!("{prefix}-{:x}{n:06x}", self.started.elapsed().as_nanos() as u64 ^ self.created),
            created: super::unix_now(),
            model: self.model_id.clone(),
            stream: p.stream,
            include_usage: p.stream_options.as_ref().is_some_and(|o| o.include_usage),
        }
    }

    /// Validates the sampling fields, fits `max_tokens` to the context and queues the job.
    fn submit(
        &self,
        prompt: Vec<u32>,
        p: Params,
        splitter: ReasoningSplitter,
    ) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let JobSettings { max_tokens, sampler, stop, ignore_eos } =
            request::job_settings(p, self.n_ctx, prompt.len(), || self.random_seed())?;
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job { prompt, max_tokens, sampler, stop, ignore_eos, splitter, events: tx };
        self.queue.submit(job)?;
        Ok(rx)
    }

    fn random_seed(&self) -> u64 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ self.next_id.fetch_add(1, Ordering::Relaxed).rotate_left(32)
    }
}

/// Waits for the whole answer: its text, its reasoning, why it ended and the usage.
async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> Result<(String, String, FinishReason, Usage), ApiError> {
    let (mut text, mut reasoning) = (String::new(), String::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Reasoning(t) => reasoning.push_str(&t),
            Event::Done { finish, prompt_tokens, completion_tokens } => {
                return Ok((text, reasoning, finish, Usage::new(prompt_tokens, completion_tokens)))
            }
            Event::Failed(e) => return Err(e),
        }
    }
    Err(ApiError::internal("the engine stopped before the answer was complete"))
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

fn sse(rx: mpsc::UnboundedReceiver<Event>, reply: Reply, kind: Kind) -> Response {
    let mut stream = EventStream { rx, reply, kind, pending: VecDeque::new(), done: false };
    if let Kind::Chat = kind {
        // OpenAI opens a chat stream with the role.
        let first = stream.chat_chunk(
            Delta { role: Some("assistant"), content: Some(String::new()), reasoning_content: None },
            None,
            None,
        );
        stream.pending.push_back(first);
    }
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// The worker's events as SSE `data:` chunks, ending with `data: [DONE]`.
struct EventStream {
    rx: mpsc::UnboundedReceiver<Event>,
    reply: Reply,
    kind: Kind,
    pending: VecDeque<SseEvent>,
    done: bool,
}

impl EventStream {
    fn data<T: serde::Serialize>(value: &T) -> SseEvent {
        SseEvent::default().data(serde_json::to_string(value).unwrap_or_default())
    }

    fn chat_chunk(&self, delta: Delta, finish: Option<FinishReason>, usage: Option<Usage>) -> SseEvent {
        let r = &self.reply;
        let choices = match (&delta, finish) {
            // The usage-only chunk has no choices.
            (Delta { role: None, content: None, reasoning_content: None }, None) => vec![],
            _ => vec![ChatChunkChoice { index: 0, delta, logprobs: None, finish_reason: finish }],
        };
        let chunk = ChatChunk {
            id: r.id.clone(),
            object: "chat.completion.chunk",
            created: r.created,
            model: r.model.clone(),
            choices,
            usage,
        };
        Self::data(&chunk)
    }

    fn text_chunk(&self, text: String, finish: Option<FinishReason>, usage: Option<Usage>) -> SseEvent {
        let r = &self.reply;
        let choices = match (text.is_empty(), finish) {
            (true, None) => vec![],
            _ => vec![TextChoice { index: 0, text, logprobs: None, finish_reason: finish }],
        };
        let chunk = TextCompletion {
            id: r.id.clone(),
            object: "text_completion",
            created: r.created,
            model: r.model.clone(),
            choices,
            usage,
        };
        Self::data(&chunk)
    }

    fn on_event(&mut self, ev: Event) {
        match (ev, self.kind) {
            (Event::Text(t), Kind::Chat) => {
                let e = self.chat_chunk(Delta { content: Some(t), ..Default::default() }, None, None);
                self.pending.push_back(e);
            }
            (Event::Reasoning(t), Kind::Chat) => {
                let e = self.chat_chunk(Delta { reasoning_content: Some(t), ..Default::default() }, None, None);
                self.pending.push_back(e);
            }
            (Event::Reasoning(_), Kind::Text) => {}
            (Event::Text(t), Kind::Text) => {
                let e = self.text_chunk(t, None, None);
                self.pending.push_back(e);
            }
            (Event::Done { finish, prompt_tokens, completion_tokens }, kind) => {
                let usage = Usage::new(prompt_tokens, completion_tokens);
                let (last, usage_chunk) = match kind {
                    Kind::Chat => (
                        self.chat_chunk(Delta::default(), Some(finish), None),
                        self.chat_chunk(Delta::default(), None, Some(usage)),
                    ),
                    Kind::Text => (
                        self.text_chunk(String::new(), Some(finish), None),
                        self.text_chunk(String::new(), None, Some(usage)),
                    ),
                };
                self.pending.push_back(last);
                if self.reply.include_usage {
                    self.pending.push_back(usage_chunk);
                }
                self.finish();
            }
            (Event::Failed(e), _) => self.fail(e),
        }
    }

    fn fail(&mut self, e: ApiError) {
        self.pending.push_back(Self::data(&e.body()));
        self.finish();
    }

    fn finish(&mut self) {
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }
}

impl Stream for EventStream {
    type Item = Result<SseEvent, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(e)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(ev) => self.on_event(ev),
                None => self.fail(ApiError::internal("the engine stopped before the answer was complete")),
            }
        }
    }
}
