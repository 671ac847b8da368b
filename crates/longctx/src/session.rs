//! PLACEHOLDER: the engine's public API, bodies being written.

use std::path::Path;
use std::sync::Arc;

use crate::tokenizer::Tokenizer;
use crate::Result;

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F16,
    F32,
}

/// A loaded model: weights (memory-mapped, shared read-only), configuration and tokenizer.
pub struct Model {
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template` from the GGUF, if any.
    pub chat_template: Option<String>,
    /// Trained context length (`{arch}.context_length`).
    pub trained_ctx: usize,
}

impl Model {
    pub fn load(_path: &Path) -> Result<Arc<Model>> {
        unimplemented!()
    }
}

/// How a session is set up.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Context size in tokens; 0 means the model's trained length.
    pub n_ctx: usize,
    pub kv_dtype: KvDtype,
    /// Tokens per prefill chunk.
    pub chunk_size: usize,
    /// Worker threads for the forward pass.
    pub threads: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            n_ctx: 0,
            kv_dtype: KvDtype::F16,
            chunk_size: 512,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// One sequence being processed: a KV cache and scratch buffers over a shared model.
pub struct Session {
    pub model: Arc<Model>,
}

impl Session {
    pub fn new(_model: Arc<Model>, _opts: SessionOptions) -> Result<Self> {
        unimplemented!()
    }
    /// Feeds tokens (chunked); returns the logits of the last one.
    pub fn prefill(&mut self, _tokens: &[u32]) -> Result<&[f32]> {
        unimplemented!()
    }
    /// Feeds tokens and returns logits for every one of them, row-major `[tokens, vocab]`.
    pub fn prefill_all_logits(&mut self, _tokens: &[u32]) -> Result<Vec<f32>> {
        unimplemented!()
    }
    /// Feeds one token; returns its logits.
    pub fn decode(&mut self, _token: u32) -> Result<&[f32]> {
        unimplemented!()
    }
    /// Tokens in the cache.
    pub fn n_past(&self) -> usize {
        unimplemented!()
    }
    pub fn n_ctx(&self) -> usize {
        unimplemented!()
    }
    /// Bytes allocated for the KV cache.
    pub fn kv_bytes(&self) -> usize {
        unimplemented!()
    }
    /// Empties the cache.
    pub fn reset(&mut self) {
        unimplemented!()
    }
}
