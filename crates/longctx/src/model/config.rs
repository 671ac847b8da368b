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
    /// Gemma 3: q/k norms, post-attention and post-FFN norms, GeGLU, a scaled embedding, and
    /// sliding-window (local) layers between full-attention (global) ones.
    Gemma3,
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
    /// Sliding-window attention: which layers attend only a window, and their RoPE base.
    pub sliding: Option<SlidingWindow>,
    /// Multiplies the query after its rotation (Gemma 3: `query_pre_attn_scalar`^-½); the
    /// softmax then scales by 1, as llama.cpp splits it. None: the softmax scales by 1/√D.
    pub query_scale: Option<f32>,
    /// Multiplies the token embeddings (Gemma: √E).
    pub embed_scale: Option<f32>,
    /// `tanh(l / c)·c` on the logits (`final_logit_softcapping`), where the file sets it.
    pub final_softcap: Option<f32>,
}

/// Layers that attend only the last `window` positions (a key is hidden once it is `window` or
/// more positions behind the query), with the RoPE base those layers rotate with. Position
/// schemes leave them alone: they never see a distance past their window.
#[derive(Debug, Clone)]
pub struct SlidingWindow {
    pub window: usize,
    /// One entry per layer: true where the layer is local (sliding).
    pub local: Vec<bool>,
    pub rope_base: f64,
}

impl Config {
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch_name = g.architecture()?;
        let arch = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "gemma3" => Architecture::Gemma3,
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
        let n_layer = g.get_usize(&key("block_count"))?;
        // Each layer has several tensors: a count past the file's tensors cannot be met, and it
        // would otherwise size per-layer tables before the first missing tensor is noticed.
        let n_tensors = g.tensor_names().count();
        if n_layer == 0 || n_layer > n_tensors {
            return Err(Error::Damaged {
                path: g.path().to_path_buf(),
                detail: format!(
                    "`{}` is {n_layer}, but a model needs at least one layer and at most as many as its {n_tensors} tensors",
                    key("block_count")
                ),
            });
        }
        let sliding = match (arch, g.get_usize(&key("attention.sliding_window"))) {
            (Architecture::Gemma3, Ok(window)) => Some(SlidingWindow {
                window,
                local: local_layers(g, &key("attention.sliding_window_pattern"), n_layer)?,
                rope_base: g.get_f32(&key("rope.freq_base_swa")).unwrap_or(10000.0) as f64,
            }),
            (_, Ok(window)) => {
                return Err(Error::InvalidOption(format!(
                    "this {arch_name} model uses sliding-window attention ({window} tokens), which longctx runs for Gemma 3 only"
                )))
            }
            (_, Err(_)) => None,
        };
        let gemma = arch == Architecture::Gemma3;
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
            n_layer,
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
                Architecture::Qwen2 | Architecture::Gemma3 => RopeStyle::Neox,
            },
            rope_linear_factor,
            context_length: g.get_usize(&key("context_length"))?,
            sliding,
            // Gemma 3 scales queries by query_pre_attn_scalar^-½, which the GGUF does not carry:
            // it is the head size for every size but 27B, whose n_embd / n_head llama.cpp
            // recognises by its 62 layers.
            query_scale: gemma.then(|| {
                let scalar = if n_layer == 62 {
                    n_embd / n_head
                } else {
                    head_dim
                };
                1.0 / (scalar as f32).sqrt()
            }),
            embed_scale: gemma.then(|| (n_embd as f32).sqrt()),
            final_softcap: g
                .get_f32(&key("final_logit_softcapping"))
                .ok()
                .filter(|&c| c > 0.0),
        })
    }

    /// Whether `layer` attends only a sliding window.
    pub fn is_local(&self, layer: usize) -> bool {
        self.sliding.as_ref().is_some_and(|s| s.local[layer])
    }

    /// The sliding window of `layer`, if it has one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding
            .as_ref()
            .filter(|s| s.local[layer])
            .map(|s| s.window)
    }

    /// Values cached per token (keys and values, all layers), were every layer to hold every
    /// token.
    pub fn kv_values_per_token(&self) -> usize {
        2 * self.n_layer * self.n_kv_head * self.head_dim
    }
}

/// Which layers are local: the file's per-layer array, or its period n (every n-th layer is
/// global, the rest local; 0: all local), or llama.cpp's default for Gemma 3, a period of 6.
fn local_layers(g: &Gguf, key: &str, n_layer: usize) -> Result<Vec<bool>> {
    if let Ok(flags) = g.get_bool_array(key) {
        if flags.len() != n_layer {
            return Err(Error::MissingMetadata(format!(
                "`{key}` with one entry per layer ({n_layer}), found {}",
                flags.len()
            )));
        }
        return Ok(flags);
    }
    let period = g.get_usize(key).unwrap_or(6);
    Ok((0..n_layer)
        .map(|l| period == 0 || l % period < period - 1)
        .collect())
}
