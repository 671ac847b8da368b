//! AVX2 K-quant kernels, bit for bit the scalar ones in [`super::kquants`].
//!
//! The integer sums are exact in any order, so they are computed with `maddubs` (unsigned codes
//! ≤ 63 times signed activations: no pair can saturate) and `madd` with the 16-bit scales, which
//! gives exactly the scalar path's per-chunk, per-4-byte-lane sums. The float operations after
//! them follow the scalar path one by one. Each weight super-block is decoded once (codes,
//! scales, mins) and used for every activation row of the call.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::kquants::{KPath, Q8K_BYTES};
use super::WeightType;

/// One weight super-block ready for the products.
struct Block {
    /// The unsigned codes of 32-value chunk c, in value order.
    q: [__m256i; 8],
    /// The 16-bit scale of every value of chunk c (its two 16-value groups' scales).
    sc: [__m256i; 8],
    /// The 16 scales of the 16-value groups (Q6_K's offset term).
    scale16: __m256i,
    /// Each sub-block's min twice, aligned with the 16 activation sums.
    min16: __m256i,
    d: f32,
    dmin: f32,
}

/// Per row: the VecDot lanes, the min lanes of Q4_K's VecDot, and two scalar accumulators
/// (product and min, or the tiled sum alone).
#[derive(Clone, Copy)]
struct Acc {
    lanes: __m256,
    min4: __m128,
    acc: f32,
    min: f32,
}

const TYPES: [WeightType; 3] = [WeightType::Q4K, WeightType::Q5K, WeightType::Q6K];
const PATHS: [KPath; 4] = [KPath::VecDot, KPath::Tiled, KPath::Gemv, KPath::Gemm];

/// The kernels are stamped out twice, for AVX2 and with AVX-512 enabled: the same instructions,
/// but 32 vector registers hold a decoded super-block (16 vectors) that 16 cannot.
macro_rules! kquant_kernels {
    ($features:literal) => {
        use super::*;

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn halves(p: *const u8) -> (f32, f32) {
            let v = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p.cast::<i32>())));
            (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
        }

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn half(p: *const u8) -> f32 {
            let bits = std::ptr::read_unaligned(p.cast::<u16>());
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }

        /// Chunk scale vector: `lo` for the first 16 values, `hi` for the second.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn scale_pair(lo: i16, hi: i16) -> __m256i {
            _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
        }

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn decode(wtype: WeightType, b: *const u8) -> Block {
            let m15 = _mm256_set1_epi8(15);
            let zero = _mm256_setzero_si256();
            let mut q = [zero; 8];
            let mut sc = [zero; 8];
            match wtype {
                WeightType::Q4K | WeightType::Q5K => {
                    let (d, dmin) = halves(b);
                    let (sc6, m6) = super::super::kquants::scales_mins(std::slice::from_raw_parts(
                        b.add(4),
                        12,
                    ));
                    let mut scales = [0i16; 8];
                    let mut mins = [0i16; 16];
                    for j in 0..8 {
                        scales[j] = sc6[j] as i16;
                        mins[2 * j] = m6[j] as i16;
                        mins[2 * j + 1] = m6[j] as i16;
                    }
                    let qs = if wtype == WeightType::Q5K {
                        b.add(48)
                    } else {
                        b.add(16)
                    };
                    for j in 0..4 {
                        let bytes = _mm256_loadu_si256(qs.add(32 * j).cast());
                        q[2 * j] = _mm256_and_si256(bytes, m15);
                        q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m15);
                    }
                    if wtype == WeightType::Q5K {
                        let qh = _mm256_loadu_si256(b.add(16).cast());
                        let bit4 = _mm256_set1_epi8(16);
                        // Bit c of each high-bit byte becomes bit 4 of chunk c's code.
                        macro_rules! high {
                            ($c:literal, $shifted:expr) => {
                                q[$c] = _mm256_or_si256(q[$c], _mm256_and_si256($shifted, bit4));
                            };
                        }
                        high!(0, _mm256_slli_epi16(qh, 4));
                        high!(1, _mm256_slli_epi16(qh, 3));
                        high!(2, _mm256_slli_epi16(qh, 2));
                        high!(3, _mm256_slli_epi16(qh, 1));
                        high!(4, qh);
                        high!(5, _mm256_srli_epi16(qh, 1));
                        high!(6, _mm256_srli_epi16(qh, 2));
                        high!(7, _mm256_srli_epi16(qh, 3));
                    }
                    for (c, v) in sc.iter_mut().enumerate() {
                        *v = _mm256_set1_epi16(scales[c]);
                    }
                    Block {
                        q,
                        sc,
                        scale16: zero,
                        min16: _mm256_loadu_si256(mins.as_ptr().cast()),
                        d,
                        dmin,
                    }
                }
                _ => {
                    // Q6_K: ql[128], qh[64], i8 scales[16], f16 d.
                    let m30 = _mm256_set1_epi8(0x30);
                    for n in 0..2 {
                        let a = _mm256_loadu_si256(b.add(64 * n).cast());
                        let c = _mm256_loadu_si256(b.add(64 * n + 32).cast());
                        let h = _mm256_loadu_si256(b.add(128 + 32 * n).cast());
                        let a_hi = _mm256_and_si256(_mm256_srli_epi16(a, 4), m15);
                        let c_hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), m15);
                        q[4 * n] = _mm256_or_si256(
                            _mm256_and_si256(a, m15),
                            _mm256_and_si256(_mm256_slli_epi16(h, 4), m30),
                        );
                        q[4 * n + 1] = _mm256_or_si256(
                            _mm256_and_si256(c, m15),
                            _mm256_and_si256(_mm256_slli_epi16(h, 2), m30),
                        );
                        q[4 * n + 2] = _mm256_or_si256(a_hi, _mm256_and_si256(h, m30));
                        q[4 * n + 3] =
                            _mm256_or_si256(c_hi, _mm256_and_si256(_mm256_srli_epi16(h, 2), m30));
                    }
                    let raw = _mm_loadu_si128(b.add(192).cast());
                    let scale16 = _mm256_cvtepi8_epi16(raw);
                    let s: [i16; 16] = std::mem::transmute(scale16);
                    for (c, v) in sc.iter_mut().enumerate() {
                        *v = scale_pair(s[2 * c], s[2 * c + 1]);
                    }
                    Block {
                        q,
                        sc,
                        scale16,
                        min16: zero,
                        d: half(b.add(208)),
                        dmin: 0.0,
                    }
                }
            }
        }

        /// Σ of the 8 i32 lanes (integer, so the order is free).
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn hsum_i32(v: __m256i) -> i32 {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            _mm_cvtsi128_si32(s)
        }

        /// Adds one super-block of one activation row (`ab`: its Q8_K block) to `acc`.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn block(wtype: WeightType, path: KPath, w: &Block, ab: *const u8, acc: &mut Acc) {
            let dy = std::ptr::read_unaligned(ab.cast::<f32>());
            let x = ab.add(4);
            let p: [__m256i; 8] = std::array::from_fn(|c| {
                let xs = _mm256_loadu_si256(x.add(32 * c).cast());
                _mm256_madd_epi16(_mm256_maddubs_epi16(w.q[c], xs), w.sc[c])
            });
            let bsums = _mm256_loadu_si256(ab.add(260).cast());
            let q6 = wtype == WeightType::Q6K;
            // Element s: min[s]·(sum of sub-block s's activations).
            let mins = _mm256_madd_epi16(bsums, w.min16);
            // Element k: Q6_K's offset term of 16-value groups 2k and 2k+1, times 32.
            let offset = if q6 {
                _mm256_slli_epi32(_mm256_madd_epi16(bsums, w.scale16), 5)
            } else {
                _mm256_setzero_si256()
            };
            match path {
                KPath::VecDot => {
                    let s01 = _mm256_add_epi32(p[0], p[1]);
                    let s23 = _mm256_add_epi32(p[2], p[3]);
                    let s45 = _mm256_add_epi32(p[4], p[5]);
                    let s67 = _mm256_add_epi32(p[6], p[7]);
                    let mut lanes =
                        _mm256_add_epi32(_mm256_add_epi32(s01, s23), _mm256_add_epi32(s45, s67));
                    if q6 {
                        lanes = _mm256_sub_epi32(lanes, offset);
                    }
                    let d = _mm256_set1_ps(dy * w.d);
                    acc.lanes = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc.lanes);
                    let dmin = -dy * w.dmin;
                    if wtype == WeightType::Q4K {
                        // Sub-block pairs: [m0+m1, m2+m3 | m4+m5, m6+m7] in each half.
                        let h = _mm256_hadd_epi32(mins, mins);
                        let pairs = _mm_unpacklo_epi64(
                            _mm256_castsi256_si128(h),
                            _mm256_extracti128_si256(h, 1),
                        );
                        acc.min4 =
                            _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(pairs), acc.min4);
                    } else if wtype == WeightType::Q5K {
                        acc.min = dmin.mul_add(hsum_i32(mins) as f32, acc.min);
                    }
                }
                KPath::Tiled => {
                    let s01 = _mm256_add_epi32(p[0], p[1]);
                    let s23 = _mm256_add_epi32(p[2], p[3]);
                    let s45 = _mm256_add_epi32(p[4], p[5]);
                    let s67 = _mm256_add_epi32(p[6], p[7]);
                    let mut all =
                        _mm256_add_epi32(_mm256_add_epi32(s01, s23), _mm256_add_epi32(s45, s67));
                    let mut r;
                    if q6 {
                        all = _mm256_sub_epi32(all, offset);
                        r = hsum_i32(all) as f32 * w.d;
                    } else {
                        r = hsum_i32(all) as f32 * w.d;
                        r = (-w.dmin).mul_add(hsum_i32(mins) as f32, r);
                    }
                    // One rounding, as llama.cpp's compiled kernel (see `KPath::Tiled`).
                    acc.acc = r.mul_add(dy, acc.acc);
                }
                KPath::Gemv => {
                    let s01 = _mm256_add_epi32(p[0], p[1]);
                    let s23 = _mm256_add_epi32(p[2], p[3]);
                    let s45 = _mm256_add_epi32(p[4], p[5]);
                    let s67 = _mm256_add_epi32(p[6], p[7]);
                    let mut all =
                        _mm256_add_epi32(_mm256_add_epi32(s01, s23), _mm256_add_epi32(s45, s67));
                    if q6 {
                        all = _mm256_sub_epi32(all, offset);
                    }
                    acc.acc = (hsum_i32(all) as f32).mul_add(w.d * dy, acc.acc);
                    acc.min = (hsum_i32(mins) as f32).mul_add(w.dmin * dy, acc.min);
                }
                KPath::Gemm => {
                    let s01 = _mm256_add_epi32(p[0], p[1]);
                    let s23 = _mm256_add_epi32(p[2], p[3]);
                    let s45 = _mm256_add_epi32(p[4], p[5]);
                    let s67 = _mm256_add_epi32(p[6], p[7]);
                    // [s01, s23, s45, s67] horizontally summed.
                    let h =
                        _mm256_hadd_epi32(_mm256_hadd_epi32(s01, s23), _mm256_hadd_epi32(s45, s67));
                    let pairs =
                        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
                    let pairs: [i32; 4] = std::mem::transmute(pairs);
                    let mh = _mm256_hadd_epi32(mins, mins);
                    let mp = _mm_unpacklo_epi64(
                        _mm256_castsi256_si128(mh),
                        _mm256_extracti128_si256(mh, 1),
                    );
                    let mp: [i32; 4] = std::mem::transmute(mp);
                    let (dd, dm) = (w.d * dy, w.dmin * dy);
                    for j in 0..4 {
                        acc.acc = (pairs[j] as f32).mul_add(dd, acc.acc);
                        acc.min = (mp[j] as f32).mul_add(dm, acc.min);
                    }
                }
            }
        }

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn finish(wtype: WeightType, path: KPath, acc: &Acc) -> f32 {
            match path {
                KPath::VecDot => {
                    let v: [f32; 8] = std::mem::transmute(acc.lanes);
                    let h: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
                    let h = (h[0] + h[2]) + (h[1] + h[3]);
                    if wtype == WeightType::Q4K {
                        let m: [f32; 4] = std::mem::transmute(acc.min4);
                        h + ((m[0] + m[2]) + (m[1] + m[3]))
                    } else {
                        h + acc.min
                    }
                }
                KPath::Tiled => acc.acc,
                KPath::Gemv | KPath::Gemm => acc.acc - acc.min,
            }
        }

        #[target_feature(enable = $features)]
        /// The loop for one weight type and kernel order, `W` and `P` indexing [`TYPES`] and
        /// [`PATHS`]: as constants they take the per-block matches out of the loop.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn rows_for<const N: usize, const W: usize, const P: usize>(
            w: &[u8],
            a: [&[u8]; N],
            cols: usize,
        ) -> [f32; N] {
            let (wtype, path) = (TYPES[W], PATHS[P]);
            let wb = wtype.block().1;
            let blocks = cols / 256;
            assert!(w.len() >= blocks * wb);
            for a in &a {
                assert!(a.len() >= blocks * Q8K_BYTES);
            }
            let zero = Acc {
                lanes: _mm256_setzero_ps(),
                min4: _mm_setzero_ps(),
                acc: 0.0,
                min: 0.0,
            };
            let mut acc = [zero; N];
            for i in 0..blocks {
                let blk = decode(wtype, w.as_ptr().add(i * wb));
                for r in 0..N {
                    block(
                        wtype,
                        path,
                        &blk,
                        a[r].as_ptr().add(i * Q8K_BYTES),
                        &mut acc[r],
                    );
                }
            }
            std::array::from_fn(|r| finish(wtype, path, &acc[r]))
        }

        #[target_feature(enable = $features)]
        pub(super) unsafe fn dot_rows<const N: usize>(
            wtype: WeightType,
            w: &[u8],
            a: [&[u8]; N],
            cols: usize,
            path: KPath,
        ) -> [f32; N] {
            macro_rules! each_path {
                ($w:literal) => {
                    match path {
                        KPath::VecDot => rows_for::<N, $w, 0>(w, a, cols),
                        KPath::Tiled => rows_for::<N, $w, 1>(w, a, cols),
                        KPath::Gemv => rows_for::<N, $w, 2>(w, a, cols),
                        KPath::Gemm => rows_for::<N, $w, 3>(w, a, cols),
                    }
                };
            }
            match wtype {
                WeightType::Q4K => each_path!(0),
                WeightType::Q5K => each_path!(1),
                _ => each_path!(2),
            }
        }
    };
}

mod avx2 {
    kquant_kernels!("avx2,fma,f16c");
}

mod avx512 {
    kquant_kernels!("avx2,fma,f16c,avx512f,avx512vl,avx512bw");
}

fn has_avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
    })
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C.
pub(super) unsafe fn dot(wtype: WeightType, w: &[u8], a: &[u8], cols: usize, path: KPath) -> f32 {
    dot_n(wtype, w, [a], cols, path)[0]
}

/// # Safety
/// As [`dot`].
pub(super) unsafe fn dot_n<const N: usize>(
    wtype: WeightType,
    w: &[u8],
    a: [&[u8]; N],
    cols: usize,
    path: KPath,
) -> [f32; N] {
    if has_avx512() {
        avx512::dot_rows(wtype, w, a, cols, path)
    } else {
        avx2::dot_rows(wtype, w, a, cols, path)
    }
}

/// [`dot_n`] by each stamped variant the CPU can run (AVX2, then AVX-512), for the tests.
///
/// # Safety
/// As [`dot`].
#[cfg(test)]
pub(super) unsafe fn dot_n_each<const N: usize>(
    wtype: WeightType,
    w: &[u8],
    a: [&[u8]; N],
    cols: usize,
    path: KPath,
) -> Vec<[f32; N]> {
    let mut all = vec![avx2::dot_rows(wtype, w, a, cols, path)];
    if has_avx512() {
        all.push(avx512::dot_rows(wtype, w, a, cols, path));
    }
    all
}
