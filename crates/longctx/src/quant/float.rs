//! F32, F16 and BF16 weights. As in ggml, activations are first rounded to the weight's own
//! type (f16 for F16, bf16 for BF16) so results match llama.cpp's; the products accumulate in f32.

use half::{bf16, f16};

use super::{ActType, WeightType};

fn value(wtype: WeightType, b: &[u8], i: usize) -> f32 {
    match wtype {
        WeightType::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
        WeightType::F16 => f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
        _ => bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
    }
}

pub(super) fn to_f32(wtype: WeightType, b: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = value(wtype, b, i);
    }
}

pub(super) fn from_f32(act: ActType, x: &[f32], out: &mut [u8]) {
    for (i, &v) in x.iter().enumerate() {
        match act {
            ActType::F32 => out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
            ActType::F16 => out[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes()),
            _ => out[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
        }
    }
}

pub(super) fn dot(wtype: WeightType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    // Eight partial sums, like a vector unit, so rounding does not grow with the row length.
    let mut lanes = [0f32; 8];
    for i in 0..cols {
        lanes[i % 8] += value(wtype, w, i) * value(wtype, a, i);
    }
    lanes.iter().sum()
}
