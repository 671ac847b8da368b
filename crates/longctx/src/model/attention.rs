//! Causal scaled dot-product attention over the KV cache, one (query head, token) at a time.
//!
//! Numerics follow llama.cpp's default (non-flash) CPU path so that logits agree with it: with an
//! f16 cache the query is rounded to f16 before q·k, and the softmax weights are rounded to f16
//! before they weight the values; scores, softmax and sums are f32.

use half::f16;

use crate::kv::{KvCache, KvData};

/// Attention of one query head over the first `visible` slots of `kv_head` in `layer`.
///
/// `q` is `[D]` (already rotated), `scores` a scratch of at least `visible` values, `out` `[D]`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    cache: &KvCache,
    layer: usize,
    kv_head: usize,
    visible: usize,
    q: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = cache.head_dim;
    let base = cache.offset(layer, kv_head, 0);
    let scores = &mut scores[..visible];
    match &cache.k {
        KvData::F16(k) => {
            let mut qh = [0f32; 256];
            let qh = &mut qh[..d];
            for (o, &x) in qh.iter_mut().zip(q) {
                *o = f16::from_f32(x).to_f32();
            }
            for (j, s) in scores.iter_mut().enumerate() {
                *s = dot_f16(qh, &k[base + j * d..base + (j + 1) * d]) * scale;
            }
        }
        KvData::F32(k) => {
            for (j, s) in scores.iter_mut().enumerate() {
                *s = dot_f32(q, &k[base + j * d..base + (j + 1) * d]) * scale;
            }
        }
    }
    softmax(scores);
    out.fill(0.0);
    match &cache.v {
        KvData::F16(v) => {
            for (j, &p) in scores.iter().enumerate() {
                let p = f16::from_f32(p).to_f32();
                axpy_f16(out, p, &v[base + j * d..base + (j + 1) * d]);
            }
        }
        KvData::F32(v) => {
            for (j, &p) in scores.iter().enumerate() {
                for (o, &x) in out.iter_mut().zip(&v[base + j * d..base + (j + 1) * d]) {
                    *o += p * x;
                }
            }
        }
    }
}

fn softmax(x: &mut [f32]) {
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        lanes[i % 8] += x * y;
    }
    lanes.iter().sum()
}

fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if a.len() % 8 == 0 && crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C; lengths are multiples of 8.
        return unsafe { simd::dot_f16(a, b) };
    }
    let mut lanes = [0f32; 8];
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        lanes[i % 8] += x * y.to_f32();
    }
    lanes.iter().sum()
}

fn axpy_f16(out: &mut [f32], p: f32, v: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    if out.len() % 8 == 0 && crate::quant::has_avx2() {
        // SAFETY: as above.
        return unsafe { simd::axpy_f16(out, p, v) };
    }
    for (o, x) in out.iter_mut().zip(v) {
        *o += p * x.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for i in (0..a.len()).step_by(8) {
            let k = _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().add(i).cast()));
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), k, acc);
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy_f16(out: &mut [f32], p: f32, v: &[f16]) {
        let pv = _mm256_set1_ps(p);
        for i in (0..out.len()).step_by(8) {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i).cast()));
            let o = out.as_mut_ptr().add(i);
            _mm256_storeu_ps(o, _mm256_fmadd_ps(pv, x, _mm256_loadu_ps(o)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvDtype;

    #[test]
    fn attention_equals_the_textbook_formula() {
        let d = 8;
        let mut cache = KvCache::new(KvDtype::F32, 1, 1, d, 4);
        cache.push_slots(&[0, 1, 2]).unwrap();
        let keys: Vec<Vec<f32>> = (0..3).map(|j| (0..d).map(|i| ((i + j) as f32 * 0.3).sin()).collect()).collect();
        let vals: Vec<Vec<f32>> = (0..3).map(|j| (0..d).map(|i| (i * j) as f32 * 0.1).collect()).collect();
        for j in 0..3 {
            cache.write(0, 0, j, &keys[j], &vals[j]);
        }
        let q: Vec<f32> = (0..d).map(|i| i as f32 * 0.2 - 0.5).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let mut scores = vec![0.0; 4];
        let mut out = vec![0.0; d];
        attend(&cache, 0, 0, 3, &q, scale, &mut scores, &mut out);
        let logits: Vec<f32> = keys.iter().map(|k| k.iter().zip(&q).map(|(a, b)| a * b).sum::<f32>() * scale).collect();
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for i in 0..d {
            let expected: f32 = (0..3).map(|j| logits[j].exp() / z * vals[j][i]).sum();
            assert!((out[i] - expected).abs() < 1e-5);
        }
        // With one visible slot the output is that slot's value.
        attend(&cache, 0, 0, 1, &q, scale, &mut scores, &mut out);
        assert_eq!(out, vals[0]);
    }
}
