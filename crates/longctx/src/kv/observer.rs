//! A window on the attention weights, for the KV policies that rank cached tokens by how much
//! attention they receive (H2O, SnapKV, TOVA, …). The kernel reports the softmax weights of the
//! queries an observer asks for, per query head with its KV head, without ever materialising an
//! L×L matrix.

/// Receives softmax weights of chosen queries while the forward pass runs.
///
/// Called from the worker threads, concurrently, hence `Sync`: accumulate with atomics or a lock.
pub trait AttentionObserver: Sync {
    /// Whether the weights of the query at `position` in `layer` are wanted.
    fn wants(&self, layer: usize, position: i32) -> bool;
    /// The weights (summing to 1) of one query head over the visible cache slots, oldest first.
    fn observe(&self, layer: usize, head: usize, kv_head: usize, position: i32, weights: &[f32]);
}
