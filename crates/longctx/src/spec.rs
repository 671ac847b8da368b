//! Method specs as users type them: `name:key=value,key=value`, several joined with `+`
//! (`yarn:factor=4+logn`, `snapkv:budget=1024+kivi:bits=4`). The same grammar selects position
//! schemes (`--rope`), KV policies (`--kv`) and evaluation tasks, so one parser and one set of
//! error messages serve all three.

use std::fmt;
use std::ops::{Bound, RangeBounds};
use std::str::FromStr;

use crate::{Error, Result};

/// One method with its parameters, in the order the user wrote them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecPart {
    pub name: String,
    pub params: Vec<(String, String)>,
}

/// A `+`-joined list of methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub parts: Vec<SpecPart>,
}

impl Spec {
    /// A spec of one method without parameters.
    pub fn named(name: &str) -> Self {
        Self {
            parts: vec![SpecPart {
                name: name.to_string(),
                params: Vec::new(),
            }],
        }
    }

    /// True when the spec is exactly `name` with no parameters and nothing composed with it.
    pub fn is(&self, name: &str) -> bool {
        matches!(self.parts.as_slice(), [only] if only.name == name && only.params.is_empty())
    }
}

impl FromStr for Spec {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let invalid = |detail: String| Error::InvalidSpec {
            spec: text.to_string(),
            detail,
        };
        if text.trim().is_empty() {
            return Err(invalid("it is empty".to_string()));
        }
        let mut parts = Vec::new();
        for part in text.split('+') {
            let part = part.trim();
            let (name, rest) = match part.split_once(':') {
                Some((name, rest)) => (name.trim(), Some(rest)),
                None => (part, None),
            };
            if name.is_empty() {
                return Err(invalid("a method name is missing".to_string()));
            }
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(invalid(format!(
                    "`{name}` is not a method name (letters, digits, `_` and `-` only)"
                )));
            }
            let mut params: Vec<(String, String)> = Vec::new();
            // `auto:16384`: a lone number without a key is the method's positional argument
            // (only a number, so that a forgotten `=value` still reads as the mistake it is).
            if let Some(value) = rest
                .map(str::trim)
                .filter(|r| r.starts_with(|c: char| c.is_ascii_digit()) && !r.contains(['=', ',']))
            {
                parts.push(SpecPart {
                    name: name.to_string(),
                    params: vec![(String::new(), value.to_string())],
                });
                continue;
            }
            for pair in rest.into_iter().flat_map(|r| r.split(',')) {
                let Some((key, value)) = pair.split_once('=') else {
                    return Err(invalid(format!("`{pair}` in `{name}` is not key=value")));
                };
                let (key, value) = (key.trim(), value.trim());
                if key.is_empty() || value.is_empty() {
                    return Err(invalid(format!(
                        "`{pair}` in `{name}` needs both a key and a value"
                    )));
                }
                if params.iter().any(|(k, _)| k == key) {
                    return Err(invalid(format!("`{key}` is given twice for `{name}`")));
                }
                params.push((key.to_string(), value.to_string()));
            }
            parts.push(SpecPart {
                name: name.to_string(),
                params,
            });
        }
        Ok(Self { parts })
    }
}

impl fmt::Display for SpecPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        for (i, (key, value)) in self.params.iter().enumerate() {
            f.write_str(if i == 0 { ":" } else { "," })?;
            if key.is_empty() {
                f.write_str(value)?;
            } else {
                write!(f, "{key}={value}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                f.write_str("+")?;
            }
            write!(f, "{part}")?;
        }
        Ok(())
    }
}

/// The most tokens any count in a spec may name (16M): past any context this engine can hold,
/// and far below where arithmetic on token counts could overflow.
pub const MAX_TOKENS: usize = 1 << 24;

/// Reads a method's parameters by name with defaults, and refuses the ones nobody read, so a
/// typo (`facter=4`) is an error rather than a silently ignored option.
pub struct Params<'a> {
    part: &'a SpecPart,
    read: Vec<bool>,
}

impl<'a> Params<'a> {
    pub fn new(part: &'a SpecPart) -> Self {
        Self {
            part,
            read: vec![false; part.params.len()],
        }
    }

    /// The raw value of `key`, if given.
    pub fn raw(&mut self, key: &str) -> Option<&'a str> {
        let index = self.part.params.iter().position(|(k, _)| k == key)?;
        self.read[index] = true;
        Some(self.part.params[index].1.as_str())
    }

    /// `key` parsed as `T`, or `default` when it is not given.
    pub fn get<T: FromStr>(&mut self, key: &str, default: T) -> Result<T> {
        Ok(self.optional(key)?.unwrap_or(default))
    }

    /// `key` parsed as `T`; an error naming the parameter when it is missing.
    pub fn required<T: FromStr>(&mut self, key: &str) -> Result<T> {
        if let Some(value) = self.optional(key)? {
            return Ok(value);
        }
        // A misspelt key is the likeliest reason; name what was given instead.
        let given: Vec<String> = self
            .part
            .params
            .iter()
            .map(|(k, _)| format!("`{k}`"))
            .collect();
        let given = if given.is_empty() {
            String::new()
        } else {
            format!(" (given: {})", given.join(", "))
        };
        Err(Error::InvalidOption(format!(
            "`{}` needs `{key}=…`{given}",
            self.part.name
        )))
    }

    /// `key` parsed as `T`, or None when it is not given.
    pub fn optional<T: FromStr>(&mut self, key: &str) -> Result<Option<T>> {
        let Some(value) = self.raw(key) else {
            return Ok(None);
        };
        value.parse().map(Some).map_err(|_| {
            Error::InvalidOption(format!(
                "`{key}={value}` for `{}`: the value must be a {}",
                self.part.name,
                type_word::<T>()
            ))
        })
    }

    /// `key` parsed as `T` and inside `range`, or `default` when it is not given. Every numeric
    /// parameter is read this way, so that no value that makes no sense (a factor of 1e308, a
    /// negative attention factor, 1e11 sink tokens, NaN) reaches the arithmetic.
    pub fn get_in<T>(&mut self, key: &str, default: T, range: impl RangeBounds<T>) -> Result<T>
    where
        T: FromStr + PartialOrd + fmt::Display,
    {
        Ok(self.optional_in(key, range)?.unwrap_or(default))
    }

    /// As [`Params::get_in`], with no default: an error naming the parameter when it is missing.
    pub fn required_in<T>(&mut self, key: &str, range: impl RangeBounds<T>) -> Result<T>
    where
        T: FromStr + PartialOrd + fmt::Display,
    {
        match self.optional_in(key, range)? {
            Some(value) => Ok(value),
            // Absent: `required` says so, naming the parameter.
            None => self.required(key),
        }
    }

    /// As [`Params::get_in`], None when `key` is not given.
    pub fn optional_in<T>(&mut self, key: &str, range: impl RangeBounds<T>) -> Result<Option<T>>
    where
        T: FromStr + PartialOrd + fmt::Display,
    {
        let Some(text) = self.raw(key) else {
            return Ok(None);
        };
        match text.parse::<T>() {
            Ok(value) if range.contains(&value) => Ok(Some(value)),
            _ => Err(Error::InvalidOption(format!(
                "`{}`: {key} must be a {} {} (got {text})",
                self.part.name,
                type_word::<T>(),
                range_words(&range)
            ))),
        }
    }

    /// `key` as one of `choices`, or the first choice when it is not given.
    pub fn choice(&mut self, key: &str, choices: &[&'a str]) -> Result<&'a str> {
        match self.raw(key) {
            None => Ok(choices[0]),
            Some(value) => choices
                .iter()
                .copied()
                .find(|c| *c == value)
                .ok_or_else(|| {
                    Error::InvalidOption(format!(
                        "`{key}={value}` for `{}`: choose one of {}",
                        self.part.name,
                        choices.join(", ")
                    ))
                }),
        }
    }

    /// Fails on any parameter that was never read, naming the ones that exist.
    pub fn finish(self, known: &[&str]) -> Result<()> {
        let unread: Vec<&str> = self
            .part
            .params
            .iter()
            .zip(&self.read)
            .filter(|(_, read)| !**read)
            .map(|((key, _), _)| key.as_str())
            .collect();
        if unread.is_empty() {
            return Ok(());
        }
        let known = if known.is_empty() {
            "it takes no parameters".to_string()
        } else {
            format!("it takes {}", known.join(", "))
        };
        Err(Error::InvalidOption(format!(
            "`{}` has no parameter {}; {known}",
            self.part.name,
            unread
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// A token count as users write it: `4096`, `4k` or `1.5k` (1k = 1024), `1m` (1024k); None
/// unless it is a positive whole number of tokens.
pub fn parse_length(text: &str) -> Option<usize> {
    let t = text.trim().to_ascii_lowercase();
    let (number, unit) = match t.strip_suffix('k') {
        Some(n) => (n, 1024.0),
        None => match t.strip_suffix('m') {
            Some(n) => (n, 1024.0 * 1024.0),
            None => (t.as_str(), 1.0),
        },
    };
    match number.parse::<f64>() {
        Ok(v) if v > 0.0 && (v * unit).fract() == 0.0 => Some((v * unit) as usize),
        _ => None,
    }
}

/// `range` as a sentence says it: "between 1 and 1024", "above 0 and at most 16".
fn range_words<T: fmt::Display>(range: &impl RangeBounds<T>) -> String {
    if let (Bound::Included(lo), Bound::Included(hi)) = (range.start_bound(), range.end_bound()) {
        return format!("between {lo} and {hi}");
    }
    let low = match range.start_bound() {
        Bound::Included(lo) => Some(format!("at least {lo}")),
        Bound::Excluded(lo) => Some(format!("above {lo}")),
        Bound::Unbounded => None,
    };
    let high = match range.end_bound() {
        Bound::Included(hi) => Some(format!("at most {hi}")),
        Bound::Excluded(hi) => Some(format!("below {hi}")),
        Bound::Unbounded => None,
    };
    low.into_iter()
        .chain(high)
        .collect::<Vec<_>>()
        .join(" and ")
}

fn type_word<T>() -> &'static str {
    let name = std::any::type_name::<T>();
    if name.starts_with('f') {
        "number"
    } else if name.starts_with('u') || name.starts_with('i') {
        "whole number"
    } else if name == "bool" {
        "true or false"
    } else {
        "valid value"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composed_specs_parse_and_print_back() {
        let spec: Spec = "yarn:factor=4,beta_fast=32+logn".parse().unwrap();
        assert_eq!(spec.parts.len(), 2);
        assert_eq!(spec.parts[0].name, "yarn");
        assert_eq!(
            spec.parts[0].params,
            [
                ("factor".to_string(), "4".to_string()),
                ("beta_fast".to_string(), "32".to_string())
            ]
        );
        assert_eq!(spec.to_string(), "yarn:factor=4,beta_fast=32+logn");
        assert!("none".parse::<Spec>().unwrap().is("none"));
        let auto: Spec = "auto:16384".parse().unwrap();
        assert_eq!(auto.parts[0].params, [(String::new(), "16384".to_string())]);
        assert_eq!(auto.to_string(), "auto:16384");
        assert!(!spec.is("yarn"));
    }

    #[test]
    fn malformed_specs_say_what_is_wrong() {
        for (text, needle) in [
            ("", "empty"),
            ("yarn:factor", "not key=value"),
            ("yarn:factor=", "both a key and a value"),
            ("+logn", "name is missing"),
            ("ya rn", "not a method name"),
            ("yarn:factor=2,factor=3", "given twice"),
        ] {
            let err = text.parse::<Spec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn params_read_defaults_and_refuse_typos() {
        let spec: Spec = "snapkv:window=64,facter=2".parse().unwrap();
        let mut params = Params::new(&spec.parts[0]);
        assert_eq!(params.get("window", 32usize).unwrap(), 64);
        assert_eq!(params.get("kernel", 5usize).unwrap(), 5);
        let err = params
            .finish(&["window", "kernel"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`facter`") && err.contains("window, kernel"),
            "{err}"
        );

        let spec: Spec = "x:window=many,pool=mean".parse().unwrap();
        let mut params = Params::new(&spec.parts[0]);
        let err = params.get("window", 1usize).unwrap_err().to_string();
        assert!(err.contains("whole number"), "{err}");
        let err = params
            .choice("pool", &["avg", "max"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("avg, max"), "{err}");
    }
}
