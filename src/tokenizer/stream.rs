//! Streaming detokenization: token pieces in, complete UTF-8 out. Never emits half a character;
//! the concatenation of everything it emits equals [`super::Tokenizer::decode`] of the same ids.

use super::Tokenizer;

/// Turns a stream of token ids into text chunks, holding back the bytes of a character whose
/// remaining bytes are still to come (byte-level vocabularies split 世 or 🦀 across tokens).
///
/// Special tokens are rendered, as in `decode`; callers that stop at end-of-generation should test
/// [`Tokenizer::is_eog`] before pushing.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// Bytes received but not yet emitted: at most the start of one incomplete character.
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> StreamDecoder<'a> {
        StreamDecoder { tokenizer, pending: Vec::new() }
    }

    /// Adds token `id`; returns the text it completes, possibly empty.
    pub fn push(&mut self, id: u32) -> String {
        self.tokenizer.append_piece(id, &mut self.pending);
        take_complete(&mut self.pending)
    }

    /// Ends the stream: returns what is still held back, with U+FFFD for an unfinished character.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

/// Removes from `bytes` and returns its longest prefix that is not the start of a character still
/// being completed. Invalid sequences become U+FFFD exactly as `String::from_utf8_lossy` does, so
/// chunked output equals lossy decoding of the whole.
fn take_complete(bytes: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut start = 0;
    while start < bytes.len() {
        match std::str::from_utf8(&bytes[start..]) {
            Ok(valid) => {
                out.push_str(valid);
                start = bytes.len();
            }
            Err(e) => {
                let valid_end = start + e.valid_up_to();
                // `valid_up_to` bytes were just validated, so the fallback is unreachable.
                out.push_str(std::str::from_utf8(&bytes[start..valid_end]).unwrap_or_default());
                match e.error_len() {
                    // An incomplete character at the end: wait for its other bytes.
                    None => {
                        start = valid_end;
                        break;
                    }
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        start = valid_end + bad;
                    }
                }
            }
        }
    }
    bytes.drain(..start);
    out
}

#[cfg(test)]
mod tests {
    use super::take_complete;

    /// Feeds `chunks` one by one; returns what each call emitted and the final lossy flush.
    fn check(chunks: &[&[u8]], expect: &[&str], expect_rest: &str) {
        let mut pending = Vec::new();
        let mut got = Vec::new();
        for chunk in chunks {
            pending.extend_from_slice(chunk);
            got.push(take_complete(&mut pending));
        }
        assert_eq!(got, expect);
        assert_eq!(String::from_utf8_lossy(&pending), expect_rest);
        // Chunked output + flush equals lossy decoding of everything at once.
        let whole: Vec<u8> = chunks.concat();
        assert_eq!(got.concat() + expect_rest, String::from_utf8_lossy(&whole));
    }

    #[test]
    fn holds_back_partial_characters() {
        // 世 = E4 B8 96, 🦀 = F0 9F A6 80
        check(&[b"a\xE4", b"\xB8", b"\x96b"], &["a", "", "世b"], "");
        check(&[b"\xF0\x9F", b"\xA6\x80!"], &["", "🦀!"], "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        check(&[b"a\xFFb"], &["a\u{FFFD}b"], "");
        // A start byte followed by a non-continuation byte is invalid, not incomplete.
        check(&[b"\xE4", b"x"], &["", "\u{FFFD}x"], "");
    }

    #[test]
    fn unfinished_character_is_flushed_lossily() {
        check(&[b"ok\xF0\x9F\xA6"], &["ok"], "\u{FFFD}");
    }
}
