//! `longctx serve`: the OpenAI-compatible server (crates/longctx-server).

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Result};
use longctx_server::ServerConfig;

use crate::common::{EngineArgs, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to listen on. Loopback by default; any other address needs --api-key (or
    /// --insecure), since anyone who reaches the port can use the model.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// The key clients must send as `Authorization: Bearer KEY` (every route but /health).
    /// Better from the environment than the command line, where `ps` shows it.
    #[arg(
        long,
        env = "LONGCTX_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    api_key: Option<String>,
    /// Serve beyond loopback without an API key.
    #[arg(long)]
    insecure: bool,
    /// Another name requests may give as `model` (repeatable); the file's name is always served.
    #[arg(long, value_name = "NAME")]
    alias: Vec<String>,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Context window of each request in tokens (default: the model's trained length).
    #[arg(long, value_parser = crate::common::at_least_one, allow_negative_numbers = true)]
    ctx: Option<usize>,
    /// Requests decoded together (continuous batching); more wait in the queue.
    #[arg(long, default_value_t = 8, value_parser = crate::common::at_least_one, allow_negative_numbers = true)]
    max_concurrent: usize,
    /// Requests that may wait for a slot; beyond that the server answers 429.
    #[arg(long, default_value_t = 64, value_parser = crate::common::count, allow_negative_numbers = true)]
    max_queue: usize,
    /// MiB of KV cache kept for prefix reuse across requests (0 turns the prefix cache off).
    #[arg(long, default_value_t = 1024, value_parser = crate::common::count, allow_negative_numbers = true)]
    prefix_cache_mib: usize,
    /// Largest request body accepted, in MiB.
    #[arg(long, default_value_t = 8, value_parser = crate::common::at_least_one, allow_negative_numbers = true)]
    max_body_mib: usize,
    /// max_tokens of a request that sets none (less where the window has less room).
    #[arg(long, default_value_t = 512, value_parser = crate::common::at_least_one, allow_negative_numbers = true)]
    default_max_tokens: usize,
    /// A directory of LongRoPE factors files that requests may name by file name
    /// (`"longctx": {"rope": "longrope:factors=NAME"}`); without it, requests name no files.
    #[arg(long, value_name = "DIR")]
    factors_dir: Option<std::path::PathBuf>,
    /// Connections held at once; more are answered 503.
    #[arg(long, default_value_t = 256, value_parser = crate::common::at_least_one, allow_negative_numbers = true)]
    max_connections: usize,
    /// Seconds a client may take to send a request's headers (or to start its next request on
    /// a kept-alive connection), to send its body, and to read each part of the answer.
    #[arg(long, default_value_t = 30, value_parser = crate::common::at_least_one, allow_negative_numbers = true)]
    timeout: usize,
}

pub fn main(args: Args) -> Result<()> {
    let api_key = args
        .api_key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty());
    if !args.host.is_loopback() && api_key.is_none() && !args.insecure {
        bail!(
            "--host {} reaches beyond this machine, and without a key anyone who reaches the \
             port can use the model; give --api-key KEY (or LONGCTX_API_KEY), or --insecure to \
             serve without one",
            args.host
        );
    }
    let factors_dir = match &args.factors_dir {
        Some(dir) if !dir.is_dir() => {
            bail!("--factors-dir {}: not a directory", dir.display())
        }
        Some(dir) => Some(dir.canonicalize()?),
        None => None,
    };
    // Bounded so that nothing wraps: the body limit's shift (it did, to a limit of 0 that
    // refused every body), the timers' deadlines, the connection semaphore's permit count.
    at_most("max-body-mib", args.max_body_mib, 4096, "")?;
    at_most("timeout", args.timeout, 86_400, " seconds (a day)")?;
    at_most("max-connections", args.max_connections, 1 << 20, "")?;
    let body_limit = args.max_body_mib << 20;
    let Some(prefix_cache_bytes) = args.prefix_cache_mib.checked_mul(1 << 20) else {
        bail!(
            "--prefix-cache-mib {} is more memory than any machine has; give a size in MiB",
            args.prefix_cache_mib
        );
    };
    let model = args.model.load()?;
    let n_ctx = args.ctx.unwrap_or_else(|| model.trained_ctx());
    let defaults = args.engine.session_options(n_ctx)?;
    // A bad --rope/--kv should stop the server at start, not fail every request.
    longctx::session::Session::check_request(&model, &defaults, 1, 1)?;
    let model_name = model_name(args.model.model.as_deref());
    let config = ServerConfig {
        model,
        model_name,
        defaults,
        max_concurrent: args.max_concurrent,
        max_queue: args.max_queue,
        prefix_cache_bytes,
        body_limit,
        default_max_tokens: args.default_max_tokens,
        factors_dir,
        aliases: args.alias.clone(),
        api_key: api_key.map(str::to_string),
        limits: longctx_server::connections::Limits {
            max_connections: args.max_connections,
            read_timeout: std::time::Duration::from_secs(args.timeout as u64),
            write_timeout: std::time::Duration::from_secs(args.timeout as u64),
        },
    };
    longctx_server::run(config, SocketAddr::new(args.host, args.port))
}

fn at_most(flag: &str, value: usize, max: usize, unit: &str) -> Result<()> {
    if value > max {
        bail!("--{flag} {value} is out of range; give 1 to {max}{unit}");
    }
    Ok(())
}

/// The id clients see: the file's stem, or the name the model was fetched by.
fn model_name(spec: Option<&str>) -> String {
    let spec = spec.unwrap_or("smollm2");
    std::path::Path::new(spec)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(spec)
        .to_string()
}
