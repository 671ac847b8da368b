//! Log-length attention scaling (Chiang & Cholak, "Overcoming a Theoretical Limitation of
//! Self-Attention", arXiv:2202.12172; used training-free as Self-Extend's `scale_base` and in
//! Entropy-ABF, arXiv:2401.07004): past `scale_base` tokens the query at position p is multiplied
//! by ln(p+1)/ln(scale_base), so attention entropy does not grow with the length. It composes
//! with any frequency scheme (`yarn:factor=4+logn`).

use super::{Base, FarPositions, GroupBlocks, PositionScheme, RotaryTable};
use crate::spec::{Params, SpecPart, MAX_TOKENS};
use crate::Result;

pub struct LogN {
    inner: Box<dyn PositionScheme>,
    ln_scale_base: f64,
}

pub fn build(
    part: &SpecPart,
    base: &Base,
    inner: Box<dyn PositionScheme>,
) -> Result<Box<dyn PositionScheme>> {
    let mut params = Params::new(part);
    // ln(scale_base) divides: 2 tokens is the least that gives a positive one.
    let scale_base: usize = params.get_in("scale_base", base.trained_ctx, 2..=MAX_TOKENS)?;
    params.finish(&["scale_base"])?;
    Ok(Box::new(LogN {
        inner,
        ln_scale_base: (scale_base as f64).ln(),
    }))
}

impl LogN {
    /// max(1, ln(p+1) / ln(scale_base)).
    pub fn query_scale(&self, position: i32) -> f32 {
        ((position as f64 + 1.0).ln() / self.ln_scale_base).max(1.0) as f32
    }
}

impl PositionScheme for LogN {
    fn frequencies(&self, seq_len: usize, out: &mut Vec<f64>) {
        self.inner.frequencies(seq_len, out);
    }

    fn attention_factor(&self) -> f32 {
        self.inner.attention_factor()
    }

    fn varies_with_length(&self) -> bool {
        self.inner.varies_with_length()
    }

    fn reach(&self) -> Option<usize> {
        self.inner.reach()
    }

    fn far(&self) -> Option<FarPositions> {
        self.inner.far()
    }

    fn group_blocks(&self) -> Option<GroupBlocks> {
        self.inner.group_blocks()
    }

    fn fill_table(
        &self,
        positions: &[i32],
        seq_len: usize,
        freqs: &mut Vec<f64>,
        table: &mut RotaryTable,
    ) {
        self.inner.fill_table(positions, seq_len, freqs, table);
        table.query_scale.clear();
        table
            .query_scale
            .extend(positions.iter().map(|&p| self.query_scale(p)));
    }
}
