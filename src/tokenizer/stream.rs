//! Streaming text out of generated ids: `IncrementalDecoder` turns one id at a time into a text
//! delta, `StopStringMatcher` finds stop strings that span deltas. Both only ever emit text that
//! is final: the decoder holds back bytes of an unfinished UTF-8 character, the matcher holds
//! back a suffix that may still become a stop string. Neither ever emits text twice or drops text
//! other than a stop string and what follows it.
//!
//! Decoding a window of recent ids, not ids one by one, is what makes SentencePiece spaces (`▁`,
//! stripped at the start of a decode) and byte-fallback / byte-level pieces of one character come
//! out right (the prefix_offset/read_offset scheme of HF TGI and vLLM):
//!
//! ```text
//!   ids:   ... p p p p p | e e e | n n
//!                ^prefix_offset  ^read_offset   (n: not yet emitted)
//!   prefix_text = decode(ids[prefix_offset..read_offset])   already emitted
//!   new_text    = decode(ids[prefix_offset..])
//!   delta       = new_text minus prefix_text, unless it ends in U+FFFD (an unfinished char)
//! ```

use std::sync::Arc;

use super::{Tokenizer, TokenizerError};

/// How many prompt ids seed the decode window (context for the first generated piece).
const NUM_PROMPT_CONTEXT_IDS: usize = 5;

/// Streams text for generated tokens; never emits broken UTF-8.
#[derive(Debug)]
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    /// The window: ids from `prefix_offset` on (older ids are dropped).
    window: Vec<u32>,
    /// Index in `window` of the first id not yet emitted (`read_offset - prefix_offset`).
    read_idx: usize,
    /// decode(window[..read_idx]), cached.
    prefix_text: String,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// A decoder for the tokens generated after `prompt_ids`; the last few prompt ids seed the
    /// window so the first piece decodes with its context (e.g. the leading space of a
    /// SentencePiece word).
    pub fn new(tokenizer: Arc<Tokenizer>, prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        let context_start = prompt_ids.len().saturating_sub(NUM_PROMPT_CONTEXT_IDS);
        let window = prompt_ids[context_start..].to_vec();
        // An out-of-range prompt id would have failed earlier (the prompt was encoded or
        // validated); decode what can be decoded rather than fail construction.
        let prefix_text = tokenizer
            .decode(&window, skip_special_tokens)
            .unwrap_or_default();
        IncrementalDecoder {
            tokenizer,
            read_idx: window.len(),
            window,
            prefix_text,
            skip_special_tokens,
        }
    }

    /// The new text delta for `token_id`, possibly "" (text held back until a character is
    /// complete). An out-of-range id is an error and leaves the decoder unchanged.
    pub fn step(&mut self, token_id: u32) -> Result<String, TokenizerError> {
        self.window.push(token_id);
        let new_text = match self
            .tokenizer
            .decode(&self.window, self.skip_special_tokens)
        {
            Ok(text) => text,
            Err(e) => {
                self.window.pop();
                return Err(e);
            }
        };
        if new_text.len() <= self.prefix_text.len() || new_text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        Ok(self.advance(new_text))
    }

    /// Anything still held back at end of stream (with U+FFFD for bytes that never formed a
    /// character).
    pub fn flush(&mut self) -> String {
        if self.read_idx == self.window.len() {
            return String::new();
        }
        match self
            .tokenizer
            .decode(&self.window, self.skip_special_tokens)
        {
            Ok(new_text) => self.advance(new_text),
            // Unreachable in practice: `step` only keeps ids that decoded.
            Err(_) => String::new(),
        }
    }

    /// Emits `new_text` (the decode of the whole window) past the prefix, and slides the
    /// window so that the ids just emitted become the new prefix.
    fn advance(&mut self, new_text: String) -> String {
        let delta = suffix_after(&new_text, &self.prefix_text).to_string();
        let emitted = self.window.split_off(self.read_idx);
        // These ids decoded inside the window already, so this cannot fail.
        self.prefix_text = self
            .tokenizer
            .decode(&emitted, self.skip_special_tokens)
            .unwrap_or_default();
        self.window = emitted;
        self.read_idx = self.window.len();
        delta
    }
}

/// `text` past `prefix`. Decoding is prefix-stable in practice; should a longer window ever
/// re-spell the prefix, cut at the nearest character boundary instead of panicking.
fn suffix_after<'a>(text: &'a str, prefix: &str) -> &'a str {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest;
    }
    let mut cut = prefix.len().min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[cut..]
}

/// What `StopStringMatcher::push` lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopMatch {
    /// Text that is safe to emit now.
    pub emit: String,
    /// A stop string matched: nothing more will be emitted.
    pub stopped: bool,
}

/// Stop strings that may span tokens: feed deltas, get back text that is safe to emit (holding
/// back a suffix that could be the start of a stop string), and whether a stop string matched
/// (the match and everything after it are dropped).
#[derive(Debug, Clone)]
pub struct StopStringMatcher {
    stop_strings: Vec<String>,
    /// Text received but not emitted: always shorter than the longest stop string, and a prefix
    /// of one of them.
    held: String,
    matched_idx: Option<usize>,
}

impl StopStringMatcher {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new(stop_strings: Vec<String>) -> Self {
        StopStringMatcher {
            stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            matched_idx: None,
        }
    }

    /// Feeds the next text delta: returns what may be emitted now (holding back a tail that could
    /// start a stop string) and whether a stop string matched, in which case the match and all
    /// later text are dropped and every further call returns `stopped` with nothing to emit.
    pub fn push(&mut self, delta: &str) -> StopMatch {
        if self.matched_idx.is_some() {
            return StopMatch {
                emit: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(delta);
        // The earliest match wins (at equal positions, the first stop string listed).
        let earliest = self
            .stop_strings
            .iter()
            .enumerate()
            .filter_map(|(idx, stop)| self.held.find(stop.as_str()).map(|pos| (pos, idx)))
            .min();
        if let Some((pos, idx)) = earliest {
            self.matched_idx = Some(idx);
            let mut emit = std::mem::take(&mut self.held);
            emit.truncate(pos);
            return StopMatch {
                emit,
                stopped: true,
            };
        }
        // Hold back the longest suffix that a stop string starts with.
        let keep_from = self
            .held
            .char_indices()
            .map(|(idx, _)| idx)
            .find(|&idx| {
                let tail = &self.held[idx..];
                self.stop_strings.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let rest = self.held.split_off(keep_from);
        StopMatch {
            emit: std::mem::replace(&mut self.held, rest),
            stopped: false,
        }
    }

    /// Held-back text when generation ends for another reason ("" after a stop).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The stop string that matched, if any.
    pub fn matched_stop(&self) -> Option<&str> {
        self.matched_idx
            .and_then(|idx| self.stop_strings.get(idx))
            .map(String::as_str)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn suffix_after_is_char_safe() {
        assert_eq!(suffix_after("héllo", "hé"), "llo");
        // "é" is 2 bytes: a 2-byte foreign prefix would cut inside it.
        assert_eq!(suffix_after("xé!", "ab"), "é!");
        assert_eq!(suffix_after("ab", "abc"), "");
    }
}
