//! The generation loop: prefill a prompt, then sample and decode token by token, streaming text.

use std::sync::Arc;
use std::time::Instant;

use crate::sampling::Sampler;
use crate::session::Session;
use crate::tokenizer::StreamDecoder;
use crate::{Error, Result};

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Stop,
    /// `max_tokens` were generated.
    Length,
}

/// What a generation cost and produced.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Tokens generated, the end-of-generation token not included.
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    /// Time from the end of the prefill to the end of generation: sampling, forward passes and
    /// detokenization, as the user waits for them.
    pub decode_seconds: f64,
    pub kv_bytes: usize,
    pub finish_reason: FinishReason,
}

impl GenerationStats {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_seconds)
    }

    pub fn decode_tokens_per_second(&self) -> f64 {
        rate(self.generated_tokens, self.decode_seconds)
    }
}

fn rate(tokens: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    }
}

/// Feeds `prompt` to `session` and generates up to `max_tokens` tokens after it, passing their
/// text to `on_text` piece by piece (never splitting a UTF-8 character). The text of an
/// end-of-generation token is not emitted.
///
/// Every generated token is also fed to the session, so afterwards the cache holds the prompt and
/// the whole answer and a conversation can go on from there.
pub fn generate(
    session: &mut Session,
    sampler: &mut Sampler,
    prompt: &[u32],
    max_tokens: usize,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerationStats> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    session.check_fits(prompt.len(), max_tokens)?;
    let start = Instant::now();
    let logits = session.prefill(prompt)?.to_vec();
    let prefill_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let (generated_tokens, finish_reason) =
        continue_generation(session, sampler, prompt, &logits, max_tokens, on_text)?;
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens,
        prefill_seconds,
        decode_seconds: start.elapsed().as_secs_f64(),
        kv_bytes: session.kv_bytes(),
        finish_reason,
    })
}

/// Generates up to `max_tokens` tokens after a prompt the caller has fed itself (as evaluation
/// does when the context and the question go in separately): `logits` are the prompt's last
/// token's, `prompt` its tokens, which the repetition penalty looks back over. Returns the
/// number of tokens generated and why it stopped.
pub fn continue_generation(
    session: &mut Session,
    sampler: &mut Sampler,
    prompt: &[u32],
    logits: &[f32],
    max_tokens: usize,
    on_text: &mut dyn FnMut(&str),
) -> Result<(usize, FinishReason)> {
    // The session is borrowed mutably for every forward pass; the tokenizer lives in the shared
    // model, so hold the model separately.
    let model = Arc::clone(&session.model);
    let tokenizer = &model.tokenizer;
    // The repetition penalty looks back over the prompt too, as llama.cpp's does.
    let mut history = Vec::with_capacity(prompt.len() + max_tokens);
    history.extend_from_slice(prompt);
    let mut logits = logits;
    let mut decoder = StreamDecoder::new();
    let mut generated = 0;
    let mut finish_reason = FinishReason::Length;
    while generated < max_tokens {
        let id = sampler.sample(logits, &history);
        if tokenizer.is_end_of_generation(id) {
            finish_reason = FinishReason::Stop;
            break;
        }
        generated += 1;
        history.push(id);
        let piece = decoder.push(tokenizer, id);
        if !piece.is_empty() {
            on_text(&piece);
        }
        logits = session.decode(id)?;
    }
    let rest = decoder.finish();
    if !rest.is_empty() {
        on_text(&rest);
    }
    Ok((generated, finish_reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;
    use crate::session::{Model, SessionOptions};

    fn session(n_ctx: usize) -> Session {
        let path = crate::fetch::resolve_model(None).unwrap();
        let model = Model::load(&path).unwrap();
        let options = SessionOptions {
            n_ctx,
            ..SessionOptions::default()
        };
        Session::new(model, options).unwrap()
    }

    fn run(
        session: &mut Session,
        prompt: &[u32],
        max_tokens: usize,
    ) -> Result<(String, GenerationStats)> {
        let mut sampler = Sampler::new(SamplingParams::greedy())?;
        let mut text = String::new();
        let stats = generate(session, &mut sampler, prompt, max_tokens, &mut |piece| {
            text.push_str(piece)
        })?;
        Ok((text, stats))
    }

    #[test]
    fn greedy_generation_streams_text_and_fills_the_cache() {
        let mut s = session(256);
        let prompt = s
            .model
            .tokenizer
            .encode("The capital of France is", true, false)
            .unwrap();
        let (text, stats) = run(&mut s, &prompt, 8).unwrap();
        assert!(!text.is_empty());
        assert_eq!(stats.prompt_tokens, prompt.len());
        assert!(stats.generated_tokens <= 8);
        if stats.finish_reason == FinishReason::Length {
            assert_eq!(stats.generated_tokens, 8);
        }
        assert_eq!(s.n_past(), prompt.len() + stats.generated_tokens);
        assert!(stats.kv_bytes > 0);

        // Greedy decoding is deterministic.
        s.reset();
        let (again, _) = run(&mut s, &prompt, 8).unwrap();
        assert_eq!(again, text);
    }

    #[test]
    fn an_empty_prompt_is_an_error() {
        let mut s = session(64);
        assert!(matches!(run(&mut s, &[], 4), Err(Error::EmptyPrompt)));
    }

    #[test]
    fn a_prompt_that_does_not_fit_is_refused_before_any_work() {
        let mut s = session(32);
        let prompt = vec![1u32; 30];
        let err = run(&mut s, &prompt, 4).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ContextOverflow {
                    tokens: 30,
                    reserve: 4,
                    ctx: 32
                }
            ),
            "{err}"
        );
        assert_eq!(s.n_past(), 0);
    }
}
