//! `longctx`: the command-line face of the library. Parsing and printing only; the work happens
//! in the `longctx` crate.

mod bench;
mod common;
mod eval;
mod fetch;
mod rope_search;
mod run;
mod serve;
mod tokenize;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "longctx",
    version,
    about = "Run GGUF language models locally and make their context window go further"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download a model by name into the cache (once) and print its path.
    Fetch(fetch::Args),
    /// Complete a prompt, streaming the text to stdout and the statistics to stderr.
    Run(run::Args),
    /// Print the token ids of a text as a JSON array.
    Tokenize(tokenize::Args),
    /// Measure prefill and decode speed, as llama-bench does.
    Bench(bench::Args),
    /// Measure the context a model really uses: passkey, needle in a haystack, RULER tasks,
    /// perplexity against length, MECW; resumable, with reports and plots.
    Eval(eval::Args),
    /// Search per-dimension RoPE factors for a target length (LongRoPE's evolutionary search),
    /// for use as `--rope longrope:factors=FILE`; resumable.
    RopeSearch(rope_search::Args),
    /// Serve the model over an OpenAI-compatible HTTP API, with per-request `--rope`/`--kv`
    /// (the `longctx` field), continuous batching and a prefix cache.
    Serve(serve::Args),
}

fn main() -> ExitCode {
    install_panic_hook();
    // candle captures a backtrace into its errors when RUST_BACKTRACE is set, and its messages
    // then carry it; the user wants one sentence. Only the library's capture is turned off.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fetch(args) => fetch::main(args),
        Command::Run(args) => run::main(args),
        Command::Tokenize(args) => tokenize::main(args),
        Command::Bench(args) => bench::main(args),
        Command::Eval(args) => eval::main(args),
        Command::RopeSearch(args) => rope_search::main(args),
        Command::Serve(args) => serve::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, whatever the error's own formatting: scripts grep for `longctx: `.
            // Library errors already name their cause, so the source chain is not repeated.
            let message = err.to_string().replace('\n', " ");
            eprintln!("longctx: {message}");
            ExitCode::from(1)
        }
    }
}

/// A panic is a bug in longctx, not the user's fault: say so in one line instead of a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("unknown panic");
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "longctx: internal error ({what}{place}); this is a bug, please report it with the command that caused it"
        );
        std::process::exit(101);
    }));
}
