//! Measuring the context window a model really uses: synthetic long-context tasks (passkey,
//! RULER's needle-in-a-haystack family, variable tracking, common and frequent words, needle
//! threading), perplexity against length, the maximum effective context window, a runner whose
//! results survive interruption, and reports with tables and plots.

pub mod fit;
pub mod plots;
pub mod report;
pub mod rope_search;
pub mod runner;
pub mod scoring;
pub mod task;
pub mod tasks;
pub mod text;
pub mod words;

pub use task::{task_from_spec, Case, Outcome, Prompt, Task, TaskContext};

/// Errors of the evaluation harness; engine errors pass through with their own message.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Engine(#[from] longctx::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, EvalError>;
