//! Hyper-parameters of a model, from `{arch}.*` GGUF metadata.

use crate::gguf::Gguf;
use crate::positions::RopeStyle;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, Mistral (without sliding window), SmolLM.
    Llama,
    /// Qwen2: llama with q/k/v biases and NeoX rotary pairs.
    Qwen2,
}

/// Shapes and constants of a model. Letters used in shape comments across the engine:
/// T tokens in a chunk, E `n_embd`, H `n_head`, Hkv `n_kv_head`, D `head_dim`, F `n_ff`, V `vocab`.
#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Architecture,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_base: f64,
    pub rope_dims: usize,
    pub rope_style: RopeStyle,
    /// Linear RoPE scaling declared in the file, 1 if none.
    pub rope_linear_factor: f64,
    /// Trained context length.
    pub context_length: usize,
}

impl Config {
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch_name = g.architecture()?;
        let arch = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            _ => return Err(Error::UnsupportedArchitecture(arch_name)),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let n_embd = g.get_usize(&key("embedding_length"))?;
        let n_head = g.get_usize(&key("attention.head_count"))?;
        let n_kv_head = g
            .get_usize(&key("attention.head_count_kv"))
            .unwrap_or(n_head);
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(Error::MissingMetadata(format!(
                "a valid head layout (found {n_head} query heads and {n_kv_head} KV heads)"
            )));
        }
        let head_dim = g
            .get_usize(&key("attention.key_length"))
            .unwrap_or(n_embd / n_head);
        if let Ok(sliding) = g.get_usize(&key("attention.sliding_window")) {
            return Err(Error::InvalidOption(format!(
                "this model uses sliding-window attention ({sliding} tokens), which longctx does not implement yet"
            )));
        }
        let rope_linear_factor = match g.get_str(&key("rope.scaling.type")) {
            Ok(t) if t == "none" => 1.0,
            Ok(t) if t == "linear" => g.get_f32(&key("rope.scaling.factor")).unwrap_or(1.0) as f64,
            Ok(t) => {
                return Err(Error::InvalidOption(format!(
                    "the file asks for `{t}` RoPE scaling, which longctx does not read from GGUF yet; convert without it"
                )))
            }
            Err(_) => 1.0,
        };
        let token_embd_rows = g.weight("token_embd.weight")?.rows;
        Ok(Self {
            arch,
            n_embd,
            n_layer: g.get_usize(&key("block_count"))?,
            n_head,
            n_kv_head,
            head_dim,
            n_ff: g.get_usize(&key("feed_forward_length"))?,
            vocab: g.get_usize(&key("vocab_size")).unwrap_or(token_embd_rows),
            rms_eps: g.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
            rope_base: g.get_f32(&key("rope.freq_base")).unwrap_or(10000.0) as f64,
            rope_dims: g
                .get_usize(&key("rope.dimension_count"))
                .unwrap_or(head_dim),
            rope_style: match arch {
                Architecture::Llama => RopeStyle::Normal,
                Architecture::Qwen2 => RopeStyle::Neox,
            },
            rope_linear_factor,
            context_length: g.get_usize(&key("context_length"))?,
        })
    }

    /// Values cached per token (keys and values, all layers).
    pub fn kv_values_per_token(&self) -> usize {
        2 * self.n_layer * self.n_kv_head * self.head_dim
    }
}
