//! The OpenAI-compatible HTTP server (`moerun serve`): axum on tokio in front of one engine thread.
//! `POST /v1/chat/completions`, `POST /v1/completions` (JSON or SSE), `GET /v1/models`,
//! `GET /v1/moe/stats`, `GET /health`.
//!
//! Invariant: only `server` knows HTTP and JSON. It takes an already-bound listener and a
//! shutdown future, so tests bind `127.0.0.1:0`; requests reach the engine only through the
//! bounded queue of `worker`, and every error leaves in OpenAI's error JSON.

mod handlers;
pub mod openai;
pub mod request;
pub mod stop;
mod worker;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::chat::{ChatError, ChatFormat};
use crate::engine::{Engine, EngineConfig};
use crate::model::Model;
use crate::stats::MoeFacts;
use crate::tokenizer::Tokenizer;
use worker::{Queue, SharedStats};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The id clients name in `model`; `None`: the GGUF's `general.name`, else the file stem.
    pub model_id: Option<String>,
    /// Require `Authorization: Bearer <key>` on every route but `/health`.
    pub api_key: Option<String>,
    /// Requests that may wait for the engine; one more gets 503 with `Retry-After`.
    pub queue_capacity: usize,
    /// Largest request body accepted; larger gets 413.
    pub max_body_bytes: usize,
    pub engine: EngineConfig,
    /// Serve routed experts from a budgeted cache (`None`: all resident).
    pub offload: Option<crate::engine::offload::OffloadConfig>,
    /// Predict and prefetch the next layers' experts (`None`: off, unless `predict_auto`).
    pub predict: Option<crate::predict::PredictConfig>,
    /// With `predict` off because nobody asked: predict anyway where the backend keeps experts in
    /// a cache of its own (a GPU's arena under `--gpu-budget`).
    pub predict_auto: bool,
    /// After shutdown begins, how long answers already accepted may still run; then a running
    /// one is cut and the queued ones are refused (503 `shutting_down`).
    pub shutdown_grace: std::time::Duration,
}

pub const DEFAULT_QUEUE: usize = 64;
pub const DEFAULT_MAX_BODY: usize = 1 << 20;
/// Docker's and Kubernetes' stop timeouts are 10 and 30 s: answer within the shorter.
pub const DEFAULT_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(8);

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_id: None,
            api_key: None,
            queue_capacity: DEFAULT_QUEUE,
            max_body_bytes: DEFAULT_MAX_BODY,
            engine: EngineConfig::default(),
            offload: None,
            predict: None,
            predict_auto: false,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("chat format: {0}")]
    Chat(#[from] ChatError),
    #[error("could not start the engine thread: {0}")]
    Spawn(std::io::Error),
    #[error("serving HTTP: {0}")]
    Io(std::io::Error),
    #[error("the engine thread panicked")]
    WorkerPanicked,
    #[error("expert cache: {0}")]
    Offload(#[from] crate::engine::offload::OffloadError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
}

/// What every handler sees.
struct AppState {
    model_id: String,
    /// Other names accepted in `model` (the file stem).
    aliases: Vec<String>,
    created: u64,
    format: ChatFormat,
    n_ctx: usize,
    threads: usize,
    queue: Queue,
    stats: SharedStats,
    facts: MoeFacts,
    api_key: Option<String>,
    max_body: usize,
    started: Instant,
    next_id: AtomicU64,
}

/// A server ready to accept connections: the engine thread is running.
pub struct Server {
    app: Router,
    model_id: String,
    worker: JoinHandle<()>,
    deadline: worker::Deadline,
    grace: std::time::Duration,
}

impl Server {
    /// Starts the engine thread and builds the routes.
    pub fn new(model: Arc<Model>, tok: Arc<Tokenizer>, cfg: ServerConfig) -> Result<Server, ServerError> {
        let threads = cfg.engine.threads;
        Server::with_backend(model, tok, cfg, crate::backend::cpu::CpuBackend::new(threads))
    }

    /// [`Server::new`] on `backend` (a GPU's, or the CPU's).
    pub fn with_backend<B>(
        model: Arc<Model>,
        tok: Arc<Tokenizer>,
        cfg: ServerConfig,
        backend: B,
    ) -> Result<Server, ServerError>
    where
        B: crate::backend::Backend,
        Engine<B>: Send,
        crate::engine::Session<B>: Send,
    {
        let model_id = cfg.model_id.clone().unwrap_or_else(|| default_model_id(&model));
        let stem = file_stem(model.file.path());
        let aliases = stem.into_iter().filter(|s| *s != model_id).collect();
        let facts = MoeFacts::of(&model);
        let format = ChatFormat::new(Arc::clone(&tok))?;
        // The cache first: a budget that cannot work fails before any weight is copied.
        let offload = match &cfg.offload {
            Some(oc) => Some(crate::engine::offload::Offload::new(Arc::clone(&model), oc)?),
            None => None,
        };
        let mut engine = Engine::with_backend(Arc::clone(&model), backend, cfg.engine.clone())?;
        if let Some(off) = offload {
            engine.set_offload(off);
        }
        let auto = cfg.predict_auto && engine.backend().caches_experts();
        engine.set_predictor(cfg.predict.or(auto.then(crate::predict::device_default)));
        let (n_ctx, threads) = (engine.n_ctx(), engine.threads());
        let sess = engine.new_session()?;
        let stats = SharedStats::default();
        let deadline = worker::Deadline::default();
        let (queue, worker) = worker::spawn(engine, sess, tok, cfg.queue_capacity, stats.clone(), deadline.clone())
            .map_err(ServerError::Spawn)?;
        let state = Arc::new(AppState {
            model_id: model_id.clone(),
            aliases,
            created: unix_now(),
            format,
            n_ctx,
            threads,
            queue,
            stats,
            facts,
            api_key: cfg.api_key.filter(|k| !k.is_empty()),
            max_body: cfg.max_body_bytes,
            started: Instant::now(),
            next_id: AtomicU64::new(0),
        });
        let app = router(state, cfg.max_body_bytes);
        Ok(Server { app, model_id, worker, deadline, grace: cfg.shutdown_grace })
    }

    /// The id `/v1/models` lists and requests must name.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Serves `listener` until `shutdown` completes, then lets requests in flight finish (within
    /// the grace period: `ServerConfig::shutdown_grace`) and stops the engine thread.
    pub async fn serve<F>(self, listener: TcpListener, shutdown: F) -> Result<(), ServerError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Server { app, worker, deadline, grace, .. } = self;
        let shutdown = async move {
            shutdown.await;
            deadline.set(Instant::now() + grace);
        };
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(ServerError::Io)?;
        // Every queue sender lived in the router's state, now dropped: the worker drains and ends.
        tokio::task::spawn_blocking(move || worker.join())
            .await
            .map_err(|_| ServerError::WorkerPanicked)?
            .map_err(|_| ServerError::WorkerPanicked)
    }
}

fn router(state: Arc<AppState>, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::models))
        .route("/v1/moe/stats", get(handlers::moe_stats))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state), handlers::require_key));
    Router::new()
        .merge(api)
        .route("/health", get(handlers::health))
        .fallback(handlers::no_route)
        .method_not_allowed_fallback(handlers::wrong_method)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), handlers::drain_oversize))
        .with_state(state)
}

/// `general.name`, else the file stem, else "model".
fn default_model_id(model: &Model) -> String {
    let name = model.file.get_str("general.name").ok().flatten().map(str::trim).filter(|s| !s.is_empty());
    name.map(str::to_string).or_else(|| file_stem(model.file.path())).unwrap_or_else(|| "model".to_string())
}

fn file_stem(path: &Path) -> Option<String> {
    path.file_stem().map(|s| s.to_string_lossy().into_owned())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
