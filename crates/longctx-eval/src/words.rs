//! Random keys and values for needles, drawn as RULER draws them: 7-digit numbers,
//! adjective-noun words and version-4 UUIDs.

use rand::seq::IndexedRandom;
use rand::Rng;

/// What a needle's key or value is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Numbers,
    Words,
    Uuids,
}

impl Kind {
    pub const NAMES: [&'static str; 3] = ["numbers", "words", "uuids"];

    pub fn parse(name: &str) -> Self {
        match name {
            "words" => Self::Words,
            "uuids" => Self::Uuids,
            _ => Self::Numbers,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Numbers => "numbers",
            Self::Words => "words",
            Self::Uuids => "uuids",
        }
    }

    /// The name used in the prompt's prose, singular or plural.
    pub fn noun(self, plural: bool) -> &'static str {
        match (self, plural) {
            (Self::Numbers, true) => "numbers",
            (Self::Numbers, false) => "number",
            (Self::Words, true) => "words",
            (Self::Words, false) => "word",
            (Self::Uuids, true) => "uuids",
            (Self::Uuids, false) => "uuid",
        }
    }

    pub fn draw(self, rng: &mut impl Rng) -> String {
        match self {
            Self::Numbers => rng.random_range(1_000_000..=9_999_999u32).to_string(),
            Self::Words => adjective_noun(rng),
            Self::Uuids => uuid4(rng),
        }
    }

    /// `n` distinct draws.
    pub fn draw_distinct(self, n: usize, rng: &mut impl Rng) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(n);
        while out.len() < n {
            let value = self.draw(rng);
            if !out.contains(&value) {
                out.push(value);
            }
        }
        out
    }
}

/// RULER's word keys: an adjective and a noun joined by a hyphen.
pub fn adjective_noun(rng: &mut impl Rng) -> String {
    let adjective = names::ADJECTIVES.choose(rng).copied().unwrap_or("quiet");
    let noun = names::NOUNS.choose(rng).copied().unwrap_or("river");
    format!("{adjective}-{noun}")
}

/// A version-4 UUID from 128 random bits, as Python's `uuid.UUID(int=…, version=4)` forms it.
pub fn uuid4(rng: &mut impl Rng) -> String {
    let mut bits: u128 = rng.random();
    bits &= !(0xf000u128 << 64);
    bits |= 0x4000u128 << 64;
    bits &= !(0xc000u128 << 48);
    bits |= 0x8000u128 << 48;
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// English list: "a", "a and b", "a, b, and c".
pub fn join_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [a, b] => format!("{a} and {b}"),
        [rest @ .., last] => format!("{}, and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn draws_have_their_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let number = Kind::Numbers.draw(&mut rng);
        assert_eq!(number.len(), 7);
        assert!(number.chars().all(|c| c.is_ascii_digit()));
        let word = Kind::Words.draw(&mut rng);
        assert_eq!(word.matches('-').count(), 1, "{word}");
        let uuid = Kind::Uuids.draw(&mut rng);
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4", "{uuid}");
        assert!("89ab".contains(&uuid[19..20]), "{uuid}");
        let values = Kind::Numbers.draw_distinct(20, &mut rng);
        let mut unique = values.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 20);
    }

    #[test]
    fn lists_read_as_english() {
        let items: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(join_list(&items[..1]), "a");
        assert_eq!(join_list(&items[..2]), "a and b");
        assert_eq!(join_list(&items), "a, b, and c");
    }
}
