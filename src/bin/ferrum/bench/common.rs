//! What both bench workloads share: the request and model types, the engine options and weights
//! label of a bench, pseudo-random prompt ids, and `submit_and_time`, the one place that submits
//! bench requests and timestamps their tokens (see `bench`'s module doc for the rule it serves).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use triton_ferrum::engine::options::LoadedEngine;
use triton_ferrum::engine::{EngineHandle, is_final, options};
use triton_ferrum::model::Checkpoint;
use triton_ferrum::request::{
    GenerateRequest, Prompt, RequestSpec, SamplingParams, StopCriteria, TokenEvent,
};

use crate::EngineArgs;

/// One bench request: prompt token ids and the exact number of tokens to generate
/// (`ignore_eos`, greedy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
}

/// A checkpoint opened for a bench, and how to name it in the output.
pub struct BenchModel {
    pub ckpt: Checkpoint,
    pub source: String,
}

/// Engine options of a bench: the user's engine flags on the bench's model path.
pub fn engine_options(engine: &EngineArgs) -> options::EngineOptions {
    engine.options(
        engine
            .model
            .clone()
            .unwrap_or_else(|| PathBuf::from("<random>")),
    )
}

/// How the loaded weights are stored: the dtype on the GPU, the host format on the CPU.
pub fn weights_label(loaded: &LoadedEngine) -> String {
    match loaded.device.starts_with("cuda") {
        true => options::dtype_name(loaded.dtype).to_owned(),
        false => format!("{:?}", loaded.weight_format).to_lowercase(),
    }
}

/// Deterministic pseudo-random prompt ids in `0..vocab`, different per `request_idx`.
pub fn pseudo_random_ids(seed: u64, request_idx: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| {
            let x = (seed + request_idx as u64 * 1_000_003 + i as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((x >> 33) % vocab.max(1) as u64) as u32
        })
        .collect()
}

/// Submits every request at once (greedy, `ignore_eos`) and returns the arrival time of each of
/// its output tokens, in request order. All events come back on one shared channel read by this
/// thread. Fails, aborting what is still running, when a request is refused, errors, or ends
/// with other than `max_tokens` tokens.
pub fn submit_and_time(
    handle: &EngineHandle,
    requests: &[BenchRequest],
) -> Result<Vec<Vec<Instant>>, Box<dyn std::error::Error>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut idx_of = HashMap::with_capacity(requests.len());
    let abort_all = |idx_of: &HashMap<_, usize>| {
        for &seq_id in idx_of.keys() {
            handle.abort(seq_id);
        }
    };
    for (idx, r) in requests.iter().enumerate() {
        let spec = RequestSpec {
            prompt: Prompt::TokenIds(r.prompt_ids.clone()),
            sampling: SamplingParams::default(),
            stop: StopCriteria {
                max_tokens: r.max_tokens,
                ignore_eos: true,
                ..StopCriteria::default()
            },
            detokenize: false,
            queue: Default::default(),
        };
        let submitted = GenerateRequest::new(spec, handle.info())
            .and_then(|req| handle.submit_to(req, tx.clone()));
        match submitted {
            Ok((seq_id, _)) => {
                idx_of.insert(seq_id, idx);
            }
            Err(e) => {
                abort_all(&idx_of);
                return Err(format!("bench request {idx}: {e}").into());
            }
        }
    }
    // Only the engine holds senders now: `recv` fails if it stops before every request ended.
    drop(tx);
    let mut times: Vec<Vec<Instant>> = requests
        .iter()
        .map(|r| Vec::with_capacity(r.max_tokens))
        .collect();
    let mut num_open = requests.len();
    while num_open > 0 {
        let (seq_id, ev) = rx
            .recv()
            .map_err(|_| "the engine stopped before every bench request finished")?;
        let Some(&idx) = idx_of.get(&seq_id) else {
            continue;
        };
        let last = is_final(&ev);
        match ev {
            TokenEvent::Token { .. } => times[idx].push(Instant::now()),
            TokenEvent::Error(e) | TokenEvent::Unavailable(e) => {
                abort_all(&idx_of);
                return Err(format!("bench request {idx}: {e}").into());
            }
            TokenEvent::Started { .. } | TokenEvent::Finished { .. } => {}
        }
        if last {
            num_open -= 1;
        }
    }
    for (idx, (t, r)) in times.iter().zip(requests).enumerate() {
        if t.len() != r.max_tokens {
            return Err(format!(
                "bench request {idx} produced {} tokens, expected {}",
                t.len(),
                r.max_tokens
            )
            .into());
        }
    }
    Ok(times)
}
