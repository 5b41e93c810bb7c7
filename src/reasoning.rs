//! Splitting a model's answer into its reasoning and its reply, as llama.cpp's chat parsers do
//! for the two formats MoE models use: `<think>…</think>` (Qwen3, DeepSeek-R1) and gpt-oss's
//! Harmony channels (`<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final
//! <|message|>…`). Works on the decoded text stream, so a marker split across pieces is held back
//! until it is whole. Knows no terminal and no HTTP.

/// How a model marks its reasoning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningFormat {
    /// No reasoning markers: everything is the reply.
    None,
    /// `<think>…</think>` before the reply.
    Think,
    /// Harmony channels: `analysis` is reasoning, `final` and `commentary` are the reply.
    Harmony,
}

impl ReasoningFormat {
    /// The format a chat template implies (llama.cpp decides from the template too: a Harmony
    /// template mentions `<|channel|>`, a thinking one `<think>`).
    pub fn detect(template: Option<&str>) -> ReasoningFormat {
        match template {
            Some(t) if t.contains("<|channel|>") && t.contains("<|message|>") => ReasoningFormat::Harmony,
            Some(t) if t.contains("<think>") => ReasoningFormat::Think,
            _ => ReasoningFormat::None,
        }
    }
}

/// A piece of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Reasoning(String),
    Reply(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Outside reasoning (`Think`), or inside a Harmony message whose channel is the reply.
    Reply,
    /// Inside `<think>` or a Harmony `analysis` message.
    Reasoning,
    /// A Harmony header (`<|start|>role…`, `<|channel|>name…`) up to `<|message|>`: dropped;
    /// `channel` collects the channel name.
    Header { channel: String },
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const H_START: &str = "<|start|>";
const H_CHANNEL: &str = "<|channel|>";
const H_MESSAGE: &str = "<|message|>";
const H_END: &str = "<|end|>";
const H_ENDS: [&str; 3] = [H_END, "<|return|>", "<|call|>"];

/// The splitter of one answer.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    format: ReasoningFormat,
    state: State,
    /// Text not yet classified: a suffix that may be the start of a marker.
    held: String,
}

impl ReasoningSplitter {
    /// `prompt_tail`: the end of the rendered prompt, which decides where the answer starts (a
    /// Harmony prompt ends in an assistant header; some thinking templates open `<think>`).
    pub fn new(format: ReasoningFormat, prompt_tail: &str) -> ReasoningSplitter {
        let state = match format {
            ReasoningFormat::Harmony => State::Header { channel: String::new() },
            ReasoningFormat::Think if prompt_tail.trim_end().ends_with(THINK_OPEN) => State::Reasoning,
            _ => State::Reply,
        };
        ReasoningSplitter { format, state, held: String::new() }
    }

    /// Classify `text` (the next decoded piece); returns what is certain so far.
    pub fn push(&mut self, text: &str) -> Vec<Part> {
        if self.format == ReasoningFormat::None {
            return if text.is_empty() { vec![] } else { vec![Part::Reply(text.to_string())] };
        }
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            let markers = self.markers();
            let found = markers.iter().filter_map(|m| self.held.find(m).map(|i| (i, *m))).min_by_key(|&(i, _)| i);
            match found {
                Some((i, m)) => {
                    let before: String = self.held.drain(..i + m.len()).collect();
                    self.emit(&before[..i], &mut out);
                    self.on_marker(m);
                }
                None => {
                    // Keep back the longest suffix that could start a marker.
                    let keep = (1..self.held.len().min(16) + 1)
                        .rev()
                        .filter(|&n| self.held.is_char_boundary(self.held.len() - n))
                        .find(|&n| markers.iter().any(|m| m.starts_with(&self.held[self.held.len() - n..])))
                        .unwrap_or(0);
                    let ready: String = self.held.drain(..self.held.len() - keep).collect();
                    self.emit(&ready, &mut out);
                    return out;
                }
            }
        }
    }

    /// The end of the answer: whatever is still held back.
    pub fn finish(&mut self) -> Vec<Part> {
        let rest = std::mem::take(&mut self.held);
        let mut out = Vec::new();
        self.emit(&rest, &mut out);
        out
    }

    fn markers(&self) -> &'static [&'static str] {
        match (self.format, &self.state) {
            (ReasoningFormat::Think, State::Reasoning) => &[THINK_CLOSE],
            (ReasoningFormat::Think, _) => &[THINK_OPEN],
            (ReasoningFormat::Harmony, State::Header { .. }) => &[H_MESSAGE, H_CHANNEL, H_START],
            (ReasoningFormat::Harmony, _) => &[H_END, "<|return|>", "<|call|>", H_START],
            (ReasoningFormat::None, _) => &[],
        }
    }

    fn emit(&mut self, text: &str, out: &mut Vec<Part>) {
        if text.is_empty() {
            return;
        }
        match &mut self.state {
            State::Reply => push_part(out, Part::Reply(text.to_string())),
            State::Reasoning => push_part(out, Part::Reasoning(text.to_string())),
            State::Header { channel } => channel.push_str(text),
        }
    }

    fn on_marker(&mut self, m: &str) {
        self.state = match (self.format, m) {
            (ReasoningFormat::Think, THINK_OPEN) => State::Reasoning,
            (ReasoningFormat::Think, _) => State::Reply,
            (_, H_START) => State::Header { channel: String::new() },
            (_, H_CHANNEL) => State::Header { channel: String::new() },
            (_, H_MESSAGE) => match &self.state {
                // `analysis` is reasoning; `final` and `commentary` (tool calls) are the reply.
                State::Header { channel } if channel.trim_start().starts_with("analysis") => State::Reasoning,
                _ => State::Reply,
            },
            (_, m) if H_ENDS.contains(&m) => State::Header { channel: String::new() },
            _ => self.state.clone(),
        };
    }
}

/// Append `p`, merging it into the last part of the same kind.
fn push_part(out: &mut Vec<Part>, p: Part) {
    match (out.last_mut(), p) {
        (Some(Part::Reply(a)), Part::Reply(b)) | (Some(Part::Reasoning(a)), Part::Reasoning(b)) => a.push_str(&b),
        (_, p) => out.push(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `pieces` and collect the reasoning and the reply.
    fn split(format: ReasoningFormat, tail: &str, pieces: &[&str]) -> (String, String) {
        let mut s = ReasoningSplitter::new(format, tail);
        let mut parts: Vec<Part> = pieces.iter().flat_map(|p| s.push(p)).collect();
        parts.extend(s.finish());
        let (mut r, mut c) = (String::new(), String::new());
        for p in parts {
            match p {
                Part::Reasoning(t) => r += &t,
                Part::Reply(t) => c += &t,
            }
        }
        (r, c)
    }

    #[test]
    fn harmony_analysis_is_reasoning_and_final_is_the_reply() {
        let pieces = [
            "<|channel|>",
            "analysis",
            "<|message|>",
            "The user asks",
            " about traits.",
            "<|end|>",
            "<|start|>",
            "assistant",
            "<|channel|>",
            "final",
            "<|message|>",
            "A trait is ",
            "an interface.",
        ];
        let (r, c) = split(ReasoningFormat::Harmony, "<|start|>assistant", &pieces);
        assert_eq!(r, "The user asks about traits.");
        assert_eq!(c, "A trait is an interface.");
    }

    #[test]
    fn markers_split_across_pieces_are_still_found() {
        let pieces = ["<|chan", "nel|>final<|mes", "sage|>Hi", " there<|e", "nd|>"];
        let (r, c) = split(ReasoningFormat::Harmony, "", &pieces);
        assert_eq!((r.as_str(), c.as_str()), ("", "Hi there"));
        let (r, c) = split(ReasoningFormat::Think, "", &["<thi", "nk>\nhmm</th", "ink>\n\nYes."]);
        assert_eq!((r.as_str(), c.as_str()), ("\nhmm", "\n\nYes."));
    }

    #[test]
    fn a_prompt_that_opens_think_starts_in_reasoning() {
        let (r, c) = split(ReasoningFormat::Think, "<|Assistant|><think>\n", &["step one", "</think>", "done"]);
        assert_eq!((r.as_str(), c.as_str()), ("step one", "done"));
        // Without markers everything is the reply, and text that only looks like one is kept.
        let (r, c) = split(ReasoningFormat::None, "", &["<think>x</think>", "y"]);
        assert_eq!((r.as_str(), c.as_str()), ("", "<think>x</think>y"));
        let (r, c) = split(ReasoningFormat::Think, "", &["a < b, <th"]);
        assert_eq!((r.as_str(), c.as_str()), ("", "a < b, <th"));
    }

    #[test]
    fn the_format_follows_the_template() {
        assert_eq!(ReasoningFormat::detect(Some("{{'<|start|>'}}<|channel|>x<|message|>")), ReasoningFormat::Harmony);
        assert_eq!(ReasoningFormat::detect(Some("{% if x %}<think>{% endif %}")), ReasoningFormat::Think);
        assert_eq!(ReasoningFormat::detect(Some("<|im_start|>")), ReasoningFormat::None);
        assert_eq!(ReasoningFormat::detect(None), ReasoningFormat::None);
    }
}
