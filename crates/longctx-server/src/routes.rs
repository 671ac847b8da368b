//! HTTP routes and the OpenAI response shapes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use http_body_util::BodyExt;
use longctx::chat::{ChatMessage, ChatTemplate};
use longctx::generate::FinishReason;
use longctx::sampling::SamplingParams;
use longctx::session::{Model, Session, SessionOptions};
use longctx::spec::Spec;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::Semaphore;

use crate::api::{self, ChatRequest, Common, CompletionRequest, Prompt};
use crate::engine::{EngineHandle, Event, Job, TokenLogprob, Usage};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::ServerConfig;

pub struct AppState {
    model: Arc<Model>,
    model_name: String,
    aliases: Vec<String>,
    defaults: SessionOptions,
    template: Option<ChatTemplate>,
    default_max_tokens: usize,
    engine: EngineHandle,
    metrics: Metrics,
    next_id: AtomicU64,
    body_limit: usize,
    factors_dir: Option<std::path::PathBuf>,
    api_key: Option<String>,
    read_timeout: Duration,
    /// One permit per core for CPU-bound request work (tokenizing, checking).
    cpu: Arc<Semaphore>,
}

type Shared = State<Arc<AppState>>;

impl AppState {
    pub fn new(config: ServerConfig, engine: EngineHandle, metrics: Metrics) -> Arc<Self> {
        let tok = &config.model.tokenizer;
        let text = |id: Option<u32>| id.and_then(|id| tok.token_text(id)).unwrap_or("");
        // A template that does not compile is reported per chat request, not at start-up, so
        // the completion endpoint stays usable.
        let template =
            config.model.chat_template.as_deref().and_then(|source| {
                ChatTemplate::new(source, text(tok.bos()), text(tok.eos())).ok()
            });
        Arc::new(Self {
            template,
            model: config.model,
            model_name: config.model_name,
            aliases: config.aliases,
            defaults: config.defaults,
            default_max_tokens: config.default_max_tokens,
            engine,
            metrics,
            next_id: AtomicU64::new(1),
            body_limit: config.body_limit,
            factors_dir: config.factors_dir,
            api_key: config.api_key,
            read_timeout: config.limits.read_timeout,
            cpu: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            )),
        })
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // `read_body` reads every body whole, within the limit and the timeout, before the
        // handlers' `Bytes` take it; axum's own limit would only repeat that check.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        // Outermost, so that a request without the key is refused before its body is read.
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// Refuses every route but `/health` (which load balancers probe without credentials) to a
/// request that lacks the server's key, as llama-server and OpenAI do.
async fn authorize(State(state): Shared, request: Request, next: Next) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(request).await;
    };
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let message = match given {
        // Compared in constant time, so that timing does not reveal the key byte by byte.
        Some(given) if bool::from(given.trim().as_bytes().ct_eq(key.as_bytes())) => {
            return next.run(request).await;
        }
        Some(_) => "the API key is not this server's; send the key its operator started it with",
        None => {
            "this server needs an API key: send the header `Authorization: Bearer KEY` with the \
             key its operator started it with"
        }
    };
    let mut response = ApiError::invalid(message)
        .with_status(StatusCode::UNAUTHORIZED)
        .with_code("invalid_api_key")
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Reads the whole body within the server's read timeout and size limit before any handler
/// runs: hyper's header timer stops at the headers, and a body sent a byte a minute would
/// otherwise hold its connection and its handler for good.
async fn read_body(State(state): Shared, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let limited = http_body_util::Limited::new(body, state.body_limit);
    let read = tokio::time::timeout(state.read_timeout, limited.collect()).await;
    let bytes = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return ApiError::invalid(format!(
                "the request body is larger than the server's limit of {} bytes; send a \
                 shorter prompt or start the server with a larger --max-body-mib",
                state.body_limit
            ))
            .with_status(StatusCode::PAYLOAD_TOO_LARGE)
            .into_response()
        }
        Ok(Err(e)) => {
            return ApiError::invalid(format!("cannot read the request body: {e}")).into_response()
        }
        Err(_) => {
            return ApiError::invalid(format!(
                "the request body did not arrive within {} s; send the whole body at once",
                state.read_timeout.as_secs_f64()
            ))
            .with_status(StatusCode::REQUEST_TIMEOUT)
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Runs CPU-bound request work off the async workers, one job per core at a time, so that
/// `/health` and streams stay responsive and memory stays bounded whatever clients send. The
/// permit travels with the job: a client that hangs up does not free it while the job runs.
async fn off_workers<T: Send + 'static>(
    state: &Arc<AppState>,
    work: impl FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let permit = state
        .cpu
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::internal("the server is shutting down"))?;
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work(&state)
    })
    .await
    .unwrap_or_else(|e| Err(ApiError::internal(format!("request handling failed: {e}"))))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; the API lives under /v1 (chat/completions, completions, models), with /health, /metrics, /tokenize and /detokenize")
}

async fn method_not_allowed() -> ApiError {
    ApiError::invalid("this route does not take that HTTP method")
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(state): Shared) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": now(),
            "owned_by": "longctx",
            "meta": {
                "n_ctx": state.defaults.n_ctx,
                "n_ctx_train": state.model.trained_ctx(),
                "rope": state.defaults.rope.to_string(),
                "kv": state.defaults.kv.to_string(),
            }
        }]
    }))
}

async fn metrics(State(state): Shared) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn tokenize(State(state): Shared, body: Bytes) -> Response {
    match off_workers(&state, move |state| tokenize_body(state, &body)).await {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The answer serialized here, on the blocking thread, straight from the ids rather than
/// through a `Value` of 30-odd bytes per token.
fn tokenize_body(state: &AppState, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    #[derive(serde::Serialize)]
    struct Piece {
        id: u32,
        piece: String,
    }
    #[derive(serde::Serialize)]
    struct Tokens<T> {
        tokens: T,
    }
    let request: api::TokenizeRequest = api::parse(body)?;
    let tok = &state.model.tokenizer;
    let ids = tok.encode(&request.content, request.add_special, request.parse_special)?;
    let json = if request.with_pieces {
        let pieces: Vec<Piece> = ids
            .iter()
            .map(|&id| Piece {
                id,
                piece: String::from_utf8_lossy(&tok.token_bytes(id)).into_owned(),
            })
            .collect();
        serde_json::to_vec(&Tokens { tokens: pieces })
    } else {
        serde_json::to_vec(&Tokens { tokens: &ids })
    };
    json.map_err(|e| ApiError::internal(format!("cannot write the answer: {e}")))
}

async fn detokenize(State(state): Shared, body: Bytes) -> Response {
    let result = off_workers(&state, move |state| {
        let request: api::DetokenizeRequest = api::parse(&body)?;
        let ids = token_ids(&request.tokens, state.model.config.vocab, "tokens")?;
        Ok(json!({ "content": state.model.tokenizer.decode(&ids) }))
    })
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

fn token_ids(ids: &[i64], vocab: usize, param: &str) -> Result<Vec<u32>, ApiError> {
    ids.iter()
        .map(|&id| {
            u32::try_from(id)
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        param,
                        format!("token id {id} is outside the vocabulary of {vocab} tokens"),
                    )
                })
        })
        .collect()
}

/// Which endpoint a generation answers, for the shape of its responses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

/// A checked request, ready for the engine.
struct Prepared {
    endpoint: Endpoint,
    job: Job,
    stream: bool,
    include_usage: bool,
    events: UnboundedReceiver<Event>,
}

async fn chat(State(state): Shared, body: Bytes) -> Response {
    generate(state, body, Endpoint::Chat).await
}

async fn completions(State(state): Shared, body: Bytes) -> Response {
    generate(state, body, Endpoint::Completion).await
}

async fn generate(state: Arc<AppState>, bytes: Bytes, endpoint: Endpoint) -> Response {
    // Tokenizing a long prompt and checking it against the window is CPU work.
    let prepared = off_workers(&state, move |state| prepare(state, &bytes, endpoint)).await;
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let Prepared {
        endpoint,
        job,
        stream,
        include_usage,
        events,
    } = prepared;
    let logprobs = job.logprobs.is_some();
    if let Err(e) = state.engine.submit(job) {
        return e.into_response();
    }
    let reply = Reply {
        id: state.id(match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        }),
        created: now(),
        model: state.model_name.clone(),
        endpoint,
        logprobs,
    };
    if stream {
        let events = sse_events(reply, events, include_usage);
        Sse::new(events)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(1)))
            .into_response()
    } else {
        collect(reply, events).await
    }
}

fn prepare(state: &AppState, body: &[u8], endpoint: Endpoint) -> Result<Prepared, ApiError> {
    let tok = &state.model.tokenizer;
    let (common, prompt, logprobs) = match endpoint {
        Endpoint::Chat => {
            let (request, common): (ChatRequest, Common) = api::parse_generation(body)?;
            served(state, &common)?;
            let logprobs = match (request.logprobs, request.top_logprobs) {
                (Some(true), top) => Some(in_range(top.unwrap_or(0), 0, 20, "top_logprobs")?),
                (_, Some(_)) => {
                    return Err(ApiError::invalid_param(
                        "top_logprobs",
                        "top_logprobs needs logprobs set to true",
                    ))
                }
                _ => None,
            };
            let ids = encode_chat(state, &request.messages)?;
            (common, ids, logprobs)
        }
        Endpoint::Completion => {
            let (request, common): (CompletionRequest, Common) = api::parse_generation(body)?;
            served(state, &common)?;
            if request.echo == Some(true) {
                return Err(ApiError::invalid_param(
                    "echo",
                    "echo is not supported; send echo false or leave it out",
                ));
            }
            if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
                return Err(ApiError::invalid_param(
                    "suffix",
                    "suffix (fill-in-the-middle) is not supported by this model",
                ));
            }
            let logprobs = request
                .logprobs
                .map(|n| in_range(n, 0, 5, "logprobs"))
                .transpose()?;
            let tokens = match request.prompt.single()? {
                Prompt::Text(text) => tok.encode(&text, true, true)?,
                Prompt::Tokens(ids) => token_ids(&ids, state.model.config.vocab, "prompt")?,
                Prompt::Texts(_) | Prompt::TokenLists(_) => unreachable!("single() flattens"),
            };
            (common, tokens, logprobs)
        }
    };
    let prompt_param = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completion => "prompt",
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid_param(prompt_param, "the prompt is empty"));
    }
    let options = session_options(state, &common)?;
    let sampling = sampling(&common, state.model.config.vocab)?;
    let max_tokens =
        max_tokens(state, &common, &options, prompt.len()).map_err(|e| match e.code {
            Some("context_length_exceeded") => ApiError {
                param: Some(prompt_param.to_string()),
                ..e
            },
            _ => e,
        })?;
    let stop = common
        .stop
        .map(api::Stop::into_list)
        .transpose()?
        .unwrap_or_default();
    if let Some(n) = common.n {
        if n != 1 {
            return Err(ApiError::invalid_param(
                "n",
                format!("n must be 1 (one choice per request), got {n}"),
            ));
        }
    }
    let stream = common.stream.unwrap_or(false);
    let include_usage = common
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let (events_tx, events) = unbounded_channel();
    Ok(Prepared {
        endpoint,
        job: Job {
            prompt,
            options,
            sampling,
            max_tokens,
            stop,
            logprobs,
            events: events_tx,
        },
        stream,
        include_usage,
        events,
    })
}

/// Refuses, before any tokenizing, a request for another model or for a feature the server
/// lacks.
fn served(state: &AppState, common: &Common) -> Result<(), ApiError> {
    if let Some(asked) = &common.model {
        if *asked != state.model_name && !state.aliases.contains(asked) {
            let mut names = vec![format!("`{}`", state.model_name)];
            names.extend(state.aliases.iter().map(|a| format!("`{a}`")));
            return Err(ApiError::invalid_param(
                "model",
                format!(
                    "this server does not serve the model `{}`; it serves {} (GET /v1/models \
                     lists it; its operator can accept more names with --alias)",
                    asked.escape_debug(),
                    names.join(" or ")
                ),
            )
            .with_status(StatusCode::NOT_FOUND)
            .with_code("model_not_found"));
        }
    }
    common.unsupported()
}

fn in_range(value: i64, low: i64, high: i64, param: &str) -> Result<usize, ApiError> {
    if (low..=high).contains(&value) {
        Ok(value as usize)
    } else {
        Err(ApiError::invalid_param(
            param,
            format!("{param} must be between {low} and {high}, got {value}"),
        ))
    }
}

/// The chat roles OpenAI's API defines and chat templates know.
const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

fn encode_chat(state: &AppState, messages: &[api::Message]) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages is empty; send at least one message",
        ));
    }
    let template = state.template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "this model has no usable chat template; use /v1/completions with a prompt",
        )
    })?;
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // A role is template text, not message text: one a client made up could carry
            // special-token text past the message guard, and no template knows it anyway.
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].role"),
                    format!(
                        "`{}` is not a role this server takes; use one of {}",
                        m.role.escape_debug(),
                        ROLES.join(", ")
                    ),
                ));
            }
            Ok(ChatMessage {
                role: m.role.clone(),
                content: m
                    .content
                    .as_ref()
                    .map(|c| c.text())
                    .transpose()?
                    .unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(state
        .model
        .tokenizer
        .encode_chat(template, &messages, true)?)
}

/// The server's options with the request's `longctx` overrides, parsed.
fn session_options(state: &AppState, common: &Common) -> Result<SessionOptions, ApiError> {
    let mut options = state.defaults.clone();
    if let Some(ext) = &common.longctx {
        let spec = |text: &str, param: &str| {
            text.parse::<Spec>()
                .map_err(|e| ApiError::invalid_param(param, e.to_string()))
        };
        if let Some(rope) = &ext.rope {
            options.rope = request_rope(spec(rope, "longctx.rope")?, state.factors_dir.as_deref())?;
        }
        if let Some(kv) = &ext.kv {
            options.kv = spec(kv, "longctx.kv")?;
        }
    }
    Ok(options)
}

/// A request's position scheme with the files it names resolved: a request never names a path
/// on the server (it could read any file, or hang on a FIFO). LongRoPE factors come by a bare
/// file name from the directory the operator serves with `--factors-dir`, or not at all.
fn request_rope(mut rope: Spec, dir: Option<&std::path::Path>) -> Result<Spec, ApiError> {
    let param = "longctx.rope";
    for part in &mut rope.parts {
        for (key, value) in &mut part.params {
            if key != "factors" {
                continue;
            }
            let Some(dir) = dir else {
                return Err(ApiError::invalid_param(
                    param,
                    "this server takes no factors files from requests; its operator can serve \
                     a directory of them with --factors-dir, which requests then name by file name",
                ));
            };
            let bare = !value.is_empty() && !value.starts_with('.') && !value.contains(['/', '\\']);
            let path = dir.join(&*value);
            if !bare || !path.is_file() {
                return Err(ApiError::invalid_param(
                    param,
                    format!(
                        "this server has no factors file named `{}`; name one of the files in \
                         its factors directory, without a path",
                        value.escape_debug()
                    ),
                ));
            }
            *value = path.to_string_lossy().into_owned();
        }
    }
    Ok(rope)
}

fn sampling(common: &Common, vocab: usize) -> Result<SamplingParams, ApiError> {
    let mut params = SamplingParams::default();
    if let Some(t) = common.temperature {
        params.temperature = within(t, 0.0, 2.0, "temperature", "between 0 and 2")?;
    }
    if let Some(p) = common.top_p {
        if p <= 0.0 {
            return Err(ApiError::invalid_param(
                "top_p",
                format!("top_p must be in (0, 1], got {p}"),
            ));
        }
        params.top_p = within(p, 0.0, 1.0, "top_p", "in (0, 1]")?;
    }
    if let Some(k) = common.top_k {
        params.top_k = in_range(k, 0, 1 << 20, "top_k")?;
    }
    if let Some(p) = common.min_p {
        params.min_p = within(p, 0.0, 1.0, "min_p", "between 0 and 1")?;
    }
    // OpenAI's ranges for the penalties and the bias.
    if let Some(p) = common.frequency_penalty {
        params.frequency_penalty = within(p, -2.0, 2.0, "frequency_penalty", "between -2 and 2")?;
    }
    if let Some(p) = common.presence_penalty {
        params.presence_penalty = within(p, -2.0, 2.0, "presence_penalty", "between -2 and 2")?;
    }
    if let Some(p) = common.repeat_penalty {
        if p <= 0.0 {
            return Err(ApiError::invalid_param(
                "repeat_penalty",
                format!("repeat_penalty must be positive (1 turns it off), got {p}"),
            ));
        }
        params.repeat_penalty = within(p, 0.0, 10.0, "repeat_penalty", "in (0, 10]")?;
    }
    if let Some(bias) = &common.logit_bias {
        params.logit_bias = bias
            .iter()
            .map(|(id, &value)| {
                let param = format!("logit_bias.{id}");
                let token = id
                    .parse::<u32>()
                    .ok()
                    .filter(|&t| (t as usize) < vocab)
                    .ok_or_else(|| {
                        ApiError::invalid_param(
                            &param,
                            format!(
                                "logit_bias keys are token ids below the vocabulary size                                  {vocab}, got `{}`",
                                id.escape_debug()
                            ),
                        )
                    })?;
                Ok((token, within(value, -100.0, 100.0, &param, "between -100 and 100")?))
            })
            .collect::<Result<_, ApiError>>()?;
    }
    params.seed = match common.seed {
        Some(seed) => seed as u64,
        // Without a seed each request draws differently, as OpenAI's do.
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    params.validate()?;
    Ok(params)
}

/// `value` as the engine's f32 if it lies in `[low, high]`; else a 400 naming `param` and the
/// value as sent.
fn within(value: f64, low: f64, high: f64, param: &str, range: &str) -> Result<f32, ApiError> {
    if (low..=high).contains(&value) {
        Ok(value as f32)
    } else {
        Err(ApiError::invalid_param(
            param,
            // Debug, not Display: 1e308 reads as sent rather than as 309 digits.
            format!("{param} must be {range}, got {value:?}"),
        ))
    }
}

/// The request's `max_tokens`, checked against the window under its policies. Without one, the
/// server's default, less where the window has less room.
fn max_tokens(
    state: &AppState,
    common: &Common,
    options: &SessionOptions,
    prompt: usize,
) -> Result<usize, ApiError> {
    let n_ctx = options.n_ctx;
    let (asked, param) = match (common.max_completion_tokens, common.max_tokens) {
        (Some(n), _) => (Some(n), "max_completion_tokens"),
        (None, n) => (n, "max_tokens"),
    };
    let max = match asked {
        Some(n) => in_range(n, 1, n_ctx as i64, param)?,
        None => {
            // A compressing policy has room beyond the window; keep the default if it fits.
            let default = state.default_max_tokens;
            if Session::check_request(&state.model, options, prompt, default).is_ok() {
                return Ok(default);
            }
            default.min(n_ctx.saturating_sub(prompt).max(1))
        }
    };
    match Session::check_request(&state.model, options, prompt, max) {
        Ok(()) => Ok(max),
        Err(
            e @ (longctx::Error::ContextOverflow { .. } | longctx::Error::PolicyOverflow { .. }),
        ) => Err(over_window(state, options, prompt, max, &e)),
        Err(e) => Err(match &common.longctx {
            Some(_) => ApiError::invalid_param("longctx", e.to_string()),
            None => e.into(),
        }),
    }
}

/// The 400 for a prompt the window cannot hold: the window, the prompt, and the options that
/// would hold it, checked against the engine rather than guessed.
fn over_window(
    state: &AppState,
    options: &SessionOptions,
    prompt: usize,
    max_tokens: usize,
    cause: &longctx::Error,
) -> ApiError {
    let n_ctx = options.n_ctx;
    let trained = state.model.trained_ctx();
    let mut fits = Vec::new();
    let budget = n_ctx.saturating_sub(options.chunk_size + max_tokens) * 3 / 4;
    if budget > 0 {
        for policy in ["snapkv", "streaming"] {
            let spec = format!("{policy}:budget={budget}");
            let Ok(kv) = spec.parse::<Spec>() else {
                continue;
            };
            let candidate = SessionOptions {
                kv,
                ..options.clone()
            };
            if Session::check_request(&state.model, &candidate, prompt, max_tokens).is_ok() {
                fits.push(format!(
                    "\"longctx\": {{\"kv\": \"{spec}\"}} in the request"
                ));
            }
        }
    }
    let need = (prompt + max_tokens).next_power_of_two();
    if need > trained {
        let factor = need.div_ceil(trained);
        fits.push(format!(
            "a larger window, which only the server's operator can give it (`longctx serve \
             --ctx {need} --rope yarn:factor={factor}`; the model was trained on {trained} tokens)"
        ));
    } else {
        fits.push(format!(
            "a larger window, which only the server's operator can give it (`longctx serve \
             --ctx {need}`)"
        ));
    }
    // The engine's own wording names command-line flags; only the policy's part is the client's.
    let policy = match cause {
        longctx::Error::PolicyOverflow { peak, .. } => format!(
            " (under kv {} the cache would hold up to {peak} tokens: its budget, a prefill \
             chunk and the tokens generated)",
            options.kv
        ),
        _ => String::new(),
    };
    ApiError::invalid(format!(
        "the prompt does not fit: this server's context window is {n_ctx} tokens and the \
         prompt has {prompt} tokens with max_tokens {max_tokens} to generate{policy}. \
         Options that fit it: {}. Or shorten the prompt or lower max_tokens.",
        fits.join("; ")
    ))
    .with_code("context_length_exceeded")
}

/// What every response of one request carries.
struct Reply {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    logprobs: bool,
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    })
}

fn alternative_json(a: &crate::engine::Alternative) -> Value {
    json!({"token": a.text, "logprob": a.logprob, "bytes": a.bytes})
}

/// Log-probabilities in the endpoint's shape: chat's `content` list, or the legacy endpoint's
/// parallel lists.
fn logprobs_json(endpoint: Endpoint, items: &[TokenLogprob], text_offset: usize) -> Value {
    match endpoint {
        Endpoint::Chat => json!({
            "content": items.iter().map(|lp| {
                let mut v = alternative_json(&lp.token);
                v["top_logprobs"] = lp.top.iter().map(alternative_json).collect();
                v
            }).collect::<Vec<_>>()
        }),
        Endpoint::Completion => {
            let mut offset = text_offset;
            let mut offsets = Vec::new();
            for lp in items {
                offsets.push(offset);
                offset += lp.token.text.len();
            }
            json!({
                "tokens": items.iter().map(|lp| lp.token.text.clone()).collect::<Vec<_>>(),
                "token_logprobs": items.iter().map(|lp| lp.token.logprob).collect::<Vec<_>>(),
                "top_logprobs": items.iter().map(|lp| {
                    lp.top.iter().map(|a| (a.text.clone(), json!(a.logprob))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

/// The non-streaming response: every event collected into one body.
async fn collect(reply: Reply, mut events: UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    loop {
        match events.recv().await {
            Some(Event::Token {
                text: piece,
                logprob,
            }) => {
                text.push_str(&piece);
                logprobs.extend(logprob);
            }
            Some(Event::Done {
                finish_reason: reason,
                usage,
            }) => {
                let lp = reply
                    .logprobs
                    .then(|| logprobs_json(reply.endpoint, &logprobs, 0));
                let choice = match reply.endpoint {
                    Endpoint::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": lp,
                        "finish_reason": finish_reason(reason),
                    }),
                    Endpoint::Completion => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": lp,
                        "finish_reason": finish_reason(reason),
                    }),
                };
                return Json(json!({
                    "id": reply.id,
                    "object": match reply.endpoint {
                        Endpoint::Chat => "chat.completion",
                        Endpoint::Completion => "text_completion",
                    },
                    "created": reply.created,
                    "model": reply.model,
                    "choices": [choice],
                    "usage": usage_json(&usage),
                }))
                .into_response();
            }
            Some(Event::Failed(e)) => return e.into_response(),
            None => return ApiError::internal("the engine dropped the request").into_response(),
        }
    }
}

/// Server-Sent Events for a streaming request, ending with `data: [DONE]`.
fn sse_events(
    reply: Reply,
    events: UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    struct St {
        reply: Reply,
        events: UnboundedReceiver<Event>,
        include_usage: bool,
        out: VecDeque<SseEvent>,
        ended: bool,
        text_offset: usize,
    }
    let mut first = VecDeque::new();
    if reply.endpoint == Endpoint::Chat {
        first.push_back(chunk(
            &reply,
            json!({"role": "assistant", "content": ""}),
            None,
            None,
            include_usage,
        ));
    }
    let state = St {
        reply,
        events,
        include_usage,
        out: first,
        ended: false,
        text_offset: 0,
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if let Some(event) = st.out.pop_front() {
                return Some((Ok(event), st));
            }
            if st.ended {
                return None;
            }
            match st.events.recv().await {
                Some(Event::Token { text, logprob }) => {
                    let lp = logprob.map(|lp| {
                        logprobs_json(st.reply.endpoint, std::slice::from_ref(&lp), st.text_offset)
                    });
                    st.text_offset += text.len();
                    let delta = match st.reply.endpoint {
                        Endpoint::Chat => json!({"content": text}),
                        Endpoint::Completion => json!(text),
                    };
                    st.out
                        .push_back(chunk(&st.reply, delta, lp, None, st.include_usage));
                }
                Some(Event::Done {
                    finish_reason: reason,
                    usage,
                }) => {
                    let empty = match st.reply.endpoint {
                        Endpoint::Chat => json!({}),
                        Endpoint::Completion => json!(""),
                    };
                    st.out.push_back(chunk(
                        &st.reply,
                        empty,
                        None,
                        Some(finish_reason(reason)),
                        st.include_usage,
                    ));
                    if st.include_usage {
                        let mut last = base(&st.reply);
                        last["choices"] = json!([]);
                        last["usage"] = usage_json(&usage);
                        st.out.push_back(SseEvent::default().data(last.to_string()));
                    }
                    st.out.push_back(SseEvent::default().data("[DONE]"));
                    st.ended = true;
                }
                Some(Event::Failed(e)) => {
                    st.out
                        .push_back(SseEvent::default().data(e.body().to_string()));
                    st.out.push_back(SseEvent::default().data("[DONE]"));
                    st.ended = true;
                }
                None => {
                    let e = ApiError::internal("the engine dropped the request");
                    st.out
                        .push_back(SseEvent::default().data(e.body().to_string()));
                    st.ended = true;
                }
            }
        }
    })
}

fn base(reply: &Reply) -> Value {
    json!({
        "id": reply.id,
        "object": match reply.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        },
        "created": reply.created,
        "model": reply.model,
    })
}

/// One streamed chunk: `delta` is chat's delta object or the completion's text.
fn chunk(
    reply: &Reply,
    delta: Value,
    logprobs: Option<Value>,
    finish: Option<&str>,
    include_usage: bool,
) -> SseEvent {
    let mut v = base(reply);
    let choice = match reply.endpoint {
        Endpoint::Chat => json!({
            "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
        }),
        Endpoint::Completion => json!({
            "index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish,
        }),
    };
    v["choices"] = json!([choice]);
    if include_usage {
        v["usage"] = Value::Null;
    }
    SseEvent::default().data(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(text: &str, dir: Option<&std::path::Path>) -> Result<String, String> {
        request_rope(text.parse().unwrap(), dir)
            .map(|spec| spec.to_string())
            .map_err(|e| e.message)
    }

    #[test]
    fn a_request_names_factors_files_only_by_name_in_the_operators_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.json"), "{}").unwrap();
        let resolved = rope("longrope:factors=f.json", Some(dir.path())).unwrap();
        let path = dir.path().join("f.json");
        assert_eq!(resolved, format!("longrope:factors={}", path.display()));
        // Paths, hidden names and absent names get the same answer, which tells nothing of the
        // server's files.
        let absent = rope("longrope:factors=g.json", Some(dir.path())).unwrap_err();
        for name in ["/etc/passwd", "../f.json", ".f.json", "sub/f.json"] {
            let err = rope(&format!("longrope:factors={name}"), Some(dir.path())).unwrap_err();
            assert_eq!(
                err.replace(name, "?"),
                absent.replace("g.json", "?"),
                "{name}"
            );
        }
        let refused = rope("longrope:factors=f.json", None).unwrap_err();
        assert!(refused.contains("--factors-dir"), "{refused}");
        assert_eq!(rope("yarn:factor=2", None).unwrap(), "yarn:factor=2");
    }
}
