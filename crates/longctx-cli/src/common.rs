//! Options and steps shared by the subcommands.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use longctx::fetch::FetchConfig;
use longctx::session::{KvDtype, Model, SessionOptions};
use longctx::spec::Spec;

#[derive(clap::Args)]
pub struct ModelArgs {
    /// A .gguf file, or a model name to fetch on first use: smollm2 (default) or gemma3.
    #[arg(long, short, value_name = "PATH|NAME")]
    pub model: Option<String>,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Arc<Model>> {
        let spec = self.model.as_deref();
        announce_fetch(spec);
        let path = longctx::fetch::resolve_model_with(&fetch_config(), spec)?;
        Ok(Model::load(&path)?)
    }
}

/// Tells the user why the first run pauses: the model is being downloaded.
pub fn announce_fetch(spec: Option<&str>) {
    if let Some(name) = longctx::fetch::pending_download(spec) {
        eprintln!("fetching {name} …");
    }
}

/// The environment's fetch configuration, saying on stderr which part a model in several parts
/// is downloading.
pub fn fetch_config() -> FetchConfig {
    FetchConfig {
        progress: Some(|line| eprintln!("{line}")),
        ..FetchConfig::from_env()
    }
}

#[derive(clap::Args)]
pub struct EngineArgs {
    /// Worker threads for the forward pass (default: all cores).
    #[arg(long, short, value_parser = at_least_one, allow_negative_numbers = true)]
    pub threads: Option<usize>,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 512, value_parser = at_least_one, allow_negative_numbers = true)]
    pub chunk_size: usize,
    /// Element type of the KV cache.
    #[arg(long, value_enum, default_value_t = KvDtypeArg::F16)]
    pub kv_dtype: KvDtypeArg,
    // Parsed by the library, not by clap, so a bad spec reads like every other longctx error.
    /// Position scheme, as name:key=value,… (`none`: the model's own RoPE).
    #[arg(long, value_name = "SPEC", default_value = "none", long_help = rope_help())]
    pub rope: String,
    /// KV-cache policy, as name:key=value,… (`full`: keep every token).
    #[arg(long, value_name = "SPEC", default_value = "full", long_help = kv_help())]
    pub kv: String,
}

/// `--rope`'s long help, from the library's list so it names exactly what exists.
fn rope_help() -> String {
    let mut help = String::from(
        "Position scheme, as name:key=value,… with `+logn` composable (yarn:factor=4+logn). Parameter names follow HF rope_scaling.\n",
    );
    for (name, about) in longctx::positions::SCHEMES {
        help.push_str(&format!("  {name:<12} {about}\n"));
    }
    help.push_str(
        "auto:LENGTH keeps the model's own RoPE up to its trained length and beyond it picks YaRN with factor = LENGTH / trained length; what ran is recorded resolved.",
    );
    help
}

/// `--kv`'s long help, from the library's registry.
fn kv_help() -> String {
    let mut help = String::from(
        "KV-cache policy, as name:key=value,…; budgets as budget=N tokens per KV head or ratio=R (fraction kept). The cache is compressed after every prefill chunk, so it never holds more than budget + --chunk-size tokens.\n",
    );
    for entry in longctx::kv::POLICIES {
        help.push_str(&format!("  {:<12} {}\n", entry.name, entry.about));
    }
    help.push_str(
        "  kivi         KIVI quantization (keys per channel, values per token, bits=2|4|8), alone or after a policy: snapkv:budget=1024+kivi:bits=4\n",
    );
    help
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum KvDtypeArg {
    F16,
    F32,
}

impl EngineArgs {
    pub fn session_options(&self, n_ctx: usize) -> Result<SessionOptions> {
        let defaults = SessionOptions::default();
        Ok(SessionOptions {
            n_ctx,
            kv_dtype: match self.kv_dtype {
                KvDtypeArg::F16 => KvDtype::F16,
                KvDtypeArg::F32 => KvDtype::F32,
            },
            chunk_size: self.chunk_size,
            threads: match self.threads {
                None => defaults.threads,
                // More threads than cores only wait on each other: 4 on 2 cores ran 7x slower.
                Some(asked) if asked > defaults.threads => {
                    eprintln!(
                        "note: --threads {asked} is more than the {} cores this machine has; using {}",
                        defaults.threads, defaults.threads
                    );
                    defaults.threads
                }
                Some(asked) => asked,
            },
            rope: self.rope.parse::<Spec>()?,
            kv: self.kv.parse::<Spec>()?,
        })
    }
}

/// A count that must be at least 1, read for clap. Negative numbers reach it as values (clap
/// would otherwise take `-5` for a flag and report an unexpected argument), so the message can
/// say what is wrong with them.
pub fn at_least_one(text: &str) -> std::result::Result<usize, String> {
    count_from(text, 1)
}

/// A count where 0 means something (off, none), read for clap as [`at_least_one`] is.
pub fn count(text: &str) -> std::result::Result<usize, String> {
    count_from(text, 0)
}

fn count_from(text: &str, low: i128) -> std::result::Result<usize, String> {
    match text.trim().parse::<i128>() {
        Ok(n) if n >= low => usize::try_from(n).map_err(|_| format!("{text} is too large")),
        Ok(_) => Err(format!(
            "{text} is not allowed; give a whole number of at least {low}"
        )),
        Err(_) => Err(format!(
            "`{text}` is not a whole number; give one of at least {low}"
        )),
    }
}

/// The text of `--file`, refusing binary files with a clearer word than "invalid UTF-8".
pub fn read_text(path: &Path) -> Result<String> {
    // Far more text than any context holds (a million tokens is a few MiB).
    let bytes = longctx::files::read_limited(path, 64 * longctx::files::MIB, "a prompt file")?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(text),
        Err(_) => bail!("{} is not UTF-8 text; pass a text file", path.display()),
    }
}

/// Prints `text` and a newline to stdout. A reader that has gone away (`longctx … | head`)
/// is not an error; `println!` would panic there.
pub fn print_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            bail!("cannot write to stdout: {e}")
        }
        _ => Ok(()),
    }
}

/// The process's peak resident memory (VmHWM); 0 where /proc is not available.
pub fn peak_rss_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_is_read() {
        if cfg!(target_os = "linux") {
            assert!(super::peak_rss_bytes() > 0);
        }
    }
}
