//! Self-Extend (Jin et al., "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning",
//! arXiv:2401.01325), the paper's exact bi-level attention (datamllab/LongLM
//! `self_extend_patch/Llama.py`). A query at i sees its `window` (W) nearest keys as trained, key
//! j at j; every key further away (i − j ≥ W) is seen at the grouped position ⌊j/G⌋ from a query
//! at ⌊i/G⌋ + W − W/G, the shift that makes grouped distances continue where the window's end.
//! The grouped scores replace the plain ones before the one softmax. Relative distances stay
//! below the trained length L up to (L − W)·G + W tokens.
//!
//! Grouped keys are a second rotation of every key, which the KV cache keeps beside the first
//! (one more key tensor: the cache grows by half).
//!
//! `mode=block` is instead llama.cpp's one-map approximation (`--grp-attn-n/--grp-attn-w`,
//! `tools/main/main.cpp`): before each chunk, every completed block of W tokens past the window
//! has its cached keys moved to grouped positions (token t to ⌊t/G⌋), the trailing tokens
//! carry on densely from there, and attention is the model's own, over one key per token. It
//! needs no second key buffer and no second score per key, but the neighbours seen at their own
//! positions jump by whole blocks (0…W tokens instead of exactly W), and, like llama.cpp's, the
//! result depends on where chunks end: it is not the paper's attention.

use super::{Base, FarPositions, ModelRope, PositionScheme, RotaryTable};
use crate::spec::{Params, SpecPart, MAX_TOKENS};
use crate::{Error, Result};

pub struct SelfExtend {
    rope: ModelRope,
    group: usize,
    window: usize,
    trained_ctx: usize,
    block: bool,
}

pub fn build(part: &SpecPart, base: &Base, n_ctx: usize) -> Result<Box<dyn PositionScheme>> {
    let mut params = Params::new(part);
    // A group past 1024 maps a whole trained length onto a handful of positions.
    let group: usize = params.get_in("group", 4, 1..=1024)?;
    let window: usize = params.get_in("window", 512, 1..=MAX_TOKENS)?;
    let block = params.choice("mode", &["exact", "block"])? == "block";
    params.finish(&["group", "window", "mode"])?;
    let trained = base.trained_ctx;
    if !window.is_multiple_of(group) {
        return Err(Error::InvalidOption(format!(
            "`{part}`: window={window} must be a positive multiple of group={group}, so that grouped positions continue where the window ends (llama.cpp's --grp-attn-w has the same rule)"
        )));
    }
    if window >= trained {
        return Err(Error::InvalidOption(format!(
            "`{part}`: window={window} must be below the trained length of {trained} tokens, which leaves room for the grouped keys"
        )));
    }
    let scheme = SelfExtend {
        rope: base.rope.clone(),
        group,
        window,
        trained_ctx: trained,
        block,
    };
    let reach = scheme.reach_tokens();
    if n_ctx > reach {
        let needed = (n_ctx - window).div_ceil(trained - window);
        return Err(Error::InvalidOption(format!(
            "`{part}` reaches {reach} tokens ((trained {trained} − window {window})·group {group} + window {window}), but the context is {n_ctx}; raise group to at least {needed} or shorten the context"
        )));
    }
    Ok(Box::new(scheme))
}

impl SelfExtend {
    /// (L − W)·G + W: the longest context whose grouped distances stay inside the trained length.
    fn reach_tokens(&self) -> usize {
        (self.trained_ctx - self.window) * self.group + self.window
    }
}

impl PositionScheme for SelfExtend {
    fn frequencies(&self, seq_len: usize, out: &mut Vec<f64>) {
        self.rope.frequencies(seq_len, out);
    }

    fn reach(&self) -> Option<usize> {
        Some(self.reach_tokens())
    }

    /// The model's own arithmetic, so that inside the window Self-Extend is the model exactly.
    fn fill_table(
        &self,
        positions: &[i32],
        seq_len: usize,
        freqs: &mut Vec<f64>,
        table: &mut RotaryTable,
    ) {
        self.rope.fill_table(positions, seq_len, freqs, table);
    }

    fn group_blocks(&self) -> Option<GroupBlocks> {
        self.block.then_some(GroupBlocks {
            group: self.group as i32,
            window: self.window as i32,
        })
    }

    fn far(&self) -> Option<FarPositions> {
        if self.block {
            return None;
        }
        let (g, w) = (self.group as i32, self.window as i32);
        Some(FarPositions {
            distance: w,
            group: g,
            query_offset: w - w / g,
        })
    }
}

/// Self-Extend's block mode: how cached tokens are regrouped between chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupBlocks {
    pub group: i32,
    pub window: i32,
}

impl GroupBlocks {
    /// Whether [`GroupBlocks::regroup`] has a block to move: the next position has passed a
    /// window beyond the grouped range (so most chunks skip copying the positions at all).
    pub fn due(&self, next: i32, grouped: i32) -> bool {
        next >= grouped + self.window
    }

    /// llama.cpp's loop, run before each chunk: while the next position has passed a window
    /// beyond the grouped range, shift the cached positions up, divide one block of `window` by
    /// `group` and close the gap behind it. `positions` holds every cached token's position
    /// (edited in place), `next` the position the next token takes and `grouped` the end of the
    /// grouped range (llama.cpp's `n_past` and `ga_i`). Returns whether anything moved.
    pub fn regroup(&self, positions: &mut [i32], next: &mut i32, grouped: &mut i32) -> bool {
        let (g, w) = (self.group, self.window);
        let mut moved = false;
        while self.due(*next, *grouped) {
            let ib = g * *grouped / w;
            let bd = (w / g) * (g - 1);
            let dd = w / g - ib * bd - w;
            let start = *grouped + ib * bd;
            shift(positions, *grouped..*next, ib * bd);
            for p in positions
                .iter_mut()
                .filter(|p| (start..start + w).contains(*p))
            {
                *p /= g;
            }
            shift(positions, start + w..*next + ib * bd, dd);
            *next -= bd;
            *grouped += w / g;
            moved = true;
        }
        moved
    }
}

/// Adds `delta` to the positions in `range` (llama.cpp's `seq_add`).
fn shift(positions: &mut [i32], range: std::ops::Range<i32>, delta: i32) {
    for p in positions.iter_mut().filter(|p| range.contains(*p)) {
        *p += delta;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{build, test_base, Base};
    use super::*;

    fn base(trained_ctx: usize) -> Base {
        test_base(10000.0, 8, trained_ctx)
    }

    fn far(spec: &str, trained: usize, n_ctx: usize) -> FarPositions {
        build(&spec.parse().unwrap(), &base(trained), n_ctx)
            .unwrap()
            .far()
            .unwrap()
    }

    /// G = 2, W = 4, query i = 9 over keys j = 0..=9: keys 6..=9 are neighbours at distance
    /// 9 − j; keys 0..=5 are grouped, at distance ⌊9/2⌋ + 4 − 4/2 − ⌊j/2⌋ = 6 − ⌊j/2⌋.
    #[test]
    fn positions_follow_the_paper_for_a_small_case() {
        let f = far("self_extend:group=2,window=4", 12, 20);
        let keys: Vec<i32> = (0..=9).collect();
        assert_eq!(f.far_slots(&keys, 9), 6);
        assert_eq!(f.query(9), 6);
        let distances: Vec<i32> = keys
            .iter()
            .map(|&j| {
                if 9 - j >= f.distance {
                    f.query(9) - f.key(j)
                } else {
                    9 - j
                }
            })
            .collect();
        // Across the window's edge the distance goes on from 3 (neighbour j = 6) to 4 (j = 5).
        assert_eq!(distances, [6, 6, 5, 5, 4, 4, 3, 2, 1, 0]);
    }

    #[test]
    fn the_last_query_of_the_reach_stays_inside_the_trained_length() {
        // (512 − 128)·4 + 128 = 1664 tokens; the farthest distance is from the last query to key 0.
        let f = far("self_extend:group=4,window=128", 512, 1664);
        assert_eq!(f.query(1663) - f.key(0), 511);
        let s = build(&"self_extend".parse().unwrap(), &base(4096), 14336).unwrap();
        assert_eq!(s.reach(), Some((4096 - 512) * 4 + 512));
        assert_eq!(
            s.far(),
            Some(FarPositions {
                distance: 512,
                group: 4,
                query_offset: 512 - 128
            })
        );
    }

    /// Feeds `n` tokens `chunk` at a time, regrouping before each chunk as the session does.
    fn feed_blocks(blocks: GroupBlocks, n: i32, chunk: i32) -> (Vec<i32>, i32) {
        let (mut positions, mut next, mut grouped) = (Vec::new(), 0, 0);
        let mut fed = 0;
        while fed < n {
            blocks.regroup(&mut positions, &mut next, &mut grouped);
            let c = chunk.min(n - fed);
            positions.extend(next..next + c);
            next += c;
            fed += c;
        }
        (positions, next)
    }

    /// G = 2, W = 4, 14 tokens: every completed block of 4 past the grouped range is grouped,
    /// token t at ⌊t/2⌋ (0 0 1 1 … 5 5, tokens 0–11); tokens 12 and 13 carry on densely at 6
    /// and 7. With G = 4, W = 8 and 40 tokens, tokens 0–31 sit at ⌊t/4⌋ and 32–39 at 8–15.
    #[test]
    fn block_mode_groups_completed_blocks_as_llama_cpp_does() {
        let small = GroupBlocks {
            group: 2,
            window: 4,
        };
        let expected = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7];
        for chunk in [1, 3, 14] {
            let (positions, next) = feed_blocks(small, 14, chunk);
            if chunk == 14 {
                // One chunk: nothing to regroup before it.
                assert_eq!(positions, (0..14).collect::<Vec<_>>());
            } else {
                assert_eq!(
                    (positions.as_slice(), next),
                    (&expected[..], 8),
                    "chunk {chunk}"
                );
            }
        }
        let (positions, next) = feed_blocks(
            GroupBlocks {
                group: 4,
                window: 8,
            },
            40,
            1,
        );
        let expected: Vec<i32> = (0..32).map(|t| t / 4).chain(8..16).collect();
        assert_eq!((positions, next), (expected, 16));
        let s = build(
            &"self_extend:group=4,window=8,mode=block".parse().unwrap(),
            &base(64),
            200,
        )
        .unwrap();
        assert_eq!(s.far(), None);
        assert_eq!(
            s.group_blocks(),
            Some(GroupBlocks {
                group: 4,
                window: 8
            })
        );
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        for (spec, n_ctx, needle) in [
            ("self_extend:group=3,window=128", 512, "window=128 must be a positive multiple of group=3"),
            ("self_extend:group=0", 512, "group must be a whole number between 1 and 1024 (got 0)"),
            ("self_extend:group=4,window=512", 512, "window=512 must be below the trained length of 512"),
            ("self_extend:group=4,window=1024", 512, "must be below the trained length"),
            (
                "self_extend:group=4,window=128",
                2048,
                "reaches 1664 tokens ((trained 512 − window 128)·group 4 + window 128), but the context is 2048; raise group to at least 5",
            ),
            ("self_extend:groups=4", 512, "no parameter `groups`"),
            ("self_extend:mode=blocks", 512, "`mode=blocks` for `self_extend`: choose one of exact, block"),
        ] {
            let err = match build(&spec.parse().unwrap(), &base(512), n_ctx) {
                Ok(_) => panic!("{spec} was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }
}
