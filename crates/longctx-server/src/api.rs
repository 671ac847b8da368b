//! The OpenAI request bodies the server reads, and how each becomes an engine job. Fields the
//! server does not know are ignored, as OpenAI clients expect; known fields of the wrong type or
//! out of range are refused naming the field, and so are the OpenAI features it does not
//! implement (tools, JSON mode …): a client relying on one must not get output that silently
//! ignored it.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::ApiError;

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The `longctx` extension object: this request's context policies.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    pub rope: Option<String>,
    pub kv: Option<String>,
}

/// Fields shared by both completion endpoints, read from the same body as the endpoint's own
/// (not flattened into them: a flattened field's errors lose their path).
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    /// The chat endpoint's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    // Read as f64 so that a value past f32's range is reported as sent, not as `inf`.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    /// Token id (as a string, OpenAI's shape) to a bias added to its logit.
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// llama-server's extensions, accepted by many OpenAI-style clients.
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub longctx: Option<Extension>,
    // OpenAI and llama-server fields whose features this server does not implement, read as
    // raw JSON only to be refused when they ask for something (see [`Common::unsupported`]).
    // Not a flattened struct: flattening loses the other fields' error paths.
    tools: Option<serde_json::Value>,
    tool_choice: Option<serde_json::Value>,
    functions: Option<serde_json::Value>,
    function_call: Option<serde_json::Value>,
    response_format: Option<serde_json::Value>,
    grammar: Option<serde_json::Value>,
    json_schema: Option<serde_json::Value>,
    best_of: Option<serde_json::Value>,
    modalities: Option<serde_json::Value>,
    audio: Option<serde_json::Value>,
    prediction: Option<serde_json::Value>,
}

impl Common {
    /// The first field that asks for a feature this server lacks, as a 400 naming it. Values
    /// that ask for nothing (`tools: []`, `tool_choice: "none"`, `response_format: {"type":
    /// "text"}`, `best_of: 1`) pass, since many clients send them by default.
    pub fn unsupported(&self) -> Result<(), ApiError> {
        use serde_json::Value;
        let u = self;
        let empty = |v: &Value| match v {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::String(s) => s.is_empty(),
            _ => false,
        };
        let refuse = |field: &str, what: &str| {
            Err(ApiError::invalid_param(
                field,
                format!("`{field}` is not supported: this server does not implement {what}"),
            ))
        };
        let asks = |v: &Option<Value>| v.as_ref().is_some_and(|v| !empty(v));
        if asks(&u.tools) || asks(&u.functions) {
            let field = if asks(&u.tools) { "tools" } else { "functions" };
            return refuse(
                field,
                "tool or function calling; send the request without it",
            );
        }
        for (field, value) in [
            ("tool_choice", &u.tool_choice),
            ("function_call", &u.function_call),
        ] {
            match value {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if s == "none" || s == "auto" => {}
                Some(_) => {
                    return refuse(
                        field,
                        "tool or function calling; leave it out or send \"none\"",
                    )
                }
            }
        }
        if let Some(format) = &u.response_format {
            let kind = format.get("type").and_then(Value::as_str);
            if !(format.is_null() || kind == Some("text")) {
                return refuse(
                    "response_format",
                    "JSON mode or structured outputs; leave it out or send {\"type\": \"text\"}",
                );
            }
        }
        for (field, value) in [
            ("grammar", &u.grammar),
            ("json_schema", &u.json_schema),
            ("audio", &u.audio),
            ("prediction", &u.prediction),
        ] {
            if asks(value) {
                return refuse(field, "constrained or multimodal output");
            }
        }
        if let Some(modalities) = &u.modalities {
            if modalities
                .as_array()
                .is_none_or(|m| m.iter().any(|x| x != "text"))
            {
                return refuse("modalities", "output other than text; send [\"text\"]");
            }
        }
        if let Some(best_of) = &u.best_of {
            if !(best_of.is_null() || best_of == 1) {
                return refuse("best_of", "several candidates per request; send 1");
            }
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// A message's content: a string, or a list of parts of which the text ones are read.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// The legacy endpoint's `logprobs`: how many alternatives to list per token.
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
}

/// `prompt`: text, or token ids; a list of one of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<i64>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<i64>>),
}

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub content: String,
    #[serde(default)]
    pub add_special: bool,
    #[serde(default)]
    pub with_pieces: bool,
    /// Special-token text (`<|im_start|>`) becomes the token; false keeps it text. llama-server's
    /// field and default.
    #[serde(default = "yes")]
    pub parse_special: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<i64>,
}

/// Parses a generation request's body into the endpoint's fields and the shared ones.
pub fn parse_generation<T: DeserializeOwned>(body: &[u8]) -> Result<(T, Common), ApiError> {
    let value = json_object(body)?;
    Ok((from_value(value.clone())?, from_value(value)?))
}

/// Parses a JSON body into `T`: malformed JSON and wrong types are 400s that say where.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    from_value(json_object(body)?)
}

fn json_object(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "the request body is empty; send a JSON object",
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!(
            "the request body is not valid JSON ({e}); send a JSON object"
        ))
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    }
    Ok(value)
}

fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            ApiError::invalid(format!("invalid request: {inner}"))
        } else {
            ApiError::invalid_param(&path, format!("invalid value for `{path}`: {inner}"))
        }
    })
}

impl Content {
    pub fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(text) => Ok(text.clone()),
            Content::Parts(parts) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid_param(
                                "messages",
                                format!(
                                    "content parts of type `{kind}` are not supported; this \
                                     model reads text parts only"
                                ),
                            ))
                        }
                    }
                }
                Ok(text)
            }
        }
    }
}

impl Prompt {
    /// The one prompt of the request (`n` = 1 and one prompt per request).
    pub fn single(self) -> Result<Prompt, ApiError> {
        let too_many = || {
            ApiError::invalid_param(
                "prompt",
                "send one prompt per request; batches of prompts are not supported",
            )
        };
        match self {
            Prompt::Texts(mut list) if list.len() == 1 => Ok(Prompt::Text(list.remove(0))),
            Prompt::TokenLists(mut list) if list.len() == 1 => Ok(Prompt::Tokens(list.remove(0))),
            Prompt::Texts(_) | Prompt::TokenLists(_) => Err(too_many()),
            single => Ok(single),
        }
    }
}

impl Stop {
    pub fn into_list(self) -> Result<Vec<String>, ApiError> {
        let list = match self {
            Stop::One(s) => vec![s],
            Stop::Many(list) => list,
        };
        if list.len() > 4 {
            return Err(ApiError::invalid_param(
                "stop",
                format!("up to 4 stop sequences are allowed, got {}", list.len()),
            ));
        }
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_ignored_and_wrong_types_name_the_field() {
        let ok: ChatRequest = parse(
            br#"{"model":"x","messages":[{"role":"user","content":"hi"}],"frequency_penalty":0,"user":"u"}"#,
        )
        .unwrap();
        assert_eq!(ok.messages.len(), 1);
        let e = parse_generation::<ChatRequest>(
            br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":"ten"}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = parse::<ChatRequest>(br#"{"messages":[{"role":"user","content":5}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = parse_generation::<ChatRequest>(
            br#"{"messages":[{"role":"user","content":"hi"}],"longctx":{"kvv":"x"}}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("kvv"), "{}", e.message);
    }

    #[test]
    fn features_not_implemented_are_refused_naming_the_field() {
        let refused = [
            (
                r#""tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required""#,
                "tools",
            ),
            (r#""tool_choice":"required""#, "tool_choice"),
            (
                r#""tool_choice":{"type":"function","function":{"name":"f"}}"#,
                "tool_choice",
            ),
            (r#""functions":[{"name":"f"}]"#, "functions"),
            (r#""function_call":{"name":"f"}"#, "function_call"),
            (
                r#""response_format":{"type":"json_object"}"#,
                "response_format",
            ),
            (
                r#""response_format":{"type":"json_schema","json_schema":{}}"#,
                "response_format",
            ),
            (r#""grammar":"root ::= [a-z]+""#, "grammar"),
            (r#""json_schema":{"type":"object"}"#, "json_schema"),
            (r#""modalities":["text","audio"]"#, "modalities"),
            (r#""audio":{"voice":"x"}"#, "audio"),
            (r#""best_of":3"#, "best_of"),
        ];
        for (fields, param) in refused {
            let body = format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],{fields}}}"#);
            let (_, common): (ChatRequest, Common) = parse_generation(body.as_bytes()).unwrap();
            let e = common.unsupported().unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{fields}: {}", e.message);
        }
        let harmless = [
            r#""tools":[],"tool_choice":"none""#,
            r#""tool_choice":"auto""#,
            r#""response_format":{"type":"text"}"#,
            r#""modalities":["text"],"best_of":1"#,
            r#""tools":null,"response_format":null"#,
        ];
        for fields in harmless {
            let body = format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],{fields}}}"#);
            let (_, common): (ChatRequest, Common) = parse_generation(body.as_bytes()).unwrap();
            assert!(common.unsupported().is_ok(), "{fields}");
        }
    }

    #[test]
    fn malformed_bodies_are_400s() {
        for body in [
            &b""[..],
            b"{",
            b"[1,2]",
            b"null",
            b"\"text\"",
            b"{\"messages\":",
        ] {
            let e = parse::<ChatRequest>(body).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{body:?}");
        }
        let e = parse::<ChatRequest>(b"{}").unwrap_err();
        assert!(e.message.contains("messages"), "{}", e.message);
    }

    #[test]
    fn prompts_come_as_text_or_tokens_one_at_a_time() {
        let r: CompletionRequest = parse(br#"{"prompt":[1,2,3]}"#).unwrap();
        assert!(matches!(r.prompt.single().unwrap(), Prompt::Tokens(t) if t == vec![1, 2, 3]));
        let r: CompletionRequest = parse(br#"{"prompt":["a"]}"#).unwrap();
        assert!(matches!(r.prompt.single().unwrap(), Prompt::Text(t) if t == "a"));
        let r: CompletionRequest = parse(br#"{"prompt":["a","b"]}"#).unwrap();
        assert!(r.prompt.single().is_err());
    }
}
