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
