//! `out[t, r] = Σ_c x[t, c] · W[r, c]` for several weight matrices that share one input, split
//! by output rows across the pool (one parallel region for q, k and v together, say).

use super::{dot, dot_n, dot_pair_n, ActType, Activations, Batch, Weight};
use crate::threads::ThreadPool;

/// Tokens processed per pass over a thread's weight rows (a multiple of 4: `dot_n` must see
/// whole groups of the four llama.cpp's batched kernels see, tokens `0..n - n % 4`): their
/// converted activations (~40 KB for 32 tokens of 576 values in Q8_0, Q5_0's offsets
/// included) stay in L1 while the weights stream from L2. 16 and 64 measured no better.
const TOKEN_TILE: usize = 32;
const _: () = assert!(TOKEN_TILE.is_multiple_of(4));

/// Inputs of at least this many tokens are converted by all threads; a decoded token's would
/// cost less than waking them.
const PARALLEL_CONVERSION: usize = 8;

/// One matrix of a [`matmul`] call and where its `[tokens, rows]` output goes.
pub struct MatmulJob<'a> {
    pub weight: &'a Weight,
    pub out: &'a mut [f32],
}

/// Most matrices one [`matmul`] call takes (q, k and v share one call).
pub const MAX_JOBS: usize = 4;

/// Converted copies of the current input, one per activation format the weights need.
#[derive(Default)]
pub struct ActCache {
    entries: Vec<Activations>,
}

impl ActCache {
    /// Index of the entry holding `x` converted to `act`, converting it unless `fresh` says this
    /// call already did.
    fn get(
        &mut self,
        pool: &ThreadPool,
        x: &[f32],
        tokens: usize,
        cols: usize,
        act: ActType,
        fresh: &mut [Option<ActType>; MAX_JOBS],
    ) -> usize {
        let index = match self.entries.iter().position(|e| e.act() == Some(act)) {
            Some(i) => i,
            None => {
                self.entries.push(Activations::default());
                self.entries.len() - 1
            }
        };
        if !fresh.contains(&Some(act)) {
            let entry = &mut self.entries[index];
            if tokens >= PARALLEL_CONVERSION {
                entry.quantize_on(pool, x, tokens, cols, act);
            } else {
                entry.quantize(x, tokens, cols, act);
            }
            if let Some(slot) = fresh.iter_mut().find(|f| f.is_none()) {
                *slot = Some(act);
            }
        }
        index
    }
}

struct SyncPtr(*mut f32);
// SAFETY: threads write disjoint rows of the outputs (see `matmul`).
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// Taking the pointer through a method makes closures capture the `Sync` wrapper, not the
    /// raw pointer field.
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Runs every job (at most [`MAX_JOBS`]) on input `x` (`[tokens, cols]`). Allocates nothing once
/// the activation buffers have grown to the largest input.
pub fn matmul(
    pool: &ThreadPool,
    acts: &mut ActCache,
    x: &[f32],
    tokens: usize,
    jobs: &mut [MatmulJob],
) {
    assert!(
        jobs.len() <= MAX_JOBS,
        "matmul takes at most {MAX_JOBS} matrices"
    );
    let Some(first) = jobs.first() else { return };
    let cols = first.weight.cols;
    let mut fresh = [None; MAX_JOBS];
    let mut act_index = [0usize; MAX_JOBS];
    for (j, slot) in jobs.iter().zip(act_index.iter_mut()) {
        debug_assert_eq!(j.weight.cols, cols);
        debug_assert_eq!(j.out.len(), tokens * j.weight.rows);
        *slot = acts.get(pool, x, tokens, cols, j.weight.wtype.act_type(), &mut fresh);
    }
    let acts = &*acts;
    let n = jobs.len();
    let outs: [SyncPtr; MAX_JOBS] = std::array::from_fn(|i| {
        SyncPtr(
            jobs.get_mut(i)
                .map_or(std::ptr::null_mut(), |j| j.out.as_mut_ptr()),
        )
    });
    let weights: [Option<&Weight>; MAX_JOBS] =
        std::array::from_fn(|i| jobs.get(i).map(|j| j.weight));
    let total: usize = weights.iter().flatten().map(|w| w.rows).sum();
    pool.for_ranges(total, &|range| {
        let mut base = 0;
        for i in 0..n {
            let Some(weight) = weights[i] else { continue };
            let (lo, hi) = (range.start.max(base), range.end.min(base + weight.rows));
            if lo < hi {
                rows(
                    weight,
                    &acts.entries[act_index[i]],
                    tokens,
                    (lo - base)..(hi - base),
                    &outs[i],
                );
            }
            base += weight.rows;
        }
    });
}

fn rows(
    weight: &Weight,
    act: &Activations,
    tokens: usize,
    range: std::ops::Range<usize>,
    out: &SyncPtr,
) {
    let n = weight.rows;
    let cols = weight.cols;
    let batch = Batch {
        tokens,
        repacked: weight.repacked(),
    };
    let store = |t: usize, r: usize, v: f32| {
        // SAFETY: `t < tokens` and `r` lies in this thread's exclusive row range.
        unsafe { *out.get().add(t * n + r) = v }
    };
    for t0 in (0..tokens).step_by(TOKEN_TILE) {
        let t1 = (t0 + TOKEN_TILE).min(tokens);
        let mut r = range.start;
        while r < range.end {
            let mut t = t0;
            let paired = r + 1 < range.end
                && pair_groups::<8>(weight, act, r, &mut t, t1, &store)
                && pair_groups::<4>(weight, act, r, &mut t, t1, &store);
            let rows = if paired { r..r + 2 } else { r..r + 1 };
            if !paired {
                // Eight tokens a weight block where they are there: its decoding is shared
                // more widely, and the accumulators still fit the registers.
                groups::<8>(weight, act, r, &mut t, t1, batch, &store);
                groups::<4>(weight, act, r, &mut t, t1, batch, &store);
            }
            for r in rows.clone() {
                for t in t..t1 {
                    store(
                        t,
                        r,
                        dot(weight.wtype, weight.row(r), act.row(t), cols, batch),
                    );
                }
            }
            r = rows.end;
        }
    }
}

/// [`groups`] for rows `r` and `r + 1` together; false (and nothing done) where no kernel
/// takes two rows for this weight type and CPU.
fn pair_groups<const N: usize>(
    weight: &Weight,
    act: &Activations,
    r: usize,
    t: &mut usize,
    t1: usize,
    store: &impl Fn(usize, usize, f32),
) -> bool {
    let w = [weight.row(r), weight.row(r + 1)];
    while *t + N <= t1 {
        let a: [&[u8]; N] = std::array::from_fn(|i| act.row(*t + i));
        let Some(both) = dot_pair_n(weight.wtype, w, a, weight.cols) else {
            return false;
        };
        for (row, values) in both.into_iter().enumerate() {
            for (i, v) in values.into_iter().enumerate() {
                store(*t + i, r + row, v);
            }
        }
        *t += N;
    }
    true
}

/// Row `r` against tokens `t..` in groups of `N` while whole groups fit before `t1`; `t` ends
/// after the last group.
fn groups<const N: usize>(
    weight: &Weight,
    act: &Activations,
    r: usize,
    t: &mut usize,
    t1: usize,
    batch: Batch,
    store: &impl Fn(usize, usize, f32),
) {
    let w = weight.row(r);
    while *t + N <= t1 {
        let a: [&[u8]; N] = std::array::from_fn(|i| act.row(*t + i));
        for (i, v) in dot_n(weight.wtype, w, a, weight.cols, batch)
            .into_iter()
            .enumerate()
        {
            store(*t + i, r, v);
        }
        *t += N;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use memmap2::Mmap;

    use super::*;
    use crate::quant::{blocks, MapSlice, WeightType};

    /// A `[rows, cols]` matrix of random valid blocks, mapped from a temporary file as a model's
    /// weights are.
    fn weight(wtype: WeightType, rows: usize, cols: usize, seed: u32) -> Weight {
        let bytes = wtype.block().1;
        let mut s = seed;
        let mut data: Vec<u8> = (0..rows * cols / 32 * bytes)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 24) as u8
            })
            .collect();
        for (i, b) in data.chunks_exact_mut(bytes).enumerate() {
            let d = half::f16::from_f32(0.002 + 0.0005 * (i % 9) as f32);
            b[..2].copy_from_slice(&d.to_le_bytes());
            if wtype == WeightType::Q5_1 {
                b[2..4].copy_from_slice(&(-d).to_le_bytes());
            }
        }
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        // SAFETY: the temporary file is private to this test and not resized while mapped.
        let map = Arc::new(unsafe { Mmap::map(&file) }.unwrap());
        let slice = MapSlice::new(map, 0, data.len());
        Weight::new("blk.0.attn_q.weight", wtype, rows, cols, slice).unwrap()
    }

    /// Q5 and Q8_0 matrices through the threaded driver, one token (decode) and several
    /// (prefill: groups of eight and four through `dot_n`, or through `dot_pair_n` two weight
    /// rows at once where the CPU has the kernel, the rest through `dot`, the
    /// conversion on all threads from 8 tokens on): every output is the scalar oracle's product
    /// bit for bit and close to the float product of the dequantized weights.
    #[test]
    fn q5_weights_through_matmul_match_the_oracle() {
        let pool = ThreadPool::new(2);
        // An odd row count: one thread's range ends in a row without a pair.
        let (rows, cols) = (21, 640);
        for wtype in [WeightType::Q5_0, WeightType::Q5_1, WeightType::Q8_0] {
            let w = weight(wtype, rows, cols, 17);
            let mut deq = vec![0f32; rows * cols];
            for (r, out) in deq.chunks_exact_mut(cols).enumerate() {
                w.dequantize_row(r, out);
            }
            for tokens in [1, 2, 7, 13] {
                let mut s = 99u32 + tokens as u32;
                let x: Vec<f32> = (0..tokens * cols)
                    .map(|_| {
                        s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                        (s >> 8) as f32 / (1 << 24) as f32 - 0.5
                    })
                    .collect();
                let mut out = vec![f32::NAN; tokens * rows];
                let mut cache = ActCache::default();
                matmul(
                    &pool,
                    &mut cache,
                    &x,
                    tokens,
                    &mut [MatmulJob {
                        weight: &w,
                        out: &mut out,
                    }],
                );
                let mut act = Activations::default();
                act.quantize(&x, tokens, cols, wtype.act_type());
                for t in 0..tokens {
                    let xt = &x[t * cols..(t + 1) * cols];
                    for r in 0..rows {
                        let got = out[t * rows + r];
                        let oracle = blocks::dot_scalar(wtype, w.row(r), act.row(t), cols);
                        assert_eq!(got.to_bits(), oracle.to_bits(), "{wtype:?} t {t} r {r}");
                        let exact: f32 = deq[r * cols..(r + 1) * cols]
                            .iter()
                            .zip(xt)
                            .map(|(a, b)| a * b)
                            .sum();
                        // Random Q8_0 codes reach ±127, eight times Q5's: so does the
                        // activations' rounding error.
                        let tolerance = if wtype == WeightType::Q8_0 {
                            0.16
                        } else {
                            0.02
                        };
                        assert!(
                            (got - exact).abs() < tolerance,
                            "{wtype:?} t {t} r {r}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
