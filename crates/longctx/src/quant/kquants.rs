//! K-quant weights (Q4_K, Q5_K, Q6_K) through candle's block types and its SIMD dot products
//! with Q8_K activations, which already match ggml's.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, GgmlType};

use super::WeightType;

/// Reinterprets bytes as blocks. The blocks are `repr(C)` with alignment ≤ 4, and both the
/// model map (GGUF aligns tensor data to 32) and activation rows (u32-backed) satisfy it.
fn as_blocks<T>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert_eq!(
        bytes.as_ptr() as usize % std::mem::align_of::<T>(),
        0,
        "misaligned quant block"
    );
    // SAFETY: alignment is checked above; the blocks are plain data valid for any bytes.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / size) }
}

fn as_blocks_mut<T>(bytes: &mut [u8]) -> &mut [T] {
    let size = std::mem::size_of::<T>();
    assert_eq!(
        bytes.as_ptr() as usize % std::mem::align_of::<T>(),
        0,
        "misaligned quant block"
    );
    // SAFETY: as above, and the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), bytes.len() / size) }
}

pub(super) fn quantize_act(x: &[f32], out: &mut [u8]) {
    let blocks = x.len() / 256;
    BlockQ8K::from_float(x, &mut as_blocks_mut::<BlockQ8K>(out)[..blocks]);
}

pub(super) fn dequantize(wtype: WeightType, w: &[u8], out: &mut [f32]) {
    match wtype {
        WeightType::Q4K => BlockQ4K::to_float(as_blocks(w), out),
        WeightType::Q5K => BlockQ5K::to_float(as_blocks(w), out),
        _ => BlockQ6K::to_float(as_blocks(w), out),
    }
}

pub(super) fn dot(wtype: WeightType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    let acts: &[BlockQ8K] = &as_blocks(a)[..cols / 256];
    match wtype {
        WeightType::Q4K => BlockQ4K::vec_dot(cols, as_blocks(w), acts),
        WeightType::Q5K => BlockQ5K::vec_dot(cols, as_blocks(w), acts),
        _ => BlockQ6K::vec_dot(cols, as_blocks(w), acts),
    }
}
