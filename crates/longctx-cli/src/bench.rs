//! Speed measurement in the manner of llama-bench: synthetic tokens, the forward pass timed
//! alone, the median over repetitions.

use std::time::Instant;

use anyhow::{bail, Result};
use longctx::session::Session;

use crate::common::{peak_rss_bytes, print_out, EngineArgs, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens in the timed prefill (0 skips it).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens decoded one by one, timed (0 skips it).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Tokens put in the cache, untimed, before measuring (like `llama-bench -d`).
    #[arg(long, default_value_t = 0)]
    depth: usize,
    /// Runs to take the median of.
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

pub fn main(args: Args) -> Result<()> {
    if args.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    if args.prompt_tokens == 0 && args.gen_tokens == 0 {
        bail!("nothing to measure: --prompt-tokens and --gen-tokens are both 0");
    }
    let model = args.model.load()?;
    let n_ctx = args.depth + args.prompt_tokens + args.gen_tokens;
    let vocab = model.tokenizer.vocab_size();
    let mut session = Session::new(model, args.engine.session_options(n_ctx)?)?;
    let tokens = synthetic_tokens(vocab, n_ctx);
    let (depth_tokens, rest) = tokens.split_at(args.depth);
    let (prompt_tokens, gen_tokens) = rest.split_at(args.prompt_tokens);

    // Touch every weight page once so the first repetition does not pay for the memory map.
    session.prefill(&tokens[..n_ctx.min(16)])?;

    let mut prefill_rates = Vec::with_capacity(args.repetitions);
    let mut decode_rates = Vec::with_capacity(args.repetitions);
    for _ in 0..args.repetitions {
        session.reset();
        if !depth_tokens.is_empty() {
            session.prefill(depth_tokens)?;
        }
        if !prompt_tokens.is_empty() {
            let start = Instant::now();
            session.prefill(prompt_tokens)?;
            prefill_rates.push(prompt_tokens.len() as f64 / start.elapsed().as_secs_f64());
        }
        if !gen_tokens.is_empty() {
            let start = Instant::now();
            for &id in gen_tokens {
                session.decode(id)?;
            }
            decode_rates.push(gen_tokens.len() as f64 / start.elapsed().as_secs_f64());
        }
    }

    let report = Report {
        prefill_tok_s: median(&mut prefill_rates),
        decode_tok_s: median(&mut decode_rates),
        peak_rss_bytes: peak_rss_bytes(),
        kv_bytes: session.kv_bytes(),
        kv_bytes_local_layers: session.kv_bytes_by_kind().0,
        kv_tokens: session.n_past(),
        kv: session.policy_spec(),
        threads: session.options().threads,
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        depth: args.depth,
    };
    let text = if args.json {
        serde_json::to_string(&report)?
    } else {
        report.table(args.repetitions)
    };
    print_out(&text)
}

#[derive(serde::Serialize)]
struct Report {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    peak_rss_bytes: u64,
    /// KV cache in use at the end, and the tokens it holds.
    kv_bytes: usize,
    /// Of `kv_bytes`, what sliding-window (local) layers hold.
    kv_bytes_local_layers: usize,
    kv_tokens: usize,
    kv: String,
    threads: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    depth: usize,
}

impl Report {
    fn table(&self, repetitions: usize) -> String {
        let at_depth = if self.depth > 0 {
            format!(" @ depth {}", self.depth)
        } else {
            String::new()
        };
        let mut lines = vec![
            format!("| test | tok/s (median of {repetitions}) |"),
            "|---|---:|".to_string(),
        ];
        if self.prompt_tokens > 0 {
            lines.push(format!(
                "| prefill {}{at_depth} | {:.1} |",
                self.prompt_tokens, self.prefill_tok_s
            ));
        }
        if self.gen_tokens > 0 {
            lines.push(format!(
                "| decode {}{at_depth} | {:.1} |",
                self.gen_tokens, self.decode_tok_s
            ));
        }
        lines.push(String::new());
        lines.push(format!(
            "threads {}, kv cache {:.1} MiB (local layers {:.1} MiB; {} tokens, --kv {}), peak RSS {:.1} MiB",
            self.threads,
            self.kv_bytes as f64 / (1024.0 * 1024.0),
            self.kv_bytes_local_layers as f64 / (1024.0 * 1024.0),
            self.kv_tokens,
            self.kv,
            self.peak_rss_bytes as f64 / (1024.0 * 1024.0)
        ));
        lines.join("\n")
    }
}

/// Ordinary-looking token ids spread over the vocabulary, the same on every run. llama-bench
/// uses random ids; a fixed sequence makes runs comparable. The first ids are skipped because
/// that is where vocabularies put their special tokens.
fn synthetic_tokens(vocab: usize, n: usize) -> Vec<u32> {
    let skip = (vocab / 64).min(1000);
    let span = (vocab - skip).max(1) as u64;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            // A 64-bit LCG (Knuth's MMIX constants); its high bits are well spread.
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (skip as u64 + (state >> 33) % span) as u32
        })
        .collect()
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_tokens_stay_in_the_ordinary_vocabulary() {
        let ids = synthetic_tokens(49152, 4096);
        assert!(ids.iter().all(|&id| (768..49152).contains(&id)));
        assert_eq!(ids, synthetic_tokens(49152, 4096));
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert!(distinct.len() > 3000);
        assert!(synthetic_tokens(10, 5).iter().all(|&id| id < 10));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}
