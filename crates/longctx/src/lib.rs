//! longctx: a GGUF inference engine built to make a context window go further.
//!
//! The crate is organised around the seams described in `DESIGN.md`: the model forward pass
//! (`model`), the KV cache (`kv`), position schemes (`positions`), the tokenizer (`tokenizer`)
//! and the session that wires them together (`session`).

pub mod chat;
pub mod error;
pub mod fetch;
pub mod files;
pub mod generate;
pub mod gguf;
pub mod kv;
pub mod model;
pub mod positions;
pub mod quant;
pub mod sampling;
pub mod session;
pub mod spec;
pub mod threads;
pub mod tokenizer;

pub use error::{Error, Result};
