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
//!
//! Each token decodes a short window, not the whole sequence (which cost ~0.25 ms per token
//! at 1,000 tokens with GPT-2's tokenizer, on the HTTP threads that share the cores with the
//! model): the ids from one token before the last committed point, compared with the same
//! window without the new tokens, so a decoder's start-of-text rules (a leading space
//! dropped) apply to both sides alike. Text is committed when it does not end in a possibly
//! incomplete character (the scheme of Hugging Face's text-generation-inference); a window
//! decode that does not extend the shorter one falls back to decoding the whole sequence.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

pub struct TextStream {
    ids: Vec<u32>,
    /// ids[window..read] decoded: the committed end of the text as a window decode sees it.
    window_head: String,
    window: usize,
    /// Ids whose text is committed: text[..committed] is theirs and later tokens cannot
    /// change it.
    read: usize,
    committed: usize,
    /// The text of all ids so far (cut before a stop string once one matched).
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
    stops: Vec<String>,
    /// A stop string matched: the text ends before it, and nothing more is added.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        TextStream { ids: Vec::new(), window_head: String::new(), window: 0, read: 0, committed: 0, text: String::new(), sent: 0, stops, stopped: false }
    }

    /// Adds a generated token and returns the text that can be sent now.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(id);
        let decoded = tok.decode(&self.ids[self.window..])?;
        match decoded.strip_prefix(self.window_head.as_str()) {
            Some(new) => {
                self.text.truncate(self.committed);
                self.text.push_str(new);
                if !new.is_empty() && !new.ends_with('\u{fffd}') {
                    self.committed = self.text.len();
                    self.window = self.read;
                    self.read = self.ids.len();
                    self.window_head = tok.decode(&self.ids[self.window..self.read])?;
                }
            }
            // A decoder whose window text does not extend the shorter one's (or a committed
            // end that changed after all): the whole sequence, and the window starts over.
            None => {
                self.text = tok.decode(&self.ids)?;
                (self.window, self.read, self.committed, self.window_head) = (0, 0, 0, String::new());
            }
        }
        let text = &self.text;
        // A stop string may straddle tokens: search from where it could start.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest).min(text.len());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self.stops.iter().filter_map(|s| text[from..].find(s.as_str()).map(|p| from + p)).min();
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

    #[test]
    fn windowed_decoding_streams_exactly_the_whole_decode() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let tok = Tokenizer::gpt2().unwrap();
        let b2c = crate::tokenizer::byte_to_char();
        let mut rng = StdRng::seed_from_u64(5);
        let words = tok.encode(" The caf\u{e9} \u{4e16}\u{754c} na\u{ef}ve \u{1f600} end.").unwrap();
        for case in 0..200 {
            // Ordinary tokens, multi-byte characters, and stray bytes, mixed.
            let ids: Vec<u32> = (0..rng.random_range(1..60))
                .map(|_| match rng.random_range(0..4) {
                    0 => tok.token_to_id(&b2c[rng.random_range(0x80..0x100)].to_string()).unwrap(),
                    1 => words[rng.random_range(0..words.len())],
                    _ => rng.random_range(0..50257),
                })
                .collect();
            let mut s = TextStream::new(vec!["\n\n".into()]);
            let mut out = String::new();
            for &id in &ids {
                out.push_str(&s.push(&tok, id).unwrap());
                if s.stopped {
                    break;
                }
            }
            out.push_str(&s.flush());
            let whole = tok.decode(&ids).unwrap();
            let expected = whole.find("\n\n").map_or(whole.as_str(), |p| &whole[..p]);
            assert_eq!(out, expected, "case {case}: {ids:?}");
            // Plain text commits as it goes: the window stays a few tokens long.
            if !whole.contains('\u{fffd}') {
                assert!(s.ids.len() - s.window <= 3 || s.stopped, "case {case}: window from {} of {}", s.window, s.ids.len());
            }
        }
    }
}
