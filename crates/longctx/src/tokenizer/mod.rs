//! Tokenizer built from a GGUF file's metadata, giving the same ids as llama.cpp.
//!
//! Two algorithms are supported: byte-level BPE (`tokenizer.ggml.model = "gpt2"`, with the
//! pre-tokenizer named by `tokenizer.ggml.pre`) and SentencePiece BPE (`"llama"`). Encoding runs in
//! three steps, each in its own file: special-token text is cut out of the input (`special.rs`),
//! the plain text between is split into words (`pretokenize.rs`, BPE only) and merged into pieces
//! (`bpe.rs` / `spm.rs`). `vocab.rs` reads the metadata, including llama.cpp's text-based rules for
//! which tokens end generation.
//!
//! Decoding mirrors llama.cpp's `llama_detokenize` with `remove_special = false` and
//! `unparse_special = false`: control and unknown tokens (BOS, `<|im_end|>`, ...) render as nothing,
//! user-defined tokens as their text. [`StreamDecoder`] gives the text id by id, without the two
//! steps that only make sense for a whole text: removing the first token's SentencePiece space and
//! tidying spaces before punctuation.

mod bpe;
mod pretokenize;
mod special;
mod spm;
mod stream;
mod vocab;

use std::borrow::Cow;
use std::collections::HashMap;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::gguf::MetaValue;
use crate::{Error, Result};

pub use stream::StreamDecoder;

use bpe::Bpe;
use pretokenize::PreConfig;
use special::Fragment;
use spm::Spm;
use vocab::{attr, Defaults, Model, Vocab};

/// A vocabulary and the algorithm that maps text onto it.
pub struct Tokenizer {
    vocab: Vocab,
    algorithm: Algorithm,
    /// Special tokens in the order the partition tries them.
    specials: Vec<u32>,
    /// Decoding tidies spaces before punctuation (set by the pre-tokenizer, as in llama.cpp).
    clean_spaces: bool,
}

enum Algorithm {
    Bpe(Box<Bpe>),
    Spm(Spm),
}

impl Tokenizer {
    pub fn from_gguf_metadata(meta: &HashMap<String, MetaValue>) -> Result<Self> {
        let model_name = vocab::string(meta, "tokenizer.ggml.model")?.ok_or_else(|| {
            Error::Tokenizer(
                "the model file has no tokenizer.ggml.model; it carries no tokenizer".into(),
            )
        })?;
        match model_name {
            "gpt2" => {
                let config = PreConfig::from_name(vocab::string(meta, "tokenizer.ggml.pre")?)?;
                let defaults = Defaults {
                    add_bos: config.add_bos,
                    add_eos: false,
                    add_space_prefix: false,
                };
                let vocab = Vocab::from_metadata(meta, Model::Bpe, defaults)?;
                let bpe = Bpe::new(meta, &vocab, config)?;
                Ok(Self::assemble(
                    vocab,
                    Algorithm::Bpe(Box::new(bpe)),
                    config.clean_spaces,
                ))
            }
            "llama" => {
                let defaults = Defaults {
                    add_bos: true,
                    add_eos: false,
                    add_space_prefix: true,
                };
                let vocab = Vocab::from_metadata(meta, Model::Spm, defaults)?;
                let spm = Spm::new(&vocab);
                Ok(Self::assemble(vocab, Algorithm::Spm(spm), false))
            }
            other => Err(Error::Tokenizer(format!(
                "unsupported tokenizer.ggml.model `{other}`; longctx supports `gpt2` (byte-level BPE) and `llama` (SentencePiece)"
            ))),
        }
    }

    fn assemble(vocab: Vocab, algorithm: Algorithm, clean_spaces: bool) -> Self {
        let specials = special::special_tokens(&vocab);
        Self {
            vocab,
            algorithm,
            specials,
            clean_spaces,
        }
    }

    /// Token ids for `text`.
    ///
    /// `add_special` adds BOS/EOS as the model's metadata says (`tokenizer.ggml.add_bos_token` /
    /// `add_eos_token`, with llama.cpp's defaults when absent); `parse_special` recognises
    /// special/control token text (e.g. `<|im_start|>`) in the input as single tokens.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        self.encode_with_plain(text, add_special, parse_special, &[])
    }

    /// Token ids for a conversation: special tokens are parsed in the template's text, never
    /// in the messages' own text, so that a message cannot forge a turn. A conversation whose
    /// messages hold no control-token text encodes as its rendered text always did; one whose
    /// messages do is rendered with where each message lies ([`ChatTemplate::render_chat`]),
    /// and refused if its template inspects or rewrites messages too much to tell.
    pub fn encode_chat(
        &self,
        template: &ChatTemplate,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let forged = messages.iter().any(|m| self.holds_control_text(&m.content));
        if !forged {
            let text = template.render(messages, add_generation_prompt)?;
            return self.encode(&text, true, true);
        }
        let chat = template.render_chat(messages, add_generation_prompt)?;
        self.encode_with_plain(&chat.text, true, true, &chat.messages)
    }

    /// Whether `text` holds the text of a control or unknown token (`<|im_start|>`, `<s>`).
    fn holds_control_text(&self, text: &str) -> bool {
        self.specials.iter().any(|&id| {
            let special = self.vocab.texts[id as usize].as_str();
            special::is_control(&self.vocab, id) && !special.is_empty() && text.contains(special)
        })
    }

    fn encode_with_plain(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        plain: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>> {
        let fragments = special::partition(text, &self.specials, &self.vocab, parse_special, plain);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.vocab.add_bos {
            out.extend(self.vocab.bos);
        }
        match &self.algorithm {
            Algorithm::Bpe(bpe) => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(range) => bpe.encode(&self.vocab, &text[range], &mut out)?,
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
            Algorithm::Spm(spm) => {
                // SentencePiece marks word starts with a space, so text that opens the input or
                // follows a special token gets one (llama.cpp's behaviour, not only at the start).
                let mut after_special = true;
                let mut escaped = String::new();
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(range) => {
                            escaped.clear();
                            if self.vocab.add_space_prefix && after_special {
                                escaped.push(spm::SPACE);
                            }
                            escaped.extend(text[range].chars().map(|c| {
                                if c == ' ' {
                                    spm::SPACE
                                } else {
                                    c
                                }
                            }));
                            spm.encode(&self.vocab, &escaped, &mut out);
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                    }
                }
            }
        }
        if add_special && self.vocab.add_eos {
            out.extend(self.vocab.eos);
        }
        Ok(out)
    }

    /// Lossy UTF-8 text of the ids, as llama.cpp's `llama_detokenize(remove_special = false,
    /// unparse_special = false)`: control and unknown tokens are left out, the SentencePiece space
    /// prefix is removed from the first token, and for pre-tokenizers that ask for it spaces before
    /// `. , ! ?` and some contractions are dropped. Ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut strip_space = self.vocab.add_space_prefix;
        for &id in ids {
            let piece = self.piece(id, false);
            let piece = match piece.first() {
                Some(b' ') if strip_space => &piece[1..],
                _ => &piece[..],
            };
            bytes.extend_from_slice(piece);
            strip_space = false;
        }
        if self.clean_spaces {
            bytes = clean_up_spaces(&bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Raw bytes one token stands for (byte-level BPE unmapped, SentencePiece `▁` as a space,
    /// `<0xNN>` byte tokens as that byte). Control and user-defined tokens give their text; ids
    /// outside the vocabulary give nothing.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.piece(id, true).into_owned()
    }

    /// The token's text exactly as stored in the vocabulary (e.g. `<|im_end|>`, `Ġthe`, `▁the`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.texts.get(id as usize).map(String::as_str)
    }

    /// The id of a token with exactly this vocabulary text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.ids.get(text).copied()
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.vocab.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.vocab.eos
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.vocab.add_bos
    }

    /// EOS, EOT, and every token llama.cpp treats as end-of-generation (`<|im_end|>`,
    /// `<|endoftext|>`, `<|eot_id|>`, FIM separators, ...).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.vocab.eog.contains(&id)
    }

    /// What llama.cpp's `llama_token_to_piece` gives for one token, without leading-space removal.
    fn piece(&self, id: u32, special: bool) -> Cow<'_, [u8]> {
        let Some(text) = self.vocab.texts.get(id as usize) else {
            return Cow::Borrowed(&[]);
        };
        let a = self.vocab.attr(id);
        if !special && a & (attr::UNKNOWN | attr::CONTROL) != 0 {
            return Cow::Borrowed(&[]);
        }
        if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
            return Cow::Borrowed(text.as_bytes());
        }
        if a & attr::NORMAL != 0 {
            return Cow::Owned(match self.vocab.model {
                Model::Spm => text.replace(spm::SPACE, " ").into_bytes(),
                Model::Bpe => bpe::token_to_bytes(text),
            });
        }
        if a & attr::BYTE != 0 {
            // `<0xNN>`; llama.cpp reads the two hex digits without checking the rest.
            let byte = text
                .get(3..5)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .unwrap_or(0);
            return Cow::Owned(vec![byte]);
        }
        // Unused and undefined tokens render as nothing.
        Cow::Borrowed(&[])
    }
}

/// HF's `clean_up_tokenization_spaces` in llama.cpp's byte-for-byte form: drop the space before
/// `? ! . ,`, collapse ` ' ` to `'`, and drop the space before `'s 'm 're 've`.
fn clean_up_spaces(text: &[u8]) -> Vec<u8> {
    let Some(&first) = text.first() else {
        return Vec::new();
    };
    // pass 1: " ?", " !", " .", " ,"
    let mut out = vec![first];
    for &x in &text[1..] {
        if matches!(x, b'?' | b'!' | b'.' | b',') && out.last() == Some(&b' ') {
            out.pop();
        }
        out.push(x);
    }
    // pass 2: a lone apostrophe between spaces; the space after it is consumed, and llama.cpp
    // blanks it in place, so it no longer counts as a space for the next character.
    let src = out;
    let mut out = vec![src[0]];
    let mut i = 1;
    let mut prev_blanked = false;
    while i < src.len() {
        let x = src[i];
        let prev_space = src[i - 1] == b' ' && !prev_blanked;
        prev_blanked = false;
        if x == b'\'' && prev_space && src.get(i + 1) == Some(&b' ') {
            out.pop();
            out.push(x);
            i += 2;
            prev_blanked = true;
            continue;
        }
        out.push(x);
        i += 1;
    }
    // pass 3: " 's", " 'm", " 're", " 've"
    let src = out;
    let mut out = vec![src[0]];
    for i in 1..src.len() {
        let x = src[i];
        if x == b'\'' && src[i - 1] == b' ' {
            let next = (src.get(i + 1).copied(), src.get(i + 2).copied());
            if matches!(
                next,
                (Some(b's' | b'm'), _) | (Some(b'r' | b'v'), Some(b'e'))
            ) {
                out.pop();
            }
        }
        out.push(x);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_up_spaces_matches_llama_cpp_rules() {
        let clean = |s: &str| String::from_utf8(clean_up_spaces(s.as_bytes())).unwrap();
        assert_eq!(clean("Hello , world !"), "Hello, world!");
        assert_eq!(clean("a ' b"), "a'b");
        assert_eq!(
            clean("it 's we 're I 'm they 've"),
            "it's we're I'm they've"
        );
        assert_eq!(clean("don 't we 'll"), "don 't we 'll");
        assert_eq!(clean(" ' ' x"), "'' x");
        assert_eq!(clean(""), "");
    }

    #[test]
    fn unknown_model_type_is_a_clear_error() {
        let meta: HashMap<String, MetaValue> = [(
            "tokenizer.ggml.model".to_string(),
            MetaValue::String("bert".into()),
        )]
        .into_iter()
        .collect();
        let err = Tokenizer::from_gguf_metadata(&meta)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`bert`") && err.contains("gpt2") && err.contains("llama"),
            "{err}"
        );
    }

    #[test]
    fn unknown_pre_tokenizer_is_a_clear_error() {
        let meta: HashMap<String, MetaValue> = [
            (
                "tokenizer.ggml.model".to_string(),
                MetaValue::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                MetaValue::String("klingon".into()),
            ),
        ]
        .into_iter()
        .collect();
        let err = Tokenizer::from_gguf_metadata(&meta)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`klingon`") && err.contains("qwen2"), "{err}");
    }
}
