//! Stop strings over streamed text: finds them across token boundaries and holds back only the
//! text that might still turn into one. Pure string logic.
//!
//! Invariant: what it emits, in order, is the generated text up to (not including) the earliest
//! stop string — or all of it, with `finish`, when none occurs.

/// What one [`StopMatcher::push`] gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// Text that can be sent now (possibly empty).
    Emit(String),
    /// A stop string was found: the text before it, the last to send.
    Stop(String),
}

pub struct StopMatcher {
    stops: Vec<String>,
    /// Text seen but not yet emitted: a suffix that is the start of some stop string.
    held: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new() }
    }

    pub fn push(&mut self, text: &str) -> Scan {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let before = self.held[..at].to_string();
            self.held.clear();
            return Scan::Stop(before);
        }
        let keep = self.longest_partial_suffix();
        let split = self.held.len() - keep;
        let out = self.held[..split].to_string();
        self.held.drain(..split);
        Scan::Emit(out)
    }

    /// The text still held back, when generation ended without a stop string.
    pub fn finish(self) -> String {
        self.held
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_partial_suffix(&self) -> usize {
        let h = &self.held;
        let longest = self.stops.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0).min(h.len());
        (1..=longest)
            .rev()
            .find(|&k| h.is_char_boundary(h.len() - k) && self.stops.iter().any(|s| s.starts_with(&h[h.len() - k..])))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes `chunks`; returns everything emitted and whether a stop string ended it.
    fn check(stops: &[&str], chunks: &[&str], expect: &str, expect_stop: bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for c in chunks {
            match m.push(c) {
                Scan::Emit(s) => out.push_str(&s),
                Scan::Stop(s) => {
                    out.push_str(&s);
                    assert!(expect_stop, "stopped early: {out:?}");
                    assert_eq!(out, expect);
                    return;
                }
            }
        }
        assert!(!expect_stop, "no stop found in {chunks:?}");
        out.push_str(&m.finish());
        assert_eq!(out, expect);
    }

    #[test]
    fn finds_stops_across_chunks_and_drops_them() {
        check(&["\n\n"], &["fn main", "()\n", "\nmore"], "fn main()", true);
        check(&["END"], &["abc", "E", "N", "D", "x"], "abc", true);
        check(&["END", "ab"], &["xxab"], "xx", true);
        // The earliest of several stops wins.
        check(&["cd", "b"], &["abcd"], "a", true);
    }

    #[test]
    fn partial_matches_are_released_when_they_fail() {
        check(&["END"], &["E", "N", "d"], "ENd", false);
        check(&["END"], &["xEN"], "xEN", false);
        check(&[], &["a", "b"], "ab", false);
        check(&[""], &["a"], "a", false);
    }

    #[test]
    fn holds_back_only_what_could_start_a_stop() {
        let mut m = StopMatcher::new(&["Tuesday".to_string()]);
        assert_eq!(m.push("on Tu"), Scan::Emit("on ".into()));
        assert_eq!(m.push("x"), Scan::Emit("Tux".into()));
        // Multi-byte characters: never split inside one.
        let mut m = StopMatcher::new(&["é!".to_string()]);
        assert_eq!(m.push("café"), Scan::Emit("caf".into()));
        assert_eq!(m.push("?"), Scan::Emit("é?".into()));
    }
}
