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
    /// Address to listen on; loopback by default, since the API has no authentication.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Context window of each request in tokens (default: the model's trained length).
    #[arg(long, default_value_t = 0)]
    ctx: usize,
    /// Requests decoded together (continuous batching); more wait in the queue.
    #[arg(long, default_value_t = 8)]
    max_concurrent: usize,
    /// Requests that may wait for a slot; beyond that the server answers 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// MiB of KV cache kept for prefix reuse across requests (0 turns the prefix cache off).
    #[arg(long, default_value_t = 1024)]
    prefix_cache_mib: usize,
    /// Largest request body accepted, in MiB.
    #[arg(long, default_value_t = 8)]
    max_body_mib: usize,
    /// max_tokens of a request that sets none (less where the window has less room).
    #[arg(long, default_value_t = 512)]
    default_max_tokens: usize,
    /// A directory of LongRoPE factors files that requests may name by file name
    /// (`"longctx": {"rope": "longrope:factors=NAME"}`); without it, requests name no files.
    #[arg(long, value_name = "DIR")]
    factors_dir: Option<std::path::PathBuf>,
}

pub fn main(args: Args) -> Result<()> {
    if args.max_concurrent == 0 {
        bail!("--max-concurrent must be at least 1");
    }
    if args.default_max_tokens == 0 {
        bail!("--default-max-tokens must be at least 1");
    }
    let factors_dir = match &args.factors_dir {
        Some(dir) if !dir.is_dir() => {
            bail!("--factors-dir {}: not a directory", dir.display())
        }
        Some(dir) => Some(dir.canonicalize()?),
        None => None,
    };
    // Bounded so that the shift cannot wrap (it did, to a limit of 0 that refused every body).
    const MAX_BODY_MIB: usize = 4096;
    if !(1..=MAX_BODY_MIB).contains(&args.max_body_mib) {
        bail!(
            "--max-body-mib {} is out of range; give 1 to {MAX_BODY_MIB}",
            args.max_body_mib
        );
    }
    let body_limit = args.max_body_mib << 20;
    let model = args.model.load()?;
    let n_ctx = if args.ctx == 0 {
        model.trained_ctx()
    } else {
        args.ctx
    };
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
        prefix_cache_bytes: args.prefix_cache_mib << 20,
        body_limit,
        default_max_tokens: args.default_max_tokens,
        factors_dir,
    };
    longctx_server::run(config, SocketAddr::new(args.host, args.port))
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
