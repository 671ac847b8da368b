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
use crate::text::NaturalText;
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

/// Filler with more words than `length` tokens could hold.
fn filler(length: usize) -> NaturalText {
    let sentences: Vec<&str> = (0..length / 5 + 16)
        .map(|i| FILLER[i % FILLER.len()])
        .collect();
    NaturalText::synthetic(sentences.join(" "))
}

/// The first `words` words of filler with the needle between sentences at `depth`. The filler is
/// cut by words so the prompt meets its length to the token; landmark's test cuts it mid-sentence too.
fn user_text(filler: &NaturalText, words: usize, depth: f64, needle: &str) -> String {
    let at = filler.sentence_boundary_near((depth * words as f64).round() as usize, words);
    let before = filler.words_between(0, at);
    let after = filler.words_between(at, words);
    let haystack = format!("{before} {needle}{after}");
    format!("{INTRO}\n{}\n{QUESTION}", haystack.trim())
}

impl Synthetic for Passkey {
    fn spec(&self) -> String {
        "passkey".to_string()
    }

    fn synthesise(&self, case: &Case, ctx: &TaskContext) -> Result<Prompt> {
        let key = case.rng(ctx.seed, "passkey").random_range(1..=50_000u32);
        let needle = needle(key);
        let depth = case.depth.unwrap_or(50.0) / 100.0;
        let filler = filler(case.length);
        let (n, tokens) = fit(ctx, case, ANSWER_TOKENS, filler.word_count(), |n| {
            Ok(Draft {
                user: user_text(&filler, n, depth, &needle),
                answer_prefix: ANSWER_PREFIX.to_string(),
            })
        })?;
        let rendered = ctx.render(&user_text(&filler, n, depth, &needle), ANSWER_PREFIX)?;
        Ok(Prompt {
            answer_at: ctx.token_index_of(&rendered, &needle),
            question_at: ctx.question_at(&user_text(&filler, n, depth, &needle), ANSWER_PREFIX)?,
            tokens,
            answers: vec![key.to_string()],
            max_new_tokens: ANSWER_TOKENS,
        })
    }

    fn score(&self, prompt: &Prompt, output: &str) -> f64 {
        scoring::first_number_is(output, &prompt.answers[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::testing::{check_prompt, context};

    #[test]
    fn prompts_have_the_length_and_the_key_at_the_depth() {
        let ctx = context(None);
        for length in [512, 2048, 4096] {
            for depth in [0.0, 25.0, 50.0, 75.0, 100.0] {
                let case = Case {
                    length,
                    depth: Some(depth),
                    sample: 0,
                };
                let prompt = Passkey.synthesise(&case, &ctx).unwrap();
                // The intro and question are outside the haystack: about 200 bytes, 5% of 4k.
                let tolerance = 100.0 * 220.0 / length as f64;
                check_prompt(&ctx, &case, &prompt, tolerance.max(5.0));
            }
        }
    }

    #[test]
    fn the_same_case_gives_the_same_prompt_and_samples_differ() {
        let ctx = context(None);
        let case = Case {
            length: 1024,
            depth: Some(50.0),
            sample: 0,
        };
        let a = Passkey.synthesise(&case, &ctx).unwrap();
        let b = Passkey.synthesise(&case, &ctx).unwrap();
        assert_eq!(a.tokens, b.tokens);
        let other = Passkey
            .synthesise(&Case { sample: 1, ..case }, &ctx)
            .unwrap();
        assert_ne!(a.answers, other.answers);
    }

    #[test]
    fn scoring_wants_the_key_first() {
        let prompt = Prompt {
            tokens: vec![],
            answers: vec!["4711".into()],
            max_new_tokens: ANSWER_TOKENS,
            answer_at: None,
            question_at: None,
        };
        assert_eq!(Passkey.score(&prompt, " 4711. It is the key."), 100.0);
        assert_eq!(Passkey.score(&prompt, " 47110"), 0.0);
        assert_eq!(Passkey.score(&prompt, " I do not know."), 0.0);
    }

    #[test]
    fn a_length_too_short_for_the_question_is_refused() {
        let ctx = context(None);
        let case = Case {
            length: 100,
            depth: Some(0.0),
            sample: 0,
        };
        let err = Passkey.synthesise(&case, &ctx).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
    }
}
