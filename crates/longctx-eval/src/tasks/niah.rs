//! Needle in a haystack, RULER style: key→value needles hidden in noise sentences, natural text
//! or distractor needles; numbers, words or UUIDs; several keys, values or queries.
//!
//! After Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
//! Models?" (COLM 2024), NVIDIA/RULER `scripts/data/synthetic/niah.py`, scored with RULER's
//! `string_match_all`. RULER's named variants are presets (`niah_single_1` …). The prose is our
//! own; where RULER hides needles in Paul Graham's essays we use the natural text (`text`).

use longctx::spec::{Params, Spec, SpecPart};
use rand::Rng;

use crate::fit::{fit, Draft};
use crate::task::{Case, Prompt, Synthetic, Task, TaskContext, TaskEntry};
use crate::text::NaturalText;
use crate::words::{join_list, Kind};
use crate::Result;

pub const ENTRY: TaskEntry = TaskEntry {
    name: "niah",
    about: "RULER needle in a haystack: haystack=noise|text|needles, key=, value=numbers|words|uuids, keys=, values=, queries=",
    build,
};

/// RULER's task names and the parameters that make them.
pub const PRESETS: &[(&str, &str)] = &[
    ("niah_single_1", "haystack=noise,key=words,value=numbers"),
    ("niah_single_2", "haystack=text,key=words,value=numbers"),
    ("niah_single_3", "haystack=text,key=words,value=uuids"),
    (
        "niah_multikey_1",
        "haystack=text,key=words,value=numbers,keys=4",
    ),
    (
        "niah_multikey_2",
        "haystack=needles,key=words,value=numbers",
    ),
    ("niah_multikey_3", "haystack=needles,key=uuids,value=uuids"),
    (
        "niah_multivalue",
        "haystack=text,key=words,value=numbers,values=4",
    ),
    (
        "niah_multiquery",
        "haystack=text,key=words,value=numbers,queries=4",
    ),
];

/// RULER generates up to 128 tokens for NIAH.
const ANSWER_TOKENS: usize = 128;

const NOISE: [&str; 5] = [
    "The hills are quiet.",
    "The lake is still.",
    "The road is long.",
    "Birds sing in the morning.",
    "Then evening comes again.",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Haystack {
    Noise,
    Text,
    Needles,
}

pub struct Niah {
    pub haystack: Haystack,
    pub key: Kind,
    pub value: Kind,
    pub keys: usize,
    pub values: usize,
    pub queries: usize,
}

fn build(part: &SpecPart) -> Result<Box<dyn Task>> {
    Ok(Box::new(Niah::from_spec(part)?))
}

/// A RULER preset by name, with any extra parameters the user gave applied on top.
pub fn preset(part: &SpecPart) -> Result<Option<Box<dyn Task>>> {
    let Some((_, params)) = PRESETS.iter().find(|(name, _)| *name == part.name) else {
        return Ok(None);
    };
    let mut spec: Spec = format!("niah:{params}").parse()?;
    for (key, value) in &part.params {
        spec.parts[0].params.retain(|(k, _)| k != key);
        spec.parts[0].params.push((key.clone(), value.clone()));
    }
    Ok(Some(Box::new(Niah::from_spec(&spec.parts[0])?)))
}

impl Niah {
    pub fn from_spec(part: &SpecPart) -> Result<Self> {
        let mut params = Params::new(part);
        let haystack = match params.choice("haystack", &["noise", "text", "needles"])? {
            "text" => Haystack::Text,
            "needles" => Haystack::Needles,
            _ => Haystack::Noise,
        };
        let key = Kind::parse(params.choice("key", &["words", "numbers", "uuids"])?);
        let value = Kind::parse(params.choice("value", &Kind::NAMES)?);
        let keys: usize = params.get("keys", 1)?;
        let values: usize = params.get("values", 1)?;
        let queries: usize = params.get("queries", 1)?;
        params.finish(&["haystack", "key", "value", "keys", "values", "queries"])?;
        for (name, n) in [("keys", keys), ("values", values), ("queries", queries)] {
            if !(1..=64).contains(&n) {
                return Err(crate::EvalError::Invalid(format!(
                    "niah: {name}={n} is out of range; use 1 to 64"
                )));
            }
        }
        Ok(Self {
            haystack,
            key,
            value,
            // RULER: every queried key must exist.
            keys: keys.max(queries),
            values,
            queries,
        })
    }

    fn singular(&self) -> bool {
        self.queries * self.values == 1
    }

    fn needle(&self, key: &str, value: &str) -> String {
        format!(
            "One of the special magic {} for {key} is: {value}.",
            self.value.noun(true)
        )
    }

    fn question(&self, query: &str) -> (String, String) {
        let one = self.singular();
        let noun = self.value.noun(!one);
        let intro = if one {
            format!("A special magic {noun} is hidden in the text below. Memorize it, since you will be asked about the {noun} afterwards.")
        } else {
            format!("Some special magic {noun} are hidden in the text below. Memorize them, since you will be asked about the {noun} afterwards.")
        };
        let (ask, verb) = if one {
            (
                format!(
                    "What is the special magic {noun} for {query} mentioned in the text above?"
                ),
                "is",
            )
        } else {
            (format!("What are all the special magic {noun} for {query} mentioned in the text above?"), "are")
        };
        (
            format!("{intro}\n{{context}}\n{ask}"),
            format!("The special magic {noun} for {query} mentioned in the text above {verb}"),
        )
    }
}

/// A needle and where it goes, as a fraction of the haystack.
struct Placed {
    text: String,
    depth: f64,
}

impl Synthetic for Niah {
    fn spec(&self) -> String {
        let haystack = match self.haystack {
            Haystack::Noise => "noise",
            Haystack::Text => "text",
            Haystack::Needles => "needles",
        };
        format!(
            "niah:haystack={haystack},key={},value={},keys={},values={},queries={}",
            self.key.name(),
            self.value.name(),
            self.keys,
            self.values,
            self.queries
        )
    }

    fn needs_text(&self) -> bool {
        self.haystack == Haystack::Text
    }

    fn synthesise(&self, case: &Case, ctx: &TaskContext) -> Result<Prompt> {
        let mut rng = case.rng(ctx.seed, &Synthetic::spec(self));
        let keys = self.key.draw_distinct(self.keys, &mut rng);
        let values: Vec<Vec<String>> = keys
            .iter()
            .map(|_| self.value.draw_distinct(self.values, &mut rng))
            .collect();
        let queried = &keys[..self.queries];
        // The queried needles start at the case's depth and spread towards the end, as
        // Kamradt's multi-needle test does; the distractor keys land anywhere.
        let depth = case.depth.unwrap_or(50.0) / 100.0;
        let queried_count = self.queries * self.values;
        let mut placed = Vec::new();
        for (k, key) in keys.iter().enumerate() {
            for value in &values[k] {
                let depth = if k < self.queries {
                    let i = placed.len() as f64;
                    depth + i * (1.0 - depth) / queried_count as f64
                } else {
                    rng.random_range(0.0..=1.0)
                };
                placed.push(Placed {
                    text: self.needle(key, value),
                    depth,
                });
            }
        }
        let answers: Vec<String> = values[..self.queries].iter().flatten().cloned().collect();
        let (template, answer_prefix) = self.question(&join_list(queried));
        let generated;
        let haystack = match self.haystack {
            Haystack::Text => ctx.text()?,
            Haystack::Noise | Haystack::Needles => {
                generated = self.generate_haystack(case.length, &mut rng);
                &generated
            }
        };
        let draft = |n: usize| -> Result<Draft> {
            Ok(Draft {
                user: template.replace("{context}", &insert(haystack, n, &placed)),
                answer_prefix: answer_prefix.clone(),
            })
        };
        let (n, tokens) = fit(ctx, case, ANSWER_TOKENS, haystack.word_count(), draft)?;
        let rendered = ctx.render(&draft(n)?.user, &answer_prefix)?;
        Ok(Prompt {
            answer_at: ctx.token_index_of(&rendered, &placed[0].text),
            question_at: ctx.question_at(&draft(n)?.user, &answer_prefix)?,
            tokens,
            answers,
            max_new_tokens: ANSWER_TOKENS,
        })
    }
}

impl Niah {
    /// A synthetic haystack with more words than `length` tokens could hold (every word is at
    /// least one token): noise sentences, or distractor needles one per line.
    fn generate_haystack(&self, length: usize, rng: &mut impl Rng) -> NaturalText {
        let text = match self.haystack {
            Haystack::Needles => (0..length / 8 + 16)
                .map(|_| self.needle(&self.key.draw(rng), &self.value.draw(rng)))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => (0..length / 3 + 16)
                .map(|i| NOISE[i % NOISE.len()])
                .collect::<Vec<_>>()
                .join(" "),
        };
        NaturalText::synthetic(text)
    }
}

/// The haystack's first `n` words with the needles between sentences at their depths. The
/// haystack is cut by words, not sentences, so that the prompt can meet its length to the token
/// (the landmark passkey test cuts its filler mid-sentence the same way).
fn insert(haystack: &NaturalText, n: usize, placed: &[Placed]) -> String {
    let mut inserts: Vec<(usize, &str)> = placed
        .iter()
        .map(|p| {
            let at = (p.depth * n as f64).round() as usize;
            (haystack.sentence_boundary_near(at, n), p.text.as_str())
        })
        .collect();
    inserts.sort_by_key(|(at, _)| *at);
    let mut out = String::new();
    let mut from = 0;
    for (at, needle) in inserts {
        out.push_str(haystack.words_between(from, at));
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(needle);
        from = at;
    }
    out.push_str(haystack.words_between(from, n));
    out.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::task_from_spec;
    use crate::task::testing::{check_prompt, context};
    use crate::text::sample_text;

    fn niah(spec: &str) -> Niah {
        let spec: Spec = spec.parse().unwrap();
        Niah::from_spec(&spec.parts[0]).unwrap()
    }

    #[test]
    fn every_haystack_meets_the_length_with_needles_at_the_depth() {
        let ctx = context(Some(sample_text()));
        for spec in [
            "niah:haystack=noise",
            "niah:haystack=text,value=uuids",
            "niah:haystack=needles,key=uuids,value=uuids",
            "niah:haystack=text,keys=4,values=2,queries=2",
        ] {
            let task = niah(spec);
            for depth in [0.0, 50.0, 100.0] {
                let case = Case {
                    length: 3072,
                    depth: Some(depth),
                    sample: 0,
                };
                let prompt = task.synthesise(&case, &ctx).unwrap();
                assert_eq!(prompt.answers.len(), task.queries * task.values, "{spec}");
                // The fixed text is ~300 bytes; natural text moves a needle to a sentence end.
                check_prompt(&ctx, &case, &prompt, 12.0);
            }
        }
    }

    #[test]
    fn one_query_one_value_reads_in_the_singular() {
        let single = niah("niah");
        let (template, prefix) = single.question("calm-river");
        assert!(template.contains("What is the special magic number for calm-river"));
        assert!(prefix.ends_with("is"), "{prefix}");
        let multi = niah("niah:values=3");
        let (template, prefix) = multi.question("calm-river");
        assert!(template.contains("What are all the special magic numbers"));
        assert!(prefix.ends_with("are"), "{prefix}");
    }

    #[test]
    fn scored_as_ruler_scores_it() {
        let task = niah("niah:values=2");
        let prompt = Prompt {
            tokens: vec![],
            answers: vec!["1234567".into(), "7654321".into()],
            max_new_tokens: ANSWER_TOKENS,
            answer_at: None,
            question_at: None,
        };
        assert_eq!(task.score(&prompt, " 1234567 and 7654321."), 100.0);
        assert_eq!(task.score(&prompt, " 1234567."), 50.0);
        assert_eq!(task.score(&prompt, " none"), 0.0);
    }

    #[test]
    fn presets_and_bad_parameters() {
        let task = task_from_spec(&"niah_multikey_3".parse().unwrap()).unwrap();
        assert_eq!(
            task.spec(),
            "niah:haystack=needles,key=uuids,value=uuids,keys=1,values=1,queries=1"
        );
        let task = task_from_spec(&"niah_single_2:value=uuids".parse().unwrap()).unwrap();
        assert!(task.spec().contains("haystack=text,key=words,value=uuids"));
        for (bad, needle) in [
            ("niah:haystack=essay", "noise, text, needles"),
            ("niah:keys=0", "out of range"),
            ("niah:needles=3", "no parameter `needles`"),
        ] {
            let err = task_from_spec(&bad.parse().unwrap())
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
