//! Models: configuration read from GGUF metadata, weights mapped in place, and the forward pass.

mod attention;
mod config;
mod llama;
mod swiglu;

pub use attention::{attend, Reduction, MAX_HEAD_DIM};
pub use config::{Architecture, Config};
pub use llama::{forward, Chunk, LayerWeights, Scratch, Weights};
