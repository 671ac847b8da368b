//! `out[t, r] = Σ_c x[t, c] · W[r, c]` for several weight matrices that share one input, split
//! by output rows across the pool (one parallel region for q, k and v together, say).

use super::{dot, dot_x4, ActType, Activations, Batch, Weight};
use crate::threads::ThreadPool;

/// Tokens processed per pass over a thread's weight rows (a multiple of 4: `dot_x4` must see
/// exactly the groups of four llama.cpp's batched kernels see, tokens `0..n - n % 4`): their converted activations
/// (~20 KB for 32 tokens of 576 values) stay in L1 while the weights stream from L2.
const TOKEN_TILE: usize = 32;
const _: () = assert!(TOKEN_TILE.is_multiple_of(4));

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
            self.entries[index].quantize(x, tokens, cols, act);
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
        *slot = acts.get(x, tokens, cols, j.weight.wtype.act_type(), &mut fresh);
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
        for r in range.clone() {
            let w = weight.row(r);
            let mut t = t0;
            while t + 4 <= t1 {
                let y = dot_x4(
                    weight.wtype,
                    w,
                    [act.row(t), act.row(t + 1), act.row(t + 2), act.row(t + 3)],
                    cols,
                    batch,
                );
                for (i, v) in y.into_iter().enumerate() {
                    store(t + i, r, v);
                }
                t += 4;
            }
            for t in t..t1 {
                store(t, r, dot(weight.wtype, w, act.row(t), cols, batch));
            }
        }
    }
}
