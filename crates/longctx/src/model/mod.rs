//! Models: configuration read from GGUF metadata, weights mapped in place, and the forward pass.

mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_avx512;
mod config;
mod geglu;
mod llama;
mod swiglu;

pub use attention::{attend, FarQuery, Reduction, MAX_HEAD_DIM};
pub use config::{Architecture, Config, SlidingWindow};
pub use llama::{
    forward, forward_batch, Buffers, Chunk, FarScratch, LayerWeights, Scratch, Sequence, Sequences,
    Weights,
};
