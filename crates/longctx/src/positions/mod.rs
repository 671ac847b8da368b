//! Position schemes: how a token's position becomes a rotation of its query and key.
//!
//! Every scheme from the literature (PI, NTK, YaRN, LongRoPE, Self-Extend, …) changes one of
//! three things, which is all this seam exposes: the rotary frequency of each dimension pair, a
//! temperature on the attention logits, and which position a query or key is seen at. The
//! forward pass asks the scheme, never a constant.

mod auto;
mod dynamic;
mod far;
mod linear;
mod llama3;
mod logn;
mod longrope;
mod ntk;
mod rope;
mod self_extend;
mod string;
mod yarn;

pub use auto::recommend;
pub use far::FarPositions;
pub use longrope::LongRopeFactors;
pub use rope::{ModelRope, RopeStyle};
pub use self_extend::GroupBlocks;

use crate::session::Model;
use std::ops::Bound;

use crate::spec::{Params, Spec, SpecPart, MAX_TOKENS};
use crate::{Error, Result};

/// Every scheme `--rope` can name, with what it does, for `--help` and error messages.
pub const SCHEMES: &[(&str, &str)] = &[
    ("none", "the model's own RoPE (default)"),
    ("linear", "Position Interpolation: factor"),
    ("ntk", "static NTK-aware base scaling: factor"),
    ("dynamic", "dynamic NTK, base recomputed as the sequence grows: factor"),
    ("yarn", "YaRN: factor, original_max_position_embeddings, beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim"),
    ("llama3", "Llama-3 frequency bands: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    ("longrope", "LongRoPE per-dimension factors: factors=FILE (JSON with short_factor, long_factor), n_hat"),
    ("self_extend", "Self-Extend bi-level attention: group, window (neighbour tokens), mode=exact|block (block: llama.cpp's one-map grouping between chunks); reaches (trained − window)·group + window"),
    ("string", "STRING, distant keys seen from shifted queries, within the trained length: shift, window, attention_factor"),
    ("logn", "log-length scaling of the queries past scale_base tokens; composes: yarn:factor=4+logn"),
    ("auto", "auto:LENGTH picks a scheme for a target length (below)"),
];

fn scheme_names() -> String {
    SCHEMES
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Replaces `auto:LENGTH` by the scheme [`recommend`] picks, so that what is recorded with a
/// result is what ran; any other spec comes back unchanged.
pub fn resolve(spec: &Spec, model: &Model) -> Result<Spec> {
    resolve_for(spec, model.trained_ctx())
}

fn resolve_for(spec: &Spec, trained_ctx: usize) -> Result<Spec> {
    let mut parts = Vec::with_capacity(spec.parts.len());
    for part in &spec.parts {
        if part.name != "auto" {
            parts.push(part.clone());
            continue;
        }
        let mut params = Params::new(part);
        let text: String = match params.raw("") {
            Some(text) => text.to_string(),
            None => params.required("length")?,
        };
        params.finish(&["LENGTH"])?;
        let length = crate::spec::parse_length(&text)
            .filter(|&l| l <= MAX_TOKENS)
            .ok_or_else(|| {
            Error::InvalidOption(format!(
                "`auto:{text}`: the target length must be a whole number of tokens, as 32768 or 32k, up to {MAX_TOKENS}"
            ))
        })?;
        parts.extend(recommend(length, trained_ctx).parts);
    }
    Ok(Spec { parts })
}

/// The position scheme a `--rope` spec selects for `model` in a context of `n_ctx` tokens.
pub fn scheme_for(spec: &Spec, model: &Model, n_ctx: usize) -> Result<Box<dyn PositionScheme>> {
    let base = Base {
        rope: model.rope(),
        trained_ctx: model.trained_ctx(),
    };
    build(spec, &base, n_ctx)
}

/// The scheme `spec` selects over `base` for a context of `n_ctx` tokens.
pub fn build(spec: &Spec, base: &Base, n_ctx: usize) -> Result<Box<dyn PositionScheme>> {
    let spec = resolve_for(spec, base.trained_ctx)?;
    let (logn, frequency): (Vec<&SpecPart>, Vec<&SpecPart>) =
        spec.parts.iter().partition(|p| p.name == "logn");
    if logn.len() > 1 || frequency.len() > 1 {
        return Err(Error::InvalidOption(format!(
            "`{spec}` combines {} frequency schemes; use one, optionally with `+logn`",
            frequency.len().max(1)
        )));
    }
    let none = SpecPart {
        name: "none".into(),
        params: Vec::new(),
    };
    let part = frequency.first().copied().unwrap_or(&none);
    let mut scheme = frequency_scheme(part, base, n_ctx)?;
    if let Some(reach) = scheme.reach() {
        if n_ctx > reach {
            let remedy = if part.params.iter().any(|(k, _)| k == "factor") {
                format!(
                    "raise its factor to at least {:.2}",
                    n_ctx as f64 / base.trained_ctx as f64
                )
            } else {
                format!(
                    "use factors made for {n_ctx} tokens (longctx rope-search --target {n_ctx})"
                )
            };
            return Err(Error::InvalidOption(format!(
                "`{part}` reaches {reach} tokens, but the context is {n_ctx}; {remedy} or shorten the context"
            )));
        }
    }
    if let Some(part) = logn.first() {
        scheme = logn::build(part, base, scheme)?;
    }
    Ok(scheme)
}

/// What every scheme starts from: the model's own RoPE and its trained length.
pub struct Base {
    pub rope: ModelRope,
    pub trained_ctx: usize,
}

fn frequency_scheme(part: &SpecPart, base: &Base, n_ctx: usize) -> Result<Box<dyn PositionScheme>> {
    match part.name.as_str() {
        "none" => {
            Params::new(part).finish(&[])?;
            Ok(Box::new(base.rope.clone()))
        }
        "linear" => linear::build(part, base),
        "ntk" => ntk::build(part, base),
        "dynamic" => dynamic::build(part, base),
        "yarn" => yarn::build(part, base),
        "llama3" => llama3::build(part, base),
        "longrope" => longrope::build(part, base, n_ctx),
        "self_extend" => self_extend::build(part, base, n_ctx),
        "string" => string::build(part, base, n_ctx),
        other => Err(Error::UnknownMethod {
            kind: "position scheme",
            name: other.to_string(),
            known: scheme_names(),
        }),
    }
}

/// `factor`, which every scaling scheme takes. It must stretch, not shrink: a factor below 1
/// would squeeze the trained length (PI, NTK, YaRN and Llama 3 all define it as target over
/// trained length, at least 1), and 1024 is far past any stretch in the literature (YaRN's
/// largest is 32).
fn scale_factor(params: &mut Params) -> Result<f64> {
    params.required_in("factor", 1.0..=1024.0)
}

/// The range of an attention factor (a factor on cos/sin): positive; 16 would multiply the
/// logits by 256, far past the 1.1 to 1.4 the papers use.
const ATTENTION_FACTOR: (Bound<f64>, Bound<f64>) = (Bound::Excluded(0.0), Bound::Included(16.0));

/// `original_max_position_embeddings`, the length the model was trained on, by default read
/// from the model file.
fn original_length(params: &mut Params, base: &Base) -> Result<usize> {
    params.get_in(
        "original_max_position_embeddings",
        base.trained_ctx,
        1..=MAX_TOKENS,
    )
}

/// A way to turn positions into rotary angles.
pub trait PositionScheme: Send + Sync {
    /// Angular frequency (radians per position) of each rotated dimension pair, `rot_dims / 2`
    /// values written into `out`, for a sequence currently `seq_len` tokens long (dynamic schemes
    /// depend on it). Writes into a caller's buffer so decoding allocates nothing.
    fn frequencies(&self, seq_len: usize, out: &mut Vec<f64>);
    /// Factor on cos/sin (YaRN's mscale); the attention logits scale by its square.
    fn attention_factor(&self) -> f32 {
        1.0
    }
    /// True when [`PositionScheme::frequencies`] changes with the sequence length: the session
    /// then re-rotates cached keys whenever it does, so queries and keys always agree.
    fn varies_with_length(&self) -> bool {
        false
    }
    /// The longest context the scheme is meant to reach; None when it sets no limit.
    fn reach(&self) -> Option<usize> {
        None
    }
    /// How distant keys are seen, for schemes with a second, far attention (Self-Extend,
    /// STRING); None when every key is seen where it was cached.
    fn far(&self) -> Option<FarPositions> {
        None
    }
    /// How cached tokens are regrouped between chunks, for schemes that move them (Self-Extend's
    /// block mode); None when tokens keep the positions they were cached at.
    fn group_blocks(&self) -> Option<GroupBlocks> {
        None
    }
    /// The model's RoPE that this scheme changes, if any: where the scheme's frequencies come
    /// out as its own, with no attention factor, the default [`PositionScheme::fill_table`] leaves
    /// the rotations to it, so that factor 1 is `none` exactly.
    fn model_rope(&self) -> Option<&ModelRope> {
        None
    }
    /// Fills `table` with cos/sin for `positions`. The default forms angles from
    /// [`PositionScheme::frequencies`] in f64, or takes the model's own arithmetic where they are
    /// its own (see [`PositionScheme::model_rope`]); a scheme may override it to reproduce a
    /// peer's arithmetic exactly. `freqs` is scratch.
    fn fill_table(
        &self,
        positions: &[i32],
        seq_len: usize,
        freqs: &mut Vec<f64>,
        table: &mut RotaryTable,
    ) {
        self.frequencies(seq_len, freqs);
        let factor = self.attention_factor();
        match self.model_rope() {
            Some(rope) if factor == 1.0 && rope.gives(freqs) => {
                rope.fill_table(positions, seq_len, freqs, table)
            }
            _ => table.fill(positions, freqs, factor),
        }
    }
}

/// Cos/sin of every (position, pair) needed by one forward call, computed once and shared by all
/// layers and heads.
#[derive(Default)]
pub struct RotaryTable {
    /// `[positions, pairs]`.
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub pairs: usize,
    /// Factor on each position's query after rotation (log-n scaling); empty means 1.
    pub query_scale: Vec<f32>,
}

impl RotaryTable {
    /// Fills the table for `positions` with the given frequencies and cos/sin factor. Angles are
    /// formed in f64 so that positions in the hundreds of thousands keep full f32 accuracy.
    pub fn fill(&mut self, positions: &[i32], freqs: &[f64], factor: f32) {
        self.pairs = freqs.len();
        self.cos.clear();
        self.sin.clear();
        self.query_scale.clear();
        for &p in positions {
            for &f in freqs {
                let angle = p as f64 * f;
                self.cos.push(angle.cos() as f32 * factor);
                self.sin.push(angle.sin() as f32 * factor);
            }
        }
    }

    /// Starts an empty table of `pairs` pairs per position, for schemes that fill it themselves.
    pub fn clear(&mut self, pairs: usize) {
        self.pairs = pairs;
        self.cos.clear();
        self.sin.clear();
        self.query_scale.clear();
    }

    /// Rotates one query head for the `row`-th position and applies that position's query scale.
    pub fn rotate_query(&self, x: &mut [f32], row: usize, style: RopeStyle) {
        self.rotate(x, row, style);
        if let Some(&factor) = self.query_scale.get(row) {
            if factor != 1.0 {
                x.iter_mut().for_each(|v| *v *= factor);
            }
        }
    }

    /// Rotates one head vector `x` (`head_dim` values, the first `2·pairs` rotated) for the
    /// `row`-th position of the table.
    pub fn rotate(&self, x: &mut [f32], row: usize, style: RopeStyle) {
        #[cfg(target_arch = "x86_64")]
        if crate::quant::has_avx2() {
            // SAFETY: the CPU has FMA.
            return unsafe { self.rotate_fma(x, row, style) };
        }
        self.rotate_portable(x, row, style);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "fma")]
    unsafe fn rotate_fma(&self, x: &mut [f32], row: usize, style: RopeStyle) {
        self.rotate_portable(x, row, style);
    }

    /// x0' = x0·cos − x1·sin and x1' = x0·sin + x1·cos, each with one fused multiply-add as
    /// llama.cpp's compiled rope kernel does, so rotated keys match it bit for bit.
    #[inline(always)]
    fn rotate_portable(&self, x: &mut [f32], row: usize, style: RopeStyle) {
        let cos = &self.cos[row * self.pairs..(row + 1) * self.pairs];
        let sin = &self.sin[row * self.pairs..(row + 1) * self.pairs];
        let (stride, span) = match style {
            // Llama GGUFs: the converter permuted q/k so that pairs are adjacent values.
            RopeStyle::Normal => (2, 1),
            // Qwen2 and HF-layout models: pair i is (i, i + rot_dims/2).
            RopeStyle::Neox => (1, self.pairs),
        };
        for i in 0..self.pairs {
            let (j, k) = (i * stride, i * stride + span);
            let (a, b) = (x[j], x[k]);
            x[j] = a.mul_add(cos[i], -(b * sin[i]));
            x[k] = a.mul_add(sin[i], b * cos[i]);
        }
    }
}

/// A plain RoPE of `dims` rotated dimensions with `base`, trained on `trained_ctx` tokens: what
/// the schemes' unit tests build on.
#[cfg(test)]
fn test_base(base: f64, dims: usize, trained_ctx: usize) -> Base {
    Base {
        rope: ModelRope {
            base,
            dims,
            freq_factors: None,
            linear_factor: 1.0,
        },
        trained_ctx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(base: f64, dims: usize, trained_ctx: usize) -> Base {
        test_base(base, dims, trained_ctx)
    }

    fn smollm2() -> Base {
        base(100000.0, 64, 8192)
    }

    fn scheme(spec: &str, base: &Base, n_ctx: usize) -> Result<Box<dyn PositionScheme>> {
        build(&spec.parse().unwrap(), base, n_ctx)
    }

    /// Every frequency scheme against HF transformers' formulas
    /// (`tests/fixtures/rope/make_rope.py`).
    #[test]
    fn frequency_tables_and_attention_factors_match_hf_transformers() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../../../tests/fixtures/rope/rope.json"))
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut checked = 0;
        for case in fixture["cases"].as_array().unwrap() {
            let model = &fixture["models"][case["model"].as_str().unwrap()];
            let b = base(
                model["base"].as_f64().unwrap(),
                model["dim"].as_u64().unwrap() as usize,
                model["trained"].as_u64().unwrap() as usize,
            );
            let mut spec = case["spec"].as_str().unwrap().to_string();
            if let Some(factors) = case.get("factors") {
                let file = dir.path().join("factors.json");
                std::fs::write(&file, factors.to_string()).unwrap();
                spec = spec.replace("FILE", file.to_str().unwrap());
            }
            let n_ctx = case["n_ctx"].as_u64().unwrap() as usize;
            let seq_len = case["seq_len"].as_u64().unwrap() as usize;
            let s = scheme(&spec, &b, n_ctx).unwrap_or_else(|e| panic!("{spec}: {e}"));
            let mut ours = Vec::new();
            s.frequencies(seq_len, &mut ours);
            let hf: Vec<f64> = case["inv_freq"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(ours.len(), hf.len(), "{spec}");
            for (i, (a, b)) in ours.iter().zip(&hf).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs(),
                    "{} {spec} at {seq_len}: pair {i}: ours {a}, HF {b}",
                    case["model"]
                );
            }
            let af = case["attention_factor"].as_f64().unwrap();
            assert!(
                (s.attention_factor() as f64 - af).abs() < 1e-6,
                "{spec}: attention factor {} vs HF {af}",
                s.attention_factor()
            );
            checked += 1;
        }
        assert_eq!(checked, 44);
    }

    /// Issue 19, item 7: `--help` says factor 1 leaves the model as trained, so every scheme at
    /// its identity setting must give the rotations `none` gives, bit for bit; the plain RoPE
    /// reproduces llama.cpp's f32 arithmetic, which a table formed in f64 misses by last bits
    /// that move the first token's logprob by 0.15 on SmolLM2.
    #[test]
    fn schemes_at_their_identity_setting_rotate_as_the_model_does_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let positions: Vec<i32> = (0..8192).step_by(7).collect();
        for b in [
            smollm2(),
            base(10000.0, 64, 8192),
            base(1_000_000.0, 64, 8192),
            base(500000.0, 32, 8192),
        ] {
            let ones = dir.path().join(format!("ones{}.json", b.rope.dims));
            let pairs = b.rope.dims / 2;
            LongRopeFactors {
                short_factor: vec![1.0; pairs],
                long_factor: vec![1.0; pairs],
                original_max_position_embeddings: None,
                max_position_embeddings: None,
            }
            .save(&ones)
            .unwrap();
            let mut own = RotaryTable::default();
            scheme("none", &b, 8192).unwrap().fill_table(
                &positions,
                8192,
                &mut Vec::new(),
                &mut own,
            );
            for spec in [
                "linear:factor=1".to_string(),
                "ntk:factor=1".into(),
                "yarn:factor=1".into(),
                "yarn:factor=1,beta_fast=16,beta_slow=2".into(),
                "llama3:factor=1".into(),
                "dynamic:factor=1".into(),
                "dynamic:factor=4".into(),
                format!("longrope:factors={}", ones.display()),
            ] {
                let mut table = RotaryTable::default();
                scheme(&spec, &b, 8192).unwrap().fill_table(
                    &positions,
                    8192,
                    &mut Vec::new(),
                    &mut table,
                );
                let same = |a: &[f32], b: &[f32]| {
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                };
                assert!(
                    same(&table.cos, &own.cos) && same(&table.sin, &own.sin),
                    "{spec} (base {}) rotates otherwise than none",
                    b.rope.base
                );
            }
        }
    }

    #[test]
    fn yarn_correction_range_is_the_published_llama2_one() {
        assert_eq!(
            yarn::correction_range(32.0, 1.0, 128, 10000.0, 4096),
            (20.0, 46.0)
        );
        assert!((yarn::mscale(4.0, 1.0) - 1.1386).abs() < 1e-4);
    }

    #[test]
    fn log_n_scales_queries_only_past_the_scale_base() {
        let s = scheme("linear:factor=2+logn:scale_base=100", &smollm2(), 16384).unwrap();
        let mut table = RotaryTable::default();
        let mut freqs = Vec::new();
        s.fill_table(&[0, 99, 9999], 10000, &mut freqs, &mut table);
        assert_eq!(table.query_scale[..2], [1.0, 1.0]);
        assert!((table.query_scale[2] - 2.0).abs() < 1e-6);
        let mut linear = Vec::new();
        scheme("linear:factor=2", &smollm2(), 16384)
            .unwrap()
            .frequencies(0, &mut linear);
        assert_eq!(freqs, linear);
        let mut q = [1.0f32, 0.0];
        table.pairs = 1;
        table.cos = vec![1.0; 3];
        table.sin = vec![0.0; 3];
        table.rotate_query(&mut q, 2, RopeStyle::Normal);
        assert!((q[0] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn longrope_keeps_the_first_n_hat_positions_unscaled() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.json");
        LongRopeFactors {
            short_factor: vec![1.0; 32],
            long_factor: vec![4.0; 32],
            original_max_position_embeddings: None,
            max_position_embeddings: None,
        }
        .save(&file)
        .unwrap();
        let spec = format!("longrope:factors={},n_hat=4", file.display());
        let s = scheme(&spec, &smollm2(), 32768).unwrap();
        let mut table = RotaryTable::default();
        s.fill_table(&[3, 8], 32768, &mut Vec::new(), &mut table);
        let af = s.attention_factor();
        let expected_af = (1.0f64 + 4f64.ln() / 8192f64.ln()).sqrt() as f32;
        assert!((af - expected_af).abs() < 1e-6);
        // Pair 0 has θ = 1: position 3 keeps it, position 8 is divided by 4.
        assert!((table.cos[0] - 3f64.cos() as f32 * af).abs() < 1e-6);
        assert!((table.cos[32] - 2f64.cos() as f32 * af).abs() < 1e-6);
        // A short context takes the short factors.
        let mut f = Vec::new();
        scheme(&spec, &smollm2(), 4096)
            .unwrap()
            .frequencies(0, &mut f);
        assert_eq!(f[0], 1.0);
    }

    #[test]
    fn dynamic_ntk_is_the_model_rope_until_the_trained_length() {
        let b = smollm2();
        let s = scheme("dynamic:factor=2", &b, 65536).unwrap();
        assert!(s.varies_with_length());
        let (mut at_trained, mut own, mut past) = (Vec::new(), Vec::new(), Vec::new());
        s.frequencies(8192, &mut at_trained);
        b.rope.frequencies(0, &mut own);
        assert_eq!(at_trained, own);
        s.frequencies(16384, &mut past);
        // n = 2L, s = 2: the base grows by 3^(d/(d−2)), so the slowest pair slows down.
        assert!(past[31] < own[31] && past[0] == own[0]);
    }

    #[test]
    fn bad_schemes_and_parameters_say_what_is_wrong() {
        let b = smollm2();
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.json");
        std::fs::write(
            &short,
            r#"{"short_factor":[1.0,1.0],"long_factor":[1.0,1.0]}"#,
        )
        .unwrap();
        let below = dir.path().join("below.json");
        let mut factors = vec![1.0; 32];
        factors[5] = 0.5;
        LongRopeFactors {
            short_factor: factors.clone(),
            long_factor: factors,
            original_max_position_embeddings: None,
            max_position_embeddings: None,
        }
        .save(&below)
        .unwrap();
        let foreign = dir.path().join("foreign.json");
        std::fs::write(&foreign, "{\"hello\": 1}").unwrap();
        let made_for_16k = dir.path().join("16k.json");
        LongRopeFactors {
            short_factor: vec![1.0; 32],
            long_factor: vec![2.0; 32],
            original_max_position_embeddings: Some(8192),
            max_position_embeddings: Some(16384),
        }
        .save(&made_for_16k)
        .unwrap();
        for (spec, needle) in [
            (
                format!("longrope:factors={}", made_for_16k.display()),
                "reaches 16384 tokens, but the context is 32768; use factors made for 32768 tokens",
            ),
            (
                "rerope:factor=2".to_string(),
                "unknown position scheme `rerope`; available: none, linear",
            ),
            (
                "yarn:facter=2".into(),
                "`yarn` needs `factor=…` (given: `facter`)",
            ),
            ("yarn:factor=2,beta=3".into(), "no parameter `beta`"),
            ("yarn".into(), "`yarn` needs `factor=…`"),
            (
                "linear:factor=0.5".into(),
                "factor must be a number between 1 and 1024 (got 0.5)",
            ),
            ("ntk:factor=two".into(), "must be a number"),
            (
                "yarn:factor=2".into(),
                "reaches 16384 tokens, but the context is 32768; raise its factor to at least 4",
            ),
            ("yarn:factor=2,beta_fast=1,beta_slow=2".into(), "beta_fast"),
            (
                "yarn:factor=4+linear:factor=4".into(),
                "one, optionally with `+logn`",
            ),
            ("logn:scale_base=1".into(), "between 2 and 16777216 (got 1)"),
            (
                format!("longrope:factors={}", short.display()),
                "has 2 factors, but the model rotates 32",
            ),
            (format!("longrope:factors={}", below.display()), "holds 0.5"),
            (
                format!("longrope:factors={}", foreign.display()),
                "is not a LongRoPE factors file",
            ),
            (
                "longrope:factors=/no/such/file.json".into(),
                "cannot read /no/such/file.json",
            ),
            ("auto:12q".into(), "whole number of tokens, as 32768 or 32k"),
        ] {
            let err = match scheme(&spec, &b, 32768) {
                Ok(_) => panic!("{spec} was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }

    #[test]
    fn auto_resolves_to_a_concrete_scheme() {
        let spec: Spec = "auto:32768".parse().unwrap();
        assert_eq!(spec.to_string(), "auto:32768");
        assert_eq!(
            resolve_for(&spec, 8192).unwrap().to_string(),
            "yarn:factor=4"
        );
        let s = scheme("auto:32768+logn", &smollm2(), 32768).unwrap();
        assert!((s.attention_factor() - 1.1386).abs() < 1e-4);
    }

    #[test]
    fn rotation_preserves_norm_and_matches_complex_multiplication() {
        let mut t = RotaryTable::default();
        t.fill(&[0, 7], &[1.0, 0.1], 1.0);
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut y = x;
        t.rotate(&mut y, 0, RopeStyle::Normal);
        assert_eq!(y, x);
        t.rotate(&mut y, 1, RopeStyle::Normal);
        let (c, s) = (7f64.cos() as f32, 7f64.sin() as f32);
        assert!((y[0] - (1.0 * c - 2.0 * s)).abs() < 1e-6);
        assert!((y[1] - (1.0 * s + 2.0 * c)).abs() < 1e-6);
        let mut z = x;
        t.rotate(&mut z, 1, RopeStyle::Neox);
        assert!((z[0] - (1.0 * c - 3.0 * s)).abs() < 1e-6);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&y) - norm(&x)).abs() < 1e-4);
    }
}
