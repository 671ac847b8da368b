//! Pass-key retrieval: a number hidden in repetitive filler, asked for at the end.
//!
//! After Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for
//! Transformers" (2023), `llama/run_test.py`, and llama.cpp's `examples/passkey`: the key is an
//! integer, its depth is the fraction of filler before it, and the answer is right when the first
//! number generated is the key. The wordings here are our own.
//!
//! Small models answer the phrase "pass key" with stories about magical keys rather than the
//! number, so the task measures its wording as much as the window. Each wording below phrases the
//! needle, the question and the answer prefix differently: the landmark test's pass key, RULER's
//! "special magic number", and a neutral record (a vault number). `wording=auto` is resolved by
//! `longctx eval` with [`calibrate`]: the wording the model retrieves best inside its window.

use longctx::spec::{Params, SpecPart};
use rand::Rng;

use crate::fit::{fit, Draft};
use crate::task::{Case, Prompt, Synthetic, Task, TaskContext, TaskEntry};
use crate::text::NaturalText;
use crate::{scoring, EvalError, Result};

pub const ENTRY: TaskEntry = TaskEntry {
    name: "passkey",
    about: "a number hidden in filler sentences (Landmark Attention, llama.cpp passkey): wording=vault|magic|passkey|auto, digits=5..7",
    build,
};

/// Enough for the key and a few words after it; llama.cpp's example generates 16.
const ANSWER_TOKENS: usize = 16;

const FILLER: [&str; 5] = [
    "The grass grows slowly in the field.",
    "A cloud drifts over the hill.",
    "The river keeps flowing to the sea.",
    "Somewhere a bell rings twice.",
    "Then the day goes on as before.",
];

/// How the needle, the question and the answer prefix are phrased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wording {
    /// A neutral record: the number of a vault, stated among the filler.
    Vault,
    /// RULER's needles, in our words: a "special magic number".
    Magic,
    /// The landmark test's pass key.
    Passkey,
}

impl Wording {
    /// Every wording, the default first (the one the default model retrieves best inside its
    /// window: docs/results/baseline.md); calibration breaks ties in this order.
    pub const ALL: [Wording; 3] = [Wording::Vault, Wording::Magic, Wording::Passkey];

    pub fn name(self) -> &'static str {
        match self {
            Self::Vault => "vault",
            Self::Magic => "magic",
            Self::Passkey => "passkey",
        }
    }

    fn intro(self) -> &'static str {
        match self {
            Self::Vault => {
                "The notes below are a day's log. One line records the number of the vault; \
                 you will be asked for it at the end."
            }
            Self::Magic => {
                "A special magic number is hidden in the long text below. Find it and remember \
                 it: you will be asked for it at the end."
            }
            Self::Passkey => {
                "Somewhere in the long text below there is a pass key. Find it and remember \
                 it: you will be asked for it at the end."
            }
        }
    }

    pub fn needle(self, key: &str) -> String {
        match self {
            Self::Vault => format!("The vault number is {key}. Write it down: {key}."),
            Self::Magic => format!("The special magic number is: {key}. Remember {key}."),
            Self::Passkey => {
                format!("The pass key is {key}. Keep it in mind: {key} is the pass key.")
            }
        }
    }

    fn question(self) -> &'static str {
        match self {
            Self::Vault => "What is the vault number?",
            Self::Magic => "What is the special magic number hidden in the text?",
            Self::Passkey => "What is the pass key?",
        }
    }

    fn answer_prefix(self) -> &'static str {
        match self {
            Self::Vault => "The vault number is",
            Self::Magic => "The special magic number hidden in the text is",
            Self::Passkey => "The pass key is",
        }
    }
}

/// Key lengths the task draws from: long enough that a guess never matches, short enough to be
/// one or two tokens in most vocabularies.
const DIGITS: std::ops::RangeInclusive<u32> = 5..=7;

pub struct Passkey {
    pub wording: Wording,
    pub digits: u32,
}

impl Default for Passkey {
    fn default() -> Self {
        Self {
            wording: Wording::ALL[0],
            digits: 5,
        }
    }
}

/// The parameter value that asks `longctx eval` to choose the wording by calibration.
pub const AUTO: &str = "auto";

fn build(part: &SpecPart) -> Result<Box<dyn Task>> {
    Ok(Box::new(Passkey::from_spec(part)?))
}

impl Passkey {
    pub fn from_spec(part: &SpecPart) -> Result<Self> {
        let mut params = Params::new(part);
        let mut names: Vec<&str> = Wording::ALL.iter().map(|w| w.name()).collect();
        names.push(AUTO);
        let wording = params.choice("wording", &names)?;
        let digits: u32 = params.get("digits", Passkey::default().digits)?;
        params.finish(&["wording", "digits"])?;
        if wording == AUTO {
            return Err(EvalError::Invalid(
                "passkey:wording=auto is chosen by calibration when `longctx eval` runs; name a wording (vault, magic, passkey) to build the task directly".into(),
            ));
        }
        if !DIGITS.contains(&digits) {
            return Err(EvalError::Invalid(format!(
                "passkey: digits={digits} is out of range; use {} to {}",
                DIGITS.start(),
                DIGITS.end()
            )));
        }
        let wording = *Wording::ALL
            .iter()
            .find(|w| w.name() == wording)
            .expect("choice() returned one of the names");
        Ok(Self { wording, digits })
    }

    /// A key of exactly `digits` digits.
    fn key(&self, case: &Case, seed: u64) -> String {
        let low = 10u32.pow(self.digits - 1);
        let key = case.rng(seed, "passkey").random_range(low..low * 10);
        key.to_string()
    }
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
fn user_text(
    wording: Wording,
    filler: &NaturalText,
    words: usize,
    depth: f64,
    needle: &str,
) -> String {
    let at = filler.sentence_boundary_near((depth * words as f64).round() as usize, words);
    let before = filler.words_between(0, at);
    let after = filler.words_between(at, words);
    let haystack = format!("{before} {needle}{after}");
    format!(
        "{}\n{}\n{}",
        wording.intro(),
        haystack.trim(),
        wording.question()
    )
}

impl Synthetic for Passkey {
    fn spec(&self) -> String {
        format!(
            "passkey:wording={},digits={}",
            self.wording.name(),
            self.digits
        )
    }

    fn synthesise(&self, case: &Case, ctx: &TaskContext) -> Result<Prompt> {
        let key = self.key(case, ctx.seed);
        let needle = self.wording.needle(&key);
        let prefix = self.wording.answer_prefix();
        let depth = case.depth.unwrap_or(50.0) / 100.0;
        let filler = filler(case.length);
        let user = |n| user_text(self.wording, &filler, n, depth, &needle);
        let (n, tokens) = fit(ctx, case, ANSWER_TOKENS, filler.word_count(), |n| {
            Ok(Draft {
                user: user(n),
                answer_prefix: prefix.to_string(),
            })
        })?;
        let rendered = ctx.render(&user(n), prefix)?;
        Ok(Prompt {
            answer_at: ctx.token_index_of(&rendered, &needle),
            question_at: ctx.question_at(&user(n), prefix)?,
            tokens,
            answers: vec![key],
            max_new_tokens: ANSWER_TOKENS,
        })
    }

    fn score(&self, prompt: &Prompt, output: &str) -> f64 {
        scoring::first_number_is(output, &prompt.answers[0])
    }
}

/// What calibration measured for one wording.
#[derive(Debug, Clone, PartialEq)]
pub struct WordingScore {
    pub wording: Wording,
    /// Mean score over the calibration cases.
    pub score: f64,
    pub cases: usize,
}

/// Needle depths calibration runs at: both ends and the middle of the haystack.
pub const CALIBRATION_DEPTHS: [f64; 3] = [0.0, 50.0, 100.0];

/// Lengths calibration runs at: 1k and 2k where the trained window and the session hold them,
/// else the longest length both hold.
pub fn calibration_lengths(trained: usize, n_ctx: usize) -> Vec<usize> {
    let limit = trained.min(n_ctx);
    let lengths: Vec<usize> = [1024, 2048].into_iter().filter(|&l| l <= limit).collect();
    if lengths.is_empty() {
        vec![limit]
    } else {
        lengths
    }
}

/// Runs every wording at `lengths` × [`CALIBRATION_DEPTHS`] into its own result folder under
/// `dir` (so an interrupted calibration resumes like any run), and returns the wording with the
/// best mean score, ties going to the earlier one in [`Wording::ALL`], with every wording's score.
pub fn calibrate(
    base: &crate::runner::RunConfig,
    ctx: &TaskContext,
    engine: &mut crate::task::Engine,
    dir: &std::path::Path,
    lengths: &[usize],
    digits: u32,
    on_event: &mut dyn FnMut(crate::runner::Event),
) -> Result<(Passkey, Vec<WordingScore>)> {
    use crate::runner::{plan, run, RunConfig, RunDir};
    let mut scores = Vec::new();
    for wording in Wording::ALL {
        let task = Passkey { wording, digits };
        let config = RunConfig {
            task: Synthetic::spec(&task),
            ..base.clone()
        };
        let mut run_dir = RunDir::open(&dir.join(wording.name()), &config)?;
        let cases = plan(&task, lengths, &CALIBRATION_DEPTHS, 1)?;
        run(&task, ctx, engine, &mut run_dir, &cases, on_event)?;
        let measured: Vec<f64> = run_dir
            .records()
            .iter()
            .filter(|r| cases.contains(&r.case))
            .filter_map(|r| r.outcome.score)
            .collect();
        scores.push(WordingScore {
            wording,
            score: measured.iter().sum::<f64>() / measured.len().max(1) as f64,
            cases: measured.len(),
        });
    }
    Ok((
        Passkey {
            wording: best(&scores),
            digits,
        },
        scores,
    ))
}

/// The best-scoring wording; a tie goes to the earlier one.
fn best(scores: &[WordingScore]) -> Wording {
    scores
        .iter()
        .fold(
            &scores[0],
            |best, s| if s.score > best.score { s } else { best },
        )
        .wording
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::testing::{check_prompt, context};
    use longctx::spec::Spec;

    fn task(spec: &str) -> Passkey {
        let spec: Spec = spec.parse().unwrap();
        Passkey::from_spec(&spec.parts[0]).unwrap()
    }

    #[test]
    fn every_wording_and_key_length_fills_the_length_with_the_key_at_the_depth() {
        let ctx = context(None);
        for wording in Wording::ALL {
            for digits in DIGITS {
                let task = Passkey { wording, digits };
                for length in [512, 2048] {
                    for depth in [0.0, 50.0, 100.0] {
                        let case = Case {
                            length,
                            depth: Some(depth),
                            sample: 0,
                        };
                        let prompt = task.synthesise(&case, &ctx).unwrap();
                        // The intro and question are outside the haystack: up to ~200 bytes.
                        let tolerance = 100.0 * 230.0 / length as f64;
                        check_prompt(&ctx, &case, &prompt, tolerance.max(5.0));
                        let key = &prompt.answers[0];
                        assert_eq!(key.len(), digits as usize, "{wording:?}: {key}");
                        assert!(key.bytes().all(|b| b.is_ascii_digit()) && !key.starts_with('0'));
                        let text = ctx.model.tokenizer.decode(&prompt.tokens);
                        assert!(text.contains(&wording.needle(key)), "{wording:?}");
                        assert!(
                            text.ends_with(wording.answer_prefix()),
                            "{wording:?}: {text}"
                        );
                        assert!(text.contains(wording.question()), "{wording:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn wordings_differ_in_every_part_and_share_the_key() {
        let ctx = context(None);
        let case = Case {
            length: 1024,
            depth: Some(50.0),
            sample: 0,
        };
        let prompts: Vec<Prompt> = Wording::ALL
            .iter()
            .map(|&wording| {
                Passkey { wording, digits: 6 }
                    .synthesise(&case, &ctx)
                    .unwrap()
            })
            .collect();
        for (i, a) in Wording::ALL.iter().enumerate() {
            assert_eq!(
                prompts[i].answers, prompts[0].answers,
                "the key depends on the case only"
            );
            for b in &Wording::ALL[i + 1..] {
                assert_ne!(a.intro(), b.intro());
                assert_ne!(a.needle("1"), b.needle("1"));
                assert_ne!(a.question(), b.question());
                assert_ne!(a.answer_prefix(), b.answer_prefix());
            }
        }
    }

    #[test]
    fn the_spec_names_every_parameter_and_bad_ones_are_refused() {
        assert_eq!(
            Synthetic::spec(&task("passkey")),
            "passkey:wording=vault,digits=5"
        );
        let magic = task("passkey:wording=magic,digits=7");
        assert_eq!((magic.wording, magic.digits), (Wording::Magic, 7));
        for (bad, says) in [
            ("passkey:digits=4", "out of range"),
            ("passkey:digits=8", "out of range"),
            (
                "passkey:wording=riddle",
                "choose one of vault, magic, passkey, auto",
            ),
            ("passkey:wording=auto", "calibration"),
            ("passkey:depth=3", "depth"),
        ] {
            let spec: Spec = bad.parse().unwrap();
            let err = Passkey::from_spec(&spec.parts[0])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(says), "{bad}: {err}");
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
        let task = Passkey::default();
        let a = task.synthesise(&case, &ctx).unwrap();
        let b = task.synthesise(&case, &ctx).unwrap();
        assert_eq!(a.tokens, b.tokens);
        let other = task.synthesise(&Case { sample: 1, ..case }, &ctx).unwrap();
        assert_ne!(a.answers, other.answers);
    }

    #[test]
    fn scoring_wants_the_key_first() {
        let prompt = Prompt {
            tokens: vec![],
            answers: vec!["47110".into()],
            max_new_tokens: ANSWER_TOKENS,
            answer_at: None,
            question_at: None,
        };
        let task = Passkey::default();
        assert_eq!(task.score(&prompt, " 47110. It is the number."), 100.0);
        assert_eq!(task.score(&prompt, " 471100"), 0.0);
        assert_eq!(task.score(&prompt, " a magical key that opens"), 0.0);
    }

    #[test]
    fn a_length_too_short_for_the_question_is_refused() {
        let ctx = context(None);
        let case = Case {
            length: 100,
            depth: Some(0.0),
            sample: 0,
        };
        let err = Passkey::default()
            .synthesise(&case, &ctx)
            .unwrap_err()
            .to_string();
        assert!(err.contains("too short"), "{err}");
    }

    #[test]
    fn the_best_wording_wins_and_ties_go_to_the_earlier_one() {
        let scores = |values: [f64; 3]| -> Vec<WordingScore> {
            Wording::ALL
                .iter()
                .zip(values)
                .map(|(&wording, score)| WordingScore {
                    wording,
                    score,
                    cases: 6,
                })
                .collect()
        };
        assert_eq!(best(&scores([20.0, 100.0, 100.0])), Wording::Magic);
        assert_eq!(best(&scores([0.0, 0.0, 0.0])), Wording::Vault);
        assert_eq!(best(&scores([50.0, 33.3, 83.3])), Wording::Passkey);
    }

    #[test]
    fn calibration_runs_every_wording_into_its_folder_and_resumes() {
        use crate::runner::Event;
        use crate::task::{Engine, QueryMode};
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(None);
        let mut session = crate::task::testing::session(&ctx, 512);
        let mut engine = Engine {
            session: &mut session,
            query: QueryMode::Aware,
        };
        let base = crate::runner::tests::config();
        let mut ran = 0;
        let (chosen, scores) =
            calibrate(&base, &ctx, &mut engine, dir.path(), &[512], 6, &mut |e| {
                if let Event::Finished(_) = e {
                    ran += 1;
                }
            })
            .unwrap();
        assert_eq!(ran, 9, "three wordings at three depths");
        assert_eq!(scores.len(), 3);
        assert!(scores.iter().all(|s| s.cases == 3));
        assert_eq!(chosen.wording, best(&scores));
        assert_eq!(chosen.digits, 6);
        for wording in Wording::ALL {
            let config = crate::runner::read_config(&dir.path().join(wording.name()))
                .unwrap()
                .unwrap();
            assert_eq!(
                config.task,
                format!("passkey:wording={},digits=6", wording.name())
            );
        }
        let mut reran = 0;
        let (again, scores_again) =
            calibrate(&base, &ctx, &mut engine, dir.path(), &[512], 6, &mut |e| {
                if let Event::Finished(_) = e {
                    reran += 1;
                }
            })
            .unwrap();
        assert_eq!(reran, 0, "a finished calibration is read back, not rerun");
        assert_eq!((again.wording, scores_again), (chosen.wording, scores));
    }

    #[test]
    fn calibration_lengths_stay_inside_the_window_and_the_session() {
        assert_eq!(calibration_lengths(8192, 32768), [1024, 2048]);
        assert_eq!(calibration_lengths(8192, 1024), [1024]);
        assert_eq!(calibration_lengths(512, 4096), [512]);
    }
}
