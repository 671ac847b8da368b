//! A window on the attention weights, for the KV policies that rank cached tokens by how much
//! attention they receive (H2O, SnapKV, TOVA, …). The kernel reports the softmax weights of the
//! queries an observer asks for, per query head with its KV head, without ever materialising an
//! L×L matrix.

/// Receives softmax weights of chosen queries while the forward pass runs.
///
/// Called from the worker threads, concurrently, hence `Sync`: accumulate with atomics or a lock.
pub trait AttentionObserver: Sync {
    /// Whether the weights of the query at `position` in `layer` are wanted (none by default).
    fn wants(&self, _layer: usize, _position: i32) -> bool {
        false
    }
    /// The weights (summing to 1) of one query head over the visible cache slots, oldest first.
    fn observe(&self, _layer: usize, _head: usize, _kv_head: usize, _position: i32, _: &[f32]) {}
}

/// The KV policy's observer and the caller's as one, each told only of the weights it asks for.
#[derive(Clone, Copy, Default)]
pub struct Observers<'a> {
    pub policy: Option<&'a dyn AttentionObserver>,
    pub external: Option<&'a dyn AttentionObserver>,
}

impl Observers<'_> {
    /// The observers of one layer: the policy hears only of the layers it compresses, so that
    /// sliding-window layers (which no policy compresses) cost it no work.
    pub fn of_layer(self, compressed: bool) -> Self {
        Self {
            policy: self.policy.filter(|_| compressed),
            ..self
        }
    }

    /// What the attention kernel is handed: None when nobody observes, so that it never asks.
    pub fn get(&self) -> Option<&dyn AttentionObserver> {
        match (self.policy, self.external) {
            (Some(_), Some(_)) => Some(self),
            (one, other) => one.or(other),
        }
    }
}

impl AttentionObserver for Observers<'_> {
    fn wants(&self, layer: usize, position: i32) -> bool {
        [self.policy, self.external]
            .iter()
            .flatten()
            .any(|o| o.wants(layer, position))
    }

    fn observe(&self, layer: usize, head: usize, kv_head: usize, position: i32, w: &[f32]) {
        for o in [self.policy, self.external].iter().flatten() {
            if o.wants(layer, position) {
                o.observe(layer, head, kv_head, position, w);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Everything;

    impl AttentionObserver for Everything {
        fn wants(&self, _: usize, _: i32) -> bool {
            true
        }
    }

    #[test]
    fn a_local_layer_is_shown_to_the_caller_but_not_to_the_policy() {
        let (policy, external) = (Everything, Everything);
        let both = Observers {
            policy: Some(&policy),
            external: Some(&external),
        };
        let local = both.of_layer(false);
        assert!(local.policy.is_none() && local.external.is_some());
        let global = both.of_layer(true);
        assert!(global.policy.is_some() && global.external.is_some());
        let policy_only = Observers {
            policy: Some(&policy),
            external: None,
        };
        assert!(policy_only.of_layer(false).get().is_none());
        assert!(policy_only.of_layer(true).get().is_some());
    }
}
