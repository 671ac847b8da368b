//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): every byte of a word is first mapped to a
//! printable character (GPT-2's byte alphabet), then adjacent symbols are merged, lowest merge rank
//! first and leftmost first among equal ranks, until no ranked pair is left.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::pretokenize::{PreConfig, PreTokenizer};
use super::vocab::Vocab;
use crate::gguf::MetaValue;
use crate::{Error, Result};

/// GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes are
/// moved, in order, to U+0100..U+0143 so that every byte is a visible character.
pub(crate) fn byte_to_char(b: u8) -> char {
    let code = match b {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => u32::from(b),
        0x00..=0x20 => 0x100 + u32::from(b),
        0x7F..=0xA0 => 0x121 + u32::from(b - 0x7F),
        0xAD => 0x143,
    };
    char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// The inverse of [`byte_to_char`]; `None` for characters outside the byte alphabet.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let code = u32::from(c);
    let byte = match code {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => code,
        0x100..=0x120 => code - 0x100,
        0x121..=0x142 => code - 0x121 + 0x7F,
        0x143 => 0xAD,
        _ => return None,
    };
    u8::try_from(byte).ok()
}

/// The bytes a byte-level token stands for. Characters outside the byte alphabet (which well-formed
/// vocabularies never contain) are kept as their UTF-8; llama.cpp prints an `[UNK_BYTE_..]` marker.
pub(crate) fn token_to_bytes(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

pub(crate) struct Bpe {
    pre: PreTokenizer,
    ignore_merges: bool,
    /// Merge parts that are not themselves tokens, numbered after the vocabulary.
    extra_pieces: HashMap<String, u32>,
    /// (left piece, right piece) -> rank.
    ranks: HashMap<(u32, u32), u32>,
}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
    piece: Option<u32>,
}

impl Bpe {
    pub fn new(
        meta: &HashMap<String, MetaValue>,
        vocab: &Vocab,
        config: PreConfig,
    ) -> Result<Self> {
        let key = "tokenizer.ggml.merges";
        let Some(MetaValue::Array(merges)) = meta.get(key) else {
            return Err(Error::Tokenizer(format!(
                "the model file has no {key}; a gpt2 (BPE) vocabulary needs its merges"
            )));
        };
        let mut bpe = Bpe {
            pre: PreTokenizer::new(config.kind)?,
            ignore_merges: config.ignore_merges,
            extra_pieces: HashMap::new(),
            ranks: HashMap::with_capacity(merges.len()),
        };
        for (rank, merge) in merges.iter().enumerate() {
            let MetaValue::String(merge) = merge else {
                return Err(Error::Tokenizer(format!(
                    "{key}[{rank}] should be a string"
                )));
            };
            // The separator is the first space after the first byte, so a merge may start with one.
            let Some(space) = merge.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                continue;
            };
            let left = bpe.intern(vocab, &merge[..space]);
            let right = bpe.intern(vocab, &merge[space + 1..]);
            bpe.ranks.entry((left, right)).or_insert(rank as u32);
        }
        Ok(bpe)
    }

    fn intern(&mut self, vocab: &Vocab, piece: &str) -> u32 {
        if let Some(&id) = vocab.ids.get(piece) {
            return id;
        }
        let next = (vocab.len() + self.extra_pieces.len()) as u32;
        *self.extra_pieces.entry(piece.to_string()).or_insert(next)
    }

    fn piece(&self, vocab: &Vocab, text: &str) -> Option<u32> {
        vocab
            .ids
            .get(text)
            .or_else(|| self.extra_pieces.get(text))
            .copied()
    }

    /// Appends the ids of one fragment of plain text (special tokens already cut out).
    pub fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut word = String::new();
        for range in self.pre.split(text)? {
            word.clear();
            word.extend(text[range].bytes().map(byte_to_char));
            self.encode_word(vocab, &word, out);
        }
        Ok(())
    }

    fn encode_word(&self, vocab: &Vocab, word: &str, out: &mut Vec<u32>) {
        if self.ignore_merges {
            if let Some(&id) = vocab.ids.get(word) {
                out.push(id);
                return;
            }
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        for (i, (start, c)) in word.char_indices().enumerate() {
            let len = c.len_utf8();
            symbols.push(Symbol {
                start,
                len,
                prev: i.checked_sub(1),
                next: (start + len < word.len()).then_some(i + 1),
                piece: self.piece(vocab, &word[start..start + len]),
            });
        }
        // (rank, left, right, merged length); the heap pops the lowest rank, then the leftmost.
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: usize, right: usize| {
            let (l, r) = (&symbols[left], &symbols[right]);
            let rank = self.ranks.get(&(l.piece?, r.piece?))?;
            Some(Reverse((*rank, left, right, l.len + r.len)))
        };
        for i in 1..symbols.len() {
            queue.extend(bigram(&symbols, i - 1, i));
        }
        while let Some(Reverse((_, left, right, len))) = queue.pop() {
            let (l, r) = (&symbols[left], &symbols[right]);
            // Entries go stale when either side has merged with something else since.
            if l.len == 0 || r.len == 0 || l.len + r.len != len {
                continue;
            }
            let next = r.next;
            let start = l.start;
            symbols[right].len = 0;
            let merged = &mut symbols[left];
            merged.len = len;
            merged.next = next;
            merged.piece = self.piece(vocab, &word[start..start + len]);
            let prev = merged.prev;
            if let Some(n) = next {
                symbols[n].prev = Some(left);
                queue.extend(bigram(&symbols, left, n));
            }
            if let Some(p) = prev {
                queue.extend(bigram(&symbols, p, left));
            }
        }
        for s in symbols.iter().filter(|s| s.len > 0) {
            let text = &word[s.start..s.start + s.len];
            match vocab.ids.get(text) {
                Some(&id) => out.push(id),
                // A merge result missing from the vocabulary: llama.cpp falls back to the
                // single-byte tokens it can find and drops the rest.
                None => out.extend(text.bytes().filter(u8::is_ascii).filter_map(|b| {
                    vocab
                        .ids
                        .get(char::from(b).encode_utf8(&mut [0; 4]) as &str)
                        .copied()
                })),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::pretokenize::PreKind;
    use crate::tokenizer::vocab::{Defaults, Model};

    fn strings(items: &[&str]) -> MetaValue {
        MetaValue::Array(
            items
                .iter()
                .map(|s| MetaValue::String(s.to_string()))
                .collect(),
        )
    }

    #[test]
    fn byte_alphabet_round_trips_every_byte() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c), "byte {b} collides");
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(byte_to_char(b' '), '\u{120}');
        assert_eq!(byte_to_char(b'\n'), '\u{10a}');
        assert_eq!(char_to_byte('\u{144}'), None);
    }

    #[test]
    fn merges_apply_by_rank_then_leftmost() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc", "\u{120}", "\u{120}a"];
        let meta: HashMap<String, MetaValue> = [
            ("tokenizer.ggml.tokens".to_string(), strings(&tokens)),
            // "b c" outranks "a b", so "abc" is built as a + bc; "ab" only appears when no c follows.
            (
                "tokenizer.ggml.merges".to_string(),
                strings(&["b c", "a b", "a bc", "\u{120} a"]),
            ),
        ]
        .into_iter()
        .collect();
        let defaults = Defaults {
            add_bos: false,
            add_eos: false,
            add_space_prefix: false,
        };
        let vocab = Vocab::from_metadata(&meta, Model::Bpe, defaults).unwrap();
        let config = PreConfig {
            kind: PreKind::Gpt2,
            clean_spaces: false,
            ignore_merges: false,
            add_bos: false,
        };
        let bpe = Bpe::new(&meta, &vocab, config).unwrap();
        let encode = |text: &str| {
            let mut out = Vec::new();
            bpe.encode(&vocab, text, &mut out).unwrap();
            out
        };
        assert_eq!(encode("abc"), [5]);
        assert_eq!(encode("ab"), [3]);
        assert_eq!(encode("abab"), [3, 3]);
        assert_eq!(encode("cab"), [2, 3]);
        assert_eq!(encode("bcab a"), [4, 3, 7]);
    }
}
