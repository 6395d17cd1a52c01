//! Text of a generated sequence as it streams: token ids decoded incrementally, text held
//! back while it ends in an incomplete UTF-8 sequence or in what may become a stop string,
//! and cut before the first stop string.

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
        if self.text.ends_with('\u{fffd}') {
            return Ok(String::new()); // the rest of a character is in the next token
        }
        let hold = self.stops.iter().map(|s| partial_suffix(&self.text, s)).max().unwrap_or(0);
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
}
