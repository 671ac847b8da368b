//! Perplexity against context length over a long natural text.
//!
//! Every length reads the same `span` tokens at the start of the text (default 16384), so the
//! lengths differ only in how much context each prediction gets, not in which text is scored.
//! Two windowings, recorded with every result because they give different numbers:
//! - `mode=llama` (default) is llama.cpp's `llama-perplexity` over those tokens: non-overlapping
//!   windows of the case's length, the first token of each replaced by BOS (for models that add
//!   one), a fresh cache per window, and only the second half of each window scored, so
//!   perplexity at length L measures positions L/2…L. Sample i is window i; a length gets
//!   span / L of them.
//! - `mode=sliding` is llama.cpp's `--ppl-stride`: windows of length L every `stride` tokens,
//!   each scoring its last `stride` tokens, so every scored token sees at least L − stride tokens
//!   of context (the sliding evaluation of Press et al. and of YaRN's `eval/perplexity.py`). The
//!   scored tokens are the second half of the span at every length, so the numbers compare
//!   exactly; sample i scores the i-th L tokens of that half.
//!
//! `--samples` does not apply: the span decides how many windows a length has.

use longctx::spec::{Params, SpecPart};

use crate::task::{Case, Engine, Outcome, Task, TaskContext, TaskEntry};
use crate::{EvalError, Result};

pub const ENTRY: TaskEntry = TaskEntry {
    name: "ppl",
    about: "perplexity against length on the first span=16384 tokens of the natural text: mode=llama (llama.cpp windows, second half scored) or mode=sliding with stride=512",
    build,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Llama,
    Sliding { stride: usize },
}

pub struct Perplexity {
    pub mode: Mode,
    /// Tokens of text read at every length.
    pub span: usize,
}

fn build(part: &SpecPart) -> Result<Box<dyn Task>> {
    let mut params = Params::new(part);
    let mode = params.choice("mode", &["llama", "sliding"])?;
    let stride: usize = params.get("stride", 512)?;
    let span: usize = params.get("span", 16384)?;
    params.finish(&["mode", "stride", "span"])?;
    if stride == 0 {
        return Err(EvalError::Invalid(
            "ppl: stride must be at least 1 token".into(),
        ));
    }
    Ok(Box::new(Perplexity {
        mode: match mode {
            "sliding" => Mode::Sliding { stride },
            _ => Mode::Llama,
        },
        span,
    }))
}

/// One window: where it starts in the text's tokens, and from which position on it is scored.
struct Window {
    start: usize,
    first_scored: usize,
}

impl Perplexity {
    fn windows(&self, case: &Case) -> Result<Vec<Window>> {
        let length = case.length;
        if length < 4 {
            return Err(EvalError::Invalid(format!(
                "ppl: length {length} is too short to score"
            )));
        }
        let sample = case.sample as usize;
        if sample >= self.samples_at(length, 1)? as usize {
            return Err(EvalError::Invalid(format!(
                "ppl: window {sample} is past the span of {} tokens",
                self.span
            )));
        }
        Ok(match self.mode {
            Mode::Llama => vec![Window {
                start: sample * length,
                first_scored: length / 2,
            }],
            Mode::Sliding { stride } => {
                if stride >= length {
                    return Err(EvalError::Invalid(format!(
                        "ppl: stride {stride} must be shorter than the length {length}"
                    )));
                }
                // Sample i scores the targets [half + iL, half + (i+1)L), half = span / 2:
                // window w starts w strides past base and scores the stride's worth of targets
                // at its end; the last window, when the stride does not divide L, scores only
                // what is left.
                let base = self.span / 2 + sample * length - length;
                (1..=length.div_ceil(stride))
                    .map(|w| {
                        let shift = (w * stride).min(length);
                        Window {
                            start: base + shift,
                            first_scored: length - (shift - (w - 1) * stride) - 1,
                        }
                    })
                    .collect()
            }
        })
    }
}

impl Task for Perplexity {
    fn spec(&self) -> String {
        match self.mode {
            Mode::Llama => format!("ppl:mode=llama,span={}", self.span),
            Mode::Sliding { stride } => {
                format!("ppl:mode=sliding,stride={stride},span={}", self.span)
            }
        }
    }

    fn samples_at(&self, length: usize, _requested: u32) -> Result<u32> {
        let (room, need) = match self.mode {
            Mode::Llama => (self.span, "at least"),
            Mode::Sliding { .. } => (self.span / 2, "at least twice"),
        };
        match room / length.max(1) {
            0 => Err(EvalError::Invalid(format!(
                "ppl: length {length} needs a span of {need} the length, but span={}; raise it, e.g. ppl:span={}",
                self.span,
                length * if room == self.span { 1 } else { 2 }
            ))),
            n => Ok(n as u32),
        }
    }

    fn uses_depth(&self) -> bool {
        false
    }

    fn needs_text(&self) -> bool {
        true
    }

    fn run(&self, case: &Case, ctx: &TaskContext, engine: &mut Engine) -> Result<Outcome> {
        let windows = self.windows(case)?;
        let needed = windows.iter().map(|w| w.start).max().unwrap_or(0) + case.length;
        let tokens = text_tokens(ctx, needed)?;
        let bos = ctx.model.tokenizer.bos();
        let (mut sum, mut count) = (0.0f64, 0usize);
        for window in &windows {
            let mut input = tokens[window.start..window.start + case.length].to_vec();
            // As llama.cpp: the window's first token becomes BOS, so every window starts as a
            // document does, whatever text precedes it.
            if let (Some(bos), true) = (bos, ctx.model.tokenizer.add_bos()) {
                input[0] = bos;
            }
            let (s, n) = window_nll(engine, &input, window.first_scored)?;
            sum += s;
            count += n;
        }
        Ok(Outcome {
            prompt_tokens: case.length,
            nll_sum: Some(sum),
            nll_count: Some(count),
            ..Outcome::default()
        })
    }
}

/// The natural text's first `needed` tokens (tokenizing only as much text as that takes).
fn text_tokens(ctx: &TaskContext, needed: usize) -> Result<Vec<u32>> {
    let text = &ctx.text()?.text;
    let mut chars = needed * 6 + 1024;
    loop {
        let end = text
            .char_indices()
            .nth(chars)
            .map_or(text.len(), |(at, _)| at);
        // Cut at a line break so the last word is not split differently than in the full text.
        let cut = if end < text.len() {
            text[..end].rfind('\n').unwrap_or(end)
        } else {
            end
        };
        let tokens = ctx.model.tokenizer.encode(&text[..cut], false, false)?;
        if tokens.len() >= needed {
            return Ok(tokens);
        }
        if end == text.len() {
            return Err(EvalError::Invalid(format!(
                "the text has {} tokens but this case needs {needed}; use fewer --samples, shorter lengths or a longer --text",
                tokens.len()
            )));
        }
        chars *= 2;
    }
}

/// Summed NLL (nats) of `tokens[first_scored + 1 ..]`, each predicted from the logits one before,
/// with a fresh cache. Logits are taken a chunk at a time so a 16k window never holds all its
/// logits at once (16k × a 49k vocabulary would be 3 GiB).
fn window_nll(engine: &mut Engine, tokens: &[u32], first_scored: usize) -> Result<(f64, usize)> {
    let session = &mut *engine.session;
    session.reset();
    let step = session.options().chunk_size.max(1);
    let (mut sum, mut count) = (0.0f64, 0usize);
    let mut at = 0;
    while at < tokens.len() {
        let end = (at + step).min(tokens.len());
        let scored_here = (at..end).any(|j| j >= first_scored && j + 1 < tokens.len());
        if !scored_here {
            session.prefill(&tokens[at..end])?;
            at = end;
            continue;
        }
        let logits = session.prefill_all_logits(&tokens[at..end])?;
        let vocab = logits.len() / (end - at);
        for j in at..end {
            if j < first_scored || j + 1 >= tokens.len() {
                continue;
            }
            let row = &logits[(j - at) * vocab..(j - at + 1) * vocab];
            sum += nll(row, tokens[j + 1] as usize);
            count += 1;
        }
        at = end;
    }
    Ok((sum, count))
}

/// −log softmax(row)[target], in f64 as llama-perplexity computes it.
pub fn nll(row: &[f32], target: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    sum.ln() + max - row[target] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_is_minus_log_softmax() {
        let row = [1.0f32, 2.0, 3.0];
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).sum();
        assert!((nll(&row, 2) - (z.ln() - 3.0)).abs() < 1e-12);
        assert!((nll(&row, 0) - (z.ln() - 1.0)).abs() < 1e-12);
    }

    fn case(length: usize, sample: u32) -> Case {
        Case {
            length,
            depth: None,
            sample,
        }
    }

    #[test]
    fn llama_windows_do_not_overlap_and_score_the_second_half() {
        let ppl = Perplexity {
            mode: Mode::Llama,
            span: 8192,
        };
        let w = ppl.windows(&case(1024, 2)).unwrap();
        assert_eq!((w[0].start, w[0].first_scored), (2048, 512));
        assert_eq!(ppl.samples_at(1024, 1).unwrap(), 8);
        assert_eq!(ppl.samples_at(8192, 5).unwrap(), 1);
        let err = ppl.samples_at(16384, 1).unwrap_err().to_string();
        assert!(err.contains("ppl:span=16384"), "{err}");
        assert!(ppl.windows(&case(1024, 8)).is_err(), "past the span");
    }

    #[test]
    fn sliding_windows_score_every_token_once_with_enough_context() {
        let stride = 256;
        let ppl = Perplexity {
            mode: Mode::Sliding { stride },
            span: 4096,
        };
        let length = 1024;
        assert_eq!(ppl.samples_at(length, 1).unwrap(), 2);
        let windows = ppl.windows(&case(length, 1)).unwrap();
        assert_eq!(windows.len(), 4);
        // Absolute positions of scored targets (position j predicts j + 1).
        let mut scored: Vec<usize> = windows
            .iter()
            .flat_map(|w| (w.first_scored..length - 1).map(move |j| w.start + j + 1))
            .collect();
        scored.sort_unstable();
        let before = scored.len();
        scored.dedup();
        assert_eq!(scored.len(), before, "no token is scored twice");
        for w in &windows {
            assert!(
                w.first_scored >= length - stride - 1,
                "each target has L - stride context"
            );
        }
        let expected: Vec<usize> = (2048 + length..2048 + 2 * length).collect();
        assert_eq!(
            scored, expected,
            "sample 1: the second L tokens of the span's second half"
        );
        let uneven = Perplexity {
            mode: Mode::Sliding { stride: 300 },
            span: 4096,
        };
        let mut scored: Vec<usize> = uneven
            .windows(&case(length, 0))
            .unwrap()
            .iter()
            .flat_map(|w| (w.first_scored..length - 1).map(move |j| w.start + j + 1))
            .collect();
        scored.sort_unstable();
        assert_eq!(scored, (2048..2048 + length).collect::<Vec<_>>());
        assert!(
            ppl.windows(&case(256, 0)).is_err(),
            "stride must be below the length"
        );
    }
}
