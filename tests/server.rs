//! `moerun serve` end to end (issue 5): the server on 127.0.0.1:0 with the bundled model, driven
//! over HTTP. Each test starts its own server, so counters and the KV cache start fresh. Every
//! request and wait is bounded in count and time.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moerun::engine::EngineConfig;
use moerun::model::Model;
use moerun::server::{Server, ServerConfig, ServerError};
use moerun::tokenizer::Tokenizer;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const BUNDLED: &str = "models/rustdoc-moe-Q8_0.gguf";
const MODEL_ID: &str = "rustdoc-moe";

struct TestServer {
    addr: std::net::SocketAddr,
    base: String,
    client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

/// One engine thread per server (tests run side by side on two cores).
fn config() -> ServerConfig {
    ServerConfig { engine: EngineConfig { threads: 1, ..Default::default() }, ..Default::default() }
}

async fn start(cfg: ServerConfig) -> TestServer {
    start_with(&Path::new(env!("CARGO_MANIFEST_DIR")).join(BUNDLED), cfg).await
}

async fn start_with(path: &Path, cfg: ServerConfig) -> TestServer {
    let path = path.to_path_buf();
    let tok = Arc::new(Tokenizer::from_gguf(&path).expect("tokenizer"));
    let model = Arc::new(Model::load(&path).expect("model"));
    let server = Server::new(model, tok, cfg).expect("server");
    assert_eq!(server.model_id(), MODEL_ID);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async {
        let _ = rx.await;
    }));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client");
    TestServer { addr, base: format!("http://{addr}"), client, shutdown: Some(tx), task }
}

impl TestServer {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client.post(self.url(path)).json(body).send().await.expect("request")
    }

    /// POST `body`; the status and the JSON answer.
    async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self.post(path, body).await;
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON body"))
    }

    async fn stats(&self) -> Value {
        self.client.get(self.url("/v1/moe/stats")).send().await.expect("stats").json().await.expect("stats JSON")
    }

    /// Polls `/v1/moe/stats` until `pred` holds (at most 30 s).
    async fn wait_for_stats(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.stats().await;
            if pred(&s) {
                return s;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "timed out waiting for {what}: {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server and checks that `serve` returns cleanly.
    async fn stop(mut self) {
        let _ = self.shutdown.take().map(|tx| tx.send(()));
        let res = tokio::time::timeout(Duration::from_secs(60), self.task).await.expect("shutdown in time");
        res.expect("serve task").expect("serve returned an error");
    }
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

fn assert_openai_error(body: &Value, code: Option<&str>) {
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{body}");
    if let Some(code) = code {
        assert_eq!(e["code"], code, "{body}");
    }
}

fn question() -> Value {
    json!([{"role": "user", "content": "What is a trait?"}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_answers_with_text_and_usage() {
    let s = start(config()).await;
    let (status, v) = s
        .post_json("/v1/chat/completions", &json!({"model": MODEL_ID, "messages": question(), "temperature": 0}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL_ID);
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().expect("content");
    assert!(text.contains("trait"), "{text:?}");
    assert_eq!(choice["finish_reason"], "stop");
    let u = &v["usage"];
    assert!(u["prompt_tokens"].as_u64() > Some(5) && u["completion_tokens"].as_u64() > Some(0), "{u}");
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    // The file stem names the same model.
    let (status, _) = s
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "rustdoc-moe-Q8_0", "messages": question(), "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streaming_sends_role_then_content_then_done_and_matches_non_streaming() {
    let body =
        json!({"messages": question(), "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let s = start(config()).await;
    let resp = s.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    let data = sse_data(&resp.text().await.expect("body"));
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("chunk JSON")).collect();
    assert!(chunks.len() >= 4, "{data:?}");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let finish: Vec<&Value> =
        chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finish, [&json!("stop")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    s.stop().await;

    // A fresh server (same cold session) answers the same greedy text without streaming.
    let s = start(config()).await;
    let (_, v) = s.post_json("/v1/chat/completions", &json!({"messages": question(), "temperature": 0})).await;
    assert_eq!(v["choices"][0]["message"]["content"].as_str(), Some(text.as_str()));
    assert_eq!(&v["usage"], usage);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_stream_and_not() {
    let s = start(config()).await;
    let body = json!({"prompt": "The borrow checker", "temperature": 0, "max_tokens": 12, "ignore_eos": true});
    let (status, v) = s.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let mut body = body;
    body["stream"] = json!(true);
    let resp = s.post("/v1/completions", &body).await;
    let data = sse_data(&resp.text().await.expect("body"));
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("chunk")).collect();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert!(!text.is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_answer_and_are_not_sent() {
    let plain = json!({"prompt": "The borrow checker", "temperature": 0, "max_tokens": 40, "ignore_eos": true});
    let s = start(config()).await;
    let (_, v) = s.post_json("/v1/completions", &plain).await;
    s.stop().await;
    let full = v["choices"][0]["text"].as_str().expect("text").to_string();
    // A stop string from the middle of the greedy answer, likely spanning tokens.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 20, "{full:?}");
    let stop: String = chars[10..14].iter().collect();
    let at = full.find(&stop).unwrap();
    for stream in [false, true] {
        let s = start(config()).await;
        let mut body = plain.clone();
        body["stop"] = json!(["never-appears", stop]);
        body["stream"] = json!(stream);
        let resp = s.post("/v1/completions", &body).await;
        let (text, finish) = if stream {
            let data = sse_data(&resp.text().await.unwrap());
            let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
            let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
            (text, chunks.last().unwrap()["choices"][0]["finish_reason"].clone())
        } else {
            let v: Value = resp.json().await.unwrap();
            (v["choices"][0]["text"].as_str().unwrap().to_string(), v["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(text, full[..at], "stream={stream}, stop={stop:?}");
        assert_eq!(finish, "stop");
        s.stop().await;
    }
    // A single string works too.
    let s = start(config()).await;
    let (status, v) =
        s.post_json("/v1/chat/completions", &json!({"messages": question(), "stop": "trait", "temperature": 0})).await;
    assert_eq!(status, 200);
    assert!(!v["choices"][0]["message"]["content"].as_str().unwrap().contains("trait"), "{v}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_limits_the_answer_and_the_context_caps_it() {
    let s = start(config()).await;
    for field in ["max_tokens", "max_completion_tokens"] {
        let (_, v) = s
            .post_json(
                "/v1/chat/completions",
                &json!({"messages": question(), field: 3, "ignore_eos": true, "temperature": 0}),
            )
            .await;
        assert_eq!(v["usage"]["completion_tokens"], 3, "{field}: {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }
    // More than fits: cut at the context (256 tokens for the bundled model), finish "length".
    let (status, v) =
        s.post_json("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 100000, "ignore_eos": true})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let total = v["usage"]["total_tokens"].as_u64().unwrap();
    assert!((250..=257).contains(&total), "{v}");
    // A prompt longer than the context is refused.
    let long = "word ".repeat(400);
    let (status, v) = s.post_json("/v1/completions", &json!({"prompt": long})).await;
    assert_eq!(status, 400);
    assert_openai_error(&v, Some("context_length_exceeded"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let s = start(config()).await;
    // Bad JSON.
    let resp = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_openai_error(&resp.json().await.unwrap(), None);
    let cases = [
        ("/v1/chat/completions", json!({"messages": 5}), 400, None),
        ("/v1/chat/completions", json!({"model": MODEL_ID}), 400, None),
        ("/v1/chat/completions", json!({"messages": []}), 400, Some("invalid_value")),
        ("/v1/chat/completions", json!({"messages": question(), "n": 2}), 400, Some("invalid_value")),
        ("/v1/chat/completions", json!({"messages": question(), "temperature": 5}), 400, Some("invalid_value")),
        ("/v1/chat/completions", json!({"messages": question(), "max_tokens": 0}), 400, Some("invalid_value")),
        ("/v1/completions", json!({"prompt": [1, 2, 99999]}), 400, Some("invalid_value")),
        ("/v1/completions", json!({"prompt": ["a", "b"]}), 400, Some("invalid_value")),
        ("/v1/chat/completions", json!({"model": "gpt-4o", "messages": question()}), 404, Some("model_not_found")),
        ("/v1/completions", json!({"model": "llama", "prompt": "x"}), 404, Some("model_not_found")),
        ("/v1/nothing", json!({}), 404, None),
        ("/v1/models", json!({}), 405, None),
    ];
    for (path, body, status, code) in cases {
        let (got, v) = s.post_json(path, &body).await;
        assert_eq!(got, status, "{path} {body}: {v}");
        assert_openai_error(&v, code);
    }
    // Nothing bad reached the engine.
    assert_eq!(s.stats().await["requests"]["total"], 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_set() {
    let s = start(ServerConfig { api_key: Some("sekrit".into()), ..config() }).await;
    let body = json!({"messages": question(), "max_tokens": 2});
    let send = |auth: Option<&'static str>| {
        let mut req = s.client.post(s.url("/v1/chat/completions")).json(&body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.send()
    };
    for auth in [None, Some("Bearer wrong"), Some("Bearer "), Some("sekrit"), Some("Basic sekrit")] {
        let resp = send(auth).await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_openai_error(&resp.json().await.unwrap(), Some("invalid_api_key"));
    }
    assert_eq!(send(Some("Bearer sekrit")).await.unwrap().status(), 200);
    let models = s.client.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 401);
    assert_eq!(s.client.get(s.url("/health")).send().await.unwrap().status(), 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_body_is_413() {
    let s = start(ServerConfig { max_body_bytes: 64 * 1024, ..config() }).await;
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(100 * 1024)}]});
    let (status, v) = s.post_json("/v1/chat/completions", &big).await;
    assert_eq!(status, 413);
    assert_openai_error(&v, Some("request_too_large"));
    // Just under the limit is parsed (and refused for its length in tokens instead).
    let (status, v) = s
        .post_json("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x ".repeat(30 * 1024)}]}))
        .await;
    assert_eq!(status, 400, "{v}");
    assert_openai_error(&v, Some("context_length_exceeded"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_clients_are_all_answered() {
    let s = Arc::new(start(config()).await);
    let mut tasks = Vec::new();
    for i in 0..32 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let body = json!({"messages": [{"role": "user", "content": format!("Question {i}: what is a trait?")}], "max_tokens": 8, "seed": i});
            let resp = s.post("/v1/chat/completions", &body).await;
            let status = resp.status().as_u16();
            let retry = resp.headers().get("retry-after").is_some();
            let v: Value = resp.json().await.unwrap();
            (status, retry, v)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (status, retry, v) = t.await.unwrap();
        match status {
            200 => {
                assert!(v["usage"]["completion_tokens"].as_u64().is_some_and(|n| (1..=8).contains(&n)), "{v}");
                ok += 1;
            }
            // The queue rule: full means 503 with Retry-After.
            503 => assert!(retry, "{v}"),
            _ => panic!("{status}: {v}"),
        }
    }
    // The default queue (64) holds all 32.
    assert_eq!(ok, 32);
    let st = s.stats().await;
    assert_eq!(st["requests"]["completed"], 32, "{st}");
    let s = Arc::into_inner(s).expect("all clients done");
    s.stop().await;
}

/// A streaming completion that runs long (no EOG, up to `max_tokens`); returns once its first
/// text arrives, with the response still open.
async fn start_long_stream(s: &TestServer, max_tokens: usize) -> reqwest::Response {
    let body = json!({"prompt": "The borrow checker", "max_tokens": max_tokens, "ignore_eos": true, "stream": true});
    let mut resp = s.post("/v1/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let t0 = Instant::now();
    let mut seen = String::new();
    while !seen.contains("\"text\"") {
        assert!(t0.elapsed() < Duration::from_secs(30), "no text yet: {seen}");
        let chunk = resp.chunk().await.expect("read").expect("stream open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let engine = EngineConfig { threads: 1, n_ctx: 1024, ..Default::default() };
    let s = Arc::new(start(ServerConfig { queue_capacity: 1, engine, ..config() }).await);
    // The engine is busy with a long answer…
    let running = start_long_stream(&s, 1000).await;
    // …one request waits in the queue…
    let waiting = {
        let s = Arc::clone(&s);
        tokio::spawn(async move { s.post_json("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2})).await })
    };
    s.wait_for_stats("a queued request", |v| v["engine"]["queued"] == 1).await;
    // …so the next one is turned away.
    let resp = s.post("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2})).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_openai_error(&resp.json().await.unwrap(), Some("queue_full"));
    drop(running);
    let (status, v) = waiting.await.unwrap();
    assert_eq!(status, 200, "{v}");
    let st = s.stats().await;
    assert_eq!(st["requests"]["rejected"], 1, "{st}");
    Arc::into_inner(s).expect("clients done").stop().await;
}

/// Sends `body` to `path` over a raw socket (closing it is exactly what a vanished client does).
async fn raw_post(addr: std::net::SocketAddr, path: &str, body: &str) -> TcpStream {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    sock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_the_engine() {
    // A 1024-token context, so that an answer without EOG runs long enough to be cut short.
    let s = start(ServerConfig { engine: EngineConfig { threads: 1, n_ctx: 1024, ..Default::default() }, ..config() })
        .await;
    let long = r#"{"prompt": "The borrow checker", "max_tokens": 1000, "ignore_eos": true, "stream": true}"#;
    let mut sock = raw_post(s.addr, "/v1/completions", long).await;
    let mut seen = Vec::new();
    let t0 = Instant::now();
    while !String::from_utf8_lossy(&seen).contains("\"text\"") {
        assert!(t0.elapsed() < Duration::from_secs(30), "no text yet");
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(30), sock.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    drop(sock);
    let st = s
        .wait_for_stats("the cancelled stream", |v| v["requests"]["cancelled"] == 1 && v["engine"]["busy"] == false)
        .await;
    let generated = st["tokens"]["generated"].as_u64().unwrap();
    assert!(generated < 1000, "the generation ran to its end: {st}");

    // The same without streaming: leaving while the answer is being generated cancels it.
    let sock = raw_post(s.addr, "/v1/completions", &long.replace("true}", "false}")).await;
    s.wait_for_stats("the engine to start", |v| v["engine"]["busy"] == true).await;
    drop(sock);
    let st = s
        .wait_for_stats("the cancelled answer", |v| v["requests"]["cancelled"] == 2 && v["engine"]["busy"] == false)
        .await;
    assert!(st["tokens"]["generated"].as_u64().unwrap() < generated + 1000, "{st}");

    // The engine serves the next client.
    let (status, _) = s.post_json("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2})).await;
    assert_eq!(status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_moe_stats() {
    let s = start(config()).await;
    let v: Value = s.client.get(s.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL_ID);
    assert_eq!(v["data"][0]["object"], "model");
    let v: Value = s.client.get(s.url("/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["status"], "ok");
    // Two turns of one conversation: the second reuses the first's K/V.
    let first = json!([{"role": "user", "content": "What is a trait?"}]);
    let (_, a) =
        s.post_json("/v1/chat/completions", &json!({"messages": first, "temperature": 0, "max_tokens": 20})).await;
    let answer = a["choices"][0]["message"]["content"].as_str().unwrap();
    let second = json!([
        {"role": "user", "content": "What is a trait?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": [{"type": "text", "text": "And a struct?"}]},
    ]);
    let (status, _) = s.post_json("/v1/chat/completions", &json!({"messages": second, "max_tokens": 4})).await;
    assert_eq!(status, 200);
    let st = s.stats().await;
    assert_eq!(st["model"], MODEL_ID);
    assert_eq!(st["requests"]["completed"], 2, "{st}");
    assert!(st["tokens"]["prompt_reused"].as_u64().unwrap() >= a["usage"]["prompt_tokens"].as_u64().unwrap(), "{st}");
    assert!(st["throughput"]["decode_tok_s"].as_f64().is_some_and(|r| r > 0.0), "{st}");
    let moe = &st["moe"];
    assert_eq!(
        (moe["n_expert"].as_u64(), moe["experts_per_token"].as_u64(), moe["n_layer_moe"].as_u64()),
        (Some(8), Some(2), Some(6))
    );
    assert!(moe["active_bytes_per_token"].as_u64() < moe["total_bytes"].as_u64(), "{moe}");
    // No expert cache yet: its figures are null, never made up.
    let cache = &st["expert_cache"];
    assert_eq!(cache["enabled"], false);
    for k in ["hit_rate", "bytes_moved_per_token", "precision_mix", "predictor_accuracy", "stall_ms_per_token"] {
        assert!(cache[k].is_null(), "{k}: {cache}");
    }
    s.stop().await;
}

/// With an expert cache and the predictor, `/v1/moe/stats` reports real cache and predictor
/// figures (hit rate, stall per token, next-layer recall per distance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_report_the_expert_cache_and_the_predictor() {
    let mut cfg = config();
    cfg.engine.residency = moerun::model::Residency::fixed(moerun::model::Resident::Dense);
    cfg.offload = Some(moerun::engine::offload::OffloadConfig {
        budget: moerun::engine::offload::Budget::Share(0.25),
        ..Default::default()
    });
    cfg.predict = Some(moerun::predict::PredictConfig { distance: 2, ..Default::default() });
    let s = start(cfg).await;
    let body = json!({"prompt": "The borrow checker", "max_tokens": 24, "ignore_eos": true});
    let (status, _) = s.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200);
    let cache = s.stats().await["expert_cache"].clone();
    assert_eq!(cache["enabled"], true, "{cache}");
    assert!(cache["hit_rate"].as_f64().is_some_and(|h| (0.0..=1.0).contains(&h)), "{cache}");
    assert!(cache["predictor_accuracy"].as_f64().is_some_and(|r| r > 0.5 && r <= 1.0), "{cache}");
    assert!(cache["stall_ms_per_token"].as_f64().is_some(), "{cache}");
    let per = cache["predictor"]["per_distance"].as_array().expect("per distance").clone();
    assert_eq!(per.len(), 2, "{cache}");
    assert!(per.iter().all(|d| d["predictions"].as_u64().is_some_and(|n| n > 0)), "{cache}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_running_answer_finish() {
    let s = start(config()).await;
    let running = start_long_stream(&s, 200).await;
    let TestServer { shutdown, task, .. } = s;
    let _ = shutdown.map(|tx| tx.send(()));
    // The stream still ends properly.
    let body = tokio::time::timeout(Duration::from_secs(60), running.text()).await.unwrap().unwrap();
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    tokio::time::timeout(Duration::from_secs(60), task).await.unwrap().unwrap().unwrap();
}

/// The bundled model with its chat template replaced by `template` (everything else copied), as
/// `name` in `dir`.
fn with_template(dir: &Path, name: &str, template: &str) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(BUNDLED);
    let value = moerun::gguf::Value::String(template.into());
    common::with_metadata(&src, &dir.join(name), "tokenizer.chat_template", value)
}

/// A template that opens `<think>` for the answer (as DeepSeek-R1's does): what the model writes
/// before `</think>` is its reasoning, sent as `reasoning_content` (as llama.cpp's server does),
/// not as the reply, both whole and streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_is_kept_apart_from_the_reply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let template = "{% for m in messages %}<|user|>\n{{ m.content }}<|end|>\n{% endfor %}\
                    {% if add_generation_prompt %}<|assistant|>\n<think>\n{% endif %}";
    let s = start_with(&with_template(dir.path(), "rustdoc-moe-think.gguf", template), config()).await;
    let body = json!({"messages": question(), "temperature": 0, "max_tokens": 12});
    let (status, v) = s.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let msg = &v["choices"][0]["message"];
    let reasoning = msg["reasoning_content"].as_str().expect("reasoning_content");
    assert!(!reasoning.is_empty());
    assert_eq!(msg["content"], "", "nothing after </think> in 12 tokens: {msg}");
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let text = s.post("/v1/chat/completions", &stream).await.text().await.expect("body");
    let streamed: String = sse_data(&text)
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str().map(String::from))
        .collect();
    assert_eq!(streamed, reasoning, "streamed reasoning = whole reasoning");
    // A plain completion is raw text: nothing is taken out.
    let (status, v) = s.post_json("/v1/completions", &json!({"prompt": "<think>", "max_tokens": 4})).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
    s.stop().await;
}

/// A model whose template loops without end (issue 13): the chat request fails fast with a 500
/// in OpenAI's shape naming the file and the limit; the server goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_past_its_limits_fails_the_request_not_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let template = "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}";
    let s = start_with(&with_template(dir.path(), "rustdoc-moe-looping.gguf", template), config()).await;
    let started = Instant::now();
    let (status, v) = s.post_json("/v1/chat/completions", &json!({"messages": question(), "max_tokens": 4})).await;
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(status, 500, "{v}");
    assert_openai_error(&v, None);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("rustdoc-moe-looping.gguf: tokenizer.chat_template: render stopped at the fuel limit"),
        "{v}"
    );
    assert_eq!(v["error"]["type"], "server_error");
    let (status, v) = s.post_json("/v1/completions", &json!({"prompt": "fn main", "max_tokens": 4})).await;
    assert_eq!(status, 200, "{v}");
    s.stop().await;
}

/// Issue 13, item 4: the model file cut, rewritten or replaced under a running server (experts
/// through the cache, so every read of the file is a checked one). Each fault fails the requests
/// that meet it with an error naming the file; the server stays up and serves again, with the
/// same answer, once the file is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_file_changed_while_serving_fails_those_requests_naming_it_and_serving_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("victim.gguf");
    let original = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(BUNDLED)).expect("bundled model");
    std::fs::write(&path, &original).expect("copy");
    let mut cfg = config();
    cfg.engine.residency = moerun::model::Residency::fixed(moerun::model::Resident::Dense);
    cfg.engine.n_ctx = 2048;
    cfg.offload = Some(moerun::engine::offload::OffloadConfig {
        budget: moerun::engine::offload::Budget::Share(0.1),
        ..Default::default()
    });
    let s = start_with(&path, cfg).await;
    let ask = json!({"prompt": "The borrow checker", "max_tokens": 16, "ignore_eos": true, "temperature": 0});
    let (status, first) = s.post_json("/v1/completions", &ask).await;
    assert_eq!(status, 200, "{first}");
    let answer = first["choices"][0]["text"].clone();
    let refused = |v: &Value, what: &str| {
        assert_openai_error(v, None);
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("victim.gguf") && msg.contains(what), "{v}");
    };

    // Cut while an answer streams: the stream ends with an error naming the file.
    let running = start_long_stream(&s, 1500).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(original.len() as u64 / 3))
        .expect("cut");
    let body = tokio::time::timeout(Duration::from_secs(60), running.text()).await.expect("in time").expect("body");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let last: Value = serde_json::from_str(&sse_data(&body).iter().rev().nth(1).cloned().unwrap_or_default())
        .expect("an error chunk before [DONE]");
    refused(&last, "victim.gguf");
    // With the file still cut, the next request is refused before anything is read.
    let (status, v) = s.post_json("/v1/completions", &ask).await;
    assert_eq!(status, 500, "{v}");
    refused(&v, "changed on disk");
    // The same bytes written back in place (a new modification time): served again, same answer.
    std::fs::write(&path, &original).expect("restore");
    let (status, v) = s.post_json("/v1/completions", &ask).await;
    assert_eq!((status, &v["choices"][0]["text"]), (200, &answer), "{v}");

    // Rewritten in place with other contents of the same size: refused, until it is put back.
    let mut other = original.clone();
    let half = other.len() / 2;
    other[half..].iter_mut().for_each(|b| *b ^= 0x5a);
    // A new modification time (the file clock ticks every few milliseconds).
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(&path, &other).expect("rewrite");
    let (status, v) = s.post_json("/v1/completions", &ask).await;
    assert_eq!(status, 500, "{v}");
    refused(&v, "other contents");
    std::fs::write(&path, &original).expect("restore");
    let (status, v) = s.post_json("/v1/completions", &ask).await;
    assert_eq!((status, &v["choices"][0]["text"]), (200, &answer), "{v}");

    // Replaced by a rename (how downloads land): the server keeps serving the file it loaded.
    let newer = dir.path().join("newer.gguf");
    std::fs::write(&newer, &other).expect("write");
    std::fs::rename(&newer, &path).expect("rename");
    let (status, v) = s.post_json("/v1/completions", &ask).await;
    assert_eq!((status, &v["choices"][0]["text"]), (200, &answer), "{v}");
    let health = s.client.get(s.url("/health")).send().await.expect("health");
    assert_eq!(health.status(), 200);
    s.stop().await;
}

/// Shutdown with answers running past the grace period: the running one is cut (503
/// `shutting_down` in its stream), the queued one refused, and the server stops in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_answers_still_running_when_the_grace_period_ends() {
    let engine = EngineConfig { threads: 1, n_ctx: 4096, ..Default::default() };
    let cfg = ServerConfig { engine, shutdown_grace: Duration::from_millis(300), ..config() };
    let s = start(cfg).await;
    let running = start_long_stream(&s, 4000).await;
    let queued = {
        let (client, url) = (s.client.clone(), s.url("/v1/completions"));
        tokio::spawn(async move {
            let body = json!({"prompt": "Hello", "max_tokens": 4000, "ignore_eos": true});
            let resp = client.post(url).json(&body).send().await.expect("request");
            (resp.status().as_u16(), resp.json::<Value>().await.expect("JSON"))
        })
    };
    s.wait_for_stats("a queued request", |v| v["engine"]["queued"] == 1).await;
    let TestServer { shutdown, task, .. } = s;
    let t0 = Instant::now();
    let _ = shutdown.map(|tx| tx.send(()));
    let body = tokio::time::timeout(Duration::from_secs(30), running.text()).await.expect("in time").expect("body");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let data = sse_data(&body);
    let last: Value = serde_json::from_str(&data[data.len() - 2]).expect("JSON");
    assert_openai_error(&last, Some("shutting_down"));
    let (status, v) = queued.await.expect("queued");
    assert_eq!(status, 503, "{v}");
    assert_openai_error(&v, Some("shutting_down"));
    tokio::time::timeout(Duration::from_secs(30), task).await.expect("stops").expect("task").expect("serve");
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
}
