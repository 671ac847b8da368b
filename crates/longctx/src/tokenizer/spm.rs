//! SentencePiece BPE (`tokenizer.ggml.model = "llama"`), as llama.cpp runs it: start from single
//! characters and repeatedly join the adjacent pair whose joined text is the highest-scoring piece
//! (leftmost first among equal scores). Characters that end up in no piece fall back to `<0xNN>`
//! byte tokens.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::vocab::Vocab;

/// SentencePiece's visible space.
pub(crate) const SPACE: char = '\u{2581}';

pub(crate) struct Spm {
    /// Token for each byte value: `<0xNN>`, else the one-character token, else `<unk>`.
    byte_tokens: Vec<Option<u32>>,
}

struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    pub fn new(vocab: &Vocab) -> Self {
        let byte_tokens = (0..=255u8)
            .map(|b| {
                let hex = format!("<0x{b:02X}>");
                let single = char::from(b).is_ascii().then(|| char::from(b).to_string());
                // llama.cpp throws when a byte has no token at all; <unk> keeps encoding total.
                vocab
                    .ids
                    .get(&hex)
                    .or_else(|| single.and_then(|s| vocab.ids.get(&s)))
                    .copied()
                    .or(vocab.unk)
            })
            .collect();
        Spm { byte_tokens }
    }

    /// Appends the ids of `text`, whose spaces must already be written as [`SPACE`].
    pub fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8();
            symbols.push(Symbol {
                start,
                len,
                prev: i.checked_sub(1),
                next: (start + len < text.len()).then_some(i + 1),
            });
        }
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: usize, right: usize| {
            let (l, r) = (&symbols[left], &symbols[right]);
            let len = l.len + r.len;
            let id = *vocab.ids.get(&text[l.start..l.start + len])?;
            Some(Bigram {
                score: vocab.scores.get(id as usize).copied().unwrap_or(0.0),
                left,
                right,
                len,
            })
        };
        for i in 1..symbols.len() {
            queue.extend(bigram(&symbols, i - 1, i));
        }
        while let Some(Bigram {
            left, right, len, ..
        }) = queue.pop()
        {
            let (l, r) = (&symbols[left], &symbols[right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != len {
                continue;
            }
            let next = r.next;
            symbols[right].len = 0;
            symbols[left].len = len;
            symbols[left].next = next;
            if let Some(n) = next {
                symbols[n].prev = Some(left);
            }
            if let Some(p) = symbols[left].prev {
                queue.extend(bigram(&symbols, p, left));
            }
            if let Some(n) = next {
                queue.extend(bigram(&symbols, left, n));
            }
        }
        for s in symbols.iter().filter(|s| s.len > 0) {
            let piece = &text[s.start..s.start + s.len];
            match vocab.ids.get(piece) {
                Some(&id) => out.push(id),
                // Only single characters can miss: every merge produced a known piece.
                None => out.extend(piece.bytes().filter_map(|b| self.byte_tokens[b as usize])),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::gguf::MetaValue;
    use crate::tokenizer::vocab::{Defaults, Model};

    fn vocab(pieces: &[(&str, f32)]) -> Vocab {
        let mut tokens = vec![
            MetaValue::String("<unk>".into()),
            MetaValue::String("<s>".into()),
            MetaValue::String("</s>".into()),
        ];
        let mut scores = vec![MetaValue::F32(0.0); 3];
        let mut types = vec![MetaValue::I32(2), MetaValue::I32(3), MetaValue::I32(3)];
        for b in 0..=255u8 {
            tokens.push(MetaValue::String(format!("<0x{b:02X}>")));
            scores.push(MetaValue::F32(0.0));
            types.push(MetaValue::I32(6));
        }
        for (p, s) in pieces {
            tokens.push(MetaValue::String(p.to_string()));
            scores.push(MetaValue::F32(*s));
            types.push(MetaValue::I32(1));
        }
        let meta: HashMap<String, MetaValue> = [
            (
                "tokenizer.ggml.tokens".to_string(),
                MetaValue::Array(tokens),
            ),
            (
                "tokenizer.ggml.scores".to_string(),
                MetaValue::Array(scores),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                MetaValue::Array(types),
            ),
        ]
        .into_iter()
        .collect();
        let defaults = Defaults {
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
        };
        Vocab::from_metadata(&meta, Model::Spm, defaults).unwrap()
    }

    #[test]
    fn highest_score_wins_and_unknown_characters_become_bytes() {
        // ids: pieces start at 259
        let v = vocab(&[
            ("\u{2581}", -5.0),
            ("a", -5.0),
            ("b", -5.0),
            ("\u{2581}a", -1.0),
            ("ab", -2.0),
            ("\u{2581}ab", -0.5),
        ]);
        let spm = Spm::new(&v);
        let encode = |text: &str| {
            let mut out = Vec::new();
            spm.encode(&v, text, &mut out);
            out
        };
        assert_eq!(encode("\u{2581}ab"), [264]);
        // pairs that do not overlap both merge, whatever their order
        assert_eq!(encode("ab\u{2581}a"), [263, 262]);
        assert_eq!(encode("\u{2581}ab\u{2581}ab"), [264, 264]);
        // é is not a piece: its two UTF-8 bytes come out as byte tokens
        assert_eq!(encode("\u{e9}"), [3 + 0xC3, 3 + 0xA9]);
    }

    #[test]
    fn equal_scores_merge_leftmost_first() {
        let v = vocab(&[("a", -9.0), ("aa", -1.0)]);
        let spm = Spm::new(&v);
        let mut out = Vec::new();
        spm.encode(&v, "aaa", &mut out);
        assert_eq!(out, [260, 259]);
    }
}
