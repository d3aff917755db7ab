//! `quill serve`: an OpenAI-compatible HTTP server (axum) on the continuous-batching
//! engine. Every request becomes one engine request per prompt (its `n` choices share the
//! prompt's prefill); all of them go to the one engine thread, which decodes whatever is
//! in flight together, so concurrent requests share decoding steps.

mod chat;
mod generation;
mod metrics;
mod output;
mod request;

use crate::cli::model_args::ModelArgs;
use anyhow::{bail, Context};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chat::ChatPrompt;
use quill_actor::{EngineConfig, EngineHandle};
use quill_config::template::PromptTemplate;
use quill_model::Tokenizer;
use request::{ApiError, Limits};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The environment variable that holds the API key by default.
pub const API_KEY_ENV: &str = "QUILL_API_KEY";

/// Flags of `quill serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (host:port; port 0 picks a free one, printed at start).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: String,
    /// The model name clients must send (default: the model folder's name, or `default`).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// A file holding the API key clients must send as `Authorization: Bearer KEY`
    /// (default: the QUILL_API_KEY environment variable). Required off loopback.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// A job file whose `[template]` builds chat prompts for a model without a chat
    /// template (default: the recipe's think/answer template).
    #[arg(long)]
    pub job: Option<PathBuf>,
    /// A Jinja chat template file that replaces the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Sequences the engine decodes together, across all requests.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// `max_tokens` when a request does not give one.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 16384)]
    pub max_tokens_limit: usize,
    /// Largest `n` a request may ask for.
    #[arg(long, default_value_t = 64)]
    pub max_n: usize,
    /// Most prompts in one `/v1/completions` request.
    #[arg(long, default_value_t = 64)]
    pub max_prompts: usize,
}

/// What every handler shares.
pub struct App {
    engine: EngineHandle,
    tokenizer: Tokenizer,
    chat: ChatPrompt,
    limits: Limits,
    api_key: Option<String>,
    stop_token_ids: Vec<i64>,
    metrics: metrics::ServeMetrics,
}

/// Runs `quill serve` until interrupted.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.max_n == 0 || args.max_prompts == 0 {
        bail!("--max-n and --max-prompts must be at least 1");
    }
    if args.default_max_tokens == 0 || args.default_max_tokens > args.max_tokens_limit {
        bail!(
            "--default-max-tokens must be from 1 to --max-tokens-limit ({})",
            args.max_tokens_limit
        );
    }
    let listen: SocketAddr = args
        .listen
        .parse()
        .with_context(|| format!("--listen `{}` is not host:port", args.listen))?;
    let api_key = api_key(args.api_key_file.as_deref())?;
    if api_key.is_none() && !listen.ip().is_loopback() {
        bail!(
            "--listen {listen} is off loopback: give an API key with --api-key-file or ${API_KEY_ENV}"
        );
    }
    let fallback = match &args.job {
        Some(path) => quill_config::JobConfig::from_file(path)?.template,
        None => PromptTemplate::default(),
    };
    let chat = match &args.chat_template {
        Some(path) => ChatPrompt::jinja(
            std::fs::read_to_string(path)
                .with_context(|| format!("--chat-template {}", path.display()))?,
            String::new(),
            String::new(),
        )
        .with_context(|| format!("--chat-template {}", path.display()))?,
        None if args.model.model == "default" => ChatPrompt::Completion(fallback),
        None => ChatPrompt::for_model(Path::new(&args.model.model), fallback)?,
    };
    let served = args.served_model_name.clone().unwrap_or_else(|| {
        Path::new(&args.model.model)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| args.model.model.clone())
    });
    let load_args = args.model.clone();
    let engine = EngineHandle::spawn(
        move || load_args.load_quill(),
        EngineConfig {
            max_batch: args.batch_size,
            ..EngineConfig::default()
        },
    )
    .with_context(|| format!("loading model `{}`", args.model.model))?;
    let app = Arc::new(App {
        tokenizer: engine.tokenizer().clone(),
        stop_token_ids: engine.stop_token_ids(),
        engine,
        chat,
        limits: Limits {
            model: served,
            max_n: args.max_n,
            max_tokens: args.max_tokens_limit,
            default_max_tokens: args.default_max_tokens,
            max_prompts: args.max_prompts,
        },
        api_key,
        metrics: metrics::ServeMetrics::default(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(app, listen))
}

fn api_key(file: Option<&Path>) -> anyhow::Result<Option<String>> {
    let key = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--api-key-file {}", path.display()))?,
        ),
        None => std::env::var(API_KEY_ENV).ok(),
    };
    match key.map(|k| k.trim().to_owned()) {
        Some(k) if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic()) => {
            bail!(
                "the API key (--api-key-file or ${API_KEY_ENV}) must be non-empty printable ASCII"
            )
        }
        other => Ok(other),
    }
}

async fn serve(app: Arc<App>, listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen {listen}"))?;
    let bound = listener.local_addr()?;
    let protected = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(generation::completions))
        .route("/v1/chat/completions", post(generation::chat_completions))
        .route("/metrics", get(metrics::render))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&app),
            require_key,
        ));
    let router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .merge(protected)
        .fallback(|| async {
            ApiError::status(StatusCode::NOT_FOUND, "no such endpoint").into_response()
        })
        .with_state(Arc::clone(&app));
    println!(
        "quill serve: model `{}` on http://{bound}/v1",
        app.limits.model
    );
    tracing::info!(%bound, model = %app.limits.model, key = app.api_key.is_some(), "serving");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// Refuses a request without the API key (when the server has one) with a 401.
async fn require_key(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !quill_proto::auth::session_matches(given, key) {
            app.metrics.refused();
            return ApiError::status(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    next.run(request).await
}

async fn models(State(app): State<Arc<App>>) -> Response {
    axum::Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": app.limits.model,
            "object": "model",
            "created": generation::unix_now(),
            "owned_by": "quill",
        }],
    }))
    .into_response()
}
