//! IncrementalDecoder and StopStringMatcher: streamed text equals the full decode, no broken
//! characters mid-stream, stop strings found across deltas.
#![allow(clippy::unwrap_used)]

mod tokenizer_common;

use std::sync::Arc;

use tokenizer_common::{Rng, hf_tiny, smollm2, spm};
use triton_ferrum::tokenizer::{IncrementalDecoder, StopMatch, StopStringMatcher, Tokenizer};

/// Text fragments with multi-byte characters that byte-level BPE and SentencePiece byte
/// fallback both split across several tokens.
const FRAGMENTS: &[&str] = &[
    "hello",
    " world",
    "  ",
    "\n",
    "\t",
    "token",
    "izer",
    " the",
    "é",
    "ü",
    "naïve",
    "東京",
    "タワー",
    "🚀",
    "👍🏽",
    "👨‍👩‍👧",
    "한국어",
    "Ωμέγα",
    "123",
    " 4",
    ",",
    ".",
    "'s",
    "<tool>",
    "<|im_start|>",
    "<|im_end|>",
    "<|eos|>",
];

fn random_text(rng: &mut Rng) -> String {
    let num_fragments = 1 + rng.below(12);
    (0..num_fragments)
        .map(|_| FRAGMENTS[rng.below(FRAGMENTS.len())])
        .collect()
}

/// Streams `generated` after `prompt`; returns (deltas, flushed tail).
fn stream(
    tok: &Arc<Tokenizer>,
    prompt: &[u32],
    generated: &[u32],
    skip: bool,
) -> (Vec<String>, String) {
    let mut decoder = IncrementalDecoder::new(tok.clone(), prompt, skip);
    let deltas = generated
        .iter()
        .map(|&id| decoder.step(id).unwrap())
        .collect();
    let tail = decoder.flush();
    (deltas, tail)
}

fn check_valid_text_streams(tok: &Arc<Tokenizer>, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut num_split_chars = 0;
    for _ in 0..200 {
        let text = random_text(&mut rng);
        let generated = tok.encode(&text, false).unwrap();
        let skip = rng.below(2) == 0;
        // Without a prompt: the stream is exactly the decode of the generated ids.
        let (deltas, tail) = stream(tok, &[], &generated, skip);
        for delta in &deltas {
            assert!(
                !delta.contains('\u{FFFD}'),
                "replacement char mid-stream in {delta:?} of {text:?}"
            );
        }
        num_split_chars += deltas.iter().filter(|d| d.is_empty()).count();
        assert_eq!(
            tail, "",
            "nothing held back at the end of valid text {text:?}"
        );
        assert_eq!(
            deltas.concat(),
            tok.decode(&generated, skip).unwrap(),
            "text {text:?}"
        );

        // After a prompt: the stream continues the prompt's text.
        let prompt_text = random_text(&mut rng);
        let prompt = tok.encode(&prompt_text, true).unwrap();
        let (deltas, tail) = stream(tok, &prompt, &generated, skip);
        let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
        let full = tok.decode(&all, skip).unwrap();
        let prompt_decoded = tok.decode(&prompt, skip).unwrap();
        assert_eq!(
            format!("{prompt_decoded}{}{tail}", deltas.concat()),
            full,
            "prompt {prompt_text:?} then {text:?}"
        );
    }
    // Multi-byte characters were in fact split across tokens (some steps emitted nothing).
    assert!(
        num_split_chars > 50,
        "only {num_split_chars} held-back steps"
    );
}

#[test]
fn incremental_decode_byte_level_bpe() {
    check_valid_text_streams(&smollm2(), 1);
}

#[test]
fn incremental_decode_sentencepiece_byte_fallback() {
    check_valid_text_streams(&spm(), 2);
}

#[test]
fn incremental_decode_tokenizer_json() {
    check_valid_text_streams(&hf_tiny(), 3);
}

#[test]
fn sentencepiece_leading_space_survives_streaming() {
    let tok = spm();
    let prompt = tok.encode("hello", true).unwrap();
    let generated = tok.encode(" world", false).unwrap()[1..].to_vec(); // "▁world" without the prefix "▁"
    let (deltas, _) = stream(&tok, &prompt, &generated, true);
    assert_eq!(deltas.concat(), " world");
    // Decoding token by token would strip that space.
    assert_eq!(tok.decode(&generated, true).unwrap(), "world");
}

#[test]
fn incremental_decode_random_ids() {
    // Arbitrary ids, including lone byte tokens that never form a character: the stream plus the
    // flushed tail is the (lossy) full decode, and nothing is emitted twice.
    //
    // One exception, for SentencePiece only: HF's ByteFallback decoder turns a whole run of byte
    // tokens into U+FFFDs when the run is not valid UTF-8, valid bytes included, so a stream that
    // already emitted `<0x7D>` as "}" cannot agree with a later full decode of `<0x7D><0xB6>` as
    // "\u{FFFD}\u{FFFD}". There the stream must only stay free of U+FFFD wherever the full decode is.
    // (SentencePiece: 256 of its 420 ids are byte tokens, so most random sequences are invalid.)
    for (tok, seed, byte_runs_all_or_nothing, min_exact) in
        [(smollm2(), 10, false, 500), (spm(), 11, true, 40)]
    {
        let mut rng = Rng::new(seed);
        let vocab_size = tok.vocab_size();
        let mut num_exact = 0;
        for _ in 0..300 {
            let len = 1 + rng.below(24);
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    // Bias towards the low ids: specials and byte tokens.
                    let bound = if rng.below(2) == 0 {
                        300.min(vocab_size)
                    } else {
                        vocab_size
                    };
                    rng.below(bound) as u32
                })
                .collect();
            for skip in [false, true] {
                let (deltas, tail) = stream(&tok, &[], &ids, skip);
                let streamed = format!("{}{tail}", deltas.concat());
                let full = tok.decode(&ids, skip).unwrap();
                if byte_runs_all_or_nothing && full.contains('\u{FFFD}') {
                    continue;
                }
                assert_eq!(streamed, full, "ids {ids:?} skip {skip}");
                num_exact += 1;
                if !full.contains('\u{FFFD}') {
                    assert_eq!(tail, "");
                }
            }
        }
        assert!(
            num_exact >= min_exact,
            "only {num_exact} sequences compared"
        );
    }
}

#[test]
fn incremental_decode_holds_partial_char_and_rejects_bad_ids() {
    let tok = smollm2();
    let ids = tok.encode("🚀", false).unwrap();
    assert!(
        ids.len() > 1,
        "🚀 should be several byte-level tokens: {ids:?}"
    );
    let mut decoder = IncrementalDecoder::new(tok.clone(), &[], false);
    for &id in &ids[..ids.len() - 1] {
        assert_eq!(decoder.step(id).unwrap(), "");
    }
    // An invalid id is an error and does not disturb the stream.
    assert!(decoder.step(tok.vocab_size() as u32).is_err());
    assert_eq!(decoder.step(ids[ids.len() - 1]).unwrap(), "🚀");
    assert_eq!(decoder.flush(), "");

    // A character cut short by the end of the stream comes out lossy on flush.
    let mut decoder = IncrementalDecoder::new(tok, &[], false);
    assert_eq!(decoder.step(ids[0]).unwrap(), "");
    assert_eq!(decoder.flush(), "\u{FFFD}");
    assert_eq!(decoder.flush(), "");
}

// ---- stop strings ----------------------------------------------------------------------------

fn feed(matcher: &mut StopStringMatcher, deltas: &[&str]) -> (String, bool) {
    let mut emitted = String::new();
    for delta in deltas {
        let StopMatch { emit, stopped } = matcher.push(delta);
        emitted.push_str(&emit);
        if stopped {
            return (emitted, true);
        }
    }
    emitted.push_str(&matcher.flush());
    (emitted, false)
}

#[test]
fn stop_string_split_across_deltas() {
    let mut m = StopStringMatcher::new(vec!["</answer>".into()]);
    assert_eq!(
        m.push("The answer is 42<"),
        StopMatch {
            emit: "The answer is 42".into(),
            stopped: false
        }
    );
    assert_eq!(
        m.push("/ans"),
        StopMatch {
            emit: String::new(),
            stopped: false
        }
    );
    assert_eq!(
        m.push("wer> trailing"),
        StopMatch {
            emit: String::new(),
            stopped: true
        }
    );
    assert_eq!(m.matched_stop(), Some("</answer>"));
    // Nothing after a stop.
    assert_eq!(
        m.push("more"),
        StopMatch {
            emit: String::new(),
            stopped: true
        }
    );
    assert_eq!(m.flush(), "");
}

#[test]
fn partial_match_that_is_not_a_stop_is_emitted() {
    let mut m = StopStringMatcher::new(vec!["STOP".into()]);
    assert_eq!(m.push("ST").emit, "");
    assert_eq!(m.push("O").emit, "");
    assert_eq!(
        m.push("P!"),
        StopMatch {
            emit: String::new(),
            stopped: true
        }
    );

    let mut m = StopStringMatcher::new(vec!["STOP".into()]);
    assert_eq!(m.push("ST").emit, "");
    assert_eq!(m.push("OW").emit, "STOW");
    assert_eq!(m.push("ST").emit, "");
    assert_eq!(m.flush(), "ST");
}

#[test]
fn overlapping_prefixes_and_multiple_stops() {
    // "aab": after "aa" the held text must keep the second 'a' as a possible start.
    let (out, stopped) = feed(
        &mut StopStringMatcher::new(vec!["aab".into()]),
        &["a", "a", "a", "b", "c"],
    );
    assert_eq!((out.as_str(), stopped), ("a", true));

    // The earliest match wins, whichever stop string it is.
    let mut m = StopStringMatcher::new(vec!["world".into(), "lo w".into(), "\n\n".into()]);
    let (out, stopped) = feed(&mut m, &["hel", "lo", " wor", "ld\n\n"]);
    assert_eq!((out.as_str(), stopped), ("hel", true));
    assert_eq!(m.matched_stop(), Some("lo w"));

    // One stop is a prefix of another.
    let mut m = StopStringMatcher::new(vec!["ab".into(), "abcd".into()]);
    assert_eq!(feed(&mut m, &["xa", "bcd"]), ("x".to_string(), true));
    assert_eq!(m.matched_stop(), Some("ab"));

    // Multi-byte stop strings and deltas; empty stop strings are ignored.
    let mut m = StopStringMatcher::new(vec![String::new(), "東京".into()]);
    assert_eq!(
        feed(&mut m, &["行き先は東", "京です"]),
        ("行き先は".to_string(), true)
    );
    let mut m = StopStringMatcher::new(vec![]);
    assert_eq!(feed(&mut m, &["a", "b"]), ("ab".to_string(), false));
}

#[test]
fn randomized_stops_emit_exactly_the_text_before_the_first_match() {
    let mut rng = Rng::new(42);
    let alphabet = ['a', 'b', 'c', 'é', '🚀', ' '];
    for _ in 0..2000 {
        let gen_str = |rng: &mut Rng, max: usize| -> String {
            (0..1 + rng.below(max))
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect()
        };
        let text = gen_str(&mut rng, 30);
        let stops: Vec<String> = (0..1 + rng.below(3))
            .map(|_| gen_str(&mut rng, 3))
            .collect();
        // Random chunking on char boundaries.
        let chars: Vec<char> = text.chars().collect();
        let mut deltas = Vec::new();
        let mut idx = 0;
        while idx < chars.len() {
            let n = 1 + rng.below(4);
            let end = (idx + n).min(chars.len());
            deltas.push(chars[idx..end].iter().collect::<String>());
            idx = end;
        }
        let delta_refs: Vec<&str> = deltas.iter().map(String::as_str).collect();
        let mut m = StopStringMatcher::new(stops.clone());
        let (out, stopped) = feed(&mut m, &delta_refs);
        let first = stops.iter().filter_map(|s| text.find(s.as_str())).min();
        match first {
            Some(pos) => {
                assert!(stopped, "{text:?} {stops:?}");
                assert_eq!(out, text[..pos], "{text:?} {stops:?} {deltas:?}");
            }
            None => {
                assert!(!stopped);
                assert_eq!(out, text, "{text:?} {stops:?}");
            }
        }
    }
}
