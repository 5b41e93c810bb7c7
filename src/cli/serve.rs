//! `moerun serve`: the OpenAI-compatible HTTP server on a tokio runtime, until SIGINT/SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use moerun::model::Model;
use moerun::server::{Server, ServerConfig, DEFAULT_MAX_BODY, DEFAULT_QUEUE, DEFAULT_SHUTDOWN_GRACE};
use moerun::tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model (default: the bundled model).
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Address to bind; anything but loopback exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind; 0 picks a free one (the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// The model id clients send in `model` (default: the GGUF's general.name, else the file stem).
    #[arg(long, value_name = "ID")]
    model_id: Option<String>,
    /// Requests that may wait for the engine; one more is answered 503 with Retry-After.
    #[arg(long, default_value_t = DEFAULT_QUEUE)]
    queue: usize,
    /// Largest request body in bytes; larger is answered 413.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY)]
    max_body: usize,
    /// On SIGTERM/SIGINT, seconds that answers already accepted may still run; then a running
    /// answer is cut and queued ones are refused (503).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_SHUTDOWN_GRACE.as_secs_f64())]
    shutdown_grace: f64,
    #[command(flatten)]
    engine: super::common_args::EngineArgs,
    #[command(flatten)]
    offload: super::offload_args::OffloadArgs,
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    let path = super::model_path(a.model.as_deref())?;
    let tok = Arc::new(Tokenizer::from_gguf(&path)?);
    let model = Arc::new(Model::load(&path)?);
    let engine = a.offload.engine_config(&model, moerun::model::Resident::Auto, a.engine.config());
    let kv = moerun::engine::session_kv_bytes(&model, &engine);
    let offload = a.offload.config(&model, &path, kv)?;
    let cfg = ServerConfig {
        model_id: a.model_id,
        api_key: a.api_key,
        queue_capacity: a.queue.max(1),
        max_body_bytes: a.max_body,
        engine,
        offload,
        predict: a.offload.predict_config()?,
        predict_auto: a.offload.predict.is_none(),
        shutdown_grace: std::time::Duration::try_from_secs_f64(a.shutdown_grace)
            .map_err(|e| anyhow::anyhow!("--shutdown-grace {}: {e}", a.shutdown_grace))?,
    };
    let device = a.engine.device()?;
    let threads = cfg.engine.threads;
    let server = super::device_args::with_backend!(device, threads, b => Server::with_backend(model, tok, cfg, b)?);
    // The engine has its own compute threads; the runtime only moves bytes.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        // Scripts read this line to find the port (with --port 0).
        println!("moerun: serving {} on http://{addr}/v1", server.model_id());
        std::io::stdout().flush()?;
        server.serve(listener, shutdown_signal()).await?;
        eprintln!("moerun: stopped");
        anyhow::Ok(())
    })
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("moerun: shutting down (answers in flight may finish within the grace period)");
}
