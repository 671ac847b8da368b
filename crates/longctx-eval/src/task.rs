//! The `Task` seam: how a test case is synthesised, run and scored. One file per task under
//! `tasks/`, one line per task in [`REGISTRY`].

use std::sync::Arc;

use longctx::chat::{ChatMessage, ChatTemplate};
use longctx::generate::{continue_generation, generate};
use longctx::sampling::{Sampler, SamplingParams};
use longctx::session::{Model, Session};
use longctx::spec::{Spec, SpecPart};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::text::NaturalText;
use crate::{tasks, EvalError, Result};

/// One point of a sweep: a context length, a depth where the task has one, and which sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Case {
    /// Tokens of context: the prompt plus the tokens reserved for the answer, as RULER counts.
    pub length: usize,
    /// Where the answer sits, in percent of the haystack; None for tasks without a depth.
    pub depth: Option<f64>,
    pub sample: u32,
}

impl Case {
    /// A stable name for the case, used to recognise finished work on resume.
    pub fn id(&self) -> String {
        match self.depth {
            Some(depth) => format!("L{}-d{}-s{}", self.length, depth, self.sample),
            None => format!("L{}-s{}", self.length, self.sample),
        }
    }

    /// This case's own random stream: it depends on the case and the seed only, never on which
    /// cases ran before, so a resumed run synthesises exactly what the first run would have.
    pub fn rng(&self, seed: u64, task: &str) -> ChaCha8Rng {
        let digest = Sha256::digest(format!("{seed}/{task}/{}", self.id()));
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&digest);
        ChaCha8Rng::from_seed(bytes)
    }
}

/// A synthesised test: the prompt in tokens and what a correct answer contains.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub tokens: Vec<u32>,
    /// Strings a correct answer contains (RULER scores the fraction found).
    pub answers: Vec<String>,
    /// Tokens reserved for the answer; the prompt plus these make the case's length.
    pub max_new_tokens: usize,
    /// Token index where the (first) answer was placed, for checking depths.
    pub answer_at: Option<usize>,
    /// Token index where the question after the context starts (the rest of the user turn,
    /// the template's turn change and the answer prefix), for the query-agnostic protocol.
    pub question_at: Option<usize>,
}

/// What a finished case produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// 0–100 for generation tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub expected: Vec<String>,
    pub prompt_tokens: usize,
    /// Summed negative log-likelihood (nats) and the number of tokens scored, for perplexity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nll_sum: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nll_count: Option<usize>,
}

/// Everything a task needs to synthesise prompts: the model's tokenizer and chat template, the
/// natural text where the task uses one, and the run's seed.
pub struct TaskContext {
    pub model: Arc<Model>,
    /// Applied around the task text when the model is a chat model and the user did not turn it off.
    pub chat: Option<ChatTemplate>,
    pub text: Option<Arc<NaturalText>>,
    pub seed: u64,
}

impl TaskContext {
    /// Tokens of a prompt whose user turn is `user` and whose answer starts with `answer_prefix`,
    /// so the model continues the answer rather than choosing how to begin it (RULER does the same).
    pub fn render(&self, user: &str, answer_prefix: &str) -> Result<String> {
        Ok(match &self.chat {
            Some(template) => {
                let messages = [ChatMessage {
                    role: "user".to_string(),
                    content: user.to_string(),
                }];
                let mut text = template.render(&messages, true)?;
                text.push_str(answer_prefix.trim_start());
                text
            }
            None => format!("{user}\n{answer_prefix}"),
        })
    }

    /// Tokens of a rendered prompt, BOS included where the model wants it.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.model.tokenizer.encode(text, true, true)?)
    }

    /// The token index at which `needle` starts in the rendered prompt `text`.
    pub fn token_index_of(&self, text: &str, needle: &str) -> Option<usize> {
        let at = text.find(needle)?;
        self.encode_text(&text[..at]).ok().map(|t| t.len())
    }

    /// Token index of the question in the rendered prompt of `user`: the user text's last line
    /// (every task puts its question there, after the context).
    pub fn question_at(&self, user: &str, answer_prefix: &str) -> Result<Option<usize>> {
        let question = user.rsplit('\n').next().unwrap_or(user);
        let rendered = self.render(user, answer_prefix)?;
        Ok(rendered
            .rfind(question)
            .and_then(|at| self.encode_text(&rendered[..at]).ok().map(|t| t.len())))
    }

    /// The natural text, or an error saying the task needs it.
    pub fn text(&self) -> Result<&NaturalText> {
        self.text.as_deref().ok_or_else(|| {
            EvalError::Invalid("this task needs the natural text, which was not loaded".into())
        })
    }

    /// Number of tokens `text` has on its own, without BOS.
    pub fn count(&self, text: &str) -> Result<usize> {
        Ok(self.model.tokenizer.encode(text, false, false)?.len())
    }
}

/// What the KV policy sees of the question when it compresses the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueryMode {
    /// The question is part of the prompt the policy compresses, as users run it.
    #[default]
    Aware,
    /// The context is prefilled and compressed alone, the question appended after it
    /// uncompressed (kvpress's protocol).
    Agnostic,
}

impl QueryMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Aware => "aware",
            Self::Agnostic => "agnostic",
        }
    }
}

/// The engine a case runs on: one session, reused case after case.
pub struct Engine<'a> {
    pub session: &'a mut Session,
    pub query: QueryMode,
}

impl Engine<'_> {
    /// Greedy continuation of `prompt`, at most `max_new_tokens` tokens, from an empty cache.
    /// With `question_at`, the context before it and the question from it go in as the query
    /// mode says (question-guided policies see the question while compressing the context).
    pub fn complete(
        &mut self,
        prompt: &[u32],
        question_at: Option<usize>,
        max_new_tokens: usize,
    ) -> Result<String> {
        self.session.reset();
        let mut sampler = Sampler::new(SamplingParams::greedy())?;
        let mut output = String::new();
        let Some(at) = question_at.filter(|&at| at > 0 && at < prompt.len()) else {
            generate(
                self.session,
                &mut sampler,
                prompt,
                max_new_tokens,
                &mut |piece| output.push_str(piece),
            )?;
            return Ok(output);
        };
        self.session.check_fits(prompt.len(), max_new_tokens)?;
        let (context, question) = prompt.split_at(at);
        let logits = match self.query {
            QueryMode::Aware => self.session.prefill_guided(context, question)?.to_vec(),
            QueryMode::Agnostic => {
                self.session.prefill(context)?;
                self.session.prefill_uncompressed(question)?.to_vec()
            }
        };
        continue_generation(
            self.session,
            &mut sampler,
            prompt,
            &logits,
            max_new_tokens,
            &mut |piece| output.push_str(piece),
        )?;
        Ok(output)
    }
}

/// A task as the runner sees it.
pub trait Task: Send + Sync {
    /// The task's name with every parameter resolved, so that the recorded configuration says
    /// exactly what ran (`niah:haystack=noise,key=words,…`).
    fn spec(&self) -> String;
    /// Whether cases sweep needle depths.
    fn uses_depth(&self) -> bool {
        true
    }
    /// Whether the task reads the natural text.
    fn needs_text(&self) -> bool {
        false
    }
    /// How many samples a length gets when the user asks for `requested`; a task whose samples
    /// are pieces of a fixed amount of text (perplexity) decides for itself.
    fn samples_at(&self, _length: usize, requested: u32) -> Result<u32> {
        Ok(requested)
    }
    /// Runs one case.
    fn run(&self, case: &Case, ctx: &TaskContext, engine: &mut Engine) -> Result<Outcome>;
    /// The task's prompt synthesis, where it has one (to replay prompts in another engine).
    fn as_synthetic(&self) -> Option<&dyn Synthetic> {
        None
    }
}

/// A task that synthesises a prompt with known answers and scores a greedy completion: all the
/// retrieval tasks.
pub trait Synthetic: Send + Sync {
    fn spec(&self) -> String;
    fn uses_depth(&self) -> bool {
        true
    }
    fn needs_text(&self) -> bool {
        false
    }
    /// The prompt for `case`, of `case.length` tokens including the answer's reserve.
    fn synthesise(&self, case: &Case, ctx: &TaskContext) -> Result<Prompt>;
    /// 0–100 for `output` against the prompt's answers.
    fn score(&self, prompt: &Prompt, output: &str) -> f64 {
        crate::scoring::string_match_all(output, &prompt.answers)
    }
}

impl<T: Synthetic> Task for T {
    fn spec(&self) -> String {
        Synthetic::spec(self)
    }

    fn uses_depth(&self) -> bool {
        Synthetic::uses_depth(self)
    }

    fn needs_text(&self) -> bool {
        Synthetic::needs_text(self)
    }

    fn as_synthetic(&self) -> Option<&dyn Synthetic> {
        Some(self)
    }

    fn run(&self, case: &Case, ctx: &TaskContext, engine: &mut Engine) -> Result<Outcome> {
        let prompt = self.synthesise(case, ctx)?;
        let output = engine.complete(&prompt.tokens, prompt.question_at, prompt.max_new_tokens)?;
        Ok(Outcome {
            score: Some(self.score(&prompt, &output)),
            output: Some(output),
            expected: prompt.answers.clone(),
            prompt_tokens: prompt.tokens.len(),
            ..Outcome::default()
        })
    }
}

/// A task name, what it measures, and how to build it from a spec.
pub struct TaskEntry {
    pub name: &'static str,
    pub about: &'static str,
    pub build: fn(&SpecPart) -> Result<Box<dyn Task>>,
}

/// Every task `longctx eval` knows. RULER's named NIAH variants are presets of `niah`.
pub const REGISTRY: &[TaskEntry] = &[
    tasks::passkey::ENTRY,
    tasks::niah::ENTRY,
    tasks::ppl::ENTRY,
    tasks::mecw::ENTRY,
    tasks::vt::ENTRY,
    tasks::cwe::ENTRY,
    tasks::fwe::ENTRY,
    tasks::threads::ENTRY,
];

/// The task a spec names, with its parameters checked.
pub fn task_from_spec(spec: &Spec) -> Result<Box<dyn Task>> {
    let [part] = spec.parts.as_slice() else {
        return Err(EvalError::Invalid(format!(
            "`{spec}` names several tasks; run one task at a time"
        )));
    };
    if let Some(entry) = REGISTRY.iter().find(|e| e.name == part.name) {
        return (entry.build)(part);
    }
    if let Some(preset) = tasks::niah::preset(part)? {
        return Ok(preset);
    }
    let mut known: Vec<&str> = REGISTRY.iter().map(|e| e.name).collect();
    known.extend(tasks::niah::PRESETS.iter().map(|(name, _)| *name));
    Err(longctx::Error::UnknownMethod {
        kind: "task",
        name: part.name.clone(),
        known: known.join(", "),
    }
    .into())
}

/// What the tests of every task share: the tiny random-weight model of the engine's fixtures
/// (byte-level vocabulary, so about one token per byte) and a context around it.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn tiny_model() -> Arc<Model> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/models/llama-q4_1.gguf"
        );
        Model::load(std::path::Path::new(path)).expect("the tiny fixture model loads")
    }

    /// A session of `n_ctx` tokens on the context's model.
    pub fn session(ctx: &TaskContext, n_ctx: usize) -> Session {
        Session::new(
            ctx.model.clone(),
            longctx::session::SessionOptions {
                n_ctx,
                threads: 2,
                ..Default::default()
            },
        )
        .expect("a session on the tiny model")
    }

    pub fn context(text: Option<NaturalText>) -> TaskContext {
        TaskContext {
            model: tiny_model(),
            chat: None,
            text: text.map(Arc::new),
            seed: 42,
        }
    }

    /// Checks a synthesised prompt: its length is the case's to within 1% and never above it,
    /// every answer is in it, and the first answer sits at the case's depth to within
    /// `depth_tolerance` percentage points of the prompt.
    pub fn check_prompt(ctx: &TaskContext, case: &Case, prompt: &Prompt, depth_tolerance: f64) {
        let total = prompt.tokens.len() + prompt.max_new_tokens;
        assert!(total <= case.length, "{case:?}: {total} tokens");
        assert!(
            total as f64 >= 0.99 * case.length as f64,
            "{case:?}: only {total} tokens"
        );
        let text = ctx.model.tokenizer.decode(&prompt.tokens);
        for answer in &prompt.answers {
            assert!(text.contains(answer.as_str()), "{case:?}: {answer} missing");
        }
        if let Some(depth) = case.depth {
            let at = prompt
                .answer_at
                .expect("a task with depths reports where the answer is");
            let placed = 100.0 * at as f64 / prompt.tokens.len() as f64;
            assert!(
                (placed - depth).abs() <= depth_tolerance,
                "{case:?}: answer at {placed:.1}% of the prompt"
            );
        }
    }
}
