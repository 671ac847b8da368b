//! LongRoPE (Ding et al., "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens",
//! arXiv:2402.13753): every dimension pair has its own rescale factor λ_i, θ'_i = θ_i / λ_i,
//! found by search (`longctx rope-search`) or shipped with a model (Phi-3's `short_factor` and
//! `long_factor`). Tokens before position n̂ keep the original RoPE (the paper's Eq. 3).
//!
//! HF switches between the short and long sets per forward pass, which leaves keys cached under
//! one set attended by queries under the other; like llama.cpp, the set is chosen once here, from
//! the session's context size: long when it exceeds the original length.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{Base, ModelRope, PositionScheme, RotaryTable, ATTENTION_FACTOR};
use crate::spec::{Params, SpecPart, MAX_TOKENS};
use crate::{Error, Result};

/// A factors file: HF `rope_scaling` field names, at the top level or inside `rope_scaling` (so a
/// model's `config.json` works as it is).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongRopeFactors {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// The length the long factors were made for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct ConfigJson {
    rope_scaling: LongRopeFactors,
    original_max_position_embeddings: Option<usize>,
    max_position_embeddings: Option<usize>,
}

/// A file's length and modification time, when the file system tells them.
type Stamp = Option<(u64, Option<std::time::SystemTime>)>;

/// Far above any factors file (two lists of a few hundred numbers, or a model's config.json).
const FACTORS_LIMIT: u64 = 4 * crate::files::MIB;

impl LongRopeFactors {
    pub fn load(path: &Path) -> Result<Self> {
        // A server checks a request's settings before it queues it and builds them again to
        // run it: the file's content is read once, and again only once the file has changed.
        static LOADED: Mutex<Vec<(PathBuf, Stamp, LongRopeFactors)>> = Mutex::new(Vec::new());
        let what = "a LongRoPE factors file";
        let file = crate::files::open_regular(path, what)?;
        let stamp = file.metadata().map(|m| (m.len(), m.modified().ok())).ok();
        let loaded = |l: &(PathBuf, Stamp, LongRopeFactors)| l.0 == path && l.1 == stamp;
        let mut cache = LOADED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, _, factors)) = cache.iter().find(|l| loaded(l)) {
            return Ok(factors.clone());
        }
        let bytes = crate::files::read_open(file, path, FACTORS_LIMIT, what)?;
        let factors = Self::parse(path, &String::from_utf8_lossy(&bytes))?;
        cache.retain(|l| l.0 != path);
        if stamp.is_some() {
            cache.push((path.to_path_buf(), stamp, factors.clone()));
        }
        Ok(factors)
    }

    fn parse(path: &Path, text: &str) -> Result<Self> {
        let bad = |detail: String| {
            Error::InvalidOption(format!(
                "{} is not a LongRoPE factors file ({detail}); it needs `short_factor` and `long_factor` lists, as `longctx rope-search` writes them or as a model's config.json holds them under `rope_scaling`",
                path.display()
            ))
        };
        if let Ok(factors) = serde_json::from_str::<LongRopeFactors>(text) {
            return Ok(factors);
        }
        match serde_json::from_str::<ConfigJson>(text) {
            Ok(config) => Ok(LongRopeFactors {
                original_max_position_embeddings: config
                    .rope_scaling
                    .original_max_position_embeddings
                    .or(config.original_max_position_embeddings),
                max_position_embeddings: config
                    .rope_scaling
                    .max_position_embeddings
                    .or(config.max_position_embeddings),
                ..config.rope_scaling
            }),
            Err(e) => Err(bad(e.to_string())),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("plain data serialises");
        std::fs::write(path, text + "\n").map_err(|source| Error::Io {
            path: PathBuf::from(path),
            source,
        })
    }

    /// Checks the factors against a model with `pairs` rotated pairs.
    pub fn check(&self, pairs: usize, origin: &str) -> Result<()> {
        for (name, list) in [
            ("short_factor", &self.short_factor),
            ("long_factor", &self.long_factor),
        ] {
            if list.len() != pairs {
                return Err(Error::InvalidOption(format!(
                    "{origin}: `{name}` has {} factors, but the model rotates {pairs} dimension pairs; the file was made for another model",
                    list.len()
                )));
            }
            if let Some(bad) = list.iter().find(|f| !(**f >= 1.0 && f.is_finite())) {
                return Err(Error::InvalidOption(format!(
                    "{origin}: `{name}` holds {bad}; every factor must be at least 1 (1 keeps a dimension as trained)"
                )));
            }
        }
        Ok(())
    }
}

pub struct LongRope {
    rope: ModelRope,
    /// λ_i of the chosen set.
    factors: Vec<f64>,
    n_hat: i32,
    attention_factor: f32,
    reach: Option<usize>,
}

/// The attention factor HF derives from the stretch s = target / original: sqrt(1 + ln s / ln L).
pub fn attention_factor(stretch: f64, original: usize) -> f64 {
    if stretch <= 1.0 {
        1.0
    } else {
        (1.0 + stretch.ln() / (original as f64).ln()).sqrt()
    }
}

pub fn build(part: &SpecPart, base: &Base, n_ctx: usize) -> Result<Box<dyn PositionScheme>> {
    let mut params = Params::new(part);
    let file: String = params.required("factors")?;
    let n_hat: i32 = params.get_in("n_hat", 0, 0..=MAX_TOKENS as i32)?;
    let attention: Option<f64> = params.optional_in("attention_factor", ATTENTION_FACTOR)?;
    params.finish(&["factors", "n_hat", "attention_factor"])?;
    let factors = LongRopeFactors::load(Path::new(&file))?;
    factors.check(base.rope.dims / 2, &file)?;
    Ok(Box::new(LongRope::new(
        &factors, base, n_ctx, n_hat, attention,
    )))
}

impl LongRope {
    pub fn new(
        factors: &LongRopeFactors,
        base: &Base,
        n_ctx: usize,
        n_hat: i32,
        attention: Option<f64>,
    ) -> Self {
        let original = factors
            .original_max_position_embeddings
            .unwrap_or(base.trained_ctx);
        let chosen = if n_ctx > original {
            &factors.long_factor
        } else {
            &factors.short_factor
        };
        let target = factors.max_position_embeddings.unwrap_or(n_ctx);
        let attention_factor = attention
            .unwrap_or_else(|| attention_factor(target as f64 / original as f64, original));
        Self {
            rope: base.rope.clone(),
            factors: chosen.clone(),
            n_hat,
            attention_factor: attention_factor as f32,
            reach: factors.max_position_embeddings,
        }
    }
}

impl PositionScheme for LongRope {
    fn frequencies(&self, seq_len: usize, out: &mut Vec<f64>) {
        self.rope.frequencies(seq_len, out);
        for (f, lambda) in out.iter_mut().zip(&self.factors) {
            *f /= lambda;
        }
    }

    fn attention_factor(&self) -> f32 {
        self.attention_factor
    }

    fn reach(&self) -> Option<usize> {
        self.reach
    }

    /// Positions before n̂ take the unscaled frequencies; the attention factor applies to all.
    fn fill_table(
        &self,
        positions: &[i32],
        seq_len: usize,
        freqs: &mut Vec<f64>,
        table: &mut RotaryTable,
    ) {
        self.frequencies(seq_len, freqs);
        if self.attention_factor == 1.0 && self.rope.gives(freqs) {
            return self.rope.fill_table(positions, seq_len, freqs, table);
        }
        if positions.iter().all(|&p| p >= self.n_hat) {
            return table.fill(positions, freqs, self.attention_factor);
        }
        let mut original = Vec::new();
        self.rope.frequencies(seq_len, &mut original);
        table.clear(freqs.len());
        for &p in positions {
            let set = if p < self.n_hat { &original } else { &*freqs };
            for &f in set {
                let angle = p as f64 * f;
                table.cos.push(angle.cos() as f32 * self.attention_factor);
                table.sin.push(angle.sin() as f32 * self.attention_factor);
            }
        }
    }
}
