//! The vocabulary as llama.cpp reads it from GGUF metadata: token texts and attributes, scores,
//! special ids, whether BOS/EOS are added, and which tokens end generation.
//!
//! llama.cpp decides several of these from token *text* rather than metadata (an `<|im_end|>` ends a
//! turn whatever the converter wrote), so the same heuristics are reproduced here; without them a
//! chat model would run past the end of its answer.

use std::collections::{HashMap, HashSet};

use crate::gguf::MetaValue;
use crate::{Error, Result};

/// Token attribute bits, numbered as llama.cpp numbers them.
pub(crate) mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;
}

/// The two tokenizer algorithms longctx implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Model {
    /// `tokenizer.ggml.model = "gpt2"`: byte-level BPE with ranked merges.
    Bpe,
    /// `tokenizer.ggml.model = "llama"`: SentencePiece BPE driven by piece scores, with byte fallback.
    Spm,
}

/// Defaults that depend on the model type and pre-tokenizer, before metadata overrides them.
pub(crate) struct Defaults {
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
}

pub(crate) struct Vocab {
    pub model: Model,
    pub texts: Vec<String>,
    pub ids: HashMap<String, u32>,
    pub attrs: Vec<u16>,
    pub scores: Vec<f32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    pub eog: HashSet<u32>,
}

// Texts llama.cpp recognises for each special role when metadata does not name the token.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
// gpt-oss formats its channel markers as ordinary text, so llama.cpp always renders them.
const ALWAYS_RENDERED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

impl Vocab {
    pub fn from_metadata(
        meta: &HashMap<String, MetaValue>,
        model: Model,
        defaults: Defaults,
    ) -> Result<Self> {
        let texts = read_tokens(meta)?;
        let n = texts.len();
        let mut ids = HashMap::with_capacity(n);
        for (i, t) in texts.iter().enumerate() {
            if let Some(first) = ids.insert(t.clone(), i as u32) {
                return Err(Error::Tokenizer(format!(
                    "duplicate token {t:?} in the vocabulary (ids {first} and {i}); the GGUF is corrupt"
                )));
            }
        }
        let scores = match meta.get("tokenizer.ggml.scores") {
            None => vec![0.0; n],
            Some(v) => numbers(v, "tokenizer.ggml.scores", n)?,
        };
        let attrs = match meta.get("tokenizer.ggml.token_type") {
            None => vec![attr::NORMAL; n],
            Some(v) => numbers(v, "tokenizer.ggml.token_type", n)?
                .into_iter()
                .map(|t| attr_of_type(t as i64))
                .collect(),
        };

        let (bos, eos, unk) = match model {
            Model::Spm => (Some(1), Some(2), Some(0)),
            // llama.cpp's historical default for BPE vocabularies that name no BOS/EOS.
            Model::Bpe => (Some(11), Some(11), None),
        };
        let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        let special = |key: &str, default: Option<u32>| -> Result<Option<u32>> {
            Ok(match meta.get(key).map(|v| int(v, key)).transpose()? {
                Some(id) if id >= 0 && (id as usize) < n => Some(id as u32),
                _ => in_range(default),
            })
        };
        let bos = special("tokenizer.ggml.bos_token_id", bos)?;
        let eos = special("tokenizer.ggml.eos_token_id", eos)?;
        let unk = special("tokenizer.ggml.unknown_token_id", unk)?;
        let eot = special("tokenizer.ggml.eot_token_id", None)?;
        let eom = special("tokenizer.ggml.eom_token_id", None)?;
        let fim_pre = special("tokenizer.ggml.fim_pre_token_id", None)?;
        let fim_pre = special("tokenizer.ggml.prefix_token_id", fim_pre)?;
        let fim_suf = special("tokenizer.ggml.fim_suf_token_id", None)?;
        let fim_suf = special("tokenizer.ggml.suffix_token_id", fim_suf)?;
        let fim_mid = special("tokenizer.ggml.fim_mid_token_id", None)?;
        let fim_mid = special("tokenizer.ggml.middle_token_id", fim_mid)?;
        let fim_pad = special("tokenizer.ggml.fim_pad_token_id", None)?;
        let fim_rep = special("tokenizer.ggml.fim_rep_token_id", None)?;
        let fim_sep = special("tokenizer.ggml.fim_sep_token_id", None)?;

        let flag = |key: &str, default: bool| -> Result<bool> {
            match meta.get(key) {
                None => Ok(default),
                Some(MetaValue::Bool(b)) => Ok(*b),
                Some(other) => Err(Error::Tokenizer(format!(
                    "{key} should be a boolean, found {other:?}"
                ))),
            }
        };
        let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", defaults.add_space_prefix)?;
        let add_bos = flag("tokenizer.ggml.add_bos_token", defaults.add_bos)?;
        let add_eos = flag("tokenizer.ggml.add_eos_token", defaults.add_eos)?;
        if add_bos && bos.is_none() {
            return Err(Error::Tokenizer(
                "tokenizer.ggml.add_bos_token is true, but the vocabulary has no BOS token".into(),
            ));
        }
        if add_eos && eos.is_none() {
            return Err(Error::Tokenizer(
                "tokenizer.ggml.add_eos_token is true, but the vocabulary has no EOS token".into(),
            ));
        }

        let mut vocab = Vocab {
            model,
            texts,
            ids,
            attrs,
            scores,
            bos,
            eos,
            unk,
            add_bos,
            add_eos,
            add_space_prefix,
            eog: HashSet::new(),
        };
        vocab.find_end_of_generation(
            [eot, eom],
            [fim_pre, fim_suf, fim_mid],
            [fim_pad, fim_rep, fim_sep],
        );
        Ok(vocab)
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn attr(&self, id: u32) -> u16 {
        self.attrs.get(id as usize).copied().unwrap_or(0)
    }

    /// The first token (lowest id) whose text is in `texts`. llama.cpp takes whichever its hash map
    /// yields first; vocabularies with two candidates for one role are not known to exist.
    fn find_text(&self, texts: &[&str]) -> Option<u32> {
        texts.iter().filter_map(|t| self.ids.get(*t).copied()).min()
    }

    /// The token for a role: the one metadata named, else one found by text, which then becomes a
    /// control token as llama.cpp makes it.
    fn claim(&mut self, known: Option<u32>, texts: &[&str]) -> Option<u32> {
        known.or_else(|| {
            let id = self.find_text(texts)?;
            self.mark_control(id);
            Some(id)
        })
    }

    fn mark_control(&mut self, id: u32) {
        if let Some(a) = self.attrs.get_mut(id as usize) {
            *a |= attr::CONTROL;
        }
    }

    /// Fills `eog` and fixes attributes the way llama.cpp's loader does: role tokens found by text
    /// become control tokens (so they are parsed as one token and hidden when decoding).
    fn find_end_of_generation(
        &mut self,
        [eot, eom]: [Option<u32>; 2],
        fim: [Option<u32>; 3],
        [fim_pad, fim_rep, fim_sep]: [Option<u32>; 3],
    ) {
        let eot = self.claim(eot, EOT_TEXTS);
        let eom = self.claim(eom, EOM_TEXTS);
        for (known, texts) in fim
            .into_iter()
            .zip([FIM_PRE_TEXTS, FIM_SUF_TEXTS, FIM_MID_TEXTS])
        {
            self.claim(known, texts);
        }
        let fim_pad = self.claim(fim_pad, FIM_PAD_TEXTS);
        let fim_rep = self.claim(fim_rep, FIM_REP_TEXTS);
        let fim_sep = self.claim(fim_sep, FIM_SEP_TEXTS);

        let mut eog: HashSet<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        for text in EOG_TEXTS {
            if let Some(&id) = self.ids.get(*text) {
                eog.insert(id);
                self.mark_control(id);
            }
        }
        for text in ALWAYS_RENDERED {
            if let Some(&id) = self.ids.get(*text) {
                self.attrs[id as usize] = attr::USER_DEFINED;
            }
        }
        eog.extend([self.eos, eot, eom].into_iter().flatten());

        let in_eog = |t: &str| self.ids.get(t).filter(|id| eog.contains(id)).copied();
        // Harmony-style vocabularies end a message with <|end|> but keep generating afterwards.
        let end = in_eog("<|end|>").filter(|_| {
            (in_eog("<|return|>").is_some() && in_eog("<|call|>").is_some())
                || (in_eog("<|calls|>").is_some() && in_eog("<|flush|>").is_some())
        });
        // Vocabularies with <|tool_response> use </s> as ordinary text.
        let eos_text = in_eog("</s>").filter(|_| in_eog("<|tool_response>").is_some());
        if let Some(end) = end {
            eog.remove(&end);
            self.attrs[end as usize] = attr::USER_DEFINED;
        }
        if let Some(s) = eos_text {
            eog.remove(&s);
            self.attrs[s as usize] = attr::NORMAL;
        }
        self.eog = eog;
    }
}

fn attr_of_type(token_type: i64) -> u16 {
    match token_type {
        1 => attr::NORMAL,
        2 => attr::UNKNOWN,
        3 => attr::CONTROL,
        4 => attr::USER_DEFINED,
        5 => attr::UNUSED,
        6 => attr::BYTE,
        _ => 0,
    }
}

fn read_tokens(meta: &HashMap<String, MetaValue>) -> Result<Vec<String>> {
    let key = "tokenizer.ggml.tokens";
    let Some(MetaValue::Array(items)) = meta.get(key) else {
        return Err(Error::Tokenizer(format!(
            "the model file has no {key} array; it carries no vocabulary"
        )));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            // llama.cpp renames empty pieces so that every token has a distinct, non-empty text.
            MetaValue::String(s) if s.is_empty() => Ok(format!("[EMPTY_{i}]")),
            MetaValue::String(s) => Ok(s.clone()),
            other => Err(Error::Tokenizer(format!(
                "{key}[{i}] should be a string, found {other:?}"
            ))),
        })
        .collect()
}

/// Reads a numeric array of at least `n` entries (scores are F32 or I32 depending on the converter).
fn numbers(value: &MetaValue, key: &str, n: usize) -> Result<Vec<f32>> {
    let MetaValue::Array(items) = value else {
        return Err(Error::Tokenizer(format!("{key} should be an array")));
    };
    if items.len() < n {
        return Err(Error::Tokenizer(format!(
            "{key} has {} entries for {n} tokens",
            items.len()
        )));
    }
    items[..n]
        .iter()
        .map(|v| match v {
            MetaValue::F32(x) => Ok(*x),
            MetaValue::F64(x) => Ok(*x as f32),
            other => int(other, key).map(|i| i as f32),
        })
        .collect()
}

fn int(value: &MetaValue, key: &str) -> Result<i64> {
    Ok(match value {
        MetaValue::U8(x) => i64::from(*x),
        MetaValue::I8(x) => i64::from(*x),
        MetaValue::U16(x) => i64::from(*x),
        MetaValue::I16(x) => i64::from(*x),
        MetaValue::U32(x) => i64::from(*x),
        MetaValue::I32(x) => i64::from(*x),
        MetaValue::U64(x) => i64::try_from(*x).unwrap_or(i64::MAX),
        MetaValue::I64(x) => *x,
        other => {
            return Err(Error::Tokenizer(format!(
                "{key} should be an integer, found {other:?}"
            )))
        }
    })
}

/// Reads an optional string entry.
pub(crate) fn string<'m>(
    meta: &'m HashMap<String, MetaValue>,
    key: &str,
) -> Result<Option<&'m str>> {
    match meta.get(key) {
        None => Ok(None),
        Some(MetaValue::String(s)) => Ok(Some(s)),
        Some(other) => Err(Error::Tokenizer(format!(
            "{key} should be a string, found {other:?}"
        ))),
    }
}
