//! Frequent words extraction: a text of random "code words" whose frequencies follow a Zipf law;
//! the model names the three most frequent. Like CWE it tests aggregation over the whole
//! context, so it has no depth.
//!
//! After Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
//! Models?" (COLM 2024), NVIDIA/RULER `scripts/data/synthetic/freq_words_extraction.py`: a
//! vocabulary of (length − 50) / 50 random six-letter lowercase words, the word of rank k repeated
//! `int(N·k^-alpha / ζ(alpha))` times, the top rank replaced by `...` so that the most frequent
//! token is noise to be ignored, the words shuffled and joined by spaces; the answer is ranks 2–4,
//! 50 tokens are generated, `string_match_all`. N is what sizes the prompt.
//!
//! One addition: RULER does not check that the answer is well defined; we refuse a prompt whose
//! fourth rank is not strictly more frequent than the fifth (too short a length for `alpha`),
//! since the top three would then be ambiguous. The prose is our own.

use std::collections::HashSet;

use longctx::spec::{Params, SpecPart};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::fit::{fit, Draft};
use crate::task::{Case, Prompt, Synthetic, Task, TaskContext, TaskEntry};
use crate::{EvalError, Result};

pub const ENTRY: TaskEntry = TaskEntry {
    name: "fwe",
    about: "RULER frequent words extraction: the three most frequent words of a Zipf-distributed coded text; alpha=",
    build,
};

/// RULER generates 50 tokens for FWE.
const ANSWER_TOKENS: usize = 50;

/// RULER's code words: six lowercase letters.
const WORD_LETTERS: usize = 6;

/// The top rank, which stands in for noise.
const NOISE: &str = "...";

const INSTRUCTION: &str = "Below is a text made of code words. Count how often each code word \
                           occurs: you will be asked which three occur most often.";
const QUESTION: &str = "Question: Leaving out the dots '...', which three code words occur most \
                        often in the coded text above? Give only the words, no explanation.";
const ANSWER_PREFIX: &str =
    "Answer: The three code words that occur most often in the coded text above are:";

pub struct Fwe {
    pub alpha: f64,
}

fn build(part: &SpecPart) -> Result<Box<dyn Task>> {
    Ok(Box::new(Fwe::from_spec(part)?))
}

impl Fwe {
    pub fn from_spec(part: &SpecPart) -> Result<Self> {
        let mut params = Params::new(part);
        let alpha: f64 = params.get("alpha", 2.0)?;
        params.finish(&["alpha"])?;
        // ζ(alpha) diverges at 1 and below; far above 10 every rank past the first is empty.
        if !(alpha > 1.0 && alpha <= 10.0) {
            return Err(EvalError::Invalid(format!(
                "fwe: alpha={alpha} is out of range; use a number above 1 and at most 10"
            )));
        }
        Ok(Self { alpha })
    }

    /// The share of the text each rank gets before rounding down.
    fn shares(&self, vocabulary: usize) -> Vec<f64> {
        let zeta = zeta(self.alpha);
        (1..=vocabulary)
            .map(|k| (k as f64).powf(-self.alpha) / zeta)
            .collect()
    }

    /// How often the word of each rank appears when the text is scaled by `n`.
    fn counts(&self, n: usize, vocabulary: usize) -> Vec<usize> {
        self.shares(vocabulary)
            .iter()
            .map(|share| (n as f64 * share) as usize)
            .collect()
    }
}

/// Riemann ζ(s) for s > 1: the first terms summed, the tail by Euler–Maclaurin, good to about
/// 1e-10 even near s = 1.
fn zeta(s: f64) -> f64 {
    const TERMS: usize = 64;
    let head: f64 = (1..TERMS).map(|k| (k as f64).powf(-s)).sum();
    let m = TERMS as f64;
    head + m.powf(1.0 - s) / (s - 1.0) + 0.5 * m.powf(-s) + s * m.powf(-s - 1.0) / 12.0
}

impl Synthetic for Fwe {
    fn spec(&self) -> String {
        format!("fwe:alpha={}", self.alpha)
    }

    fn uses_depth(&self) -> bool {
        false
    }

    fn synthesise(&self, case: &Case, ctx: &TaskContext) -> Result<Prompt> {
        let mut rng = case.rng(ctx.seed, &Synthetic::spec(self));
        // RULER's one word per 50 tokens; ranks 1 to 5 must exist: the noise, the answer and the
        // first word that is not in it.
        let size = (case.length.saturating_sub(ANSWER_TOKENS) / 50).max(5);
        let mut seen = HashSet::new();
        let mut vocabulary = vec![NOISE.to_string()];
        while vocabulary.len() < size {
            let word: String = (0..WORD_LETTERS)
                .map(|_| rng.random_range(b'a'..=b'z') as char)
                .collect();
            if seen.insert(word.clone()) {
                vocabulary.push(word);
            }
        }
        // Every draft shuffles with the same stream, so a given N always gives one prompt.
        let shuffle_seed: u64 = rng.random();
        let draft = |n: usize| {
            let counts = self.counts(n, size);
            let mut words: Vec<&str> = vocabulary
                .iter()
                .zip(counts)
                .flat_map(|(word, count)| std::iter::repeat_n(word.as_str(), count))
                .collect();
            words.shuffle(&mut ChaCha8Rng::seed_from_u64(shuffle_seed));
            Ok(Draft {
                user: format!("{INSTRUCTION}\n{}\n{QUESTION}", words.join(" ")),
                answer_prefix: ANSWER_PREFIX.to_string(),
            })
        };
        // Rounding down loses under one word per rank, and a word with its space is at least one
        // token, so twice this N is sure to overflow the length; with alpha near 1 most of the
        // Zipf mass lies beyond the vocabulary and N must be far larger than the word count.
        let mass: f64 = self.shares(size).iter().sum();
        let max_n = (2.0 * (case.length + size) as f64 / mass).ceil() as usize;
        let (n, tokens) = fit(ctx, case, ANSWER_TOKENS, max_n, draft)?;
        let counts = self.counts(n, size);
        if counts[3] <= counts[4] {
            return Err(EvalError::Invalid(format!(
                "fwe: {} tokens leave room for too few words to tell the third most frequent code word from the fourth (alpha={}); use a longer length",
                case.length, self.alpha
            )));
        }
        Ok(Prompt {
            tokens,
            answers: vocabulary[1..4].to_vec(),
            max_new_tokens: ANSWER_TOKENS,
            answer_at: None,
            question_at: ctx.question_at(&draft(n)?.user, ANSWER_PREFIX)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::testing::{check_prompt, context};
    use longctx::spec::Spec;
    use std::collections::HashMap;

    fn fwe(spec: &str) -> Result<Fwe> {
        let spec: Spec = spec.parse()?;
        Fwe::from_spec(&spec.parts[0])
    }

    fn case(length: usize, sample: u32) -> Case {
        Case {
            length,
            depth: None,
            sample,
        }
    }

    #[test]
    fn prompts_fill_the_length_and_the_answer_is_the_top_three() {
        let ctx = context(None);
        let task = fwe("fwe").unwrap();
        for length in [2048, 4096] {
            let case = case(length, 0);
            let prompt = task.synthesise(&case, &ctx).unwrap();
            check_prompt(&ctx, &case, &prompt, 0.0);
            // Raw token bytes: decoding would tidy " ..." into "...", gluing the dots to words.
            let bytes: Vec<u8> = prompt
                .tokens
                .iter()
                .flat_map(|&t| ctx.model.tokenizer.token_bytes(t))
                .collect();
            let text = String::from_utf8(bytes).unwrap();
            let from = text.find(INSTRUCTION).unwrap() + INSTRUCTION.len();
            let to = text.rfind("\nQuestion:").unwrap();
            let mut counts: HashMap<&str, usize> = HashMap::new();
            for word in text[from..to].split_whitespace() {
                *counts.entry(word).or_default() += 1;
            }
            let mut ranked: Vec<(usize, &str)> = counts.iter().map(|(w, c)| (*c, *w)).collect();
            ranked.sort_by(|a, b| b.cmp(a));
            assert_eq!(ranked[0].1, NOISE);
            assert!(ranked[3].0 > ranked[4].0, "{ranked:?}");
            let top: Vec<&str> = ranked[1..4].iter().map(|(_, w)| *w).collect();
            assert_eq!(top, prompt.answers, "{ranked:?}");
            assert!(counts
                .keys()
                .all(|w| *w == NOISE || w.len() == WORD_LETTERS));
        }
    }

    #[test]
    fn alpha_near_one_still_fills_the_length() {
        let ctx = context(None);
        let case = case(2048, 0);
        let prompt = fwe("fwe:alpha=1.01")
            .unwrap()
            .synthesise(&case, &ctx)
            .unwrap();
        check_prompt(&ctx, &case, &prompt, 0.0);
    }

    #[test]
    fn same_case_same_prompt_other_sample_other_prompt() {
        let ctx = context(None);
        let task = fwe("fwe:alpha=1.5").unwrap();
        let a = task.synthesise(&case(2048, 0), &ctx).unwrap();
        let b = task.synthesise(&case(2048, 0), &ctx).unwrap();
        let c = task.synthesise(&case(2048, 1), &ctx).unwrap();
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.answers, b.answers);
        assert_ne!(a.tokens, c.tokens);
        assert_ne!(a.answers, c.answers);
    }

    #[test]
    fn zeta_matches_known_values() {
        assert!((zeta(2.0) - std::f64::consts::PI.powi(2) / 6.0).abs() < 1e-10);
        assert!((zeta(3.0) - 1.202_056_903_159_594).abs() < 1e-10);
        assert!((zeta(1.1) - 10.584_448_464_950_81).abs() < 1e-8);
    }

    #[test]
    fn scores_count_the_words_found() {
        let task = fwe("fwe").unwrap();
        let prompt = Prompt {
            tokens: Vec::new(),
            answers: ["qwerty", "asdfgh", "zxcvbn"].map(String::from).to_vec(),
            max_new_tokens: ANSWER_TOKENS,
            answer_at: None,
            question_at: None,
        };
        assert_eq!(task.score(&prompt, " qwerty, asdfgh and zxcvbn"), 100.0);
        assert_eq!(task.score(&prompt, " ..., qwerty, poiuyt"), 100.0 / 3.0);
        assert_eq!(task.score(&prompt, " ..."), 0.0);
    }

    #[test]
    fn bad_parameters_and_lengths_are_refused() {
        assert_eq!(Synthetic::spec(&fwe("fwe").unwrap()), "fwe:alpha=2");
        assert_eq!(
            Synthetic::spec(&fwe("fwe:alpha=1.5").unwrap()),
            "fwe:alpha=1.5"
        );
        assert!(!Synthetic::uses_depth(&fwe("fwe").unwrap()));
        for bad in ["1", "0.5", "NaN", "11"] {
            let error = fwe(&format!("fwe:alpha={bad}")).err().unwrap().to_string();
            assert!(error.contains("above 1"), "{error}");
        }
        let error = fwe("fwe:alpha=two").err().unwrap().to_string();
        assert!(error.contains("`alpha=two`"), "{error}");
        let error = fwe("fwe:beta=2").err().unwrap().to_string();
        assert!(error.contains("`beta`"), "{error}");
        let task = fwe("fwe:alpha=8").unwrap();
        let error = task
            .synthesise(&case(2048, 0), &context(None))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("too few words"), "{error}");
    }
}
