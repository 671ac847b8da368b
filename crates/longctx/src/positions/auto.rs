//! `--rope auto:LENGTH`: a scheme for a target length, from the model's trained length alone.
//!
//! The rule: within the trained length, the model's own RoPE (`none`); beyond it, YaRN with
//! factor = LENGTH / trained length, rounded up to a hundredth. YaRN is the scheme llama.cpp,
//! vLLM and HF all ship for training-free stretching, it leaves the short-range dimensions
//! untouched (so quality inside the trained window is kept) and, in the published comparisons
//! without fine-tuning (`../shared/research/context-extension.md`), it degrades most gently of
//! the frequency-only schemes. `docs/results/extension.md` measures whether this holds here.

use crate::spec::{Spec, SpecPart};

/// The scheme `auto` picks for `length` tokens on a model trained on `trained` tokens.
pub fn recommend(length: usize, trained: usize) -> Spec {
    if length <= trained || trained == 0 {
        return Spec::named("none");
    }
    let factor = (length as f64 / trained as f64 * 100.0).ceil() / 100.0;
    Spec {
        parts: vec![SpecPart {
            name: "yarn".into(),
            params: vec![("factor".into(), format_factor(factor))],
        }],
    }
}

fn format_factor(factor: f64) -> String {
    let text = format!("{factor:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_the_window_the_model_is_left_alone_and_beyond_it_yarn_stretches_to_the_target() {
        assert_eq!(recommend(4096, 8192).to_string(), "none");
        assert_eq!(recommend(8192, 8192).to_string(), "none");
        assert_eq!(recommend(32768, 8192).to_string(), "yarn:factor=4");
        assert_eq!(recommend(20000, 8192).to_string(), "yarn:factor=2.45");
    }
}
