//! Continuous batching: one forward pass decodes a token for each of several sessions. Decoding
//! them one after the other reads every weight matrix once per session; batched, the matmuls
//! read it once for all of them, which is where a server's throughput with concurrent clients
//! comes from. Each session still attends over its own cache, at its own positions, under its
//! own policy.

use std::sync::Arc;

use super::{Feeding, Model, Session, Step};
use crate::model::{forward_batch, Buffers, Config, Sequence, Sequences};
use crate::threads::ThreadPool;
use crate::{Error, Result};

/// Buffers for decoding several sessions at once, sized for up to `max_batch` of them.
pub struct DecodeBatch {
    pool: Arc<ThreadPool>,
    buffers: Buffers,
    /// `[max_batch, V]`: the output matmul writes every session's row here at once.
    logits: Vec<f32>,
    /// Each session's chunk between its preparation and its finish.
    steps: Vec<Step>,
    max_batch: usize,
}

impl DecodeBatch {
    pub fn new(model: &Model, pool: Arc<ThreadPool>, max_batch: usize) -> Self {
        let c = &model.config;
        Self {
            pool,
            buffers: Buffers::new(c, max_batch),
            logits: vec![0.0; max_batch * c.vocab],
            steps: Vec::with_capacity(max_batch),
            max_batch,
        }
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The pool the batch runs on, for [`Session::with_pool`].
    pub fn pool(&self) -> &Arc<ThreadPool> {
        &self.pool
    }

    /// Whether the buffers hold `n` sessions of a model of this shape.
    fn fits(&self, c: &Config, n: usize) -> bool {
        self.buffers.fits(c, n) && self.logits.len() >= n * c.vocab
    }
}

/// The sessions of one step, each with the chunk it was prepared for.
struct Batch<'a, 'b> {
    sessions: &'a mut [&'b mut Session],
    steps: &'a [Step],
}

impl Sequences for Batch<'_, '_> {
    fn sequence(&mut self, i: usize) -> Sequence<'_> {
        self.sessions[i].split(self.steps[i].compress()).1
    }
}

/// Feeds `tokens[i]` to `sessions[i]`, all in one forward pass; afterwards `sessions[i].logits()`
/// holds its next-token logits. Each session goes through what [`Session::decode`] would do to
/// it: its policy observes the token's attention (and so does its external observer), may evict
/// or re-position after it, and the session's next position moves on.
///
/// Everything is checked before any session changes: one token per session, no more sessions
/// than the batch was made for, one model for all of them, token ids in its vocabulary and room
/// in every cache. An empty batch does nothing.
pub fn decode_batch(
    batch: &mut DecodeBatch,
    sessions: &mut [&mut Session],
    tokens: &[u32],
) -> Result<()> {
    check(batch, sessions, tokens)?;
    let Some(first) = sessions.first() else {
        return Ok(());
    };
    let model = first.model.clone();
    let vocab = model.config.vocab;
    batch.steps.clear();
    for s in sessions.iter_mut() {
        // `check` has made sure the cache has room, which is all this can fail on.
        batch.steps.push(s.prepare_chunk(1, Feeding::Decode, true)?);
    }
    let logits = &mut batch.logits[..tokens.len() * vocab];
    let mut sequences = Batch {
        sessions,
        steps: &batch.steps,
    };
    forward_batch(
        &model.weights,
        &model.config,
        &batch.pool,
        &mut batch.buffers,
        &mut sequences,
        tokens,
        logits,
    );
    for ((s, &step), logits) in sessions
        .iter_mut()
        .zip(&batch.steps)
        .zip(batch.logits.chunks_exact(vocab))
    {
        s.logits.copy_from_slice(logits);
        s.finish_chunk(step);
    }
    Ok(())
}

fn check(batch: &DecodeBatch, sessions: &[&mut Session], tokens: &[u32]) -> Result<()> {
    if sessions.len() != tokens.len() {
        return Err(Error::InvalidOption(format!(
            "a batched decode feeds one token to each session: {} sessions, {} tokens",
            sessions.len(),
            tokens.len()
        )));
    }
    if sessions.len() > batch.max_batch {
        return Err(Error::InvalidOption(format!(
            "{} sessions in a batch made for at most {}",
            sessions.len(),
            batch.max_batch
        )));
    }
    let Some(first) = sessions.first() else {
        return Ok(());
    };
    if !batch.fits(&first.model.config, sessions.len()) {
        return Err(Error::InvalidOption(
            "the batch was made for a model of another shape than the sessions'".into(),
        ));
    }
    for (s, token) in sessions.iter().zip(tokens) {
        if !Arc::ptr_eq(&s.model, &first.model) {
            return Err(Error::InvalidOption(
                "the sessions of a batch must share one loaded model (the same Arc<Model>)".into(),
            ));
        }
        // The attention's score rows are the session's, one per thread of the batch's pool.
        if s.scratch.threads() < batch.pool.threads() {
            return Err(Error::InvalidOption(format!(
                "a session made for {} threads cannot decode in a batch whose pool has {}; \
                 make it with Session::with_pool on the batch's pool",
                s.scratch.threads(),
                batch.pool.threads()
            )));
        }
        s.check_feed(std::slice::from_ref(token), Feeding::Decode)?;
    }
    Ok(())
}
