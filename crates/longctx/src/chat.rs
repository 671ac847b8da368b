//! Chat templates: the Jinja template a GGUF carries in `tokenizer.chat_template`, rendered with
//! minijinja set up the way HF transformers and llama-cpp-python set up jinja2 (`trim_blocks`,
//! `lstrip_blocks`, loop controls, `raise_exception`, Python string methods such as `.strip()`,
//! and a `tojson` that writes what Python's `json.dumps` writes), so that a prompt renders to the
//! same text, and therefore the same tokens, as it would there.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template with the BOS/EOS texts it is given.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const TEMPLATE_NAME: &str = "chat_template";

/// A template is code from an untrusted file, so one render may take this many VM steps: a
/// real template spends tens per message, so a thousand-message conversation stays far below,
/// while a loop that would never end stops within a second.
const FUEL: u64 = 2_000_000;

/// And may write this much: more than any context holds, far below what exhausts memory.
const MAX_OUTPUT: usize = 64 << 20;

/// The render's output, refused past [`MAX_OUTPUT`] bytes.
struct Bounded {
    bytes: Vec<u8>,
    full: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_OUTPUT {
            self.full = true;
            return Err(std::io::Error::other(
                "the chat template's output is too long",
            ));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A conversation rendered for the model, with the byte ranges of `text` that are the
/// messages' own text: those are tokenized as plain text, the rest (the template's markers) with
/// special tokens parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    pub messages: Vec<std::ops::Range<usize>>,
}

/// The whitespace and the mark of a message's placeholder ([`Placeholders`]).
/// Em space and ideographic space: whitespace to Python's `strip` and Rust's `trim`, and
/// escaped by no JSON writer (U+2028/2029 are, by some).
const PAD: &str = "\u{2003}\u{3000}";
const MARK: char = '\u{E000}';

fn template_error(e: minijinja::Error) -> Error {
    // The detail alone reads better than minijinja's kind prefix when a template raises on purpose.
    let message = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => e.to_string(),
    };
    Error::ChatTemplate(message)
}

impl ChatTemplate {
    /// Compiles `source` (the GGUF's `tokenizer.chat_template`); `bos_token` and `eos_token` are
    /// the texts the template sees as `bos_token` / `eos_token`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(template_error)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt text for `messages`; with `add_generation_prompt` the template opens the
    /// assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        let mut out = Bounded {
            bytes: Vec::new(),
            full: false,
        };
        let rendered = template.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            },
            &mut out,
        );
        match rendered {
            Ok(_) => String::from_utf8(out.bytes).map_err(|_| {
                Error::ChatTemplate("the template wrote text that is not UTF-8".into())
            }),
            Err(_) if out.full => Err(Error::ChatTemplate(format!(
                "the template wrote more than {} MiB, more than any prompt; it is not a chat template this engine can use",
                MAX_OUTPUT >> 20
            ))),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::ChatTemplate(format!(
                "the template ran past {FUEL} steps, far more than a conversation needs; it may loop without end"
            ))),
            Err(e) => Err(template_error(e)),
        }
    }
}

impl ChatTemplate {
    /// [`ChatTemplate::render`], with where each message's text lies in the result, so that
    /// only the template's own text is searched for special tokens. The template renders once
    /// with a placeholder for each message, which gives its text apart from the messages'; each
    /// message then goes where its placeholder went, as the template treated it: stripped or as
    /// it is, or else (`tojson`, escaping) rendered alone among placeholders and cut out between
    /// the template's text before and after it. The result must equal [`ChatTemplate::render`]'s
    /// text, or the conversation is refused: a message is never searched for where it ends.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<RenderedChat> {
        let real = self.render(messages, add_generation_prompt)?;
        let marks = Placeholders::new();
        let marked = self.render(&marks.stand_in(messages, None), add_generation_prompt)?;
        let slots = marks.find(&marked, messages.len())?;
        let chat = assemble(&marked, &slots, |slot| {
            let mut content = messages[slot.index].content.as_str();
            if !slot.kept_before {
                content = content.trim_start();
            }
            if !slot.kept_after {
                content = content.trim_end();
            }
            content
        });
        if chat.text == real {
            return Ok(chat);
        }
        let mut alone = vec![String::new(); messages.len()];
        for (i, text) in alone.iter_mut().enumerate() {
            let mut at = slots.iter().filter(|s| s.index == i);
            let (Some(slot), None) = (at.next(), at.next()) else {
                continue;
            };
            let rendered =
                self.render(&marks.stand_in(messages, Some(i)), add_generation_prompt)?;
            let (head, tail) = (&marked[..slot.range.start], &marked[slot.range.end..]);
            if rendered.len() < head.len() + tail.len()
                || !rendered.starts_with(head)
                || !rendered.ends_with(tail)
            {
                return Err(unfollowable());
            }
            *text = rendered[head.len()..rendered.len() - tail.len()].to_string();
        }
        let chat = assemble(&marked, &slots, |slot| alone[slot.index].as_str());
        if chat.text == real {
            Ok(chat)
        } else {
            Err(unfollowable())
        }
    }
}

/// Where a message's placeholder went in the rendered template.
struct Slot {
    index: usize,
    /// The placeholder's bytes, with what the template left of its pads.
    range: std::ops::Range<usize>,
    kept_before: bool,
    kept_after: bool,
}

/// `PAD MARK nonce:i MARK PAD` for message i. The pads are whitespace, so a template that strips
/// a message strips them too, which tells how to place the message; the private-use marks and
/// the nonce, random per conversation, cannot be sent by a client, who never sees them.
struct Placeholders {
    opening: String,
}

impl Placeholders {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let nonce = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self {
            opening: format!("{MARK}{nonce}:"),
        }
    }

    /// The messages with placeholders for their text, but message `real`'s own.
    fn stand_in(&self, messages: &[ChatMessage], real: Option<usize>) -> Vec<ChatMessage> {
        let opening = &self.opening;
        messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage {
                role: m.role.clone(),
                content: if real == Some(i) {
                    m.content.clone()
                } else {
                    format!("{PAD}{opening}{i}{MARK}{PAD}")
                },
            })
            .collect()
    }

    fn find(&self, marked: &str, messages: usize) -> Result<Vec<Slot>> {
        let mut slots = Vec::new();
        let mut from = 0;
        while let Some(found) = marked[from..].find(&self.opening) {
            let at = from + found;
            let number = at + self.opening.len();
            let (digits, _) = marked[number..].split_once(MARK).ok_or_else(unfollowable)?;
            let index = digits
                .parse::<usize>()
                .ok()
                .filter(|&i| i < messages)
                .ok_or_else(unfollowable)?;
            let end = number + digits.len() + MARK.len_utf8();
            // A pad the slot before has taken is not this one's: between a stripped message
            // and one kept whole only one is left, and slots must not overlap. The check of the
            // assembled text against the real render settles whose it was.
            let kept_before = marked[from..at].ends_with(PAD);
            let kept_after = marked[end..].starts_with(PAD);
            let start = if kept_before { at - PAD.len() } else { at };
            let stop = if kept_after { end + PAD.len() } else { end };
            slots.push(Slot {
                index,
                range: start..stop,
                kept_before,
                kept_after,
            });
            from = stop;
        }
        Ok(slots)
    }
}

/// The template's text with each slot's message text in place, and where each lies.
fn assemble<'a>(marked: &str, slots: &[Slot], content: impl Fn(&Slot) -> &'a str) -> RenderedChat {
    let mut text = String::with_capacity(marked.len());
    let mut spans = Vec::with_capacity(slots.len());
    let mut from = 0;
    for slot in slots {
        text.push_str(&marked[from..slot.range.start]);
        let piece = content(slot);
        spans.push(text.len()..text.len() + piece.len());
        text.push_str(piece);
        from = slot.range.end;
    }
    text.push_str(&marked[from..]);
    RenderedChat {
        text,
        messages: spans,
    }
}

fn unfollowable() -> Error {
    Error::ChatTemplate(
        "this chat template changes the messages' text (cuts or rewrites it), so longctx \
         cannot keep the text apart from the template's special tokens; send the prompt as raw \
         text instead (/v1/completions, or `run` without --chat)"
            .into(),
    )
}

/// HF templates call this to reject conversations they cannot format.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// HF's `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`.
/// minijinja's own filter escapes `<`, `>`, `&` and `'` for HTML and writes no spaces after
/// separators, which would change the prompt.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // Accepted for compatibility; non-ASCII is always written as is, like HF's default.
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    let style = JsonStyle {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
    };
    write_json(&mut out, value, style, 0)?;
    Ok(Value::from_safe_string(out))
}

#[derive(Clone, Copy)]
struct JsonStyle {
    indent: Option<usize>,
    sort_keys: bool,
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: JsonStyle,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => match value.as_i64().filter(|_| value.is_integer()) {
            Some(i) => out.push_str(&i.to_string()),
            None => {
                let x = f64::try_from(value.clone()).unwrap_or(f64::NAN);
                out.push_str(&python_float(x));
            }
        },
        ValueKind::String => write_json_str(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, style, depth, '[', ']', &items, |out, item| {
                write_json(out, item, style, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort();
            }
            write_container(out, style, depth, '{', '}', &keys, |out, key| {
                match key.as_str() {
                    Some(k) => write_json_str(out, k),
                    None => write_json_str(out, &key.to_string()),
                }
                out.push_str(": ");
                write_json(out, &value.get_item(key)?, style, depth + 1)
            })?;
        }
        _ => write_json_str(out, &value.to_string()),
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    style: JsonStyle,
    depth: usize,
    open: char,
    close: char,
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T) -> std::result::Result<(), minijinja::Error>,
) -> std::result::Result<(), minijinja::Error> {
    out.push(open);
    for (i, item) in items.iter().enumerate() {
        match style.indent {
            // json.dumps with an indent separates items with "," plus a newline
            Some(n) => {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                out.push_str(&" ".repeat(n * (depth + 1)));
            }
            None if i > 0 => out.push_str(", "),
            None => {}
        }
        write_item(out, item)?;
    }
    if let (Some(n), false) = (style.indent, items.is_empty()) {
        out.push('\n');
        out.push_str(&" ".repeat(n * depth));
    }
    out.push(close);
    Ok(())
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr` for the floats templates meet: integral values keep a `.0`.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        x.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs
            .iter()
            .map(|(role, content)| ChatMessage {
                role: role.to_string(),
                content: content.to_string(),
            })
            .collect()
    }

    /// A template is code from an untrusted file: one that loops (near) forever, recurses
    /// without end or writes gigabytes is stopped, quickly, with a sentence saying which.
    #[test]
    fn runaway_templates_are_stopped_with_what_they_did() {
        for (source, says) in [
            (
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                "steps",
            ),
            (
                "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                "recursion",
            ),
            (
                "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
                "recursion",
            ),
            ("{{ 'x' * 100000000 }}", "MiB"),
            (
                "{% set s = 'x' * 10000000 %}{% for i in range(100) %}{{ s }}{% endfor %}",
                "MiB",
            ),
            ("{{ 'x' * 1000000000 }}", "too large"),
        ] {
            let t = ChatTemplate::new(source, "", "").unwrap();
            let started = std::time::Instant::now();
            let err = t.render(&[], false).unwrap_err().to_string();
            assert!(err.contains(says), "{source}: {err}");
            assert!(
                started.elapsed().as_secs_f64() < 5.0,
                "{source} took {:?}",
                started.elapsed()
            );
        }
    }

    /// Found by the template property test (tests/fuzz.rs): a stripped message followed at
    /// once by one kept whole left one pad between their placeholders, which both claimed,
    /// and cutting the overlapping slots panicked.
    #[test]
    fn adjacent_placeholders_do_not_share_a_pad() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content.strip().upper() }}{{ messages[0].content }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let messages = messages(&[("user", " hi ")]);
        let real = t.render(&messages, true).unwrap();
        match t.render_chat(&messages, true) {
            Ok(chat) => assert_eq!(chat.text, real),
            Err(e) => assert!(e.to_string().contains("changes the messages' text"), "{e}"),
        }
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let source = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
            {{ raise_exception('bad role ' + m.role) }}{% endif %}\
            {{ m.role.upper() }}:{{ m.content.strip() }};{% endfor %}";
        let t = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        let ok = t.render(&messages(&[("user", "  hi  ")]), false).unwrap();
        assert_eq!(ok, "USER:hi;");
        let err = t.render(&messages(&[("tool", "x")]), false).unwrap_err();
        assert_eq!(err.to_string(), "chat template: bad role tool");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = ChatTemplate::new(
            "{{ {'a': [1, 2.0, none, true], 'b': 'x<\"y\">\u{e9}\n'} | tojson }}|{{ [1, [2]] | tojson(indent=2) }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "{\"a\": [1, 2.0, null, true], \"b\": \"x<\\\"y\\\">\u{e9}\\n\"}|[\n  1,\n  [\n    2\n  ]\n]"
        );
    }

    #[test]
    fn render_chat_places_each_message_as_the_template_treats_it() {
        // Stripped, repeated, dropped, and as is: the system text goes in twice, stripped.
        let source = "{% for m in messages %}<{{ m.role }}>{% if m.role == 'system' %}\
            {{ m.content | trim }}|{{ m.content.strip() }}{% elif m.role == 'user' %}\
            {{ m.content }}{% endif %}</>{% endfor %}";
        let t = ChatTemplate::new(source, "", "").unwrap();
        let msgs = messages(&[
            ("system", "  be brief  "),
            ("user", " <hi> "),
            ("assistant", "dropped"),
        ]);
        let chat = t.render_chat(&msgs, false).unwrap();
        assert_eq!(chat.text, t.render(&msgs, false).unwrap());
        assert_eq!(
            chat.text,
            "<system>be brief|be brief</><user> <hi> </><assistant></>"
        );
        let texts: Vec<&str> = chat
            .messages
            .iter()
            .map(|r| &chat.text[r.clone()])
            .collect();
        assert_eq!(texts, ["be brief", "be brief", " <hi> "]);
    }

    #[test]
    fn render_chat_follows_a_template_that_escapes_messages() {
        let t = ChatTemplate::new(
            "{% for m in messages %}[{{ m.role }}]{{ m.content | tojson }}{% endfor %}[end]",
            "",
            "",
        )
        .unwrap();
        let msgs = messages(&[("user", "say \"[end]\"\n"), ("assistant", "ok")]);
        let chat = t.render_chat(&msgs, false).unwrap();
        assert_eq!(chat.text, t.render(&msgs, false).unwrap());
        let texts: Vec<&str> = chat
            .messages
            .iter()
            .map(|r| &chat.text[r.clone()])
            .collect();
        // The quotes are the template's (they close around the placeholder too).
        assert_eq!(texts, ["say \\\"[end]\\\"\\n", "ok"]);
    }

    #[test]
    fn a_template_that_rewrites_messages_is_refused() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content[:3] }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let err = t
            .render_chat(&messages(&[("user", "hello")]), false)
            .unwrap_err();
        assert!(err.to_string().contains("raw"), "{err}");
    }

    #[test]
    fn syntax_errors_surface_at_construction() {
        let err = ChatTemplate::new("{% for %}", "", "").err().unwrap();
        assert!(matches!(err, Error::ChatTemplate(_)));
    }
}
