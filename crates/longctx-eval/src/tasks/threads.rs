//! Needle threading: a JSON object of UUID keys and UUID values in which some values are keys
//! of other entries; from a start key the model follows the thread to its last value.
//!
//! After Roberts, Han & Albanie, "Needle Threading: Can LLMs Follow Threads through
//! Near-Million-Scale Haystacks?" (ICLR 2025, arXiv 2411.05000), jonathan-roberts1/needle-threading,
//! split Single_Thread: the haystack is UUID→UUID pairs, a thread of `hops` pairs in which each
//! value is the next pair's key, `direction=forward` (each next pair later in the text) or
//! `backward` (each next pair earlier), scored by exact match on the start of the output.
//!
//! Our choices: the object is written one pair per line so every pair tokenizes the same wherever
//! it sits; the thread's first pair goes at the case's depth and the others at random positions
//! after it (forward) or before it (backward), so threads sweep depths like NIAH; the paper sizes
//! haystacks in characters, we in the model's tokens. A whole pair is 40–80 tokens, more than 1%
//! of a 4K prompt, so the last distractor pair is cut short (its key and value truncated UUIDs)
//! to land on the exact length: still valid JSON, and never on the thread. The prose is our own.

use longctx::spec::{Params, SpecPart};
use rand::Rng;

use crate::fit::{fit, Draft};
use crate::task::{Case, Prompt, Synthetic, Task, TaskContext, TaskEntry};
use crate::words::uuid4;
use crate::{EvalError, Result};

pub const ENTRY: TaskEntry = TaskEntry {
    name: "threads",
    about: "needle threading: follow a thread of UUID keys through a JSON object to its last value; hops=, direction=forward|backward",
    build,
};

/// A UUID is 36 characters, so at most 36 tokens even byte by byte, plus a quote or a space.
const ANSWER_TOKENS: usize = 40;

/// Characters of key and value in one distractor pair: two UUIDs.
const PAIR_CHARS: usize = 72;

const INTRO: &str = "The JSON object below maps UUID keys to UUID values. Some values are also \
                     keys of other entries, so the entries can be followed like a thread: look up \
                     a key, take its value, look that value up as a key, and so on.";
const ANSWER_PREFIX: &str = "Final value:";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

pub struct Threads {
    pub hops: usize,
    pub direction: Direction,
}

fn build(part: &SpecPart) -> Result<Box<dyn Task>> {
    Ok(Box::new(Threads::from_spec(part)?))
}

impl Threads {
    pub fn from_spec(part: &SpecPart) -> Result<Self> {
        let mut params = Params::new(part);
        let hops: usize = params.get("hops", 3)?;
        let direction = match params.choice("direction", &["forward", "backward"])? {
            "backward" => Direction::Backward,
            _ => Direction::Forward,
        };
        params.finish(&["hops", "direction"])?;
        if !(1..=64).contains(&hops) {
            return Err(EvalError::Invalid(format!(
                "threads: hops={hops} is out of range; use 1 to 64"
            )));
        }
        Ok(Self { hops, direction })
    }
}

fn pair(key: &str, value: &str) -> String {
    format!("\"{key}\": \"{value}\"")
}

/// The distractor pairs worth `chars` characters of key and value: whole pairs, then one pair
/// cut short for the remainder.
fn distractors(pairs: &[(String, String)], chars: usize) -> Vec<String> {
    let (whole, rest) = (chars / PAIR_CHARS, chars % PAIR_CHARS);
    let mut lines: Vec<String> = pairs[..whole].iter().map(|(k, v)| pair(k, v)).collect();
    if rest > 0 {
        let (key, value) = &pairs[whole];
        lines.push(pair(&key[..rest.div_ceil(2)], &value[..rest / 2]));
    }
    lines
}

/// The object with the thread's pairs inserted at their fractions of the distractor lines,
/// `placed` being in text order with nondecreasing fractions.
fn object(mut lines: Vec<String>, placed: &[(f64, String)]) -> String {
    let count = lines.len();
    for (i, (fraction, line)) in placed.iter().enumerate() {
        let at = (fraction * count as f64).round() as usize;
        lines.insert(at + i, line.clone());
    }
    format!("{{\n{}\n}}", lines.join(",\n"))
}

fn question(start: &str) -> String {
    format!(
        "Start at the key \"{start}\" and follow the thread until you reach a value that is not a \
         key in the object. What is that final value? Give only the UUID."
    )
}

/// The output must begin with the value, after any spaces and quotes: the paper's exact match on
/// the output's start.
fn starts_with_value(output: &str, value: &str) -> f64 {
    let output = output.trim_start_matches(|c: char| c.is_whitespace() || c == '"' || c == '\'');
    if output.starts_with(value) {
        100.0
    } else {
        0.0
    }
}

impl Synthetic for Threads {
    fn spec(&self) -> String {
        let direction = match self.direction {
            Direction::Forward => "forward",
            Direction::Backward => "backward",
        };
        format!("threads:hops={},direction={direction}", self.hops)
    }

    fn synthesise(&self, case: &Case, ctx: &TaskContext) -> Result<Prompt> {
        let mut rng = case.rng(ctx.seed, &Synthetic::spec(self));
        let keys: Vec<String> = (0..=self.hops).map(|_| uuid4(&mut rng)).collect();
        let depth = case.depth.unwrap_or(50.0) / 100.0;
        let range = match self.direction {
            Direction::Forward => depth..=1.0,
            Direction::Backward => 0.0..=depth,
        };
        let mut at: Vec<f64> = (1..self.hops)
            .map(|_| rng.random_range(range.clone()))
            .collect();
        at.sort_by(f64::total_cmp);
        if self.direction == Direction::Backward {
            at.reverse();
        }
        // In thread order first; a backward thread reads from its last pair to its first.
        let mut placed: Vec<(f64, String)> = std::iter::once(depth)
            .chain(at)
            .zip(keys.windows(2).map(|k| pair(&k[0], &k[1])))
            .collect();
        if self.direction == Direction::Backward {
            placed.reverse();
        }
        // A pair line, two UUIDs and their quotes, is well over 8 tokens in any tokenizer, which
        // bounds the pairs a length can hold.
        let pairs: Vec<(String, String)> = (0..case.length / 8 + 1)
            .map(|_| (uuid4(&mut rng), uuid4(&mut rng)))
            .collect();
        let user = |chars: usize| {
            format!(
                "{INTRO}\n{}\n{}",
                object(distractors(&pairs, chars), &placed),
                question(&keys[0])
            )
        };
        let (chars, tokens) = fit(
            ctx,
            case,
            ANSWER_TOKENS,
            (pairs.len() - 1) * PAIR_CHARS,
            |n| {
                Ok(Draft {
                    user: user(n),
                    answer_prefix: ANSWER_PREFIX.to_string(),
                })
            },
        )?;
        let rendered = ctx.render(&user(chars), ANSWER_PREFIX)?;
        Ok(Prompt {
            answer_at: ctx.token_index_of(&rendered, &format!("\"{}\":", keys[0])),
            question_at: ctx.question_at(&user(chars), ANSWER_PREFIX)?,
            tokens,
            answers: vec![keys[self.hops].clone()],
            max_new_tokens: ANSWER_TOKENS,
        })
    }

    fn score(&self, prompt: &Prompt, output: &str) -> f64 {
        starts_with_value(output, &prompt.answers[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::testing::{check_prompt, context};
    use longctx::spec::Spec;
    use serde_json::{Map, Value};

    fn threads(spec: &str) -> Result<Threads> {
        let spec: Spec = spec.parse()?;
        Threads::from_spec(&spec.parts[0])
    }

    fn case(length: usize, depth: f64, sample: u32) -> Case {
        Case {
            length,
            depth: Some(depth),
            sample,
        }
    }

    /// The prompt's object, parsed, and the start key its question names.
    fn parse(text: &str) -> (Map<String, Value>, String) {
        let object = &text[text.find('{').unwrap()..=text.rfind('}').unwrap()];
        let start = text.rfind("key \"").unwrap() + 5;
        let key = text[start..start + 36].to_string();
        (serde_json::from_str(object).unwrap(), key)
    }

    #[test]
    fn prompts_fill_the_length_and_the_thread_leads_to_the_answer() {
        let ctx = context(None);
        for (spec, length) in [
            ("threads", 1024),
            ("threads", 2048),
            ("threads:hops=5,direction=backward", 2048),
        ] {
            let task = threads(spec).unwrap();
            let case = case(length, 50.0, 0);
            let prompt = task.synthesise(&case, &ctx).unwrap();
            // The intro and the question take a fifth of a 1K prompt each on this byte-level
            // model, so only a loose depth check here; the exact one is below.
            check_prompt(&ctx, &case, &prompt, 10.0);
            let text = ctx.model.tokenizer.decode(&prompt.tokens);
            let (object, mut key) = parse(&text);
            let mut positions = Vec::new();
            for _ in 0..task.hops {
                positions.push(text.find(&format!("\"{key}\":")).unwrap());
                key = object[&key].as_str().unwrap().to_string();
            }
            assert_eq!(key, prompt.answers[0]);
            assert!(!object.contains_key(&key), "the last value is not a key");
            let mut sorted = positions.clone();
            sorted.sort();
            if task.direction == Direction::Backward {
                sorted.reverse();
            }
            assert_eq!(positions, sorted, "{spec}: thread out of order");
        }
    }

    /// Where the start pair sits, as a fraction of the object's tokens.
    fn depth_in_object(ctx: &TaskContext, prompt: &Prompt) -> f64 {
        let text = ctx.model.tokenizer.decode(&prompt.tokens);
        let tokens_before = |at: usize| ctx.encode_text(&text[..at]).unwrap().len() as f64;
        let start = tokens_before(text.find('{').unwrap());
        let end = tokens_before(text.rfind('}').unwrap());
        (prompt.answer_at.unwrap() as f64 - start) / (end - start)
    }

    #[test]
    fn the_thread_starts_at_the_depth() {
        let ctx = context(None);
        let task = threads("threads").unwrap();
        for depth in [0.0, 50.0, 100.0] {
            let prompt = task.synthesise(&case(8192, depth, 2), &ctx).unwrap();
            let found = depth_in_object(&ctx, &prompt);
            // At depth 100 the rest of a forward thread still follows the start pair.
            assert!(
                (found - depth / 100.0).abs() < 0.05,
                "depth {depth}: found {found}"
            );
        }
    }

    #[test]
    fn same_case_same_prompt_other_sample_other_prompt() {
        let ctx = context(None);
        let task = threads("threads:hops=2").unwrap();
        let a = task.synthesise(&case(2048, 20.0, 0), &ctx).unwrap();
        let b = task.synthesise(&case(2048, 20.0, 0), &ctx).unwrap();
        let c = task.synthesise(&case(2048, 20.0, 1), &ctx).unwrap();
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.answers, b.answers);
        assert_ne!(a.tokens, c.tokens);
        assert_ne!(a.answers, c.answers);
    }

    #[test]
    fn only_an_output_starting_with_the_value_scores() {
        let task = threads("threads").unwrap();
        let value = "0f8e2a4c-1b3d-4e5f-8a7b-9c0d1e2f3a4b";
        let prompt = Prompt {
            tokens: Vec::new(),
            answers: vec![value.to_string()],
            max_new_tokens: ANSWER_TOKENS,
            answer_at: None,
            question_at: None,
        };
        assert_eq!(task.score(&prompt, &format!(" \"{value}\"\n")), 100.0);
        assert_eq!(task.score(&prompt, &format!("{value}, then more")), 100.0);
        assert_eq!(task.score(&prompt, &format!(" The value is {value}")), 0.0);
        assert_eq!(task.score(&prompt, " \"0f8e2a4c-1b3d-4e5f-8a7b\""), 0.0);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert_eq!(
            Synthetic::spec(&threads("threads").unwrap()),
            "threads:hops=3,direction=forward"
        );
        let error = threads("threads:hops=0").err().unwrap().to_string();
        assert!(
            error.contains("hops=0") && error.contains("1 to 64"),
            "{error}"
        );
        let error = threads("threads:direction=sideways")
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("forward, backward"), "{error}");
        let error = threads("threads:length=2").err().unwrap().to_string();
        assert!(error.contains("`length`"), "{error}");
    }
}
