//! Text of a generated sequence as it streams: token ids decoded incrementally, text held
//! back while it ends in an incomplete UTF-8 sequence or in what may become a stop string,
//! and cut before the first stop string.
//!
//! Only the last character is held for an incomplete sequence: the decoder turns the
//! token bytes into text lossily, one U+FFFD per maximal invalid run, so more bytes can
//! only change a trailing incomplete run (UTF-8 resynchronises at every lead byte).
//! Everything before it is final, also the replacement characters of runs that can no
//! longer complete - a model that emits stray byte tokens (an untrained one does) streams
//! them as they come instead of going silent until a valid character follows.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

pub struct TextStream {
    ids: Vec<u32>,
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
    stops: Vec<String>,
    /// A stop string matched: the text ends before it, and nothing more is added.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        TextStream { ids: Vec::new(), text: String::new(), sent: 0, stops, stopped: false }
    }

    /// Adds a generated token and returns the text that can be sent now.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        // A stop string may straddle tokens: search from where it could start.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest).min(text.len());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self.stops.iter().filter_map(|s| text[from..].find(s.as_str()).map(|p| from + p)).min();
        self.text = text;
        if let Some(p) = hit {
            self.text.truncate(p);
            self.stopped = true;
            return Ok(self.take(p));
        }
        // The rest of the last character may be in the next token.
        let incomplete = if self.text.ends_with('\u{fffd}') { '\u{fffd}'.len_utf8() } else { 0 };
        let hold = self.stops.iter().map(|s| partial_suffix(&self.text, s)).max().unwrap_or(0).max(incomplete);
        Ok(self.take(self.text.len() - hold))
    }

    /// Text not sent yet (held back when the sequence ended).
    pub fn flush(&mut self) -> String {
        self.take(self.text.len())
    }

    fn take(&mut self, upto: usize) -> String {
        if upto <= self.sent || !self.text.is_char_boundary(self.sent) || !self.text.is_char_boundary(upto) {
            return String::new();
        }
        let out = self.text[self.sent..upto].to_string();
        self.sent = upto;
        out
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len()).rev().find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let tok = Tokenizer::char_level("abc XYZ").unwrap();
        let ids = tok.encode("ab XY cab XYZ c").unwrap();
        let mut s = TextStream::new(vec!["XYZ".into(), "ca".into()]);
        let mut out = String::new();
        let mut pieces = Vec::new();
        for &id in &ids {
            let d = s.push(&tok, id).unwrap();
            pieces.push(d.clone());
            out.push_str(&d);
            if s.stopped {
                break;
            }
        }
        // "XY" is held until the next token shows it is not "XYZ"; "c" until "ca" matches.
        assert_eq!(out, "ab XY ");
        assert!(s.stopped);
        assert_eq!(pieces[..6], ["a", "b", " ", "", "", "XY "]);
        assert_eq!(s.flush(), "");
        // Without a match, flush returns what was held at the end.
        let mut s = TextStream::new(vec!["XYZ".into()]);
        let mut out = String::new();
        for &id in &tok.encode("a XY").unwrap() {
            out.push_str(&s.push(&tok, id).unwrap());
        }
        assert_eq!(out, "a ");
        assert_eq!(s.flush(), "XY");
    }

    #[test]
    fn split_characters_wait_for_their_bytes_and_stray_bytes_stream() {
        let tok = Tokenizer::gpt2().unwrap();
        let b2c = crate::tokenizer::byte_to_char();
        let byte = |b: u8| tok.token_to_id(&b2c[b as usize].to_string()).unwrap();
        let run = |ids: &[u32]| {
            let mut s = TextStream::new(Vec::new());
            let pieces: Vec<String> = ids.iter().map(|&id| s.push(&tok, id).unwrap()).collect();
            (pieces, s.flush())
        };
        // An em dash (E2 80 94) in three byte tokens: nothing until its last byte.
        let (pieces, rest) = run(&[byte(b'a'), byte(0xE2), byte(0x80), byte(0x94)]);
        assert_eq!(pieces, ["a", "", "", "\u{2014}"]);
        assert_eq!(rest, "");
        // Stray continuation bytes can never complete: each streams once the next byte
        // shows its run has ended; only the last one waits.
        let (pieces, rest) = run(&[byte(0x80), byte(0x80), byte(0x80), byte(b'b')]);
        assert_eq!(pieces, ["", "\u{fffd}", "\u{fffd}", "\u{fffd}b"]);
        assert_eq!(rest, "");
        // A lead byte cut off by another lead byte is final; the second completes.
        let (pieces, rest) = run(&[byte(0xE2), byte(0xE2), byte(0x80), byte(0x94)]);
        assert_eq!(pieces, ["", "\u{fffd}", "", "\u{2014}"]);
        assert_eq!(rest, "");
        // Held at the end of the sequence: flushed as the replacement character.
        let (pieces, rest) = run(&[byte(b'c'), byte(0xE2)]);
        assert_eq!(pieces, ["c", ""]);
        assert_eq!(rest, "\u{fffd}");
    }
}
