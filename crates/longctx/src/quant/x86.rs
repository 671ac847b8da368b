//! AVX2 kernels for the 32-value block formats, written by hand because candle has no SIMD path
//! for Q4_1 (its `vec_dot_unopt` is scalar) and because the prefill kernel reads each weight
//! block once for four activation rows.
//!
//! Every weight block is turned into 32 unsigned bytes (Q4_1) or into |w| plus a sign (Q4_0,
//! Q8_0, ggml's sign trick), so that one `maddubs` multiplies it with 32 signed activation bytes.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::WeightType;

pub(crate) fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[inline(always)]
unsafe fn half(p: *const u8) -> f32 {
    let bits = std::ptr::read_unaligned(p.cast::<u16>());
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 16 packed bytes of nibbles → 32 bytes, values 0..15, in element order.
#[inline(always)]
unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    let packed = _mm_loadu_si128(p.cast());
    let low = _mm_and_si128(packed, _mm_set1_epi8(15));
    let high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(15));
    _mm256_set_m128i(high, low)
}

/// Σ u·s over 32 byte pairs, as 8 f32 lanes (lane i = the 4 products of bytes 4i..4i+4).
/// With VNNI one `vpdpbusd` does what `maddubs` + `madd` do; the integer results are identical.
#[inline(always)]
unsafe fn products<const VNNI: bool>(unsigned: __m256i, signed: __m256i) -> __m256 {
    if VNNI {
        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(
            _mm256_setzero_si256(),
            unsigned,
            signed,
        ))
    } else {
        let pairs = _mm256_maddubs_epi16(unsigned, signed);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// The weight block in a form ready for `products`: (unsigned bytes, sign source, d, m).
#[inline(always)]
unsafe fn load_weight(wtype: WeightType, b: *const u8) -> (__m256i, __m256i, f32, f32) {
    match wtype {
        WeightType::Q4_1 => {
            // d and m are adjacent f16s: one conversion for both.
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(b.cast::<i32>())));
            let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            (
                unpack_nibbles(b.add(4)),
                _mm256_setzero_si256(),
                _mm_cvtss_f32(dm),
                m,
            )
        }
        WeightType::Q4_0 => {
            let signed = _mm256_sub_epi8(unpack_nibbles(b.add(2)), _mm256_set1_epi8(8));
            (_mm256_sign_epi8(signed, signed), signed, half(b), 0.0)
        }
        _ => {
            let signed = _mm256_loadu_si256(b.add(2).cast());
            (_mm256_sign_epi8(signed, signed), signed, half(b), 0.0)
        }
    }
}

/// One activation row in our layout: 8-bit values, then f32 scales, then (Q8_1) f32 sums.
#[derive(Clone, Copy)]
struct Row {
    qs: *const u8,
    d: *const f32,
    s: *const f32,
}

impl Row {
    #[inline(always)]
    unsafe fn new(a: &[u8], cols: usize) -> Self {
        let qs = a.as_ptr();
        let d = qs.add(cols).cast::<f32>();
        Self {
            qs,
            d,
            s: d.add(cols / 32),
        }
    }
}

/// Adds block `i` of row `x` times the weight block to `acc`; returns the Q4_1 minimum term m·s
/// separately (ggml sums it apart from the vector accumulator too).
#[inline(always)]
unsafe fn block<const VNNI: bool>(
    wtype: WeightType,
    w: (__m256i, __m256i, f32, f32),
    x: Row,
    i: usize,
    acc: &mut __m256,
) -> f32 {
    let (unsigned, sign, dw, m) = w;
    let q = _mm256_loadu_si256(x.qs.add(32 * i).cast());
    let scale = _mm256_set1_ps(dw * std::ptr::read_unaligned(x.d.add(i)));
    if wtype == WeightType::Q4_1 {
        *acc = _mm256_fmadd_ps(scale, products::<VNNI>(unsigned, q), *acc);
        m * std::ptr::read_unaligned(x.s.add(i))
    } else {
        *acc = _mm256_fmadd_ps(
            scale,
            products::<VNNI>(unsigned, _mm256_sign_epi8(q, sign)),
            *acc,
        );
        0.0
    }
}

#[inline(always)]
unsafe fn dot_impl<const VNNI: bool>(wtype: WeightType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    let wb = wtype.block().1;
    let wp = w.as_ptr();
    let x = Row::new(a, cols);
    let mut acc = _mm256_setzero_ps();
    let mut extra = 0f32;
    for i in 0..cols / 32 {
        let wv = load_weight(wtype, wp.add(i * wb));
        extra += block::<VNNI>(wtype, wv, x, i, &mut acc);
    }
    hsum(acc) + extra
}

#[inline(always)]
unsafe fn dot_x4_impl<const VNNI: bool>(
    wtype: WeightType,
    w: &[u8],
    a: [&[u8]; 4],
    cols: usize,
) -> [f32; 4] {
    let wb = wtype.block().1;
    let wp = w.as_ptr();
    let rows = a.map(|r| Row::new(r, cols));
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut extra = [0f32; 4];
    for i in 0..cols / 32 {
        let wv = load_weight(wtype, wp.add(i * wb));
        for r in 0..4 {
            extra[r] += block::<VNNI>(wtype, wv, rows[r], i, &mut acc[r]);
        }
    }
    [0, 1, 2, 3].map(|r| hsum(acc[r]) + extra[r])
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(wtype: WeightType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    dot_impl::<false>(wtype, w, a, cols)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_vnni(wtype: WeightType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    dot_impl::<true>(wtype, w, a, cols)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_x4_avx2(wtype: WeightType, w: &[u8], a: [&[u8]; 4], cols: usize) -> [f32; 4] {
    dot_x4_impl::<false>(wtype, w, a, cols)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_x4_vnni(wtype: WeightType, w: &[u8], a: [&[u8]; 4], cols: usize) -> [f32; 4] {
    dot_x4_impl::<true>(wtype, w, a, cols)
}

fn has_vnni() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`has_avx2`]).
pub(super) unsafe fn dot(wtype: WeightType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    if has_vnni() {
        dot_vnni(wtype, w, a, cols)
    } else {
        dot_avx2(wtype, w, a, cols)
    }
}

/// # Safety
/// As [`dot`].
pub(super) unsafe fn dot_x4(wtype: WeightType, w: &[u8], a: [&[u8]; 4], cols: usize) -> [f32; 4] {
    if has_vnni() {
        dot_x4_vnni(wtype, w, a, cols)
    } else {
        dot_x4_avx2(wtype, w, a, cols)
    }
}
