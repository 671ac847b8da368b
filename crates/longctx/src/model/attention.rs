//! Causal scaled dot-product attention over the KV cache: one (query head, token) at a time
//! ([`attend`]), or a block of them sharing a KV head ([`attend_block`], prefill), same bits.
//!
//! The arithmetic reproduces, bit for bit, llama.cpp's default CPU path without flash attention
//! (`llm_graph_context::build_attn_mha`: `kq = mul_mat(k, q)`, `soft_max_ext(kq, mask, scale)`,
//! `kqv = mul_mat(v, kq)`) as built with AVX512 and llamafile, so that logits agree with it
//! exactly; the model is sensitive enough that one ulp here moves a logit by ~1.
//!
//! * `mul_mat` converts its f32 right operand to the f16 cache type first: the query is rounded to
//!   f16 before q·k, and the softmax weights are rounded to f16 before they weight the values.
//! * Each dot product runs in f32 with FMA, split over lanes by index (lane = index mod W), each
//!   lane an FMA chain in index order from zero, then the lanes are summed by a halving tree
//!   (lane i += lane i + W/2, then W/4, … 1). Which W depends on the kernel `mul_mat` picks:
//!   - chunks of 2+ tokens go to llamafile's `tinyBLAS` (`llamafile_sgemm`, 16-lane `__m512`
//!     accumulators, `hsum` = `_mm512_reduce_add_ps`, itself a halving tree): W = 16;
//!   - single-token chunks go to `ggml_vec_dot_f16` (four 16-lane accumulators, `GGML_F16_STEP`
//!     = 64, reduced pairwise by `GGML_F32Cx16_REDUCE`): W = 64; elements past the last full
//!     64 are added afterwards, one by one, in f64.
//!
//!   For q·k the index is the head dimension; for p·V it is the cache slot, counted from slot 0
//!   (the reference's V cache is transposed, so each output dimension is one dot product over
//!   slots). Masked and unused slots contribute exact zeros, so only visible slots are visited.
//! * `ggml_compute_forward_soft_max_f32`: scores are multiplied by the scale (the mask adds 0 to
//!   visible ones), the maximum is subtracted, and `ggml_vec_soft_max_f32` takes `ggml_v_expf`
//!   (a polynomial, not libm) over blocks of 16 slots from slot 0, sums each block by the
//!   16-lane halving tree in f32 and the block sums in f64; weights are multiplied by
//!   `(float)(1.0 / sum)`.
//!
//! Everything is reproduced with scalar `mul_add` or AVX2 (two 8-lane halves per 16 lanes), so
//! the result does not depend on the CPU.
//!
//! Self-Extend and STRING add a second, "far" query ([`FarQuery`]): the first slots are scored
//! with it, against the grouped keys or the plain ones, and the rest with the plain query; each
//! score has the arithmetic above, and one softmax runs over all of them, as both papers merge.

use std::cell::RefCell;
use std::ops::Range;

use half::f16;

use crate::kv::{KvCache, KvData, Tensor};

#[cfg(target_arch = "x86_64")]
use super::attention_avx512 as avx512;

/// Rows that see the same slots scored and summed together: four rows times four keys fill 16
/// of AVX-512's 32 zmm registers.
const GROUP: usize = 4;

/// Largest head size [`attend`] handles.
pub const MAX_HEAD_DIM: usize = 256;

/// Which of llama.cpp's matrix-multiplication kernels the reference runs, which fixes the lane
/// count of every dot product (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// llamafile's tinyBLAS: `ggml_compute_forward_mul_mat` uses it whenever the chunk has two
    /// or more tokens (`llamafile_sgemm` declines `n < 2`).
    Gemm,
    /// `ggml_vec_dot_f16`: chunks of one token (decoding).
    VecDot,
}

impl Reduction {
    /// The kernel llama.cpp uses for a chunk (ubatch) of `n_tokens` tokens.
    pub fn for_chunk(n_tokens: usize) -> Self {
        if n_tokens >= 2 {
            Self::Gemm
        } else {
            Self::VecDot
        }
    }

    /// Lanes of q·k, a dot product over `head_dim`; tinyBLAS declines `k % 16 != 0`.
    fn kq_lanes(self, head_dim: usize) -> usize {
        if self == Self::Gemm && head_dim.is_multiple_of(16) {
            16
        } else {
            64
        }
    }

    /// Lanes of p·V, a dot product over slots for each of `head_dim` outputs; tinyBLAS declines
    /// `m % 4 != 0` (m = head_dim here; k, the padded slot count, is a multiple of 256).
    fn kqv_lanes(self, head_dim: usize) -> usize {
        if self == Self::Gemm && head_dim.is_multiple_of(4) {
            16
        } else {
            64
        }
    }
}

/// The far part of one query's attention (Self-Extend, STRING): the first `slots` visible slots
/// are scored with `q`, the query rotated at its far position, against `keys`, which are laid
/// out as the cache's keys (its grouped keys, or its keys themselves).
pub struct FarQuery<'a> {
    pub slots: usize,
    pub q: &'a [f32],
    pub keys: &'a KvData,
}

/// Attention of one query head over the first `visible` slots of `kv_head` in `layer`.
///
/// `q` is `[D]` (already rotated), `scores` a scratch of at least `visible` values, `out` `[D]`.
/// `reduction` is [`Reduction::for_chunk`] of the number of tokens evaluated together. With
/// `far`, its slots are scored by its query instead. A head with KIVI-quantized slots is read
/// through [`attend_block`]'s dequantized tiles.
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
    reduction: Reduction,
    far: Option<FarQuery>,
) {
    let d = cache.head_dim;
    assert!(d <= MAX_HEAD_DIM, "head size {d} above {MAX_HEAD_DIM}");
    if cache.quantized(layer, kv_head) > 0 {
        assert!(far.is_none(), "no far attention over a quantized cache");
        let mut row = [QueryRow {
            q,
            from: 0,
            visible,
            out,
            far: None,
        }];
        return attend_block(
            cache, layer, kv_head, &mut row, scale, scores, reduction, None,
        );
    }
    let base = cache.offset(layer, kv_head, 0);
    let scores = &mut scores[..visible];
    let (kq_lanes, kqv_lanes) = (reduction.kq_lanes(d), reduction.kqv_lanes(d));
    let near_from = far.as_ref().map_or(0, |f| f.slots.min(visible));
    let (far_scores, near_scores) = scores.split_at_mut(near_from);
    let near_base = base + near_from * d;
    score(&cache.k, near_base, q, d, kq_lanes, scale, near_scores);
    if let Some(far) = far {
        score(far.keys, base, far.q, d, kq_lanes, scale, far_scores);
    }
    softmax(scores);
    let v = &cache.v;
    ACC.with(|acc| {
        let mut acc = acc.borrow_mut();
        let rows = kqv_lanes.min(visible);
        // Sized for every lane at once, so a growing context never reallocates mid-decode.
        if acc.len() < kqv_lanes * d {
            acc.resize(kqv_lanes * d, 0.0);
        }
        weighted_sum(v, base, d, scores, kqv_lanes, &mut acc[..rows * d], out);
    });
}

/// Tokens of a chunk whose queries [`attend_block`] takes together, times the query heads that
/// share a KV head.
pub const BLOCK_TOKENS: usize = 8;

/// Slots scored, or summed, per pass over a block's queries: one tile of keys or values, widened
/// to f32 once for every query of the block (32 KiB at head size 64), stays in L1/L2.
const TILE: usize = 128;

/// One query of an [`attend_block`]: `q` `[D]` (already rotated) sees slots `from..visible`
/// and writes `out` `[D]`.
pub struct QueryRow<'a> {
    pub q: &'a [f32],
    /// The first slot the query sees: 0, or past the keys a sliding window has left behind.
    pub from: usize,
    pub visible: usize,
    pub out: &'a mut [f32],
    /// Self-Extend, STRING: the first `slots` slots are scored by this query against the far
    /// keys instead, as in [`FarQuery`].
    pub far: Option<FarRow<'a>>,
}

#[derive(Clone, Copy)]
pub struct FarRow<'a> {
    pub q: &'a [f32],
    pub slots: usize,
}

thread_local! {
    /// [`attend_block`]'s working memory: the block's queries as the reference rounds them, one
    /// tile of keys or values in f32, and each query's per-lane partial sums of p·V.
    static BLOCK: RefCell<BlockScratch> = RefCell::new(BlockScratch::default());
}

#[derive(Default)]
struct BlockScratch {
    queries: Vec<f32>,
    tile: Vec<f32>,
    far_tile: Vec<f32>,
    acc: Vec<f32>,
}

/// [`attend`] for several queries of one KV head at once, with the same arithmetic, bit for bit.
///
/// Attending one query at a time reads (and widens from f16) the head's whole cache per query,
/// with one horizontal sum per score and one load and store of the partial sums per slot:
/// prefill ran at 0.6× llama.cpp's speed at 8k. Here each tile of keys and values is widened
/// once for all the rows; scores come eight keys at a time, their horizontal sums transposed
/// into one vector (the same tree, so the same bits), and each lane of p·V stays in registers
/// across the tile. `scores` holds at least `rows × stride` values ([`block_stride`]); on
/// return row r's softmax weights are `scores[r·stride..][..visible]`. Rows with a far part
/// score it against `far_keys`, laid out as the cache's keys.
///
/// Slots before a row's `from` are masked (a sliding window): they weigh exactly 0, as
/// llama.cpp's −∞ mask makes them, and tiles wholly before every row's `from` are not read.
#[allow(clippy::too_many_arguments)]
pub fn attend_block(
    cache: &KvCache,
    layer: usize,
    kv_head: usize,
    rows: &mut [QueryRow],
    scale: f32,
    scores: &mut [f32],
    reduction: Reduction,
    far_keys: Option<&KvData>,
) {
    let d = cache.head_dim;
    assert!(d <= MAX_HEAD_DIM, "head size {d} above {MAX_HEAD_DIM}");
    assert!(
        far_keys.is_none() || cache.quantized(layer, kv_head) == 0,
        "no far attention over a quantized cache"
    );
    assert!(
        rows.iter().all(|r| r.from == 0 || r.far.is_none()),
        "no far attention in a sliding window"
    );
    // The first tile any row reads.
    let first_tile = rows.iter().map(|r| r.from).min().unwrap_or(0) / TILE * TILE;
    let base = cache.offset(layer, kv_head, 0);
    let stride = block_stride(rows);
    let scores = &mut scores[..rows.len() * stride];
    let (kq_lanes, kqv_lanes) = (reduction.kq_lanes(d), reduction.kqv_lanes(d));
    let f16_cache = matches!(cache.k, KvData::F16(_));
    BLOCK.with(|block| {
        let block = &mut *block.borrow_mut();
        grow(&mut block.queries, 2 * rows.len() * d);
        grow(&mut block.tile, TILE * d);
        grow(&mut block.acc, rows.len() * kqv_lanes * d);
        // Each row's query, then its far query (if any), as `mul_mat` sees them: converted to
        // the cache type first.
        let queries = &mut block.queries[..2 * rows.len() * d];
        for (qr, row) in queries.chunks_mut(2 * d).zip(rows.iter()) {
            let (near, far) = qr.split_at_mut(d);
            near.copy_from_slice(row.q);
            if let Some(f) = row.far {
                far.copy_from_slice(f.q);
            }
            if f16_cache {
                round_to_f16(qr);
            }
        }
        for tile in (first_tile..stride).step_by(TILE) {
            let tile_end = (tile + TILE).min(stride);
            let BlockScratch {
                tile: near_buffer,
                far_tile: far_buffer,
                ..
            } = block;
            let keys = widen_slots(
                cache,
                Tensor::Keys,
                layer,
                kv_head,
                tile,
                tile_end,
                near_buffer,
            );
            let far_tile = match far_keys {
                Some(far) if rows.iter().any(|r| r.far.is_some_and(|f| f.slots > tile)) => {
                    grow(far_buffer, TILE * d);
                    widen(far, base, tile, tile_end, d, far_buffer)
                }
                _ => &[],
            };
            for run in runs(rows) {
                let row = &rows[run.start];
                let end = (tile + TILE).min(row.visible);
                let start = tile.max(row.from);
                if end <= start {
                    continue;
                }
                let split = row.far.map_or(start, |f| f.slots.clamp(tile, end));
                let q = &queries[run.start * 2 * d..run.end * 2 * d];
                let s = &mut scores[run.start * stride..run.end * stride];
                let score = |q: &[f32], keys: &[f32], s: &mut [f32], slots| {
                    score_rows(
                        q,
                        2 * d,
                        keys,
                        d,
                        kq_lanes,
                        f16_cache,
                        scale,
                        s,
                        stride,
                        slots,
                    )
                };
                if split > start {
                    score(&q[d..], far_tile, s, start..split);
                }
                let near_keys = &keys[(split - tile) * d..];
                score(q, near_keys, s, split..end);
            }
        }
        for (row, s) in rows.iter().zip(scores.chunks_mut(stride)) {
            softmax_from(&mut s[..row.visible], row.from);
        }
        let per_row = kqv_lanes * d;
        let acc = &mut block.acc[..rows.len() * per_row];
        acc.fill(0.0);
        let mut weights = [0f32; GROUP * TILE];
        for tile in (first_tile..stride).step_by(TILE) {
            let tile_end = (tile + TILE).min(stride);
            let values = widen_slots(
                cache,
                Tensor::Values,
                layer,
                kv_head,
                tile,
                tile_end,
                &mut block.tile,
            );
            for run in runs(rows) {
                let row = &rows[run.start];
                let end = (tile + TILE).min(row.visible);
                if end <= tile.max(row.from) {
                    continue;
                }
                let n = end - tile;
                for (r, p) in run.clone().zip(weights.chunks_mut(TILE)) {
                    let p = &mut p[..n];
                    p.copy_from_slice(&scores[r * stride + tile..][..n]);
                    // `mul_mat` converts the weights to the cache type first.
                    if f16_cache {
                        round_to_f16(p);
                    }
                }
                let a = &mut acc[run.start * per_row..run.end * per_row];
                accumulate_rows(values, &weights, n, d, kqv_lanes, a);
            }
        }
        for (row, a) in rows.iter_mut().zip(acc.chunks_mut(per_row)) {
            let used = kqv_lanes.min(row.visible) * d;
            reduce_lanes(&mut a[..used], d, kqv_lanes, row.out);
        }
    });
}

/// Rounds each value to the nearest f16 (ties to even), kept as f32.
fn round_to_f16(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2 and F16C.
        return unsafe { simd::round_to_f16(x) };
    }
    for v in x {
        *v = f16::from_f32(*v).to_f32();
    }
}

fn grow(buffer: &mut Vec<f32>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
}

/// Slots `from..to` of `data` (head's slot 0 at `base`) as f32 `[to − from][D]`: the cache
/// itself for an f32 cache, else widened into `buffer` (exactly: f16 → f32 loses nothing).
fn widen<'a>(
    data: &'a KvData,
    base: usize,
    from: usize,
    to: usize,
    d: usize,
    buffer: &'a mut [f32],
) -> &'a [f32] {
    let range = base + from * d..base + to * d;
    match data {
        KvData::F32(x) => &x[range],
        KvData::F16(x) => {
            let out = &mut buffer[..(to - from) * d];
            widen_f16(&x[range], out);
            out
        }
    }
}

/// `out[i] = x[i]` widened from f16. `half`'s slice conversion calls a function per 8 values,
/// which was a tenth of a Gemma 3 prefill at 8k.
fn widen_f16(x: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { simd::widen_f16_x16(x, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2 and F16C.
        return unsafe { simd::widen_f16(x, out) };
    }
    half::slice::HalfFloatSliceExt::convert_to_f32_slice(x, out);
}

/// [`widen`] for the keys or values of `head` in `layer`, slots `from..to`: those KIVI holds
/// quantized (the first [`KvCache::quantized`]) are dequantized into `buffer`, the rest come
/// from their rows, which start at row 0 after the quantized ones.
fn widen_slots<'a>(
    cache: &'a KvCache,
    tensor: Tensor,
    layer: usize,
    head: usize,
    from: usize,
    to: usize,
    buffer: &'a mut [f32],
) -> &'a [f32] {
    let d = cache.head_dim;
    let data = match tensor {
        Tensor::Keys => &cache.k,
        Tensor::Values => &cache.v,
    };
    let base = cache.offset(layer, head, 0);
    let quantized = cache.quantized(layer, head);
    if from >= quantized {
        return widen(data, base, from - quantized, to - quantized, d, buffer);
    }
    let split = to.min(quantized);
    let out = &mut buffer[..(to - from) * d];
    let (packed, rows) = out.split_at_mut((split - from) * d);
    cache.dequantize(tensor, layer, head, from..split, packed);
    let range = base..base + rows.len();
    match data {
        KvData::F16(x) => widen_f16(&x[range], rows),
        KvData::F32(x) => rows.copy_from_slice(&x[range]),
    }
    out
}

/// `s[j] = q·k_j · scale` for the keys of a tile (`[n][D]` f32, `q` rounded as the cache is).
fn score_tile(
    q: &[f32],
    keys: &[f32],
    d: usize,
    lanes: usize,
    wide: bool,
    scale: f32,
    s: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if lanes == 16 && d.is_multiple_of(16) && crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA; `keys` holds `s.len()` rows of `d`, `d % 16 == 0`.
        return unsafe { simd::scores16(q, keys, d, scale, s) };
    }
    #[cfg(target_arch = "x86_64")]
    if lanes == 64 && d.is_multiple_of(64) && crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA; `keys` holds `s.len()` rows of `d`, `d % 64 == 0`.
        return unsafe { simd::scores64(q, keys, d, scale, s) };
    }
    for (j, o) in s.iter_mut().enumerate() {
        let k = &keys[j * d..(j + 1) * d];
        *o = dot_lanes(lanes, d, |i| q[i], |i| k[i], wide) * scale;
    }
}

/// Adds `p[j]·v_j` for the values of a tile (`[n][D]` f32, starting at a slot that is a
/// multiple of `lanes`) to lane `j % lanes` of `acc` (`[lanes][D]`), in slot order per lane.
fn accumulate_tile(values: &[f32], p: &[f32], d: usize, lanes: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(64) && crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA; `values` holds `p.len()` rows of `d`, `acc` `lanes`
        // rows, `d % 64 == 0`.
        match lanes {
            16 => return unsafe { simd::accumulate::<16>(values, p, d, acc) },
            64 => return unsafe { simd::accumulate::<64>(values, p, d, acc) },
            _ => {}
        }
    }
    for (j, &pj) in p.iter().enumerate() {
        let row = &mut acc[(j % lanes) * d..(j % lanes + 1) * d];
        for (o, &x) in row.iter_mut().zip(&values[j * d..(j + 1) * d]) {
            *o = x.mul_add(pj, *o);
        }
    }
}

/// Rows of a block that see the same slots with the same far split (the query heads sharing a
/// KV head, at one token), consecutive, at most [`GROUP`] at a time: they are scored and summed
/// together.
fn runs<'a>(rows: &'a [QueryRow]) -> impl Iterator<Item = Range<usize>> + 'a {
    let sees = |r: &QueryRow| (r.from, r.visible, r.far.map(|f| f.slots));
    let mut start = 0;
    std::iter::from_fn(move || {
        let first = rows.get(start)?;
        let len = rows[start..]
            .iter()
            .take(GROUP)
            .take_while(|r| sees(r) == sees(first))
            .count();
        start += len;
        Some(start - len..start)
    })
}

/// [`score_tile`] for rows that see the same slots: row r's query is `queries[r·q_stride..][..d]`
/// and its scores for `slots` go to `scores[r·s_stride..]`, from the keys of those slots.
#[allow(clippy::too_many_arguments)]
fn score_rows(
    queries: &[f32],
    q_stride: usize,
    keys: &[f32],
    d: usize,
    lanes: usize,
    wide: bool,
    scale: f32,
    scores: &mut [f32],
    s_stride: usize,
    slots: Range<usize>,
) {
    let rows = scores.len().div_ceil(s_stride);
    let n = slots.len();
    if n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if lanes == 16 && d.is_multiple_of(16) && avx512::available() {
        assert!(rows <= GROUP && keys.len() >= n * d);
        assert!(queries.len() >= (rows - 1) * q_stride + d);
        assert!(scores.len() >= (rows - 1) * s_stride + slots.end);
        let (q, k) = (queries.as_ptr(), keys.as_ptr());
        let s = scores[slots.start..].as_mut_ptr();
        // SAFETY: the CPU has AVX-512F; the bounds are checked above, `d % 16 == 0`.
        unsafe {
            match rows {
                1 => avx512::scores16::<1>(q, q_stride, k, n, d, scale, s, s_stride),
                2 => avx512::scores16::<2>(q, q_stride, k, n, d, scale, s, s_stride),
                3 => avx512::scores16::<3>(q, q_stride, k, n, d, scale, s, s_stride),
                _ => avx512::scores16::<4>(q, q_stride, k, n, d, scale, s, s_stride),
            }
        }
        return;
    }
    for r in 0..rows {
        let q = &queries[r * q_stride..][..d];
        score_tile(
            q,
            keys,
            d,
            lanes,
            wide,
            scale,
            &mut scores[r * s_stride..][slots.clone()],
        );
    }
}

/// [`accumulate_tile`] for rows that see the same slots: row r's weights are
/// `weights[r·TILE..][..n]` and its lanes `acc[r·lanes·d..]`.
fn accumulate_rows(
    values: &[f32],
    weights: &[f32],
    n: usize,
    d: usize,
    lanes: usize,
    acc: &mut [f32],
) {
    let per_row = lanes * d;
    let rows = acc.len() / per_row;
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(64) && avx512::available() && matches!(lanes, 16 | 64) {
        assert!(rows <= GROUP && values.len() >= n * d && n <= TILE);
        assert!(weights.len() >= rows * TILE && acc.len() >= rows * per_row);
        let (v, p, a) = (values.as_ptr(), weights.as_ptr(), acc.as_mut_ptr());
        // SAFETY: the CPU has AVX-512F; the bounds are checked above, `d % 64 == 0`, and a
        // tile starts at a multiple of TILE, itself a multiple of 16 and 64.
        unsafe {
            match (lanes, rows) {
                (16, 1) => avx512::accumulate::<16, 1>(v, n, d, p, TILE, a, per_row),
                (16, 2) => avx512::accumulate::<16, 2>(v, n, d, p, TILE, a, per_row),
                (16, 3) => avx512::accumulate::<16, 3>(v, n, d, p, TILE, a, per_row),
                (16, _) => avx512::accumulate::<16, 4>(v, n, d, p, TILE, a, per_row),
                (_, 1) => avx512::accumulate::<64, 1>(v, n, d, p, TILE, a, per_row),
                (_, 2) => avx512::accumulate::<64, 2>(v, n, d, p, TILE, a, per_row),
                (_, 3) => avx512::accumulate::<64, 3>(v, n, d, p, TILE, a, per_row),
                (_, _) => avx512::accumulate::<64, 4>(v, n, d, p, TILE, a, per_row),
            }
        }
        return;
    }
    for (p, a) in weights.chunks(TILE).zip(acc.chunks_mut(per_row)).take(rows) {
        accumulate_tile(values, &p[..n], d, lanes, a);
    }
}

/// Distance between consecutive rows' scores in [`attend_block`]'s scratch.
pub fn block_stride(rows: &[QueryRow]) -> usize {
    rows.iter().map(|r| r.visible).max().unwrap_or(0)
}

/// `scores[j] = q·k_j · scale` for the keys in `keys` from offset `base` on, one per score.
fn score(
    keys: &KvData,
    base: usize,
    q: &[f32],
    d: usize,
    lanes: usize,
    scale: f32,
    scores: &mut [f32],
) {
    match keys {
        KvData::F16(k) => {
            let mut qh = [0f32; MAX_HEAD_DIM];
            let qh = &mut qh[..d];
            for (o, &x) in qh.iter_mut().zip(q) {
                *o = f16::from_f32(x).to_f32();
            }
            for (j, s) in scores.iter_mut().enumerate() {
                *s = dot_f16(lanes, qh, &k[base + j * d..base + (j + 1) * d]) * scale;
            }
        }
        KvData::F32(k) => {
            for (j, s) in scores.iter_mut().enumerate() {
                *s = dot_f32(lanes, q, &k[base + j * d..base + (j + 1) * d]) * scale;
            }
        }
    }
}

thread_local! {
    /// Per-lane partial sums of p·V, `[lane][D]`.
    static ACC: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[i] = Σ_j p[j]·v[j][i]` with slot j in lane `j % lanes` of `acc` (`[min(lanes, n)][D]`),
/// each lane an FMA chain over its slots, then the lanes summed by the halving tree: the order of
/// tinyBLAS / `ggml_vec_dot_f16` for the transposed V (`p` is rounded to f16 for an f16 cache;
/// `p` itself, the softmax weights, stays as it is for the caller).
fn weighted_sum(
    v: &KvData,
    base: usize,
    d: usize,
    p: &[f32],
    lanes: usize,
    acc: &mut [f32],
    out: &mut [f32],
) {
    acc.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        let row = &mut acc[(j % lanes) * d..(j % lanes + 1) * d];
        let at = base + j * d;
        match v {
            // `mul_mat` converts the weights to the cache type first.
            KvData::F16(v) => axpy_f16(row, f16::from_f32(pj).to_f32(), &v[at..at + d]),
            KvData::F32(v) => {
                for (o, &x) in row.iter_mut().zip(&v[at..at + d]) {
                    *o = x.mul_add(pj, *o);
                }
            }
        }
    }
    reduce_lanes(acc, d, lanes, out);
}

/// Sums the lanes of `acc` (its used rows, `[rows][D]`) into `out` by the halving tree; lanes
/// past the used rows are zero and leave sums unchanged.
fn reduce_lanes(acc: &mut [f32], d: usize, lanes: usize, out: &mut [f32]) {
    let mut used = acc.len() / d;
    let mut step = lanes / 2;
    while step >= 1 {
        for i in 0..step.min(used.saturating_sub(step)) {
            let (lo, hi) = acc.split_at_mut((i + step) * d);
            add_assign(&mut lo[i * d..(i + 1) * d], &hi[..d]);
        }
        used = used.min(step);
        step /= 2;
    }
    match used {
        0 => out.fill(0.0),
        _ => out.copy_from_slice(&acc[..d]),
    }
}

/// [`softmax`] of the scores of slots `from..`, the slots before weighing exactly 0: the blocks of
/// 16 stay where they are counted from slot 0, and the masked slots of the first one are −∞, so
/// the bits are those of the whole row with llama.cpp's mask.
fn softmax_from(x: &mut [f32], from: usize) {
    let aligned = from / 16 * 16;
    x[..aligned].fill(0.0);
    x[aligned..from].fill(f32::NEG_INFINITY);
    softmax(&mut x[aligned..]);
}

/// `ggml_vec_soft_max_f32` (AVX512 path) followed by the scaling of
/// `ggml_compute_forward_soft_max_f32`, over visible scores (masked ones weigh exactly 0).
fn softmax(x: &mut [f32]) {
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for block in x.chunks_mut(16) {
        sum += exp_block(block, max) as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Replaces up to 16 scores by `ggml_v_expf(s - max)` and returns their 16-lane tree sum
/// (missing lanes are masked slots: zero).
fn exp_block(block: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if block.len() == 16 && crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA; the block holds 16 values.
        return unsafe { simd::exp_block16(block, max) };
    }
    let mut lanes = [0f32; 16];
    for (l, s) in lanes.iter_mut().zip(block.iter_mut()) {
        *s = expf(*s - max);
        *l = *s;
    }
    tree_sum(&mut lanes)
}

/// Halving-tree sum (lane i += lane i + n/2, …), the order of `_mm512_reduce_add_ps` and of the
/// `GGML_F32Cx16_REDUCE` pairing; `lanes.len()` is a power of two.
fn tree_sum(lanes: &mut [f32]) -> f32 {
    let mut step = lanes.len() / 2;
    while step >= 1 {
        for i in 0..step {
            lanes[i] += lanes[i + step];
        }
        step /= 2;
    }
    lanes[0]
}

// Constants of `ggml_v_expf` (hex floats 0x1.8p23, 0x1.715476p+0, 0x1.62e4p-1, 0x1.7f7d1cp-20
// and the polynomial 0x1.ffffecp-1, 0x1.fffdb6p-2, 0x1.555e66p-3, 0x1.573e2ep-5, 0x1.0e4020p-7).
const EXP_ROUND: f32 = f32::from_bits(0x4b40_0000);
const EXP_LOG2E: f32 = f32::from_bits(0x3fb8_aa3b);
const EXP_LN2_HI: f32 = f32::from_bits(0x3f31_7200);
const EXP_LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
const EXP_C1: f32 = f32::from_bits(0x3f7f_fff6);
const EXP_C2: f32 = f32::from_bits(0x3eff_fedb);
const EXP_C3: f32 = f32::from_bits(0x3e2a_af33);
const EXP_C4: f32 = f32::from_bits(0x3d2b_9f17);
const EXP_C5: f32 = f32::from_bits(0x3c07_2010);

/// ggml's `ggml_v_expf` (AVX512 variant), one lane: `2^n · p(b)` with n = round(x·log2 e),
/// b = x − n·ln 2 in two FMA steps, p a degree-5 polynomial; `_mm512_scalef_ps` applies 2^n with
/// one rounding, and |n| > 192 saturates to 0 or ∞.
pub(crate) fn expf(x: f32) -> f32 {
    let z = x.mul_add(EXP_LOG2E, EXP_ROUND);
    let n = z - EXP_ROUND;
    let b = (-n).mul_add(EXP_LN2_LO, (-n).mul_add(EXP_LN2_HI, x));
    let u = b * b;
    let j = EXP_C5
        .mul_add(b, EXP_C4)
        .mul_add(u, EXP_C3.mul_add(b, EXP_C2))
        .mul_add(u, EXP_C1.mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    if n.is_nan() {
        return n;
    }
    // j·2^n with one rounding: an exact scaling into the normal range, then the rounding one.
    let n = n as i32;
    let n1 = n.clamp(-126, 127);
    (j * pow2(n - n1)) * pow2(n1)
}

/// 2^e for e in [-126, 127].
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// q·k over the head dimension in `lanes` lanes (q already rounded to f16).
fn dot_f16(lanes: usize, a: &[f32], b: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if a.len().is_multiple_of(lanes) && crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C; lengths are multiples of the lane count.
        return unsafe {
            match lanes {
                16 => simd::dot16_f16(a, b),
                _ => simd::dot64_f16(a, b),
            }
        };
    }
    dot_lanes(lanes, a.len(), |i| a[i], |i| b[i].to_f32(), true)
}

fn dot_f32(lanes: usize, a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(lanes, a.len(), |i| a[i], |i| b[i], false)
}

/// The reference order for a dot product of `n` elements in `lanes` lanes. The tail past the last
/// full 64 (`ggml_vec_dot_f16`/`_f32` leftovers; only possible with 64 lanes) is added one
/// product at a time, in f64 for f16 data (`wide`) and in f32 for f32 data.
fn dot_lanes(
    lanes: usize,
    n: usize,
    a: impl Fn(usize) -> f32,
    b: impl Fn(usize) -> f32,
    wide: bool,
) -> f32 {
    let mut acc = [0f32; 64];
    let full = n - n % lanes;
    for i in 0..full {
        acc[i % lanes] = a(i).mul_add(b(i), acc[i % lanes]);
    }
    let sum = tree_sum(&mut acc[..lanes]);
    if wide {
        let mut s = sum as f64;
        for i in full..n {
            s += (a(i) * b(i)) as f64;
        }
        s as f32
    } else {
        (full..n).fold(sum, |s, i| s + a(i) * b(i))
    }
}

/// `out += p·v`, each element one FMA.
fn axpy_f16(out: &mut [f32], p: f32, v: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    if out.len().is_multiple_of(8) && crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C; lengths are multiples of 8.
        return unsafe { simd::axpy_f16(out, p, v) };
    }
    for (o, x) in out.iter_mut().zip(v) {
        *o = x.to_f32().mul_add(p, *o);
    }
}

fn add_assign(a: &mut [f32], b: &[f32]) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use half::f16;
    use std::arch::x86_64::*;

    use super::*;

    /// The halving tree over 8 lanes (the last three steps of `_mm512_reduce_add_ps`).
    #[inline(always)]
    unsafe fn tree8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    /// tinyBLAS's 16-lane dot product as two 8-lane halves.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot16_f16(a: &[f32], b: &[f16]) -> f32 {
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        for i in (0..a.len()).step_by(16) {
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), load_f16(pb.add(i)), lo);
            hi = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), load_f16(pb.add(i + 8)), hi);
        }
        tree8(_mm256_add_ps(lo, hi))
    }

    /// `ggml_vec_dot_f16`'s 64-lane dot product as eight 8-lane parts.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot64_f16(a: &[f32], b: &[f16]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 8];
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        for i in (0..a.len()).step_by(64) {
            for (m, acc) in acc.iter_mut().enumerate() {
                let at = i + 8 * m;
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(at)), load_f16(pb.add(at)), *acc);
            }
        }
        for step in [4, 2, 1] {
            for m in 0..step {
                acc[m] = _mm256_add_ps(acc[m], acc[m + step]);
            }
        }
        tree8(acc[0])
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy_f16(out: &mut [f32], p: f32, v: &[f16]) {
        let pv = _mm256_set1_ps(p);
        for i in (0..out.len()).step_by(8) {
            let o = out.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                o,
                _mm256_fmadd_ps(load_f16(v.as_ptr().add(i)), pv, _mm256_loadu_ps(o)),
            );
        }
    }

    /// tinyBLAS's 16-lane dot product of f32 rows, as two 8-lane halves added before the tree.
    #[inline(always)]
    unsafe fn dot16_halves(q: *const f32, k: *const f32, d: usize) -> __m256 {
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..d).step_by(16) {
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), _mm256_loadu_ps(k.add(i)), lo);
            hi = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.add(i + 8)),
                _mm256_loadu_ps(k.add(i + 8)),
                hi,
            );
        }
        _mm256_add_ps(lo, hi)
    }

    /// [`tree8`] of eight vectors at once, lane m of the result being `tree8(v[m])`: the same
    /// additions (lane i + i+4, then i + i+2, then 0 + 1), done across registers.
    #[inline(always)]
    unsafe fn tree8x8(v: [__m256; 8]) -> __m256 {
        let halves = |a, b| {
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(a, b),
                _mm256_permute2f128_ps::<0x31>(a, b),
            )
        };
        let pairs = |a, b| {
            _mm256_add_ps(
                _mm256_shuffle_ps::<0x44>(a, b),
                _mm256_shuffle_ps::<0xEE>(a, b),
            )
        };
        let y0 = pairs(halves(v[0], v[1]), halves(v[2], v[3]));
        let y1 = pairs(halves(v[4], v[5]), halves(v[6], v[7]));
        // Lanes now hold vectors 0, 2, 4, 6 | 1, 3, 5, 7.
        let z = _mm256_add_ps(
            _mm256_shuffle_ps::<0x88>(y0, y1),
            _mm256_shuffle_ps::<0xDD>(y0, y1),
        );
        _mm256_permutevar8x32_ps(z, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// `s[j] = q·k_j · scale` in tinyBLAS's 16-lane order, eight keys per horizontal sum.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores16(q: &[f32], keys: &[f32], d: usize, scale: f32, s: &mut [f32]) {
        let (pq, pk, ps) = (q.as_ptr(), keys.as_ptr(), s.as_mut_ptr());
        let n = s.len();
        let full = n - n % 8;
        let scale8 = _mm256_set1_ps(scale);
        for j in (0..full).step_by(8) {
            let mut v = [_mm256_setzero_ps(); 8];
            for (m, v) in v.iter_mut().enumerate() {
                *v = dot16_halves(pq, pk.add((j + m) * d), d);
            }
            _mm256_storeu_ps(ps.add(j), _mm256_mul_ps(tree8x8(v), scale8));
        }
        for j in full..n {
            *ps.add(j) = tree8(dot16_halves(pq, pk.add(j * d), d)) * scale;
        }
    }

    /// `ggml_vec_dot_f16`'s 64-lane order ([`dot64_f16`]) over f32 rows, one key at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores64(q: &[f32], keys: &[f32], d: usize, scale: f32, s: &mut [f32]) {
        let (pq, pk) = (q.as_ptr(), keys.as_ptr());
        for (j, o) in s.iter_mut().enumerate() {
            let k = pk.add(j * d);
            let mut acc = [_mm256_setzero_ps(); 8];
            for i in (0..d).step_by(64) {
                for (m, acc) in acc.iter_mut().enumerate() {
                    let at = i + 8 * m;
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pq.add(at)),
                        _mm256_loadu_ps(k.add(at)),
                        *acc,
                    );
                }
            }
            for step in [4, 2, 1] {
                for m in 0..step {
                    acc[m] = _mm256_add_ps(acc[m], acc[m + step]);
                }
            }
            *o = tree8(acc[0]) * scale;
        }
    }

    /// Lane l of `acc` (`[LANES][D]`) += Σ p[j]·v_j over the slots j ≡ l (mod LANES), in slot
    /// order, 64 dimensions of one lane held in registers across the tile.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn accumulate<const LANES: usize>(
        values: &[f32],
        p: &[f32],
        d: usize,
        acc: &mut [f32],
    ) {
        let (pv, pa) = (values.as_ptr(), acc.as_mut_ptr());
        for lane in 0..LANES.min(p.len()) {
            for dc in (0..d).step_by(64) {
                let at = pa.add(lane * d + dc);
                let mut r = [_mm256_setzero_ps(); 8];
                for (m, r) in r.iter_mut().enumerate() {
                    *r = _mm256_loadu_ps(at.add(8 * m));
                }
                for j in (lane..p.len()).step_by(LANES) {
                    let w = _mm256_set1_ps(*p.get_unchecked(j));
                    let row = pv.add(j * d + dc);
                    for (m, r) in r.iter_mut().enumerate() {
                        *r = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(8 * m)), w, *r);
                    }
                }
                for (m, r) in r.iter().enumerate() {
                    _mm256_storeu_ps(at.add(8 * m), *r);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn widen_f16(x: &[f16], out: &mut [f32]) {
        assert_eq!(x.len(), out.len());
        let full = x.len() / 8 * 8;
        for i in (0..full).step_by(8) {
            _mm256_storeu_ps(out.as_mut_ptr().add(i), load_f16(x.as_ptr().add(i)));
        }
        for (o, v) in out[full..].iter_mut().zip(&x[full..]) {
            *o = v.to_f32();
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen_f16_x16(x: &[f16], out: &mut [f32]) {
        assert_eq!(x.len(), out.len());
        let full = x.len() / 16 * 16;
        for i in (0..full).step_by(16) {
            let h = _mm256_loadu_si256(x.as_ptr().add(i).cast());
            _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
        }
        for (o, v) in out[full..].iter_mut().zip(&x[full..]) {
            *o = v.to_f32();
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn round_to_f16(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(c.as_ptr()));
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
        for v in chunks.into_remainder() {
            *v = f16::from_f32(*v).to_f32();
        }
    }

    /// [`super::expf`] on 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn expf8(x: __m256) -> __m256 {
        let r = _mm256_set1_ps(EXP_ROUND);
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(EXP_LOG2E), r);
        let n = _mm256_sub_ps(z, r);
        let b = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(EXP_LN2_LO),
            _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x),
        );
        let u = _mm256_mul_ps(b, b);
        let c = |v: f32| _mm256_set1_ps(v);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(c(EXP_C5), b, c(EXP_C4)),
                u,
                _mm256_fmadd_ps(c(EXP_C3), b, c(EXP_C2)),
            ),
            u,
            _mm256_fmadd_ps(c(EXP_C1), b, c(1.0)),
        );
        // scalef(j, n): multiply by 2^(n − n1) exactly, then by 2^n1 with the one rounding.
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_min_epi32(
            _mm256_max_epi32(ni, _mm256_set1_epi32(-126)),
            _mm256_set1_epi32(127),
        );
        let n2 = _mm256_sub_epi32(ni, n1);
        let bias = _mm256_set1_epi32(127);
        let p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
        let p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
        let res = _mm256_mul_ps(_mm256_mul_ps(j, p2), p1);
        let abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let big = _mm256_cmp_ps(abs, _mm256_set1_ps(192.0), _CMP_GT_OQ);
        if _mm256_movemask_ps(big) == 0 {
            return res;
        }
        let nonpos = _mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ);
        let alt = _mm256_blendv_ps(_mm256_set1_ps(f32::INFINITY), _mm256_setzero_ps(), nonpos);
        _mm256_blendv_ps(res, alt, big)
    }

    /// [`super::exp_block`] for a full block of 16.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_block16(block: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let p = block.as_mut_ptr();
        let lo = expf8(_mm256_sub_ps(_mm256_loadu_ps(p), m));
        let hi = expf8(_mm256_sub_ps(_mm256_loadu_ps(p.add(8)), m));
        _mm256_storeu_ps(p, lo);
        _mm256_storeu_ps(p.add(8), hi);
        tree8(_mm256_add_ps(lo, hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvDtype;

    /// A sliding window: slots before `from` weigh exactly 0, the rest follow the textbook
    /// formula, and dropping whole multiples of 64 slots from the front (what a local layer's
    /// cache does) leaves every bit of the output as it was.
    #[test]
    fn a_window_masks_the_slots_before_it_and_survives_dropping_64_slots() {
        let (d, slots) = (64, 300);
        let key = |j: usize, i: usize| ((i * 7 + j * 13) as f32 * 0.037).sin();
        let value = |j: usize, i: usize| ((i + 3 * j) as f32 * 0.011).cos();
        let fill = |dropped: usize| {
            let mut cache = KvCache::new(KvDtype::F16, 1, 1, d, slots);
            let positions: Vec<i32> = (dropped as i32..slots as i32).collect();
            cache.push_slots(&positions).unwrap();
            for j in dropped..slots {
                let (k, v): (Vec<f32>, Vec<f32>) = (0..d).map(|i| (key(j, i), value(j, i))).unzip();
                cache.write(0, 0, j - dropped, &k, &v);
            }
            cache
        };
        let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.05).cos()).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let attend_from = |cache: &KvCache, from: usize, visible: usize, reduction| {
            let mut out = vec![0f32; d];
            let mut scores = vec![0f32; visible];
            attend_block(
                cache,
                0,
                0,
                &mut [QueryRow {
                    q: &q,
                    from,
                    visible,
                    out: &mut out,
                    far: None,
                }],
                scale,
                &mut scores,
                reduction,
                None,
            );
            (out, scores)
        };
        let full = fill(0);
        for reduction in [Reduction::Gemm, Reduction::VecDot] {
            for (from, visible) in [(0, 300), (130, 300), (200, 257), (250, 251)] {
                let (out, weights) = attend_from(&full, from, visible, reduction);
                assert!(weights[..from].iter().all(|&w| w == 0.0));
                let logits: Vec<f64> = (from..visible)
                    .map(|j| (0..d).map(|i| (q[i] * key(j, i)) as f64).sum::<f64>() * scale as f64)
                    .collect();
                let z: f64 = logits.iter().map(|l| l.exp()).sum();
                for (i, &o) in out.iter().enumerate() {
                    let expected: f64 = (from..visible)
                        .map(|j| (logits[j - from].exp() / z) * value(j, i) as f64)
                        .sum();
                    assert!(
                        (o as f64 - expected).abs() < 2e-3,
                        "output {i}: {o} vs {expected}"
                    );
                }
                if from >= 128 {
                    let shorter = fill(128);
                    let (dropped, _) = attend_from(&shorter, from - 128, visible - 128, reduction);
                    assert_eq!(
                        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        dropped.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{reduction:?}, from {from}"
                    );
                }
            }
        }
    }

    #[test]
    fn attention_equals_the_textbook_formula() {
        let d = 8;
        let mut cache = KvCache::new(KvDtype::F32, 1, 1, d, 4);
        cache.push_slots(&[0, 1, 2]).unwrap();
        let keys: Vec<Vec<f32>> = (0..3)
            .map(|j| (0..d).map(|i| ((i + j) as f32 * 0.3).sin()).collect())
            .collect();
        let vals: Vec<Vec<f32>> = (0..3)
            .map(|j| (0..d).map(|i| (i * j) as f32 * 0.1).collect())
            .collect();
        for j in 0..3 {
            cache.write(0, 0, j, &keys[j], &vals[j]);
        }
        let q: Vec<f32> = (0..d).map(|i| i as f32 * 0.2 - 0.5).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let mut scores = vec![0.0; 4];
        let mut out = vec![0.0; d];
        attend(
            &cache,
            0,
            0,
            3,
            &q,
            scale,
            &mut scores,
            &mut out,
            Reduction::Gemm,
            None,
        );
        let logits: Vec<f32> = keys
            .iter()
            .map(|k| k.iter().zip(&q).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for i in 0..d {
            let expected: f32 = (0..3).map(|j| logits[j].exp() / z * vals[j][i]).sum();
            assert!((out[i] - expected).abs() < 1e-5);
        }
        // With one visible slot the output is that slot's value.
        attend(
            &cache,
            0,
            0,
            1,
            &q,
            scale,
            &mut scores,
            &mut out,
            Reduction::Gemm,
            None,
        );
        assert_eq!(out, vals[0]);
    }

    /// One product of 2^24 and 63 products of 1: each order loses a different number of ones.
    #[test]
    fn dot_products_follow_the_reference_lanes_and_tree() {
        let mut q = vec![1f32; 64];
        let mut k = vec![f16::ONE; 64];
        q[0] = 2048.0;
        k[0] = f16::from_f32(8192.0);
        let big = 16_777_216f32;
        // tinyBLAS: lane 0 = 2^24 + 1 + 1 + 1 by FMA (each +1 lost to rounding to even), lanes
        // 1..15 = 4; tree: +4 → 2^24+4, +8 → 2^24+12, +16 → 2^24+28, +32 → 2^24+60.
        let gemm = big + 60.0;
        // ggml_vec_dot_f16: 64 single products; tree: +1 (lost) → 2^24, +2, +4, +8, +16, +32.
        let vec_dot = big + 62.0;
        assert_eq!(dot_f16(16, &q, &k), gemm);
        assert_eq!(dot_f16(64, &q, &k), vec_dot);
        assert_eq!(dot_lanes(16, 64, |i| q[i], |i| k[i].to_f32(), true), gemm);
        assert_eq!(
            dot_lanes(64, 64, |i| q[i], |i| k[i].to_f32(), true),
            vec_dot
        );

        // p·V runs the same orders over slots: slot 0 weighs 2^24, slots 1..63 weigh 1.
        let d = 8;
        let mut cache = KvCache::new(KvDtype::F16, 1, 1, d, 64);
        cache.push_slots(&(0..64).collect::<Vec<i32>>()).unwrap();
        for j in 0..64 {
            let v = vec![if j == 0 { 8192.0 } else { 1.0 }; d];
            cache.write(0, 0, j, &vec![0.0; d], &v);
        }
        let mut p: Vec<f32> = vec![1.0; 64];
        p[0] = 2048.0;
        let mut out = vec![0f32; d];
        for (lanes, expected) in [(16, gemm), (64, vec_dot)] {
            let mut acc = vec![0f32; lanes * d];
            weighted_sum(&cache.v, 0, d, &p, lanes, &mut acc, &mut out);
            assert!(out.iter().all(|&o| o == expected), "{lanes} lanes: {out:?}");
        }
    }

    #[test]
    fn expf_matches_ggml_and_stays_close_to_exp() {
        // Bits of ggml_v_expf (AVX512, run on a Zen 4) for these inputs, subnormal results
        // included (`_mm512_scalef_ps` rounds once).
        let pinned = [
            (0.0f32, 0x3f80_0000u32),
            (-1.0, 0x3ebc_5ab3),
            (-0.5, 0x3f1b_4597),
            (-0.1, 0x3f67_a36c),
            (-3.3, 0x3d17_12cd),
            (-10.25, 0x3814_4cd3),
            (-20.0, 0x310d_a432),
            (-60.5, 0x13d2_64df),
            (-87.0, 0x00b3_3686),
            (-88.7, 0x0020_bd47),
            (-100.0, 0x0000_001b),
            (-103.0, 0x0000_0001),
            (-104.5, 0),
            (-150.0, 0),
            (-1e4, 0),
        ];
        for (x, bits) in pinned {
            assert_eq!(expf(x).to_bits(), bits, "{x}");
        }
        for x in [-0.5f32, -10.25, -60.5] {
            let want = (x as f64).exp();
            assert!((expf(x) as f64 - want).abs() <= want * 3e-7, "{x}");
        }
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        #[cfg(target_arch = "x86_64")]
        if crate::quant::has_avx2() {
            let mut rng = 0x1234_5678u32;
            for _ in 0..4096 {
                let mut block = [0f32; 16];
                for b in block.iter_mut() {
                    rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    *b = -((rng >> 8) as f32 / (1 << 24) as f32) * 120.0;
                }
                let mut scalar = block;
                let mut lanes = [0f32; 16];
                for (l, s) in lanes.iter_mut().zip(scalar.iter_mut()) {
                    *s = expf(*s);
                    *l = *s;
                }
                let want = tree_sum(&mut lanes);
                // SAFETY: AVX2 checked above.
                let got = unsafe { simd::exp_block16(&mut block, 0.0) };
                assert_eq!(got.to_bits(), want.to_bits());
                assert_eq!(block.map(f32::to_bits), scalar.map(f32::to_bits));
            }
        }
    }

    /// The blocked path must give every query exactly what [`attend`] gives it alone, across
    /// tile edges, for both cache types, both reductions, head sizes with and without the SIMD
    /// kernels, and with far queries whose split falls anywhere (scored against other keys).
    #[test]
    fn a_block_of_queries_attends_bit_for_bit_as_each_alone() {
        let mut rng = 0x2545_f491u32;
        let mut next = || {
            rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((rng >> 8) as f32 / (1 << 24) as f32 - 0.5) * 8.0
        };
        let slots = 2 * TILE + 37;
        for dtype in [KvDtype::F16, KvDtype::F32] {
            for d in [64usize, 48, 128, 256] {
                let mut cache = KvCache::new(dtype, 2, 2, d, slots);
                let mut far_cache = KvCache::new(dtype, 2, 2, d, slots);
                for c in [&mut cache, &mut far_cache] {
                    c.push_slots(&(0..slots as i32).collect::<Vec<_>>())
                        .unwrap();
                    for layer in 0..2 {
                        for head in 0..2 {
                            for j in 0..slots {
                                let k: Vec<f32> = (0..d).map(|_| next()).collect();
                                let v: Vec<f32> = (0..d).map(|_| next()).collect();
                                c.write(layer, head, j, &k, &v);
                            }
                        }
                    }
                }
                // Runs of rows that see the same slots (up to 5: one group of four and one
                // alone) go through the group kernels.
                let visible = [
                    1usize,
                    15,
                    15,
                    16,
                    17,
                    17,
                    17,
                    TILE,
                    TILE + 1,
                    TILE + 1,
                    TILE + 1,
                    TILE + 1,
                    TILE + 1,
                    slots - 1,
                    slots,
                    203,
                    203,
                ];
                let far_slots = [
                    1usize,
                    0,
                    0,
                    9,
                    17,
                    17,
                    17,
                    100,
                    TILE,
                    TILE,
                    TILE,
                    TILE,
                    TILE,
                    TILE + 5,
                    0,
                    203,
                    203,
                ];
                let queries: Vec<(Vec<f32>, Vec<f32>)> = visible
                    .iter()
                    .map(|_| {
                        let q = (0..d).map(|_| next()).collect();
                        (q, (0..d).map(|_| next()).collect())
                    })
                    .collect();
                for (reduction, with_far) in [
                    (Reduction::Gemm, false),
                    (Reduction::VecDot, false),
                    (Reduction::Gemm, true),
                ] {
                    let case = |v: usize| {
                        format!("{dtype:?} d={d} {reduction:?} far={with_far} visible={v}")
                    };
                    let scale = 1.0 / (d as f32).sqrt();
                    let mut outs = vec![vec![0f32; d]; visible.len()];
                    let mut rows: Vec<QueryRow> = queries
                        .iter()
                        .zip(visible.iter().zip(&far_slots))
                        .zip(outs.iter_mut())
                        .map(|(((q, far_q), (&visible, &slots)), out)| QueryRow {
                            q,
                            from: 0,
                            visible,
                            out,
                            far: with_far.then_some(FarRow { q: far_q, slots }),
                        })
                        .collect();
                    let stride = block_stride(&rows);
                    let mut block_scores = vec![0f32; rows.len() * stride];
                    let far_keys = with_far.then_some(&far_cache.k);
                    attend_block(
                        &cache,
                        1,
                        1,
                        &mut rows,
                        scale,
                        &mut block_scores,
                        reduction,
                        far_keys,
                    );
                    for (r, ((q, far_q), &visible)) in queries.iter().zip(&visible).enumerate() {
                        let mut scores = vec![0f32; visible];
                        let mut out = vec![0f32; d];
                        let far = with_far.then_some(FarQuery {
                            slots: far_slots[r],
                            q: far_q,
                            keys: &far_cache.k,
                        });
                        attend(
                            &cache,
                            1,
                            1,
                            visible,
                            q,
                            scale,
                            &mut scores,
                            &mut out,
                            reduction,
                            far,
                        );
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&outs[r]), bits(&out), "{}", case(visible));
                        let weights = &block_scores[r * stride..][..visible];
                        assert_eq!(bits(weights), bits(&scores), "{}", case(visible));
                    }
                }
            }
        }
    }

    /// KIVI at 8 bits changes attention little: every query over a cache whose first slots are
    /// quantized (a tile straddling the boundary included), one at a time and in a block, comes
    /// out close to the same query over the plain f16 cache.
    #[test]
    fn attention_over_an_8_bit_kivi_cache_stays_close_to_f16() {
        let mut rng = 0x1b87_3593u32;
        let mut next = || {
            rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((rng >> 8) as f32 / (1 << 24) as f32 - 0.5) * 2.0
        };
        let (d, slots) = (64, 2 * TILE + 37);
        let mut plain = KvCache::new(KvDtype::F16, 1, 2, d, slots);
        let mut kivi = KvCache::new(KvDtype::F16, 1, 2, d, slots);
        kivi.use_kivi(crate::kv::Kivi {
            bits: 8,
            group: 32,
            residual: 5,
        });
        for c in [&mut plain, &mut kivi] {
            c.push_slots(&(0..slots as i32).collect::<Vec<_>>())
                .unwrap();
        }
        for head in 0..2 {
            for j in 0..slots {
                let k: Vec<f32> = (0..d).map(|_| 2.0 * next()).collect();
                let v: Vec<f32> = (0..d).map(|_| next()).collect();
                plain.write(0, head, j, &k, &v);
                kivi.write(0, head, j, &k, &v);
            }
        }
        kivi.settle();
        assert_eq!(kivi.quantized(0, 1), 288);
        let scale = 1.0 / (d as f32).sqrt();
        let visible = [1usize, 17, TILE, TILE + 1, 290, slots];
        let queries: Vec<Vec<f32>> = visible
            .iter()
            .map(|_| (0..d).map(|_| 2.0 * next()).collect())
            .collect();
        let mut worst = 0f32;
        for reduction in [Reduction::Gemm, Reduction::VecDot] {
            let mut block_outs = vec![vec![0f32; d]; visible.len()];
            let mut rows: Vec<QueryRow> = queries
                .iter()
                .zip(&visible)
                .zip(block_outs.iter_mut())
                .map(|((q, &visible), out)| QueryRow {
                    q,
                    from: 0,
                    visible,
                    out,
                    far: None,
                })
                .collect();
            let mut scores = vec![0f32; visible.len() * slots];
            attend_block(&kivi, 0, 1, &mut rows, scale, &mut scores, reduction, None);
            for ((q, &visible), block_out) in queries.iter().zip(&visible).zip(&block_outs) {
                let mut outs = [vec![0f32; d], vec![0f32; d]];
                for (cache, out) in [&plain, &kivi].into_iter().zip(outs.iter_mut()) {
                    let mut scores = vec![0f32; visible];
                    attend(
                        cache,
                        0,
                        1,
                        visible,
                        q,
                        scale,
                        &mut scores,
                        out,
                        reduction,
                        None,
                    );
                }
                assert_eq!(&outs[1], block_out, "{reduction:?}, {visible} visible");
                for (a, b) in outs[0].iter().zip(&outs[1]) {
                    worst = worst.max((a - b).abs());
                }
            }
        }
        // Values in [-1, 1); keys in [-2, 2) off by up to 2/255 each, scores by up to ~0.1.
        assert!(worst < 0.01, "off by {worst}");
        assert!(worst > 0.0, "the quantized slots were read");
    }

    /// The AVX2 one-row kernels, which CPUs without AVX-512 run in every block (this one runs
    /// the group kernels), against the scalar order: scores of 8 keys per tree and a tail, and
    /// p·V sums in 16 and 64 lanes.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_row_kernels_follow_the_scalar_order() {
        if !crate::quant::has_avx2() {
            return;
        }
        let mut rng = 0x7f4a_7c15u32;
        let mut next = || {
            rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((rng >> 8) as f32 / (1 << 24) as f32 - 0.5) * 16.0
        };
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for d in [64usize, 256] {
            let n = 29;
            let q: Vec<f32> = (0..d).map(|_| next()).collect();
            let keys: Vec<f32> = (0..n * d).map(|_| next()).collect();
            let p: Vec<f32> = (0..n).map(|_| next().abs() / 8.0).collect();
            let want: Vec<f32> = (0..n)
                .map(|j| dot_lanes(16, d, |i| q[i], |i| keys[j * d + i], true) * 0.125)
                .collect();
            let mut got = vec![0f32; n];
            // SAFETY: the CPU has AVX2 and FMA; `keys` holds `n` rows of `d`, `d % 16 == 0`.
            unsafe { simd::scores16(&q, &keys, d, 0.125, &mut got) };
            assert_eq!(bits(&got), bits(&want), "scores, d={d}");
            for lanes in [16usize, 64] {
                let mut want = vec![0f32; lanes * d];
                for (j, &pj) in p.iter().enumerate() {
                    let row = &mut want[(j % lanes) * d..(j % lanes + 1) * d];
                    for (o, &x) in row.iter_mut().zip(&keys[j * d..(j + 1) * d]) {
                        *o = x.mul_add(pj, *o);
                    }
                }
                let mut got = vec![0f32; lanes * d];
                // SAFETY: as above, `d % 64 == 0`, `got` holds `lanes` rows.
                unsafe {
                    match lanes {
                        16 => simd::accumulate::<16>(&keys, &p, d, &mut got),
                        _ => simd::accumulate::<64>(&keys, &p, d, &mut got),
                    }
                }
                assert_eq!(bits(&got), bits(&want), "p·V, d={d}, {lanes} lanes");
            }
        }
    }

    #[test]
    fn simd_and_scalar_orders_agree_bit_for_bit() {
        let mut rng = 0x9e37_79b9u32;
        let mut next = || {
            rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((rng >> 8) as f32 / (1 << 24) as f32 - 0.5) * 64.0
        };
        for d in [64usize, 128] {
            let a: Vec<f32> = (0..d).map(|_| f16::from_f32(next()).to_f32()).collect();
            let b: Vec<f16> = (0..d).map(|_| f16::from_f32(next())).collect();
            for lanes in [16, 64] {
                let want = dot_lanes(lanes, d, |i| a[i], |i| b[i].to_f32(), true);
                assert_eq!(dot_f16(lanes, &a, &b).to_bits(), want.to_bits());
            }
        }
        // Widening is exact whichever kernel does it, tails included.
        let h: Vec<f16> = (0..53).map(|_| f16::from_f32(next())).collect();
        let want: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
        let mut got = vec![0f32; h.len()];
        widen_f16(&h, &mut got);
        assert_eq!(got, want);
        #[cfg(target_arch = "x86_64")]
        if crate::quant::has_avx2() {
            // SAFETY: the CPU has AVX2 and F16C.
            unsafe { simd::widen_f16(&h, &mut got) };
            assert_eq!(got, want);
        }
    }
}
