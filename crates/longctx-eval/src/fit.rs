//! Sizing a haystack so the whole prompt, in the model's own tokenizer, has the case's length.
//!
//! Token counts of concatenated text are not additive (merges cross unit boundaries, the chat
//! template adds its own tokens), so the only exact way is to tokenize the whole prompt: an
//! exponential then binary search over the number of haystack units, as RULER does.

use crate::task::{Case, TaskContext};
use crate::{EvalError, Result};

/// The prompt a task builds around `n` haystack units: the user turn and the answer prefix.
pub struct Draft {
    pub user: String,
    pub answer_prefix: String,
}

/// The largest `n <= max_units` whose prompt fits in `case.length - reserve` tokens, and that
/// prompt's tokens.
pub fn fit(
    ctx: &TaskContext,
    case: &Case,
    reserve: usize,
    max_units: usize,
    draft: impl Fn(usize) -> Result<Draft>,
) -> Result<(usize, Vec<u32>)> {
    let target = case.length.checked_sub(reserve).ok_or_else(|| {
        EvalError::Invalid(format!(
            "length {} is shorter than the {reserve} tokens the answer needs",
            case.length
        ))
    })?;
    let encode = |n: usize| -> Result<Vec<u32>> {
        let d = draft(n)?;
        ctx.encode_text(&ctx.render(&d.user, &d.answer_prefix)?)
    };
    let bare = encode(0)?;
    if bare.len() > target {
        return Err(EvalError::Invalid(format!(
            "length {} is too short: the task's own text takes {} tokens plus {reserve} for the answer; use a longer length",
            case.length,
            bare.len()
        )));
    }
    // Exponential search for an upper bound, then bisection: O(log n) tokenizations.
    let (mut lo, mut lo_tokens) = (0usize, bare);
    let mut hi = None;
    let mut step = 16usize;
    while hi.is_none() {
        let probe = (lo + step).min(max_units);
        if probe == lo {
            break;
        }
        let tokens = encode(probe)?;
        if tokens.len() <= target {
            (lo, lo_tokens) = (probe, tokens);
            step *= 2;
        } else {
            hi = Some(probe);
        }
    }
    if let Some(mut hi) = hi {
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let tokens = encode(mid)?;
            if tokens.len() <= target {
                (lo, lo_tokens) = (mid, tokens);
            } else {
                hi = mid;
            }
        }
    }
    let total = lo_tokens.len() + reserve;
    if (total as f64) < 0.99 * case.length as f64 {
        return Err(EvalError::Invalid(format!(
            "the haystack stops at {total} of {} tokens: its text ran out or its pieces are too coarse for this length; use a longer length, or a longer --text for natural-text haystacks",
            case.length
        )));
    }
    Ok((lo, lo_tokens))
}
