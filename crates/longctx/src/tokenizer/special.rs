//! Cutting special-token text (`<|im_start|>`, `<s>`, user-defined pieces) out of the input before
//! the text around it is tokenized, the way llama.cpp partitions it: tokens are tried longest
//! first, each one splitting every stretch of plain text that earlier tokens left.

use std::ops::Range;

use super::vocab::{attr, Vocab};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fragment {
    /// A byte range of the input still to be tokenized.
    Text(Range<usize>),
    /// A special token found in the input.
    Token(u32),
}

/// Control, user-defined and unknown tokens, longest text first (ties by id, for determinism).
pub(crate) fn special_tokens(vocab: &Vocab) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..vocab.len() as u32)
        .filter(|&id| vocab.attr(id) & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
        .collect();
    ids.sort_by_key(|&id| (std::cmp::Reverse(vocab.texts[id as usize].len()), id));
    ids
}

/// Control and unknown tokens: recognised in text only where special tokens are parsed (user-
/// defined ones always are).
pub(crate) fn is_control(vocab: &Vocab, id: u32) -> bool {
    vocab.attr(id) & (attr::CONTROL | attr::UNKNOWN) != 0
}

/// Splits `text` into plain stretches and special tokens. Without `parse_special` only
/// user-defined tokens are recognised, as in llama.cpp (and HF tokenizers); inside the `plain`
/// byte ranges (a chat's message text) control tokens are never recognised, whatever
/// `parse_special` says, so that typed `<|im_start|>` stays text.
pub(crate) fn partition(
    text: &str,
    specials: &[u32],
    vocab: &Vocab,
    parse_special: bool,
    plain: &[Range<usize>],
) -> Vec<Fragment> {
    let mut fragments = Vec::new();
    if text.is_empty() {
        return fragments;
    }
    fragments.push(Fragment::Text(0..text.len()));
    for &id in specials {
        let control = is_control(vocab, id);
        if !parse_special && control {
            continue;
        }
        let needle = vocab.texts[id as usize].as_str();
        let present = fragments
            .iter()
            .any(|f| matches!(f, Fragment::Text(r) if text[r.clone()].contains(needle)));
        if !present {
            continue;
        }
        let hidden: &[Range<usize>] = if control { plain } else { &[] };
        let mut out = Vec::with_capacity(fragments.len() + 2);
        for fragment in fragments {
            match fragment {
                Fragment::Text(range) => split_on(text, range, needle, id, hidden, &mut out),
                token => out.push(token),
            }
        }
        fragments = out;
    }
    fragments
}

/// Cuts every match of `needle` in `range` out as token `id`, except matches that overlap a
/// `hidden` range, which stay text.
fn split_on(
    text: &str,
    range: Range<usize>,
    needle: &str,
    id: u32,
    hidden: &[Range<usize>],
    out: &mut Vec<Fragment>,
) {
    let mut start = range.start;
    let mut from = range.start;
    // Token texts are valid UTF-8, so every match starts and ends on a character boundary.
    while let Some(found) = text[from..range.end].find(needle) {
        let at = from + found;
        let end = at + needle.len();
        if hidden.iter().any(|h| h.start < end && at < h.end) {
            from = at + text[at..].chars().next().map_or(1, char::len_utf8);
            continue;
        }
        if at > start {
            out.push(Fragment::Text(start..at));
        }
        out.push(Fragment::Token(id));
        start = end;
        from = end;
    }
    if start < range.end {
        out.push(Fragment::Text(start..range.end));
    }
}
