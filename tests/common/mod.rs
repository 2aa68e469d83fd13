//! Shared helpers for integration tests: fixture locations and the real-model path.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use triton_ferrum::engine::{
    Engine, EngineHandle, EngineOptions, RequestStream, is_final, options,
};
use triton_ferrum::ops::linear::WeightFormat;
use triton_ferrum::request::{
    GenerateRequest, Prompt, RequestError, RequestSpec, SamplingParams, SeqId, StopCriteria,
    TokenEvent, TokenLogprobs,
};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/fixtures`, or `$FERRUM_FIXTURES` (the GPU runs, whose test executables run outside the
/// repository).
pub fn fixtures() -> PathBuf {
    std::env::var_os("FERRUM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("tests/fixtures"))
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF: `$FERRUM_SMOLLM2_GGUF`, else `models/` in the repo.
/// Fails (never skips) when missing: run `ci/fetch_models.sh`.
pub fn smollm2_gguf() -> PathBuf {
    let p = std::env::var_os("FERRUM_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        p.is_file(),
        "{} not found: run ci/fetch_models.sh (or set FERRUM_SMOLLM2_GGUF)",
        p.display()
    );
    p
}

pub struct TestEngine {
    pub engine: Engine,
}

impl TestEngine {
    pub fn start(
        model: &Path,
        format: Option<WeightFormat>,
        tweak: impl FnOnce(&mut EngineOptions),
    ) -> Self {
        let mut opts = EngineOptions::new(model);
        opts.weight_format = format;
        tweak(&mut opts);
        TestEngine {
            engine: options::start(&opts).unwrap().engine,
        }
    }

    pub fn handle(&self) -> EngineHandle {
        self.engine.handle()
    }
}

/// Output of one request, collected from its event stream.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    pub prompt_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub text: String,
    pub logprobs: Vec<TokenLogprobs>,
    pub finish: Option<String>,
    pub num_final_events: usize,
}

pub fn greedy(prompt: Vec<u32>, max_tokens: usize, logprobs: Option<usize>) -> RequestSpec {
    RequestSpec {
        prompt: Prompt::TokenIds(prompt),
        sampling: SamplingParams {
            logprobs,
            ..SamplingParams::default()
        },
        stop: StopCriteria {
            max_tokens,
            ignore_eos: true,
            ..StopCriteria::default()
        },
        detokenize: false,
        queue: Default::default(),
    }
}

/// Validates `spec` against `handle`'s model (`GenerateRequest::new`) and submits it.
pub fn submit(handle: &EngineHandle, spec: RequestSpec) -> Result<RequestStream, RequestError> {
    handle.submit(GenerateRequest::new(spec, handle.info())?)
}

/// Like `submit`, with the events on a shared channel (`EngineHandle::submit_to`).
pub fn submit_to(
    handle: &EngineHandle,
    spec: RequestSpec,
    events: crossbeam_channel::Sender<(SeqId, TokenEvent)>,
) -> Result<(SeqId, Vec<u32>), RequestError> {
    handle.submit_to(GenerateRequest::new(spec, handle.info())?, events)
}

pub fn collect(handle: &EngineHandle, req: RequestSpec) -> Collected {
    collect_stream(submit(handle, req).unwrap())
}

/// Reads a submitted request's events to the end.
pub fn collect_stream(mut stream: RequestStream) -> Collected {
    let mut c = Collected {
        prompt_ids: stream.prompt_ids.clone(),
        ..Collected::default()
    };
    while let Some(ev) = stream.recv() {
        if is_final(&ev) {
            c.num_final_events += 1;
        }
        match ev {
            TokenEvent::Started { .. } => {}
            TokenEvent::Token {
                token_id,
                text,
                logprobs,
                finish,
            } => {
                c.output_ids.push(token_id);
                c.text.push_str(&text);
                c.logprobs.extend(logprobs);
                if let Some(f) = finish {
                    c.finish = Some(f.as_str().to_string());
                }
            }
            TokenEvent::Finished { text, reason } => {
                c.text.push_str(&text);
                c.finish = Some(reason.as_str().to_string());
            }
            TokenEvent::Error(e) | TokenEvent::Unavailable(e) => panic!("request failed: {e}"),
        }
    }
    c
}

/// The comparison rule against a reference: greedy tokens identical; where float noise makes them
/// diverge, each side's token must be in the other's top-5 at that step, and comparison stops.
/// Logprobs of the matched prefix must agree within `tol`. Returns the number of matched tokens.
pub fn compare_greedy(
    what: &str,
    ours: &[u32],
    our_top: &[TokenLogprobs],
    want: &[u32],
    want_top: &[Vec<(u32, f32)>],
    tol: f32,
) -> usize {
    assert_eq!(
        ours.len(),
        want.len(),
        "{what}: length {} vs reference {}",
        ours.len(),
        want.len()
    );
    for step in 0..want.len() {
        let ref_top = &want_top[step];
        let our = &our_top[step];
        if ours[step] != want[step] {
            let in_ref = ref_top.iter().any(|&(id, _)| id == ours[step]);
            let in_ours = our.top.iter().any(|&(id, _)| id == want[step]);
            assert!(
                in_ref && in_ours,
                "{what}: step {step}: token {} vs reference {} and not in each other's top-5 (ours {:?}, ref {:?})",
                ours[step],
                want[step],
                our.top,
                ref_top
            );
            return step;
        }
        // Compare logprobs of tokens present in both top lists.
        for &(id, lp) in ref_top {
            if let Some(&(_, our_lp)) = our.top.iter().find(|(i, _)| *i == id) {
                assert!(
                    (lp - our_lp).abs() <= tol,
                    "{what}: step {step}: logprob of {id}: {our_lp} vs reference {lp} (tol {tol})"
                );
            }
        }
    }
    want.len()
}

/// The Hugging Face fixture rule's logprob tolerance (`compare_greedy`): both sides compute in
/// f32 from identical weights; differences come from summation order only.
pub const HF_LOGPROB_TOL: f32 = 2e-3;
/// The Hugging Face fixture rule's tolerance on a golden's `last_logits`.
pub const HF_LOGIT_TOL: f32 = 2e-3;

/// Greedy tokens and top-5 logprobs of the checkpoint at `path` (CPU engine, weights in
/// `format`) against golden `name`, case by case, by `compare_greedy` with `tol`.
pub fn check_golden_greedy(path: &Path, name: &str, format: WeightFormat, tol: f32) {
    let g = golden(name);
    let engine = TestEngine::start(path, Some(format), |_| {});
    let handle = engine.handle();
    for (i, case) in g["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        let got = collect(&handle, greedy(prompt, want.len(), Some(5)));
        assert_eq!(got.num_final_events, 1);
        let matched = compare_greedy(
            &format!("{name} case {i}"),
            &got.output_ids,
            &got.logprobs,
            &want,
            &top5(&case["top5"]),
            tol,
        );
        eprintln!(
            "{name} ({}) case {i}: {matched}/{} greedy tokens equal",
            path.display(),
            want.len()
        );
    }
}

/// Asserts that `logits` (one prompt's last-position logits) are within `HF_LOGIT_TOL` of a
/// golden case's `last_logits`; returns the largest difference.
pub fn check_golden_logits(what: &str, logits: &[f32], case: &serde_json::Value) -> f32 {
    let want: Vec<f32> = case["last_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(logits.len(), want.len(), "{what}");
    let max_diff = logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff <= HF_LOGIT_TOL,
        "{what}: max |logit diff| {max_diff} > {HF_LOGIT_TOL}"
    );
    max_diff
}

/// A golden file of scripts/make_fixtures.py: `tests/fixtures/golden/<name>.json`.
pub fn golden(name: &str) -> serde_json::Value {
    let p = fixtures().join(format!("golden/{name}.json"));
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A golden `top5` field: per step, `[token_id, logprob]` pairs.
pub fn top5(v: &serde_json::Value) -> Vec<Vec<(u32, f32)>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|step| {
            step.as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
                .collect()
        })
        .collect()
}

/// Twelve greedy text requests of 20 tokens (`request(i)`), ended three ways: every third by a
/// stop string (two characters from the first third of its free-running text), every third by
/// a stop id (its 8th free-running token), the rest by max_tokens. The free-running outputs come
/// from `handle`, one request at a time.
pub fn requests_with_stops(
    handle: &EngineHandle,
    request: impl Fn(usize) -> RequestSpec,
) -> Vec<RequestSpec> {
    (0..12)
        .map(|i| {
            let free = collect(handle, request(i));
            let mut r = request(i);
            match i % 3 {
                0 => {
                    let chars: Vec<char> = free.text.chars().collect();
                    let at = chars.len() / 3;
                    r.stop.stop_strings = vec![chars[at..at + 2].iter().collect()];
                }
                1 => r.stop.stop_token_ids = vec![free.output_ids[7]],
                _ => {}
            }
            r
        })
        .collect()
}
