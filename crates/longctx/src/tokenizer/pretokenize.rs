//! Pre-tokenizers: cut text into the words that byte-level BPE merges within.
//!
//! Each `tokenizer.ggml.pre` name stands for a list of regexes that llama.cpp applies one after the
//! other, each splitting the pieces the previous one left. The GPT-2 and Llama-3 style regexes are
//! walked by hand here, as llama.cpp does, because their lookahead (`\s+(?!\S)`) and "keep what did
//! not match as its own piece" semantics are what the ids depend on; the simple character-class
//! regexes run through `fancy_regex`.

use std::ops::Range;

use fancy_regex::Regex;

use crate::{Error, Result};

/// Which regex family a `tokenizer.ggml.pre` name selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PreKind {
    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`.
    Gpt2,
    /// StarCoder and SmolLM: every digit on its own, then GPT-2.
    StarCoder,
    /// Llama 3: letters may take one leading symbol, numbers go in threes, newlines stay with the
    /// whitespace before them.
    Llama3,
    /// Qwen 2: Llama 3 with single digits.
    Qwen2,
    /// llama.cpp's fallback: punctuation runs, GPT-2, number runs, then groups of three ASCII digits.
    Default,
}

/// What a pre-tokenizer name implies besides its regexes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PreConfig {
    pub kind: PreKind,
    /// Decoding removes spaces before punctuation and some contractions (HF's
    /// `clean_up_tokenization_spaces`).
    pub clean_spaces: bool,
    /// A word that is already a token is emitted without running merges (Llama 3's tiktoken origin).
    pub ignore_merges: bool,
    /// Default for `tokenizer.ggml.add_bos_token` when metadata does not say.
    pub add_bos: bool,
}

// (names, kind, clean_spaces, ignore_merges + add_bos), as llama.cpp groups them.
const PRE_NAMES: &[(&[&str], PreKind, bool, bool)] = &[
    (&["default"], PreKind::Default, true, false),
    (
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        PreKind::Llama3,
        true,
        true,
    ),
    (&["dbrx", "smaug-bpe"], PreKind::Llama3, true, false),
    (
        &[
            "starcoder",
            "refact",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        PreKind::StarCoder,
        true,
        false,
    ),
    (&["smollm", "command-r"], PreKind::StarCoder, false, false),
    (
        &[
            "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "gigachat", "a.x-4.0", "mellum",
        ],
        PreKind::Gpt2,
        true,
        false,
    ),
    (
        &["trillion", "granite-docling"],
        PreKind::Gpt2,
        false,
        false,
    ),
    (
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "hunyuan",
            "solar-open",
        ],
        PreKind::Qwen2,
        false,
        false,
    ),
    (&["stablelm2", "megrez"], PreKind::Qwen2, true, false),
];

impl PreConfig {
    /// The configuration for a `tokenizer.ggml.pre` value; a missing value means `default`, as in
    /// llama.cpp (which also warns that quality suffers).
    pub fn from_name(name: Option<&str>) -> Result<Self> {
        let name = name.unwrap_or("default");
        PRE_NAMES
            .iter()
            .find(|(names, ..)| names.contains(&name))
            .map(|&(_, kind, clean_spaces, llama3)| PreConfig {
                kind,
                clean_spaces,
                ignore_merges: llama3,
                add_bos: llama3,
            })
            .ok_or_else(|| {
                let known: Vec<&str> = PRE_NAMES
                    .iter()
                    .flat_map(|(n, ..)| n.iter().copied())
                    .collect();
                Error::Tokenizer(format!(
                    "unsupported pre-tokenizer tokenizer.ggml.pre = `{name}`; longctx supports {}",
                    known.join(", ")
                ))
            })
    }
}

// Character classes, as llama.cpp's codepoint flags: \p{L}, \p{N}, \s, and "inside the piece".
const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 4;
const PRESENT: u8 = 8;

enum Stage {
    /// Matches become pieces and so do the gaps between them.
    Regex(Regex),
    Gpt2,
    /// The Llama-3 walk with numbers grouped by up to this many digits.
    Llama3(usize),
}

pub(crate) struct PreTokenizer {
    stages: Vec<Stage>,
    letters: Regex,
    numbers: Regex,
}

/// Bytes split at a time (see [`PreTokenizer::split_in_chunks`]).
const CHUNK_BYTES: usize = 1 << 16;

fn regex(pattern: &str) -> Result<Regex> {
    Regex::new(pattern)
        .map_err(|e| Error::Tokenizer(format!("cannot build pre-tokenizer regex {pattern}: {e}")))
}

impl PreTokenizer {
    pub fn new(kind: PreKind) -> Result<Self> {
        let stages = match kind {
            PreKind::Gpt2 => vec![Stage::Gpt2],
            PreKind::StarCoder => vec![Stage::Regex(regex(r"\p{N}")?), Stage::Gpt2],
            PreKind::Llama3 => vec![Stage::Llama3(3)],
            PreKind::Qwen2 => vec![Stage::Llama3(1)],
            PreKind::Default => vec![
                Stage::Regex(regex(r"[\p{P}$+<=>^~|]+")?),
                Stage::Gpt2,
                Stage::Regex(regex(r"\p{N}+")?),
                Stage::Regex(regex(r"[0-9][0-9][0-9]")?),
            ],
        };
        Ok(Self {
            stages,
            letters: regex(r"\p{L}+")?,
            numbers: regex(r"\p{N}+")?,
        })
    }

    /// Byte ranges of `text`'s words, in order and covering all of it.
    pub fn split(&self, text: &str) -> Result<Vec<Range<usize>>> {
        self.split_in_chunks(text, CHUNK_BYTES)
    }

    /// [`Self::split`], a chunk of about `chunk` bytes at a time. The walk keeps a 16-byte record
    /// per character of what it splits, so a 7 MB text split whole took ~120 MB; in chunks it
    /// takes ~1 MB more than the ranges it returns. A chunk ends only where every pre-tokenizer
    /// here ends a word whatever comes before: at a space between two ASCII letters. The word
    /// holding the first letter ends there (letters stop at the space), the next one starts
    /// there (a space and letters), and none of the patterns looks behind.
    fn split_in_chunks(&self, text: &str, chunk: usize) -> Result<Vec<Range<usize>>> {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let end = (start + chunk.max(1)..text.len().saturating_sub(1))
                .find(|&i| {
                    bytes[i] == b' '
                        && bytes[i - 1].is_ascii_alphabetic()
                        && bytes[i + 1].is_ascii_alphabetic()
                })
                .unwrap_or(text.len());
            let words = self.split_whole(&text[start..end])?;
            out.extend(words.into_iter().map(|w| w.start + start..w.end + start));
            start = end;
        }
        Ok(out)
    }

    fn split_whole(&self, text: &str) -> Result<Vec<Range<usize>>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let classes = self.classify(text)?;
        let mut pieces: Vec<Range<usize>> = std::iter::once(0..text.len()).collect();
        for stage in &self.stages {
            pieces = match stage {
                Stage::Regex(re) => split_regex(text, &pieces, re)?,
                Stage::Gpt2 => walk(text, &classes, &pieces, gpt2_word),
                Stage::Llama3(digits) => walk(text, &classes, &pieces, |p, pos| {
                    llama3_word(p, pos, *digits)
                }),
            };
        }
        Ok(pieces)
    }

    /// Class bits per byte offset (meaningful at the first byte of each character).
    fn classify(&self, text: &str) -> Result<Vec<u8>> {
        let mut classes = vec![0u8; text.len()];
        for (re, bit) in [(&self.letters, LETTER), (&self.numbers, NUMBER)] {
            for m in re.find_iter(text) {
                let m = m.map_err(|e| Error::Tokenizer(format!("pre-tokenizer: {e}")))?;
                for c in &mut classes[m.range()] {
                    *c |= bit;
                }
            }
        }
        for (i, ch) in text.char_indices() {
            classes[i] |= PRESENT;
            if ch.is_whitespace() {
                classes[i] |= SPACE;
            }
        }
        Ok(classes)
    }
}

fn split_regex(text: &str, pieces: &[Range<usize>], re: &Regex) -> Result<Vec<Range<usize>>> {
    let mut out = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let mut last = piece.start;
        // Matching each piece on its own keeps lookarounds and anchors inside it, as llama.cpp does.
        for m in re.find_iter(&text[piece.clone()]) {
            let m = m.map_err(|e| Error::Tokenizer(format!("pre-tokenizer: {e}")))?;
            let (start, end) = (piece.start + m.start(), piece.start + m.end());
            if start > last {
                out.push(last..start);
            }
            out.push(start..end);
            last = end;
        }
        if last < piece.end {
            out.push(last..piece.end);
        }
    }
    Ok(out)
}

/// The characters of one piece; positions past its end read as absent (class 0, no char).
struct Piece {
    chars: Vec<(usize, char, u8)>,
    end: usize,
}

impl Piece {
    fn len(&self) -> usize {
        self.chars.len()
    }
    fn class(&self, i: usize) -> u8 {
        self.chars.get(i).map_or(0, |c| c.2)
    }
    fn char(&self, i: usize) -> Option<char> {
        self.chars.get(i).map(|c| c.1)
    }
    fn offset(&self, i: usize) -> usize {
        self.chars.get(i).map_or(self.end, |c| c.0)
    }
    fn is(&self, i: usize, bit: u8) -> bool {
        self.class(i) & bit != 0
    }
    /// `[^\s\p{L}\p{N}]` within the piece.
    fn is_other(&self, i: usize) -> bool {
        let c = self.class(i);
        c & PRESENT != 0 && c & (LETTER | NUMBER | SPACE) == 0
    }
    fn run(&self, mut i: usize, bit: u8) -> usize {
        while self.is(i, bit) {
            i += 1;
        }
        i
    }
    fn run_other(&self, mut i: usize) -> usize {
        while self.is_other(i) {
            i += 1;
        }
        i
    }
}

/// Splits every piece with `next_word`, which returns the character index where the word that
/// starts at `pos` ends.
fn walk(
    text: &str,
    classes: &[u8],
    pieces: &[Range<usize>],
    next_word: impl Fn(&Piece, usize) -> usize,
) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(pieces.len());
    for range in pieces {
        let piece = Piece {
            chars: text[range.clone()]
                .char_indices()
                .map(|(i, c)| (range.start + i, c, classes[range.start + i]))
                .collect(),
            end: range.end,
        };
        let mut pos = 0;
        while pos < piece.len() {
            let end = next_word(&piece, pos).max(pos + 1);
            out.push(piece.offset(pos)..piece.offset(end));
            pos = end;
        }
    }
    out
}

/// Length of an English contraction (`'s`, `'LL`, ...) starting at `pos`, if any.
fn contraction(p: &Piece, pos: usize, any_case: bool) -> Option<usize> {
    if p.char(pos) != Some('\'') {
        return None;
    }
    let fold = |c: Option<char>| c.map(|c| if any_case { c.to_ascii_lowercase() } else { c });
    let c1 = fold(p.char(pos + 1))?;
    if matches!(c1, 's' | 't' | 'm' | 'd') {
        return Some(2);
    }
    let c2 = fold(p.char(pos + 2))?;
    matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')).then_some(3)
}

/// Trailing whitespace handling shared by both walks: `\s+(?!\S)` keeps the last space for the
/// next word, `\s+` takes the rest.
fn whitespace_end(p: &Piece, pos: usize) -> usize {
    let run = p.run(pos, SPACE) - pos;
    if run > 1 && pos + run < p.len() {
        pos + run - 1
    } else {
        pos + run.max(1)
    }
}

fn gpt2_word(p: &Piece, pos: usize) -> usize {
    if let Some(n) = contraction(p, pos, false) {
        return pos + n;
    }
    let start = pos + usize::from(p.char(pos) == Some(' '));
    if p.is(start, LETTER) {
        return p.run(start, LETTER);
    }
    if p.is(start, NUMBER) {
        return p.run(start, NUMBER);
    }
    if p.is_other(start) {
        return p.run_other(start);
    }
    whitespace_end(p, pos)
}

fn llama3_word(p: &Piece, pos: usize, max_digits: usize) -> usize {
    if let Some(n) = contraction(p, pos, true) {
        return pos + n;
    }
    let c = p.char(pos);
    let newline = |c: Option<char>| matches!(c, Some('\r' | '\n'));
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if !newline(c) && !p.is(pos, NUMBER) && (p.is(pos, LETTER) || p.is(pos + 1, LETTER)) {
        return p.run(pos + 1, LETTER);
    }
    // \p{N}{1,max_digits}
    if p.is(pos, NUMBER) {
        let mut end = pos;
        while end - pos < max_digits && p.is(end, NUMBER) {
            end += 1;
        }
        return end;
    }
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'; a lone trailing space lands here too and comes out the same as
    // the whitespace rule would give it.
    let start = pos + usize::from(c == Some(' '));
    if p.class(start) & (LETTER | NUMBER | SPACE) == 0 {
        let mut end = p.run_other(start);
        while newline(p.char(end)) {
            end += 1;
        }
        return end;
    }
    // \s*[\r\n]+ : up to the last newline of the whitespace run
    let run_end = p.run(pos, SPACE);
    if let Some(last) = (pos..run_end).rev().find(|&i| newline(p.char(i))) {
        return last + 1;
    }
    whitespace_end(p, pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(kind: PreKind, text: &str) -> Vec<String> {
        let pre = PreTokenizer::new(kind).unwrap();
        pre.split(text)
            .unwrap()
            .into_iter()
            .map(|r| text[r].to_string())
            .collect()
    }

    #[test]
    fn gpt2_splits_words_contractions_and_spaces() {
        assert_eq!(
            words(PreKind::Gpt2, "I'm here  now\t!!  "),
            ["I", "'m", " here", " ", " now", "\t", "!!", "  "]
        );
        assert_eq!(words(PreKind::Gpt2, "x 123 4"), ["x", " 123", " 4"]);
        assert_eq!(words(PreKind::Gpt2, "a\n\nb"), ["a", "\n", "\n", "b"]);
        assert_eq!(
            words(PreKind::Gpt2, "caf\u{e9} \u{4e2d}\u{6587}"),
            ["caf\u{e9}", " \u{4e2d}\u{6587}"]
        );
    }

    #[test]
    fn starcoder_isolates_each_digit() {
        assert_eq!(
            words(PreKind::StarCoder, "ab12 3c"),
            ["ab", "1", "2", " ", "3", "c"]
        );
        // a space before a digit is cut off by the digit split, so it stands alone
        assert_eq!(words(PreKind::StarCoder, "x 7"), ["x", " ", "7"]);
    }

    #[test]
    fn llama3_groups_digits_and_keeps_newlines_with_spaces() {
        assert_eq!(words(PreKind::Llama3, "1234567"), ["123", "456", "7"]);
        assert_eq!(
            words(PreKind::Llama3, "hi  \n\n there"),
            ["hi", "  \n\n", " there"]
        );
        assert_eq!(
            words(PreKind::Llama3, "YOU'LL (see)"),
            ["YOU", "'LL", " (", "see", ")"]
        );
        assert_eq!(words(PreKind::Llama3, "$x ..\n"), ["$x", " ..\n"]);
    }

    #[test]
    fn qwen2_uses_single_digits() {
        assert_eq!(words(PreKind::Qwen2, "v123"), ["v", "1", "2", "3"]);
    }

    #[test]
    fn default_splits_punctuation_then_numbers() {
        assert_eq!(
            words(PreKind::Default, "a+b 12345"),
            ["a", "+", "b", " ", "123", "45"]
        );
    }

    #[test]
    fn unknown_pre_names_the_value_and_the_supported_ones() {
        let err = PreConfig::from_name(Some("mystery"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`mystery`") && err.contains("llama-bpe") && err.contains("smollm"),
            "{err}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256, failure_persistence: None, ..Default::default()
        })]

        #[test]
        fn splitting_in_chunks_gives_the_words_of_the_whole(
            parts in proptest::collection::vec(proptest::sample::select(vec![
                "a", "Ab", "word", " ", "  ", "\t", "\n", "\r\n", "'s", "'LL", "'t", "12", "12345",
                "7", ".", "..", "!?", "$", "+", "(", ")", "caf\u{e9}", "\u{4e2d}\u{6587}", "\u{a0}",
                "\u{3000}", "\u{85}", "x1", "1x", " 9",
            ]), 0..60),
            chunk in 1usize..40,
        ) {
            let text = parts.concat();
            for kind in [PreKind::Gpt2, PreKind::StarCoder, PreKind::Llama3, PreKind::Qwen2, PreKind::Default] {
                let pre = PreTokenizer::new(kind).unwrap();
                proptest::prop_assert_eq!(
                    pre.split_in_chunks(&text, chunk).unwrap(),
                    pre.split_whole(&text).unwrap(),
                    "{:?} on {:?}", kind, text
                );
            }
        }
    }

    #[test]
    fn words_cover_the_input_exactly() {
        let text = "  Tabs\tand\r\n\u{3000}ideographic 99\u{a0}luft\u{85} 'S";
        for kind in [
            PreKind::Gpt2,
            PreKind::StarCoder,
            PreKind::Llama3,
            PreKind::Qwen2,
            PreKind::Default,
        ] {
            assert_eq!(words(kind, text).concat(), text, "{kind:?}");
        }
    }
}
