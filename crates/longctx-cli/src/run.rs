use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::{bail, Result};
use longctx::chat::{ChatMessage, ChatTemplate};
use longctx::generate::{generate, FinishReason, GenerationStats};
use longctx::sampling::{Sampler, SamplingParams};
use longctx::session::{Model, Session};

use crate::common::{at_least_one, count, read_text, EngineArgs, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    input: Input,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128, value_parser = at_least_one, allow_negative_numbers = true)]
    max_tokens: usize,
    /// Context size in tokens (default: what the prompt and --max-tokens need, up to the
    /// model's trained length).
    #[arg(long, short, value_parser = at_least_one, allow_negative_numbers = true)]
    ctx: Option<usize>,
    // Defaults are llama.cpp's, so the same command means the same thing in both.
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true, value_parser = temperature)]
    temperature: f32,
    /// Keep the K most likely tokens; 0 turns it off.
    #[arg(long, default_value_t = 40, value_parser = count, allow_negative_numbers = true)]
    top_k: usize,
    /// Keep the most likely tokens up to this total probability; 1 turns it off.
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true, value_parser = top_p)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one; 0 turns it off.
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true, value_parser = min_p)]
    min_p: f32,
    /// Penalise the last 64 tokens' repeats by this factor; 1 turns it off.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true, value_parser = repeat_penalty)]
    repeat_penalty: f32,
    /// Subtracted from a recent token's logit once per time it was seen; 0 turns it off.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true, value_parser = frequency_penalty)]
    frequency_penalty: f32,
    /// Subtracted from a recent token's logit once if it was seen at all; 0 turns it off.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true, value_parser = presence_penalty)]
    presence_penalty: f32,
    /// Random seed (default: a fresh one, printed with the statistics).
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Input {
    /// The prompt text.
    #[arg(long, short)]
    prompt: Option<String>,
    /// A file holding the prompt text.
    #[arg(long, short, value_name = "PATH")]
    file: Option<PathBuf>,
}

pub fn main(args: Args) -> Result<()> {
    // clap guarantees exactly one of --prompt and --file.
    let text = match &args.input.file {
        Some(path) => read_text(path)?,
        None => args.input.prompt.clone().unwrap_or_default(),
    };
    // Checked on the text: a BOS token alone would otherwise pass for a prompt.
    if text.is_empty() {
        return Err(longctx::Error::EmptyPrompt.into());
    }
    let seed = args.seed.unwrap_or_else(fresh_seed);
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        frequency_penalty: args.frequency_penalty,
        presence_penalty: args.presence_penalty,
        seed,
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(params)?;

    let model = args.model.load()?;
    let prompt = match chat_template(&model, args.chat)? {
        // The message is text: `<|im_start|>` typed in it stays text, as in the server.
        Some(template) => {
            let message = ChatMessage {
                role: "user".to_string(),
                content: text,
            };
            model.tokenizer.encode_chat(&template, &[message], true)?
        }
        // Special-token text becomes the token, as in llama.cpp, and as `longctx tokenize` shows.
        None => model.tokenizer.encode(&text, true, true)?,
    };
    let n_ctx = args
        .ctx
        .unwrap_or_else(|| (prompt.len() + args.max_tokens).min(model.trained_ctx()));
    let mut session = Session::new(model, args.engine.session_options(n_ctx)?)?;

    let mut out = Stdout::default();
    let stats = generate(
        &mut session,
        &mut sampler,
        &prompt,
        args.max_tokens,
        &mut |piece| out.write(piece),
    )?;
    out.write("\n");
    if let Some(err) = out.error {
        // `longctx run | head` closing the pipe early is the reader's choice, not a failure.
        if err.kind() != io::ErrorKind::BrokenPipe {
            bail!("cannot write to stdout: {err}");
        }
    }
    print_stats(&stats, seed, &session);
    Ok(())
}

/// The model's chat template when `--chat` asks for it and the model has one.
fn chat_template(model: &Model, chat: bool) -> Result<Option<ChatTemplate>> {
    if !chat {
        return Ok(None);
    }
    let Some(source) = &model.chat_template else {
        eprintln!(
            "note: the model has no chat template (a base model, not instruction-tuned): --chat is ignored and the prompt runs as plain text"
        );
        return Ok(None);
    };
    let tok = &model.tokenizer;
    let token_text = |id: Option<u32>| id.and_then(|id| tok.token_text(id)).unwrap_or("");
    Ok(Some(ChatTemplate::new(
        source,
        token_text(tok.bos()),
        token_text(tok.eos()),
    )?))
}

/// Stdout that flushes every piece, so text appears as it is generated, and remembers the first
/// error instead of panicking as `print!` would.
#[derive(Default)]
struct Stdout {
    error: Option<io::Error>,
}

impl Stdout {
    fn write(&mut self, piece: &str) {
        if self.error.is_some() {
            return;
        }
        let mut out = io::stdout().lock();
        if let Err(err) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
            self.error = Some(err);
        }
    }
}

fn print_stats(stats: &GenerationStats, seed: u64, session: &Session) {
    let finish = match stats.finish_reason {
        FinishReason::Stop => "end of text",
        FinishReason::Length => "max tokens",
    };
    eprintln!();
    eprintln!(
        "prompt:    {} tokens in {:.2} s ({:.1} tok/s)",
        stats.prompt_tokens,
        stats.prefill_seconds,
        stats.prefill_tokens_per_second()
    );
    eprintln!(
        "generated: {} tokens in {:.2} s ({:.1} tok/s), stopped at {finish}",
        stats.generated_tokens,
        stats.decode_seconds,
        stats.decode_tokens_per_second()
    );
    eprintln!(
        "kv cache:  {} bytes ({:.1} MiB) holding {} of {} tokens (--kv {}, context {}); peak RSS {:.1} MiB; {} threads; seed {seed}",
        stats.kv_bytes,
        stats.kv_bytes as f64 / (1024.0 * 1024.0),
        session.n_past(),
        stats.prompt_tokens + stats.generated_tokens,
        session.policy_spec(),
        session.n_ctx(),
        crate::common::peak_rss_bytes() as f64 / (1024.0 * 1024.0),
        session.options().threads,
    );
    if session.model.config.sliding.is_some() {
        let (local, global) = session.kv_bytes_by_kind();
        eprintln!(
            "           of which local (sliding-window) layers {:.1} MiB, global layers {:.1} MiB",
            local as f64 / (1024.0 * 1024.0),
            global as f64 / (1024.0 * 1024.0)
        );
    }
}

fn fresh_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A sampling option checked as the text typed, before it becomes the f32 the sampler takes:
/// 1e308 would otherwise round to `inf` and be reported as that, not as what the user wrote.
/// `low_open`: the low end itself is refused. Temperatures and penalties past 100 flatten or
/// crush every distribution alike, so 100 bounds them.
fn sampling_value(
    text: &str,
    name: &str,
    (low, low_open, high): (f64, bool, f64),
    note: &str,
) -> Result<f32, String> {
    match text.trim().parse::<f64>() {
        Ok(v) if (v > low || (!low_open && v == low)) && v <= high => Ok(v as f32),
        _ => {
            let range = if low_open {
                format!("above {low} and at most {high}")
            } else {
                format!("between {low} and {high}")
            };
            Err(format!("{name} must be {range}{note} (got {text})"))
        }
    }
}

fn temperature(text: &str) -> Result<f32, String> {
    sampling_value(text, "temperature", (0.0, false, 100.0), ", 0 for greedy")
}

fn top_p(text: &str) -> Result<f32, String> {
    sampling_value(text, "top-p", (0.0, true, 1.0), ", 1 turns it off")
}

fn min_p(text: &str) -> Result<f32, String> {
    sampling_value(text, "min-p", (0.0, false, 1.0), ", 0 turns it off")
}

// OpenAI's range for both.
fn frequency_penalty(text: &str) -> Result<f32, String> {
    penalty(text, "frequency penalty")
}

fn presence_penalty(text: &str) -> Result<f32, String> {
    penalty(text, "presence penalty")
}

fn penalty(text: &str, name: &str) -> Result<f32, String> {
    sampling_value(text, name, (-2.0, false, 2.0), ", 0 turns it off")
}

fn repeat_penalty(text: &str) -> Result<f32, String> {
    sampling_value(
        text,
        "repeat penalty",
        (0.0, true, 100.0),
        ", 1 turns it off",
    )
}
