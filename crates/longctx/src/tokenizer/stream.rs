//! Detokenizing one id at a time. A token may end in the middle of a UTF-8 character (byte-level
//! BPE splits emoji and CJK across tokens), so bytes are held back until the character completes.

use super::Tokenizer;

/// Streaming detokenizer: push ids one at a time, get back only complete UTF-8 text.
///
/// Each id contributes what [`Tokenizer::decode`] would give for it alone with no leading-space
/// removal: generated text continues a prompt, so a SentencePiece `▁word` keeps its space. Control
/// tokens contribute nothing. Bytes that can never become valid UTF-8 come out as U+FFFD.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The text that `id` completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending.extend_from_slice(&tok.piece(id, false));
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    text.push_str(s);
                    self.pending.clear();
                    return text;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix was just checked, so this conversion cannot fail.
                    text.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return text;
                        }
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still held back, with an unfinished character shown as U+FFFD.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}
