//! The second attention of Self-Extend and STRING: a key far enough behind its query is scored
//! with the query, and possibly the key, seen at other positions, and the far scores replace the
//! plain ones before the one softmax.
//!
//! Both methods are one map: with group G, window distance D and query offset O, a key at j is
//! far from a query at i when i − j ≥ D, and its score is then rope(q, ⌊i/G⌋ + O)·rope(k, ⌊j/G⌋).
//! Self-Extend: D = W, G = group, O = W − W/G. STRING: D = S, G = 1, O = W − S (keys stay put,
//! so the cache needs no second copy of them).

/// How a scheme sees distant keys (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FarPositions {
    /// A key at least this many positions behind the query is far.
    pub distance: i32,
    /// Far positions are divided by this, rounding down.
    pub group: i32,
    /// Added to a far query's divided position.
    pub query_offset: i32,
}

impl FarPositions {
    /// Where the query of the token at `position` is seen by its far keys.
    pub fn query(&self, position: i32) -> i32 {
        position.div_euclid(self.group) + self.query_offset
    }

    /// Where the key of the token at `position` is seen by far queries.
    pub fn key(&self, position: i32) -> i32 {
        position.div_euclid(self.group)
    }

    /// True when far keys sit elsewhere than cached keys, so that the cache must also hold every
    /// key rotated at [`FarPositions::key`].
    pub fn moves_keys(&self) -> bool {
        self.group != 1
    }

    /// How many of the cached slots, whose keys are at `key_positions` (ascending, as the cache
    /// keeps them), a query at `query` sees as far: always the first ones.
    pub fn far_slots(&self, key_positions: &[i32], query: i32) -> usize {
        key_positions.partition_point(|&key| query - key >= self.distance)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{build, test_base, Base, PositionScheme, RopeStyle, RotaryTable};
    use super::FarPositions;
    use crate::kv::{KvCache, KvData, KvDtype};
    use crate::model::{attend, FarQuery, Reduction};

    const D: usize = 8;

    fn base() -> Base {
        test_base(10000.0, D, 12)
    }

    /// `x` rotated at `position` by the textbook RoPE, in f64: pair p = (x[2p], x[2p+1]) turns by
    /// position · 10000^(−2p/D), times the cos/sin factor `af`.
    fn rotated(x: &[f32], position: i32, af: f64) -> Vec<f64> {
        let mut out = vec![0.0; D];
        for p in 0..D / 2 {
            let angle = position as f64 * 10000f64.powf(-2.0 * p as f64 / D as f64);
            let (a, b) = (x[2 * p] as f64, x[2 * p + 1] as f64);
            out[2 * p] = af * (a * angle.cos() - b * angle.sin());
            out[2 * p + 1] = af * (a * angle.sin() + b * angle.cos());
        }
        out
    }

    fn table(scheme: &dyn PositionScheme, positions: &[i32]) -> RotaryTable {
        let mut t = RotaryTable::default();
        scheme.fill_table(positions, 0, &mut Vec::new(), &mut t);
        t
    }

    /// Checks the attention of the last of `n` tokens under `spec` through the engine (keys
    /// cached as the forward pass caches them, [`attend`] with the far query) against the
    /// textbook: every score from vectors rotated explicitly at the positions `seen(i, j)`, with
    /// the cos/sin factor `af`, then one softmax. Returns how much the far part moved the result.
    fn check_against_textbook(
        spec: &str,
        n: usize,
        af: f64,
        seen: impl Fn(i32, i32) -> (i32, i32),
    ) -> f64 {
        let scheme = build(&spec.parse().unwrap(), &base(), n).unwrap();
        let far = scheme.far().expect("a far scheme");
        let raw = |seed: usize| -> Vec<f32> {
            (0..D)
                .map(|d| ((seed * 7 + d * 3) as f32 * 0.37).sin())
                .collect()
        };
        let keys: Vec<Vec<f32>> = (0..n).map(|j| raw(j + 1)).collect();
        let values: Vec<Vec<f32>> = (0..n).map(|j| raw(j + 100)).collect();
        let q = raw(1000);
        let positions: Vec<i32> = (0..n as i32).collect();

        let mut cache = KvCache::new(KvDtype::F32, 1, 1, D, n);
        if far.moves_keys() {
            cache.keep_grouped_keys(far.group);
        }
        cache.push_slots(&positions).unwrap();
        let near_table = table(scheme.as_ref(), &positions);
        let grouped: Vec<i32> = positions.iter().map(|&p| far.key(p)).collect();
        let grouped_table = table(scheme.as_ref(), &grouped);
        for j in 0..n {
            let (mut k, mut g) = (keys[j].clone(), keys[j].clone());
            near_table.rotate(&mut k, j, RopeStyle::Normal);
            cache.write(0, 0, j, &k, &values[j]);
            if far.moves_keys() {
                grouped_table.rotate(&mut g, j, RopeStyle::Normal);
                cache.write_grouped_key(0, 0, j, &g);
            }
        }
        let i = positions[n - 1];
        let (mut near_q, mut far_q) = (q.clone(), q.clone());
        near_table.rotate_query(&mut near_q, n - 1, RopeStyle::Normal);
        table(scheme.as_ref(), &[far.query(i)]).rotate_query(&mut far_q, 0, RopeStyle::Normal);
        let slots = far.far_slots(cache.positions(0, 0), i);
        let far_keys: &KvData = cache.grouped_keys().unwrap_or(&cache.k);
        let scale = 1.0 / (D as f32).sqrt();
        let (mut scores, mut out) = (vec![0.0; n], vec![0.0; D]);
        let far_query = FarQuery {
            slots,
            q: &far_q,
            keys: far_keys,
        };
        attend(
            &cache,
            0,
            0,
            n,
            &near_q,
            scale,
            &mut scores,
            &mut out,
            Reduction::Gemm,
            Some(far_query),
        );

        let textbook = |seen: &dyn Fn(i32, i32) -> (i32, i32)| -> Vec<f64> {
            let logits: Vec<f64> = (0..n as i32)
                .map(|j| {
                    let (qp, kp) = seen(i, j);
                    let (a, b) = (rotated(&q, qp, af), rotated(&keys[j as usize], kp, af));
                    a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>() * scale as f64
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            (0..D)
                .map(|d| {
                    (0..n)
                        .map(|j| (logits[j] - max).exp() / z * values[j][d] as f64)
                        .sum()
                })
                .collect()
        };
        let expected = textbook(&seen);
        for (d, (a, b)) in out.iter().zip(&expected).enumerate() {
            assert!(
                (*a as f64 - b).abs() < 1e-5,
                "{spec}, {n} tokens: output {d}: engine {a}, textbook {b}"
            );
        }
        // How far the result is from attending to every key where it was cached.
        let plain = textbook(&|i, j| (i, j));
        expected
            .iter()
            .zip(&plain)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn self_extend_attention_is_the_papers_bi_level_attention() {
        // G = 2, W = 4 on a model trained on 12 tokens: up to (12 − 4)·2 + 4 = 20 tokens.
        let spec = "self_extend:group=2,window=4";
        let seen = |i: i32, j: i32| {
            if i - j < 4 {
                (i, j)
            } else {
                (i / 2 + 4 - 4 / 2, j / 2)
            }
        };
        // With 5 tokens, the one far key (j = 0 from i = 4) is grouped at the distance it had.
        for (n, moved) in [(3, false), (5, false), (6, true), (10, true), (20, true)] {
            let effect = check_against_textbook(spec, n, 1.0, seen);
            assert_eq!(
                effect > 1e-3,
                moved,
                "{n} tokens: grouping moved the output by {effect}"
            );
        }
    }

    #[test]
    fn string_attention_shifts_the_query_of_distant_keys_only() {
        // S = 6, W = 2, L = 12; the code's cos/sin factor 0.1·ln 2 + 1 by default.
        let af = 0.1 * 2f64.ln() + 1.0;
        for (spec, af) in [
            ("string:shift=6,window=2", af),
            ("string:shift=6,window=2,attention_factor=1", 1.0),
        ] {
            for (n, moved) in [(4, false), (7, true), (12, true)] {
                let seen = |i: i32, j: i32| if i - j < 6 { (i, j) } else { (i - 6 + 2, j) };
                let effect = check_against_textbook(spec, n, af, seen);
                assert_eq!(
                    effect > 1e-3,
                    moved,
                    "{n} tokens: the shift moved the output by {effect}"
                );
            }
        }
    }

    #[test]
    fn far_slots_count_the_keys_at_least_the_distance_behind() {
        let far = FarPositions {
            distance: 4,
            group: 2,
            query_offset: 2,
        };
        let keys: Vec<i32> = (0..10).collect();
        assert_eq!(far.far_slots(&keys, 9), 6);
        assert_eq!(far.far_slots(&keys, 3), 0);
        // After an eviction the slots no longer match positions; the positions decide.
        assert_eq!(far.far_slots(&[0, 1, 7, 8, 9], 9), 2);
    }
}
