//! Stop sequences over streamed text: text is released as soon as it can no longer turn into a
//! stop sequence, so a streaming client never receives the start of a stop it should not see.

pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What one piece of generated text released.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop sequence was completed; `text` ends just before it.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> Released {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s)).min() {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        let keep = self.held_back();
        let text = self.pending[..self.pending.len() - keep].to_string();
        self.pending.drain(..self.pending.len() - keep);
        Released {
            text,
            stopped: false,
        }
    }

    /// The text still held back, once generation has ended without a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest end of the pending text that begins some stop sequence.
    fn held_back(&self) -> usize {
        let text = &self.pending;
        (1..=text.len())
            .rev()
            .filter(|&n| text.is_char_boundary(text.len() - n))
            .find(|&n| {
                let tail = &text[text.len() - n..];
                self.stops
                    .iter()
                    .any(|s| s.len() > n && s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn a_stop_split_across_pieces_is_cut_and_never_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("one E").text, "one ");
        assert_eq!(m.push("N").text, "");
        let last = m.push("D two");
        assert_eq!(last.text, "");
        assert!(last.stopped);
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching() {
        assert_eq!(run(&["END"], &["a E", "x", "b"]), ("a Exb".into(), false));
        assert_eq!(run(&["\n\n"], &["a\n", "b"]), ("a\nb".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["zz", "b"], &["abczz"]), ("a".into(), true));
    }

    #[test]
    fn text_ending_in_a_partial_stop_is_released_at_the_end() {
        assert_eq!(run(&["STOP"], &["hello ST"]), ("hello ST".into(), false));
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        assert_eq!(run(&["é!"], &["caféé"]), ("caféé".into(), false));
        assert_eq!(run(&["é!"], &["café", "!x"]), ("caf".into(), true));
    }

    #[test]
    fn empty_stops_are_ignored() {
        assert_eq!(run(&[""], &["abc"]), ("abc".into(), false));
    }
}
