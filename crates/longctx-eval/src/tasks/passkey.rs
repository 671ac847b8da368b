//! Pass-key retrieval: a number hidden in repetitive filler, asked for at the end.
//!
//! After Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for
//! Transformers" (2023), `llama/run_test.py`, and llama.cpp's `examples/passkey`: the key is an
//! integer in 1..=50000, its depth is the fraction of filler before it, and the answer is right
//! when the first number generated is the key. The wording here is our own.

use longctx::spec::{Params, SpecPart};
use rand::Rng;

use crate::fit::{fit, Draft};
use crate::task::{Case, Prompt, Synthetic, Task, TaskContext, TaskEntry};
use crate::{scoring, Result};

pub const ENTRY: TaskEntry = TaskEntry {
    name: "passkey",
    about: "a pass key hidden in filler sentences (Landmark Attention, llama.cpp passkey)",
    build,
};

/// Enough for the key and a few words after it; llama.cpp's example generates 16.
const ANSWER_TOKENS: usize = 16;

const INTRO: &str = "Somewhere in the long text below there is a pass key. Find it and remember \
                     it: you will be asked for it at the end.";
const FILLER: [&str; 5] = [
    "The grass grows slowly in the field.",
    "A cloud drifts over the hill.",
    "The river keeps flowing to the sea.",
    "Somewhere a bell rings twice.",
    "Then the day goes on as before.",
];
const QUESTION: &str = "What is the pass key?";
const ANSWER_PREFIX: &str = "The pass key is";

pub struct Passkey;

fn build(part: &SpecPart) -> Result<Box<dyn Task>> {
    Params::new(part).finish(&[])?;
    Ok(Box::new(Passkey))
}

/// The needle sentence for `key`.
pub fn needle(key: u32) -> String {
    format!("The pass key is {key}. Keep it in mind: {key} is the pass key.")
}

fn user_text(sentences: usize, at: usize, needle: &str) -> String {
    let mut haystack = String::new();
    for i in 0..=sentences {
        if i == at {
            haystack.push_str(needle);
            haystack.push(' ');
        }
        if i < sentences {
            haystack.push_str(FILLER[i % FILLER.len()]);
            haystack.push(' ');
        }
    }
    format!("{INTRO}\n{}\n{QUESTION}", haystack.trim_end())
}

impl Synthetic for Passkey {
    fn spec(&self) -> String {
        "passkey".to_string()
    }

    fn synthesise(&self, case: &Case, ctx: &TaskContext) -> Result<Prompt> {
        let key = case.rng(ctx.seed, "passkey").random_range(1..=50_000u32);
        let needle = needle(key);
        let depth = case.depth.unwrap_or(50.0) / 100.0;
        let at = |n: usize| (depth * n as f64).round() as usize;
        let (n, tokens) = fit(ctx, case, ANSWER_TOKENS, usize::MAX / 2, |n| {
            Ok(Draft {
                user: user_text(n, at(n), &needle),
                answer_prefix: ANSWER_PREFIX.to_string(),
            })
        })?;
        let rendered = ctx.render(&user_text(n, at(n), &needle), ANSWER_PREFIX)?;
        Ok(Prompt {
            answer_at: ctx.token_index_of(&rendered, &needle),
            tokens,
            answers: vec![key.to_string()],
            max_new_tokens: ANSWER_TOKENS,
        })
    }

    fn score(&self, prompt: &Prompt, output: &str) -> f64 {
        scoring::first_number_is(output, &prompt.answers[0])
    }
}
