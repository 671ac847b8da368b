//! `longctx serve`: the engine behind an OpenAI-compatible HTTP API.
//!
//! Handlers parse and check a request (a bad one is answered at once, with OpenAI's error
//! shape), tokenize it and hand it to the engine thread ([`engine`]), which batches the decode
//! steps of every running request. Tokens come back over a channel per request, as Server-Sent
//! Events or collected into one response. A client that goes away closes its channel, and the
//! engine drops its request at the next step.

pub mod api;
pub mod connections;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod prefix_cache;
mod routes;
pub mod stop;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use longctx::session::{Model, SessionOptions};
use longctx::threads::ThreadPool;

pub use routes::router;

/// Everything the server is started with.
pub struct ServerConfig {
    pub model: Arc<Model>,
    /// The id `/v1/models` lists and responses carry.
    pub model_name: String,
    /// More names requests may give as `model` for the same model.
    pub aliases: Vec<String>,
    /// Options of every request's session; a request's `longctx` object overrides `rope`/`kv`.
    pub defaults: SessionOptions,
    /// Requests holding a slot (prefilling or decoding) at once.
    pub max_concurrent: usize,
    /// Requests waiting for a slot before new ones get 429.
    pub max_queue: usize,
    /// KV bytes the prefix cache may keep.
    pub prefix_cache_bytes: usize,
    /// Largest request body accepted.
    pub body_limit: usize,
    /// `max_tokens` when a request gives none (less where the window has less room).
    pub default_max_tokens: usize,
    /// Where requests' `longrope:factors=NAME` files are; None: requests name no files.
    pub factors_dir: Option<std::path::PathBuf>,
    /// The key every request but `/health` must carry as `Authorization: Bearer KEY`; None: no
    /// authentication.
    pub api_key: Option<String>,
    /// Connections held at once and how long a client may stall one.
    pub limits: connections::Limits,
}

/// Serves on `addr` until Ctrl-C; prints the address it listens on once ready.
pub fn run(config: ServerConfig, addr: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}; is the port in use?"))?;
        let local = listener.local_addr()?;
        let base_model = config.model.chat_template.is_none();
        let limits = config.limits;
        let app = build(config);
        eprintln!("longctx: serving on http://{local} (OpenAI API under /v1)");
        if base_model {
            eprintln!(
                "longctx: the model has no chat template (a base model): /v1/completions works, /v1/chat/completions answers 400"
            );
        }
        connections::serve(listener, app, limits, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
        Ok(())
    })
}

/// The application: starts the engine thread and returns the router over it.
pub fn build(config: ServerConfig) -> axum::Router {
    let metrics = metrics::Metrics::default();
    let pool = Arc::new(ThreadPool::new(config.defaults.threads));
    let engine = engine::start(
        config.model.clone(),
        pool,
        engine::EngineConfig {
            max_concurrent: config.max_concurrent,
            max_queue: config.max_queue,
            prefix_cache_bytes: config.prefix_cache_bytes,
        },
        metrics.clone(),
    );
    router(routes::AppState::new(config, engine, metrics))
}
