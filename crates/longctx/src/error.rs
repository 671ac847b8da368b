//! One error type for the library. Every message says what went wrong and what to do about it,
//! because the CLI prints it verbatim as the user's only clue.

use std::path::PathBuf;

/// Errors the engine reports to its callers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}; check that the path exists and is readable")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file ({detail}); pass a .gguf model file or a model name such as `smollm2`")]
    NotGguf { path: PathBuf, detail: String },
    #[error(
        "{path} is truncated: {detail}; the download or copy was cut short, fetch the model again"
    )]
    Truncated { path: PathBuf, detail: String },
    #[error("{path} is damaged: {detail}; the file was altered or not written by a GGUF converter, fetch or convert the model again")]
    Damaged { path: PathBuf, detail: String },
    #[error("unsupported model architecture `{0}`; longctx runs `llama` (Llama 2/3, Mistral, SmolLM), `qwen2` and `gemma3` models")]
    UnsupportedArchitecture(String),
    #[error("{tensor} uses weight type {dtype}, which longctx does not support; use a GGUF quantized as F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K")]
    UnsupportedWeightType {
        /// "tensor `name`".
        tensor: String,
        dtype: String,
    },
    #[error("the model file is missing {0}; the GGUF was written by an incompatible converter, re-convert it with a current llama.cpp")]
    MissingMetadata(String),
    #[error("tensor `{name}` has shape {actual:?} but the model configuration needs {expected:?}; the GGUF is inconsistent")]
    BadShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{0}` is not aligned in the file (its blocks need an even byte offset); re-convert the model with a current llama.cpp, which aligns tensors to 32 bytes")]
    Misaligned(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("the prompt is empty; give some text with --prompt or --file")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens plus {reserve} to generate, but the context holds {ctx}; shorten the prompt, lower --max-tokens, raise --ctx, or bound the cache with a KV policy (e.g. --kv snapkv:budget=1024)")]
    ContextOverflow {
        tokens: usize,
        reserve: usize,
        ctx: usize,
    },
    #[error("with --kv {policy} the cache would hold up to {peak} tokens (its budget, a prefill chunk and the tokens generated), but the context holds {ctx}; raise --ctx, lower the budget or --chunk, or lower --max-tokens")]
    PolicyOverflow {
        policy: String,
        peak: usize,
        ctx: usize,
    },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    BadToken { id: u32, vocab: usize },
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("unknown model `{name}`; known names: {known}, or pass a path to a .gguf file")]
    UnknownModel { name: String, known: String },
    #[error("cannot parse `{spec}`: {detail}; write it as name:key=value,… with several methods joined by +")]
    InvalidSpec { spec: String, detail: String },
    #[error("unknown {kind} `{name}`; available: {known}")]
    UnknownMethod {
        kind: &'static str,
        name: String,
        known: String,
    },
    #[error("a context of {n_ctx} tokens needs {need_mib} MiB of KV cache and buffers, but only {available_mib} MiB of memory is available; use a shorter context or a smaller KV cache type")]
    ContextTooLarge {
        n_ctx: usize,
        need_mib: usize,
        available_mib: usize,
    },
    #[error("could not fetch `{name}`: {detail}")]
    Fetch { name: String, detail: String },
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
