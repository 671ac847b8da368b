//! Common words extraction: a long numbered list of words in which a few words come up far more
//! often than the rest; the model names the frequent ones. It tests aggregation over the whole
//! context rather than retrieval from one place, so it has no depth.
//!
//! After Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
//! Models?" (COLM 2024), NVIDIA/RULER `scripts/data/synthetic/common_words_extraction.py`: ten
//! common words thirty times each among rare words three times each, shuffled and numbered
//! `1. w 2. w …`, a one-shot example of forty words (×10/×3) with its numbered answer in front,
//! 120 tokens to generate, `string_match_all`. Below 4K tokens RULER switches to ×6/×1 with a
//! twenty-word example (×3/×1), since thirty copies of ten words would crowd out the rest; we do
//! the same, so `freq_common`/`freq_rare` apply from 4K on. The number of rare words is what sizes
//! the prompt.
//!
//! The words are the `names` crate's adjectives and nouns (about 2,100), where RULER draws
//! wonderwords' nouns, adjectives and verbs and falls back to a larger English list; with most
//! tokenizers that is enough for prompts up to roughly 32K–64K tokens, and a longer length is a
//! clear error rather than a prompt with repeated "rare" words. The example's words are kept
//! apart from the task's so that copying the example never scores. The prose is our own.

use longctx::spec::{Params, SpecPart};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::fit::{fit, Draft};
use crate::task::{Case, Prompt, Synthetic, Task, TaskContext, TaskEntry};
use crate::{EvalError, Result};

pub const ENTRY: TaskEntry = TaskEntry {
    name: "cwe",
    about: "RULER common words extraction: name the words repeated most in a numbered list; common=, freq_common=, freq_rare= (below 4K tokens RULER's ×6/×1 apply)",
    build,
};

/// RULER generates 120 tokens for CWE: room for ten numbered words.
const ANSWER_TOKENS: usize = 120;

/// Below this length RULER uses its short-context counts.
const SHORT_LENGTH: usize = 4096;

const INSTRUCTION: &str = "Here is a numbered list of words. A few of the words come up far more \
                           often than the others; remember which ones.";

/// How many times each common and each rare word appears.
#[derive(Clone, Copy)]
struct Repeats {
    common: usize,
    rare: usize,
}

/// The one-shot example: how many rare words it has besides the common ones, and their repeats.
#[derive(Clone, Copy)]
struct Example {
    rare_words: usize,
    repeats: Repeats,
}

/// RULER's example from 4K tokens on: forty words with the default ten common ones, ×10/×3.
const EXAMPLE: Example = Example {
    rare_words: 30,
    repeats: Repeats {
        common: 10,
        rare: 3,
    },
};

/// Below 4K tokens RULER's example has twenty words at ×3/×1, and the task itself runs at ×6/×1.
const SHORT_EXAMPLE: Example = Example {
    rare_words: 10,
    repeats: Repeats { common: 3, rare: 1 },
};
const SHORT_TASK: Repeats = Repeats { common: 6, rare: 1 };

pub struct Cwe {
    pub common: usize,
    pub freq_common: usize,
    pub freq_rare: usize,
}

fn build(part: &SpecPart) -> Result<Box<dyn Task>> {
    Ok(Box::new(Cwe::from_spec(part)?))
}

impl Cwe {
    pub fn from_spec(part: &SpecPart) -> Result<Self> {
        let mut params = Params::new(part);
        let common: usize = params.get("common", 10)?;
        let freq_common: usize = params.get("freq_common", 30)?;
        let freq_rare: usize = params.get("freq_rare", 3)?;
        params.finish(&["common", "freq_common", "freq_rare"])?;
        // The prose speaks of the common words in the plural.
        if !(2..=100).contains(&common) {
            return Err(EvalError::Invalid(format!(
                "cwe: common={common} is out of range; use 2 to 100"
            )));
        }
        if freq_rare == 0 || freq_common <= freq_rare || freq_common > 1000 {
            return Err(EvalError::Invalid(format!(
                "cwe: freq_common={freq_common}, freq_rare={freq_rare}: need 1 <= freq_rare < freq_common <= 1000"
            )));
        }
        Ok(Self {
            common,
            freq_common,
            freq_rare,
        })
    }

    /// The example and the task's repeats at `length`.
    fn plan(&self, length: usize) -> (Example, Repeats) {
        if length < SHORT_LENGTH {
            (SHORT_EXAMPLE, SHORT_TASK)
        } else {
            let task = Repeats {
                common: self.freq_common,
                rare: self.freq_rare,
            };
            (EXAMPLE, task)
        }
    }

    fn task_text(&self, list: &str) -> String {
        format!(
            "{INSTRUCTION}\n{list}\nQuestion: Which {} words come up most often in the list above?",
            self.common
        )
    }

    fn answer_prefix(&self) -> String {
        format!(
            "Answer: The {} words that come up most often in the list above are:",
            self.common
        )
    }
}

/// `1. a 2. b …`
fn numbered(words: &[&str]) -> String {
    let entries: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{}. {w}", i + 1))
        .collect();
    entries.join(" ")
}

/// The common and rare words, each repeated as often as `repeats` says, shuffled and numbered.
fn listing(common: &[&str], rare: &[&str], repeats: Repeats, rng: &mut impl Rng) -> String {
    let mut words: Vec<&str> =
        Vec::with_capacity(common.len() * repeats.common + rare.len() * repeats.rare);
    for word in common {
        words.extend(std::iter::repeat_n(*word, repeats.common));
    }
    for word in rare {
        words.extend(std::iter::repeat_n(*word, repeats.rare));
    }
    words.shuffle(rng);
    numbered(&words)
}

impl Synthetic for Cwe {
    fn spec(&self) -> String {
        format!(
            "cwe:common={},freq_common={},freq_rare={}",
            self.common, self.freq_common, self.freq_rare
        )
    }

    fn uses_depth(&self) -> bool {
        false
    }

    fn synthesise(&self, case: &Case, ctx: &TaskContext) -> Result<Prompt> {
        let mut rng = case.rng(ctx.seed, &Synthetic::spec(self));
        let mut words: Vec<&str> = names::ADJECTIVES
            .iter()
            .chain(names::NOUNS)
            .copied()
            .collect();
        words.sort_unstable();
        words.dedup();
        words.shuffle(&mut rng);
        let (example_plan, repeats) = self.plan(case.length);
        let (example, rest) = words.split_at(self.common + example_plan.rare_words);
        let (common, rare) = rest.split_at(self.common);
        let (example_common, example_rare) = example.split_at(self.common);
        let shot = format!(
            "{}\n{} {}",
            self.task_text(&listing(
                example_common,
                example_rare,
                example_plan.repeats,
                &mut rng
            )),
            self.answer_prefix(),
            numbered(example_common)
        );
        // Every draft shuffles with the same stream, so a given word count always gives one prompt.
        let shuffle_seed: u64 = rng.random();
        let user = |n: usize| {
            let list = listing(
                common,
                &rare[..n],
                repeats,
                &mut ChaCha8Rng::seed_from_u64(shuffle_seed),
            );
            format!("{shot}\n\n{}", self.task_text(&list))
        };
        let prefix = self.answer_prefix();
        let draft = |n: usize| {
            Ok(Draft {
                user: user(n),
                answer_prefix: prefix.clone(),
            })
        };
        let (n, tokens) = match fit(ctx, case, ANSWER_TOKENS, rare.len(), draft) {
            Ok(fitted) => fitted,
            // fit() blames a short natural text when the units run out; here it is the word list.
            Err(error) => {
                let all = ctx
                    .encode_text(&ctx.render(&user(rare.len()), &prefix)?)?
                    .len();
                return Err(if all + ANSWER_TOKENS < case.length {
                    EvalError::Invalid(format!(
                        "cwe: with all {} words of its word list the prompt has only {all} of the {} tokens asked for; use a shorter length",
                        words.len(),
                        case.length
                    ))
                } else {
                    error
                });
            }
        };
        Ok(Prompt {
            tokens,
            answers: common.iter().map(|w| w.to_string()).collect(),
            max_new_tokens: ANSWER_TOKENS,
            answer_at: None,
            question_at: ctx.question_at(&user(n), &prefix)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::testing::{check_prompt, context};
    use longctx::spec::Spec;
    use std::collections::HashMap;

    fn cwe(spec: &str) -> Result<Cwe> {
        let spec: Spec = spec.parse()?;
        Cwe::from_spec(&spec.parts[0])
    }

    fn case(length: usize, sample: u32) -> Case {
        Case {
            length,
            depth: None,
            sample,
        }
    }

    /// How often each word appears in the task's own list (after the example), checking the
    /// numbering on the way.
    fn counts(text: &str) -> HashMap<String, usize> {
        let from = text.rfind(INSTRUCTION).unwrap() + INSTRUCTION.len();
        let to = text.rfind("\nQuestion:").unwrap();
        let items: Vec<&str> = text[from..to].split_whitespace().collect();
        let mut counts = HashMap::new();
        for (i, entry) in items.chunks(2).enumerate() {
            assert_eq!(entry[0], format!("{}.", i + 1));
            *counts.entry(entry[1].to_string()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn prompts_fill_the_length_with_common_and_rare_words() {
        let ctx = context(None);
        let task = cwe("cwe").unwrap();
        // 2048 uses RULER's short-context counts, 8192 the configured ones.
        for (length, common, rare) in [(2048, 6, 1), (8192, 30, 3)] {
            let case = case(length, 0);
            let prompt = task.synthesise(&case, &ctx).unwrap();
            check_prompt(&ctx, &case, &prompt, 0.0);
            let text = ctx.model.tokenizer.decode(&prompt.tokens);
            let counts = counts(&text);
            assert_eq!(prompt.answers.len(), 10);
            for word in &prompt.answers {
                assert_eq!(counts[word], common, "{word}");
            }
            let rares = counts.values().filter(|&&c| c == rare).count();
            assert_eq!(rares + 10, counts.len(), "{counts:?}");
            assert!(rares > 10, "only {rares} rare words at {length}");
            // The example's words are not the task's.
            let example = &text[..text.rfind(INSTRUCTION).unwrap()];
            assert!(!counts.keys().any(|w| example.contains(&format!(". {w} "))));
        }
    }

    #[test]
    fn same_case_same_prompt_other_sample_other_prompt() {
        let ctx = context(None);
        let task = cwe("cwe:common=5,freq_common=20,freq_rare=2").unwrap();
        let a = task.synthesise(&case(4096, 3), &ctx).unwrap();
        let b = task.synthesise(&case(4096, 3), &ctx).unwrap();
        let c = task.synthesise(&case(4096, 4), &ctx).unwrap();
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.answers, b.answers);
        assert_eq!(a.answers.len(), 5);
        assert_ne!(a.tokens, c.tokens);
        assert_ne!(a.answers, c.answers);
    }

    #[test]
    fn scores_count_the_common_words_found() {
        let task = cwe("cwe").unwrap();
        let prompt = Prompt {
            tokens: Vec::new(),
            answers: ["apple", "cloudy", "river", "stone"]
                .map(String::from)
                .to_vec(),
            max_new_tokens: ANSWER_TOKENS,
            answer_at: None,
            question_at: None,
        };
        assert_eq!(
            task.score(&prompt, " 1. river 2. Apple 3. stone 4. cloudy"),
            100.0
        );
        assert_eq!(task.score(&prompt, " 1. river 2. apple 3. sand"), 50.0);
        assert_eq!(task.score(&prompt, " 1. sand 2. glass"), 0.0);
    }

    #[test]
    fn bad_parameters_and_lengths_are_refused() {
        assert_eq!(
            Synthetic::spec(&cwe("cwe").unwrap()),
            "cwe:common=10,freq_common=30,freq_rare=3"
        );
        assert!(!Synthetic::uses_depth(&cwe("cwe").unwrap()));
        let error = cwe("cwe:common=1").err().unwrap().to_string();
        assert!(
            error.contains("common=1") && error.contains("2 to 100"),
            "{error}"
        );
        let error = cwe("cwe:freq_common=3,freq_rare=3")
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("freq_rare < freq_common"), "{error}");
        let error = cwe("cwe:freq_rare=0").err().unwrap().to_string();
        assert!(error.contains("freq_rare=0"), "{error}");
        let error = cwe("cwe:words=3").err().unwrap().to_string();
        assert!(error.contains("`words`"), "{error}");
        let ctx = context(None);
        let error = cwe("cwe")
            .unwrap()
            .synthesise(&case(512, 0), &ctx)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("too short"), "{error}");
        let error = cwe("cwe")
            .unwrap()
            .synthesise(&case(300_000, 0), &ctx)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("word list"), "{error}");
    }
}
