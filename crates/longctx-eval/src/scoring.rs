//! RULER's metrics (NVIDIA/RULER `scripts/eval/synthetic/constants.py`) and the pass-key check
//! of the landmark-attention evaluation.

/// RULER's output cleaning: surrounding space removed, control characters turned into newlines.
pub fn clean(output: &str) -> String {
    output
        .trim()
        .chars()
        .map(|c| if (c as u32) < 0x20 { '\n' } else { c })
        .collect()
}

/// RULER `string_match_all`: the percentage of `answers` found in `output`, ignoring case.
pub fn string_match_all(output: &str, answers: &[String]) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let output = clean(output).to_lowercase();
    let found = answers
        .iter()
        .filter(|a| output.contains(&a.to_lowercase()))
        .count();
    100.0 * found as f64 / answers.len() as f64
}

/// RULER `string_match_part`: 100 when any of `answers` is in `output`, ignoring case.
pub fn string_match_part(output: &str, answers: &[String]) -> f64 {
    let output = clean(output).to_lowercase();
    if answers.iter().any(|a| output.contains(&a.to_lowercase())) {
        100.0
    } else {
        0.0
    }
}

/// The landmark passkey check: the first run of digits in the output must be the key.
pub fn first_number_is(output: &str, key: &str) -> f64 {
    let digits: String = output
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    if digits == key {
        100.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn match_all_counts_the_fraction_found_ignoring_case() {
        let expected = answers(&["7312094", "Blue-Heron", "x"]);
        assert_eq!(
            string_match_all(" 7312094 and blue-heron\n", &expected),
            200.0 / 3.0
        );
        assert_eq!(string_match_all("nothing", &expected), 0.0);
        assert_eq!(string_match_all("x 7312094 BLUE-HERON", &expected), 100.0);
        assert_eq!(string_match_all("anything", &[]), 0.0);
    }

    #[test]
    fn match_part_needs_one() {
        let expected = answers(&["paris", "london"]);
        assert_eq!(string_match_part("It is London.", &expected), 100.0);
        assert_eq!(string_match_part("Rome", &expected), 0.0);
    }

    #[test]
    fn the_passkey_must_be_the_first_number() {
        assert_eq!(first_number_is(" 48213. Remember", "48213"), 100.0);
        assert_eq!(first_number_is("is 482130", "48213"), 0.0);
        assert_eq!(first_number_is("is 12 then 48213", "48213"), 0.0);
        assert_eq!(first_number_is("no digits", "48213"), 0.0);
    }

    #[test]
    fn control_characters_become_newlines() {
        assert_eq!(clean("\ta\u{1}b "), "a\nb");
    }
}
