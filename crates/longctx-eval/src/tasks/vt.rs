//! Variable tracking: chains of assignments (`VAR AAAAA = 12345`, then `VAR BBBBB = VAR AAAAA`,
//! …) hidden among filler; the model names every variable that ends up holding the queried value.
//!
//! After Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
//! Models?" (COLM 2024), NVIDIA/RULER `scripts/data/synthetic/variable_tracking.py`: five random
//! capitals per name, five-digit values, each chain's lines inserted at sorted random positions so
//! it still reads in order, only the first chain asked for (the others are distractors), a one-shot
//! example with its answer in front, 30 tokens to generate, `string_match_all`. As in RULER the
//! example's names have three letters, so copying them never scores.
//!
//! Our changes: the filler is cut by words rather than by five-sentence lines, so the prompt lands
//! within a word of any length; the queried chain starts at the case's depth (RULER places
//! it anywhere) so that VT sweeps depths like NIAH; the example's filler is a fixed ten sentences
//! instead of a 500-token haystack, so that it still fits short prompts. The prose is our own.

use longctx::spec::{Params, SpecPart};
use rand::Rng;

use crate::fit::{fit, Draft};
use crate::task::{Case, Prompt, Synthetic, Task, TaskContext, TaskEntry};
use crate::{EvalError, Result};

pub const ENTRY: TaskEntry = TaskEntry {
    name: "vt",
    about: "RULER variable tracking: name every variable a chain of VAR assignments passes a value to; chains=, hops=",
    build,
};

/// RULER generates 30 tokens for VT.
const ANSWER_TOKENS: usize = 30;

const FILLER: [&str; 5] = [
    "The kettle is warm.",
    "A dog naps by the door.",
    "Rain taps on the roof.",
    "The clock ticks on.",
    "Nothing else happens here.",
];

/// The example's filler, in rounds of all the filler sentences: ten sentences.
const EXAMPLE_ROUNDS: usize = 2;

/// RULER caps the example's chains at ten hops so a long task does not get a long example.
const EXAMPLE_MAX_HOPS: usize = 10;

const INSTRUCTION: &str = "The text below hides one or more chains of variable assignments among \
                           lines of filler. Keep track of every chain as you read.";

pub struct Vt {
    pub chains: usize,
    pub hops: usize,
}

fn build(part: &SpecPart) -> Result<Box<dyn Task>> {
    Ok(Box::new(Vt::from_spec(part)?))
}

impl Vt {
    pub fn from_spec(part: &SpecPart) -> Result<Self> {
        let mut params = Params::new(part);
        let chains: usize = params.get("chains", 1)?;
        let hops: usize = params.get("hops", 4)?;
        params.finish(&["chains", "hops"])?;
        for (name, n, max) in [("chains", chains, 16), ("hops", hops, 32)] {
            if !(1..=max).contains(&n) {
                return Err(EvalError::Invalid(format!(
                    "vt: {name}={n} is out of range; use 1 to {max}"
                )));
            }
        }
        Ok(Self { chains, hops })
    }
}

/// One chain: the value and the names it passes through, first to last.
struct Chain {
    value: u32,
    names: Vec<String>,
}

impl Chain {
    fn lines(&self) -> Vec<String> {
        let mut lines = vec![format!("VAR {} = {}", self.names[0], self.value)];
        lines.extend(
            self.names
                .windows(2)
                .map(|pair| format!("VAR {} = VAR {}", pair[1], pair[0])),
        );
        lines
    }
}

/// `count` chains of `hops` hops with `letters`-letter names, no name or value used twice
/// (values are also kept apart from those in `taken`).
fn draw_chains(
    count: usize,
    hops: usize,
    letters: usize,
    taken: &mut Vec<u32>,
    rng: &mut impl Rng,
) -> Vec<Chain> {
    let mut names: Vec<String> = Vec::with_capacity(count * (hops + 1));
    while names.len() < count * (hops + 1) {
        let name: String = (0..letters)
            .map(|_| rng.random_range(b'A'..=b'Z') as char)
            .collect();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
        .chunks(hops + 1)
        .map(|names| {
            let value = loop {
                let value = rng.random_range(10_000..=99_999u32);
                if !taken.contains(&value) {
                    break value;
                }
            };
            taken.push(value);
            Chain {
                value,
                names: names.to_vec(),
            }
        })
        .collect()
}

/// Every chain line with where it goes, as a fraction of the filler: the queried chain (the
/// first) from `start` on, the others anywhere. Sorted by position; a chain's own positions never
/// decrease and the sort is stable, so each chain still reads in order.
fn place(chains: &[Chain], start: f64, rng: &mut impl Rng) -> Vec<(f64, String)> {
    let mut placed = Vec::new();
    for (c, chain) in chains.iter().enumerate() {
        let lines = chain.lines();
        let from = if c == 0 { start } else { 0.0 };
        let mut at: Vec<f64> = lines.iter().map(|_| rng.random_range(from..=1.0)).collect();
        at.sort_by(f64::total_cmp);
        if c == 0 {
            at[0] = start;
        }
        placed.extend(at.into_iter().zip(lines));
    }
    placed.sort_by(|a, b| a.0.total_cmp(&b.0));
    placed
}

/// The first `words` words of filler with the `placed` lines on lines of their own, each moved
/// back to the start of a sentence so that no chain line splits one.
fn weave(words: usize, placed: &[(f64, String)]) -> String {
    let cycle: Vec<&str> = FILLER.iter().flat_map(|s| s.split(' ')).collect();
    let starts: Vec<usize> = FILLER
        .iter()
        .scan(0, |at, s| {
            let start = *at;
            *at += s.split(' ').count();
            Some(start)
        })
        .collect();
    let sentence_start = |i: usize| {
        let within = i % cycle.len();
        i - within
            + starts
                .iter()
                .rev()
                .find(|&&s| s <= within)
                .copied()
                .unwrap_or(0)
    };
    let at = |fraction: f64| {
        let i = (fraction * words as f64).round() as usize;
        if i < words {
            sentence_start(i)
        } else {
            words
        }
    };
    let mut lines: Vec<String> = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    let mut next = placed.iter().map(|(f, line)| (at(*f), line)).peekable();
    for i in 0..=words {
        while let Some((_, line)) = next.next_if(|(at, _)| *at <= i) {
            if !run.is_empty() {
                lines.push(run.join(" "));
                run.clear();
            }
            lines.push(line.clone());
        }
        if i < words {
            run.push(cycle[i % cycle.len()]);
        }
    }
    if !run.is_empty() {
        lines.push(run.join(" "));
    }
    lines.join("\n")
}

fn task_text(context: &str, value: u32) -> String {
    format!(
        "{INSTRUCTION}\n\n{context}\nQuestion: Which variables in the text above end up holding \
         the value {value}? Name every one of them."
    )
}

fn answer_prefix(chain: &Chain) -> String {
    format!(
        "Answer: Following the assignments in the text above, {} variables hold the value {}. They are:",
        chain.names.len(),
        chain.value
    )
}

impl Synthetic for Vt {
    fn spec(&self) -> String {
        format!("vt:chains={},hops={}", self.chains, self.hops)
    }

    fn synthesise(&self, case: &Case, ctx: &TaskContext) -> Result<Prompt> {
        let mut rng = case.rng(ctx.seed, &Synthetic::spec(self));
        let mut taken = Vec::new();
        let example_hops = self.hops.min(EXAMPLE_MAX_HOPS);
        let example = draw_chains(self.chains, example_hops, 3, &mut taken, &mut rng);
        let chains = draw_chains(self.chains, self.hops, 5, &mut taken, &mut rng);
        let example_start = rng.random_range(0.0..=1.0);
        let example_placed = place(&example, example_start, &mut rng);
        let depth = case.depth.unwrap_or(50.0) / 100.0;
        let placed = place(&chains, depth, &mut rng);

        let example_words =
            EXAMPLE_ROUNDS * FILLER.iter().map(|s| s.split(' ').count()).sum::<usize>();
        let shot = format!(
            "{}\n{} {}",
            task_text(&weave(example_words, &example_placed), example[0].value),
            answer_prefix(&example[0]),
            example[0].names.join(" ")
        );
        let prefix = answer_prefix(&chains[0]);
        let user = |n: usize| {
            format!(
                "{shot}\n\n{}",
                task_text(&weave(n, &placed), chains[0].value)
            )
        };
        let (n, tokens) = fit(ctx, case, ANSWER_TOKENS, usize::MAX / 2, |n| {
            Ok(Draft {
                user: user(n),
                answer_prefix: prefix.clone(),
            })
        })?;
        let rendered = ctx.render(&user(n), &prefix)?;
        Ok(Prompt {
            answer_at: ctx.token_index_of(&rendered, &chains[0].lines()[0]),
            question_at: ctx.question_at(&user(n), &prefix)?,
            tokens,
            answers: chains[0].names.clone(),
            max_new_tokens: ANSWER_TOKENS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::testing::{check_prompt, context};
    use longctx::spec::Spec;

    fn vt(spec: &str) -> Result<Vt> {
        let spec: Spec = spec.parse()?;
        Vt::from_spec(&spec.parts[0])
    }

    fn case(length: usize, depth: f64, sample: u32) -> Case {
        Case {
            length,
            depth: Some(depth),
            sample,
        }
    }

    #[test]
    fn prompts_fill_the_length_and_hold_the_chain_in_order() {
        let ctx = context(None);
        let task = vt("vt").unwrap();
        for length in [2048, 4096] {
            let case = case(length, 50.0, 0);
            let prompt = task.synthesise(&case, &ctx).unwrap();
            // The example and the instruction come before the filler, a third of a 2K prompt
            // on this byte-level model, so only a loose depth check here; the exact one is below.
            check_prompt(&ctx, &case, &prompt, 15.0);
            let text = ctx.model.tokenizer.decode(&prompt.tokens);
            assert_eq!(prompt.answers.len(), 5);
            let mut from = 0;
            for pair in prompt.answers.windows(2) {
                let line = format!("VAR {} = VAR {}", pair[1], pair[0]);
                let at = text[from..]
                    .find(&line)
                    .unwrap_or_else(|| panic!("{line} after {from}"));
                from += at;
            }
        }
    }

    /// Where the queried chain starts, as a fraction of the task's own filler (after the example
    /// and the instruction, before the question).
    fn depth_in_filler(ctx: &TaskContext, prompt: &Prompt) -> f64 {
        let text = ctx.model.tokenizer.decode(&prompt.tokens);
        let tokens_before = |at: usize| ctx.encode_text(&text[..at]).unwrap().len() as f64;
        let start = tokens_before(text.rfind(INSTRUCTION).unwrap() + INSTRUCTION.len());
        let end = tokens_before(text.rfind("\nQuestion:").unwrap());
        (prompt.answer_at.unwrap() as f64 - start) / (end - start)
    }

    #[test]
    fn the_queried_chain_starts_at_the_depth() {
        let ctx = context(None);
        let task = vt("vt").unwrap();
        for depth in [0.0, 50.0, 100.0] {
            let prompt = task.synthesise(&case(4096, depth, 1), &ctx).unwrap();
            let found = depth_in_filler(&ctx, &prompt);
            // At depth 100 the whole chain comes after its first line, at the filler's end.
            assert!(
                (found - depth / 100.0).abs() < 0.05,
                "depth {depth}: found {found}"
            );
        }
    }

    #[test]
    fn same_case_same_prompt_other_sample_other_prompt() {
        let ctx = context(None);
        let task = vt("vt:chains=2,hops=2").unwrap();
        let a = task.synthesise(&case(2048, 30.0, 0), &ctx).unwrap();
        let b = task.synthesise(&case(2048, 30.0, 0), &ctx).unwrap();
        let c = task.synthesise(&case(2048, 30.0, 1), &ctx).unwrap();
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.answers, b.answers);
        assert_ne!(a.tokens, c.tokens);
        assert_eq!(a.answers.len(), 3);
        // Two chains in the task and two in the example.
        let text = ctx.model.tokenizer.decode(&a.tokens);
        assert_eq!(text.matches(" = VAR ").count(), 8, "{text}");
    }

    #[test]
    fn scores_count_the_names_found() {
        let task = vt("vt").unwrap();
        let prompt = Prompt {
            tokens: Vec::new(),
            answers: ["QWERT", "ASDFG", "ZXCVB", "POIUY", "LKJHG"]
                .map(String::from)
                .to_vec(),
            max_new_tokens: ANSWER_TOKENS,
            answer_at: None,
            question_at: None,
        };
        assert_eq!(task.score(&prompt, " QWERT ASDFG ZXCVB POIUY LKJHG"), 100.0);
        assert_eq!(task.score(&prompt, " qwert, zxcvb"), 40.0);
        assert_eq!(task.score(&prompt, " AAAAA BBBBB"), 0.0);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert_eq!(Synthetic::spec(&vt("vt").unwrap()), "vt:chains=1,hops=4");
        let error = vt("vt:hops=0").err().unwrap().to_string();
        assert!(
            error.contains("hops=0") && error.contains("1 to 32"),
            "{error}"
        );
        let error = vt("vt:chains=x").err().unwrap().to_string();
        assert!(error.contains("`chains=x`"), "{error}");
        let error = vt("vt:hop=3").err().unwrap().to_string();
        assert!(error.contains("`hop`"), "{error}");
        let short = vt("vt")
            .unwrap()
            .synthesise(&case(512, 50.0, 0), &context(None));
        assert!(short.err().unwrap().to_string().contains("too short"));
    }
}
