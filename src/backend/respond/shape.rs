//! What each response of one request says: the engine's events for the request → the
//! `ResponseData` of its responses (one delta per response when streaming, one full answer
//! otherwise). Pure (no Triton, no sending: `Active` sends what this returns), so the accounting
//! clients rely on is tested here: streamed `num_output_tokens` add up to the total (Triton's
//! OpenAI frontend sums them), a token whose text is still held back (part of a UTF-8
//! character, a possible stop string) is reported with the next response that carries text,
//! and logprobs travel with their tokens.

use serde_json::{Map, Value, json};

use super::outputs::ResponseData;
use crate::backend::parse::{Interface, OutputSelection, ParsedRequest};
use crate::request::{FinishReason, TokenLogprobs};
use crate::tokenizer::Tokenizer;

/// The state of one request's answer.
pub struct Shaper {
    interface: Interface,
    stream: bool,
    exclude_input: bool,
    outputs: OutputSelection,
    /// The prompt as sent (prepended to a full text answer unless excluded).
    prompt_text: Option<String>,
    prompt_ids: Vec<u32>,
    /// The generated text so far (a full answer's; a stream sends its deltas instead).
    text: String,
    output_ids: Vec<u32>,
    /// One per generated token when the request asked for logprobs, else empty.
    logprobs: Vec<TokenLogprobs>,
    /// Tokens already covered by a sent response (streaming).
    num_reported: usize,
}

impl Shaper {
    /// The answer of `parsed`, whose prompt the engine tokenized to `prompt_ids`.
    pub fn new(parsed: &ParsedRequest, prompt_ids: Vec<u32>) -> Self {
        Shaper {
            interface: parsed.interface,
            stream: parsed.stream,
            exclude_input: parsed.exclude_input_in_output,
            outputs: parsed.outputs,
            prompt_text: parsed.prompt_text.clone(),
            prompt_ids,
            text: String::new(),
            output_ids: Vec::new(),
            logprobs: Vec::new(),
            num_reported: 0,
        }
    }

    /// The prompt's ids as the engine runs them (its `Started` event).
    pub fn set_prompt_ids(&mut self, prompt_ids: Vec<u32>) {
        self.prompt_ids = prompt_ids;
    }

    /// Applies one generated token (`text`: the UTF-8 safe delta it completes; `finish`: set on
    /// the request's last token). Returns the response to send, if any, and whether it is the
    /// final one (exactly when `finish` is set). `tokenizer` names the tokens of the `logprobs`
    /// JSON (parsing made sure there is one when it is asked for).
    pub fn on_token(
        &mut self,
        token_id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
        finish: Option<FinishReason>,
        tokenizer: Option<&Tokenizer>,
    ) -> Option<(ResponseData, bool)> {
        self.output_ids.push(token_id);
        if let Some(lp) = logprobs {
            self.logprobs.push(lp);
        }
        if !self.stream {
            self.text.push_str(&text);
            return finish.map(|reason| (self.full(reason, tokenizer), true));
        }
        // A text delta that is still empty waits (its token is reported with the next one),
        // except the first token's: the first response always goes out at the first token, so
        // it marks the time to first token (Triton's first-response latency, clients' TTFT).
        if finish.is_none()
            && self.interface == Interface::Text
            && text.is_empty()
            && self.output_ids.len() > 1
        {
            return None;
        }
        Some((self.delta(text, finish, tokenizer), finish.is_some()))
    }

    /// The request ended without a new token (`text`: what the detokenizer still held): the
    /// final response. The engine ends a request this way only when aborting it, which the
    /// responder answers with an error instead; this keeps any other reason answered.
    pub fn on_finished(
        &mut self,
        text: String,
        reason: FinishReason,
        tokenizer: Option<&Tokenizer>,
    ) -> ResponseData {
        if self.stream {
            self.delta(text, Some(reason), tokenizer)
        } else {
            self.text.push_str(&text);
            self.full(reason, tokenizer)
        }
    }

    /// A streamed response: `text` and the tokens not yet reported.
    fn delta(
        &mut self,
        text: String,
        finish: Option<FinishReason>,
        tokenizer: Option<&Tokenizer>,
    ) -> ResponseData {
        let (from, to) = (self.num_reported, self.output_ids.len());
        self.num_reported = to;
        let mut d = self.common(from, to, finish, tokenizer);
        match self.interface {
            Interface::Text => d.text = Some(text),
            Interface::Tokens => d.token_ids = Some(self.output_ids[from..to].to_vec()),
        }
        d
    }

    /// The whole answer (not streaming).
    fn full(&mut self, reason: FinishReason, tokenizer: Option<&Tokenizer>) -> ResponseData {
        let mut d = self.common(0, self.output_ids.len(), Some(reason), tokenizer);
        match self.interface {
            Interface::Text => {
                let text = std::mem::take(&mut self.text);
                d.text = Some(match (&self.prompt_text, self.exclude_input) {
                    (Some(p), false) => format!("{p}{text}"),
                    _ => text,
                });
            }
            Interface::Tokens => {
                let mut ids = if self.exclude_input {
                    vec![]
                } else {
                    self.prompt_ids.clone()
                };
                ids.extend_from_slice(&self.output_ids);
                d.token_ids = Some(ids);
            }
        }
        d
    }

    /// Everything but the text or ids of a response covering the generated tokens
    /// `from..to`.
    fn common(
        &self,
        from: usize,
        to: usize,
        finish: Option<FinishReason>,
        tokenizer: Option<&Tokenizer>,
    ) -> ResponseData {
        let o = self.outputs;
        // Logprobs of the tokens `from..to` (every token has them when any output needs them).
        let lps = self.logprobs.get(from..to).unwrap_or(&[]);
        let ids = &self.output_ids[from..to];
        ResponseData {
            logprobs: o
                .log_probs
                .then(|| lps.iter().map(|lp| lp.logprob).collect()),
            logprobs_json: o.logprobs_json.then(|| logprobs_json(ids, lps, tokenizer)),
            cumulative_logprob: o.cumulative_logprob.then(|| {
                let upto = self.logprobs.get(..to).unwrap_or(&[]);
                upto.iter().map(|lp| f64::from(lp.logprob)).sum::<f64>() as f32
            }),
            finish: finish.filter(|_| o.finish_reason),
            num_input_tokens: o.num_input_tokens.then_some(self.prompt_ids.len()),
            num_output_tokens: o.num_output_tokens.then_some(to - from),
            ..Default::default()
        }
    }
}

/// The vLLM backend's `logprobs` output for the tokens `ids` (with their logprobs `lps`): a JSON
/// list with one object per token, mapping token ids (as strings) to
/// `{"logprob", "rank", "decoded_token"}` for the sampled token and the top alternatives the
/// request asked for (`logprobs` in `sampling_parameters`). The top ones are ranked 1, 2, ...;
/// the sampled token has its rank among them, or, when it is not among them, one more than the
/// number of alternatives more likely than it (its true rank when the list holds every token
/// more likely than it, else a lower bound: the sampler reports the top list, not full ranks).
/// `decoded_token` is the token decoded alone.
pub fn logprobs_json(ids: &[u32], lps: &[TokenLogprobs], tokenizer: Option<&Tokenizer>) -> String {
    let decode = |id: u32| {
        tokenizer
            .and_then(|t| t.decode(&[id], false).ok())
            .unwrap_or_default()
    };
    let entry = |id: u32, logprob: f32, rank: usize| json!({ "logprob": logprob, "rank": rank, "decoded_token": decode(id) });
    let list: Vec<Value> = ids
        .iter()
        .zip(lps)
        .map(|(&id, lp)| {
            let mut obj = Map::new();
            for (idx, &(top_id, top_lp)) in lp.top.iter().enumerate() {
                obj.insert(top_id.to_string(), entry(top_id, top_lp, idx + 1));
            }
            if !obj.contains_key(&id.to_string()) {
                let rank = 1 + lp.top.iter().filter(|(_, l)| *l > lp.logprob).count();
                obj.insert(id.to_string(), entry(id, lp.logprob, rank));
            }
            Value::Object(obj)
        })
        .collect();
    Value::Array(list).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::request::GenerateRequest;

    fn tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tokenizer/hf_tiny");
        Tokenizer::from_hf_dir(&dir).unwrap().unwrap()
    }

    fn shaper(interface: Interface, stream: bool, outputs: OutputSelection) -> Shaper {
        Shaper {
            interface,
            stream,
            exclude_input: false,
            outputs,
            prompt_text: Some("P".into()),
            prompt_ids: vec![1, 2, 3],
            text: String::new(),
            output_ids: vec![],
            logprobs: vec![],
            num_reported: 0,
        }
    }

    fn lp(logprob: f32, top: &[(u32, f32)]) -> Option<TokenLogprobs> {
        Some(TokenLogprobs {
            logprob,
            top: top.to_vec(),
        })
    }

    #[test]
    fn a_stream_reports_held_back_tokens_with_the_next_text_and_counts_add_up() {
        let all = OutputSelection {
            log_probs: true,
            cumulative_logprob: true,
            ..Default::default()
        };
        let mut s = shaper(Interface::Text, true, all);
        // The first token always gets a response, even with its text held back (it marks the
        // time to first token).
        let (d, fin) = s.on_token(9, "".into(), lp(-2.0, &[]), None, None).unwrap();
        assert!(!fin);
        assert_eq!(
            (d.text.as_deref(), d.num_output_tokens),
            (Some(""), Some(1))
        );
        // Token 10 completes no text yet (half a character): nothing is sent.
        assert!(
            s.on_token(10, "".into(), lp(-1.0, &[]), None, None)
                .is_none()
        );
        let (d, fin) = s
            .on_token(11, "é".into(), lp(-0.5, &[]), None, None)
            .unwrap();
        assert!(!fin);
        assert_eq!(d.text.as_deref(), Some("é"));
        assert_eq!(d.num_output_tokens, Some(2));
        assert_eq!(d.num_input_tokens, Some(3));
        assert_eq!(d.logprobs, Some(vec![-1.0, -0.5]));
        assert_eq!(d.cumulative_logprob, Some(-3.5));
        assert_eq!(d.finish, None);
        let (d, fin) = s
            .on_token(
                12,
                "".into(),
                lp(-0.25, &[]),
                Some(FinishReason::Length),
                None,
            )
            .unwrap();
        assert!(fin);
        assert_eq!(
            (d.text.as_deref(), d.num_output_tokens, d.finish),
            (Some(""), Some(1), Some(FinishReason::Length))
        );
        assert_eq!(d.logprobs, Some(vec![-0.25]));
        assert_eq!(d.cumulative_logprob, Some(-3.75));
    }

    #[test]
    fn a_token_stream_sends_every_token() {
        let mut s = shaper(Interface::Tokens, true, OutputSelection::default());
        let (d, _) = s.on_token(7, "".into(), None, None, None).unwrap();
        assert_eq!((d.token_ids, d.num_output_tokens), (Some(vec![7]), Some(1)));
        assert_eq!(d.logprobs, None);
        // Ended without a token: the final response covers no new token.
        let d = s.on_finished("".into(), FinishReason::Stop, None);
        assert_eq!((d.token_ids, d.num_output_tokens), (Some(vec![]), Some(0)));
        assert_eq!(d.finish, Some(FinishReason::Stop));
        let mut s = shaper(Interface::Text, false, OutputSelection::default());
        s.on_token(5, "a".into(), None, None, None);
        let d = s.on_finished("b".into(), FinishReason::Stop, None);
        assert_eq!(
            (d.text.as_deref(), d.num_output_tokens),
            (Some("Pab"), Some(1))
        );
    }

    #[test]
    fn a_full_answer_has_the_prompt_unless_excluded_and_the_total_count() {
        let mut s = shaper(Interface::Text, false, OutputSelection::default());
        assert!(s.on_token(5, "a".into(), None, None, None).is_none());
        let (d, fin) = s
            .on_token(6, "b".into(), None, Some(FinishReason::Stop), None)
            .unwrap();
        assert!(fin);
        assert_eq!(d.text.as_deref(), Some("Pab"));
        assert_eq!(d.num_output_tokens, Some(2));
        assert_eq!(d.finish, Some(FinishReason::Stop));
        let mut s = shaper(Interface::Tokens, false, OutputSelection::default());
        s.exclude_input = true;
        let (d, _) = s
            .on_token(5, "".into(), None, Some(FinishReason::Length), None)
            .unwrap();
        assert_eq!(d.token_ids, Some(vec![5]));
    }

    #[test]
    fn outputs_turned_off_are_left_out() {
        let none = OutputSelection {
            finish_reason: false,
            num_input_tokens: false,
            num_output_tokens: false,
            ..Default::default()
        };
        let mut s = shaper(Interface::Text, false, none);
        let (d, _) = s
            .on_token(5, "a".into(), None, Some(FinishReason::Stop), None)
            .unwrap();
        assert_eq!(
            (d.finish, d.num_input_tokens, d.num_output_tokens),
            (None, None, None)
        );
    }

    #[test]
    fn logprobs_json_has_the_shape_the_openai_frontend_parses() {
        let tok = tokenizer();
        let a = tok.encode("a", false).unwrap()[0];
        let b = tok.encode("b", false).unwrap()[0];
        // Token 1: `a` sampled, the most likely. Token 2: `b` sampled, not in the top 1.
        let lps = [
            TokenLogprobs {
                logprob: -0.1,
                top: vec![(a, -0.1)],
            },
            TokenLogprobs {
                logprob: -2.0,
                top: vec![(a, -0.2)],
            },
        ];
        let v: Value = serde_json::from_str(&logprobs_json(&[a, b], &lps, Some(&tok))).unwrap();
        let list = v.as_array().unwrap();
        assert_eq!(list.len(), 2);
        let first = list[0].as_object().unwrap();
        assert_eq!(first.len(), 1);
        let e = &first[&a.to_string()];
        assert_eq!(e["rank"], 1);
        assert_eq!(e["decoded_token"], "a");
        assert!((e["logprob"].as_f64().unwrap() + 0.1).abs() < 1e-6);
        let second = list[1].as_object().unwrap();
        assert_eq!(second.len(), 2);
        assert_eq!(second[&b.to_string()]["rank"], 2);
        assert_eq!(second[&b.to_string()]["decoded_token"], "b");
        assert_eq!(second[&a.to_string()]["rank"], 1);
        // No token: an empty list (a response whose tokens all came earlier).
        assert_eq!(logprobs_json(&[], &[], Some(&tok)), "[]");
    }

    #[test]
    fn shaper_takes_the_parsed_request() {
        // `new` copies what the parse decided (checked through a response).
        let model = crate::request::ModelInfo {
            vocab_size: 400,
            max_model_len: 64,
            eos_token_ids: vec![],
            tokenizer: None,
            bans_words: true,
        };
        let spec = crate::request::RequestSpec {
            prompt: crate::request::Prompt::TokenIds(vec![1, 2]),
            sampling: Default::default(),
            stop: crate::request::StopCriteria {
                max_tokens: 4,
                ..Default::default()
            },
            detokenize: false,
            queue: Default::default(),
        };
        let parsed = ParsedRequest {
            generate: GenerateRequest::new(spec, &model).unwrap(),
            interface: Interface::Tokens,
            stream: false,
            exclude_input_in_output: false,
            outputs: OutputSelection::default(),
            prompt_text: None,
        };
        let mut s = Shaper::new(&parsed, vec![]);
        s.set_prompt_ids(vec![1, 2]);
        let (d, _) = s
            .on_token(9, "".into(), None, Some(FinishReason::Length), None)
            .unwrap();
        assert_eq!(d.token_ids, Some(vec![1, 2, 9]));
        assert_eq!(d.num_input_tokens, Some(2));
    }
}
