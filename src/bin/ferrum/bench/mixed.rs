//! `ferrum bench --workload mixed`: in-flight vs static batching on one deterministic
//! mixed-length workload, on one loaded engine, at equal KV cache capacity.
//!
//! Owns the workload generator (seeded prompt and output lengths, pseudo-random prompt ids) and
//! the two submission strategies; tokens are timestamped by `common::submit_and_time`.
//!
//! ```text
//! every request arrives at t0, in the same order for both modes; batch size B = max_num_seqs
//! in-flight: submit all N    ──▶ the scheduler admits a waiting request as soon as one ends
//! static:    submit r0..rB, wait until all B ended, submit rB..r2B, ...
//!            (a group runs until its longest request ends: FasterTransformer-era batching)
//! ```
//!
//! Both modes run on the same engine (same max_num_batched_tokens and KV blocks); only the
//! submission pattern differs. The KV cache holds B sequences of the longest possible length:
//! what static batching must reserve per slot. `--inflight-max-num-seqs M` (default B) lets the
//! in-flight mode run up to M sequences at once in that same memory, as a paged cache allows
//! (the engine's max_num_seqs is M; static mode never has more than B in flight, by its
//! groups). Each run reports the most requests that were in flight at once (`max_concurrent`,
//! from the token timestamps). One unmeasured in-flight pass of the whole workload comes first
//! (kernel compiles, GEMM plans and graph captures are one-time costs that would otherwise land
//! on the first measured mode), then rounds alternate the order (static first in even rounds,
//! in-flight first in odd ones) so drift affects both alike. TTFT and latency count
//! from t0, so a static request's wait for its group is part of them. This module must never
//! change engine settings between the modes, nor judge the speed it measures.

use std::ops::{Range, RangeInclusive};
use std::time::Instant;

use clap::Args;
use serde_json::{Value, json};
use triton_ferrum::engine::EngineHandle;
use triton_ferrum::engine::options;

use super::common::{self, BenchModel, BenchRequest};
use crate::{CliResult, EngineArgs};

/// Batch size B when `--batch-size` is not given.
pub const DEFAULT_BATCH_SIZE: usize = 64;

/// Flags of `--workload mixed`. Lengths are drawn uniformly from the inclusive ranges.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Mixed workload (--workload mixed)")]
pub struct MixedArgs {
    /// Number of requests N of the mixed workload.
    #[arg(long, default_value_t = 256)]
    num_requests: usize,
    /// Shortest prompt of the mixed workload, in tokens.
    #[arg(long, default_value_t = 32)]
    min_prompt_len: usize,
    /// Longest prompt of the mixed workload, in tokens.
    #[arg(long, default_value_t = 1024)]
    max_prompt_len: usize,
    /// Fewest output tokens of a mixed-workload request.
    #[arg(long, default_value_t = 16)]
    min_gen_len: usize,
    /// Most output tokens of a mixed-workload request.
    #[arg(long, default_value_t = 512)]
    max_gen_len: usize,
    /// Seed of the mixed workload's lengths and prompt ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rounds of (static, in-flight), alternating which runs first.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Most sequences the in-flight mode may run at once (the engine's max_num_seqs), >= the
    /// batch size B; the KV cache stays sized for B sequences of the longest length. Default B.
    #[arg(long)]
    inflight_max_num_seqs: Option<usize>,
}

/// What the mixed workload looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadConfig {
    pub num_requests: usize,
    /// Prompt length in tokens, drawn uniformly.
    pub prompt_len: RangeInclusive<usize>,
    /// Output length in tokens, drawn uniformly.
    pub gen_len: RangeInclusive<usize>,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("mixed workload: num_requests = 0 (at least one request is required)")]
    NoRequests,
    #[error(
        "mixed workload: {field} range {min}..={max} is empty or starts at 0 (need 1 <= min <= max)"
    )]
    BadRange {
        field: &'static str,
        min: usize,
        max: usize,
    },
    #[error(
        "mixed workload: max prompt + max output = {need} tokens exceeds max_model_len = {max_model_len} \
         (lower --max-prompt-len/--max-gen-len or use a model with a longer context)"
    )]
    TooLong { need: usize, max_model_len: usize },
}

impl WorkloadConfig {
    fn from_args(a: &MixedArgs) -> Self {
        WorkloadConfig {
            num_requests: a.num_requests,
            prompt_len: a.min_prompt_len..=a.max_prompt_len,
            gen_len: a.min_gen_len..=a.max_gen_len,
            seed: a.seed,
        }
    }

    /// The longest prompt + output a request of this workload can have.
    pub fn max_seq_len(&self) -> usize {
        self.prompt_len.end().saturating_add(*self.gen_len.end())
    }

    pub fn validate(&self, max_model_len: usize) -> Result<(), WorkloadError> {
        if self.num_requests == 0 {
            return Err(WorkloadError::NoRequests);
        }
        for (field, r) in [
            ("prompt length", &self.prompt_len),
            ("output length", &self.gen_len),
        ] {
            if *r.start() == 0 || r.start() > r.end() {
                return Err(WorkloadError::BadRange {
                    field,
                    min: *r.start(),
                    max: *r.end(),
                });
            }
        }
        if self.max_seq_len() > max_model_len {
            return Err(WorkloadError::TooLong {
                need: self.max_seq_len(),
                max_model_len,
            });
        }
        Ok(())
    }
}

/// SplitMix64: a tiny seeded PRNG, enough to draw lengths reproducibly.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `r` (modulo bias below 2^-50 for the ranges used here).
    fn in_range(&mut self, r: &RangeInclusive<usize>) -> usize {
        let width = (r.end() - r.start()) as u64 + 1;
        r.start() + (self.next_u64() % width) as usize
    }
}

/// The N requests of the workload, in submission order; the same config gives the same requests.
pub fn generate_workload(
    cfg: &WorkloadConfig,
    vocab: usize,
    max_model_len: usize,
) -> Result<Vec<BenchRequest>, WorkloadError> {
    cfg.validate(max_model_len)?;
    let mut rng = SplitMix64(cfg.seed);
    Ok((0..cfg.num_requests)
        .map(|request_idx| {
            let prompt_len = rng.in_range(&cfg.prompt_len);
            let max_tokens = rng.in_range(&cfg.gen_len);
            BenchRequest {
                prompt_ids: common::pseudo_random_ids(cfg.seed, request_idx, prompt_len, vocab),
                max_tokens,
            }
        })
        .collect())
}

/// How requests are fed to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// All at once; the engine admits waiting requests as running ones finish.
    InFlight,
    /// Groups of `batch_size`, the next group only after every request of the previous ended.
    Static,
}

impl Batching {
    fn name(self) -> &'static str {
        match self {
            Batching::InFlight => "inflight",
            Batching::Static => "static",
        }
    }
}

/// Token arrival times of one run: `times[request_idx][token_idx]`, all requests arriving at
/// `t0`; `groups` are the request index ranges submitted together, in order.
struct Timeline {
    t0: Instant,
    end: Instant,
    times: Vec<Vec<Instant>>,
    groups: Vec<Range<usize>>,
}

/// Runs the workload once with `batching` and returns when every request has ended.
fn run_mode(
    handle: &EngineHandle,
    requests: &[BenchRequest],
    batching: Batching,
    batch_size: usize,
) -> Result<Timeline, Box<dyn std::error::Error>> {
    let groups: Vec<Range<usize>> = match batching {
        Batching::InFlight => std::iter::once(0..requests.len()).collect(),
        Batching::Static => (0..requests.len())
            .step_by(batch_size.max(1))
            .map(|start| start..(start + batch_size).min(requests.len()))
            .collect(),
    };
    let t0 = Instant::now();
    let mut times = Vec::with_capacity(requests.len());
    for g in &groups {
        times.extend(common::submit_and_time(handle, &requests[g.clone()])?);
    }
    Ok(Timeline {
        t0,
        end: Instant::now(),
        times,
        groups,
    })
}

/// What one run of one mode measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ModeStats {
    pub num_output_tokens: usize,
    pub total_s: f64,
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_ms: Summary,
    pub latency_ms: Summary,
    pub num_groups: usize,
    /// Every group's first token came after the previous group's last token.
    pub groups_disjoint: bool,
    /// Most requests between their first and last token at the same instant.
    pub max_concurrent: usize,
}

/// Mean and nearest-rank percentiles of a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
}

impl Summary {
    fn of(mut xs: Vec<f64>) -> Summary {
        xs.sort_by(f64::total_cmp);
        let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        Summary {
            mean,
            p50: percentile(&xs, 50.0),
            p99: percentile(&xs, 99.0),
        }
    }
}

/// Nearest-rank percentile of ascending `sorted` (0.0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len().max(1)) - 1)
        .copied()
        .unwrap_or(0.0)
}

/// Most requests in flight at once: requests are in flight from their first to their last
/// token (inclusive); requests without tokens never are.
pub fn max_concurrent(times: &[Vec<Instant>]) -> usize {
    // (instant, +1 at a first token / -1 after a last token); starts sort before ends at the
    // same instant, so touching intervals count as overlapping.
    let mut events: Vec<(Instant, i32)> = times
        .iter()
        .filter_map(|t| Some([(*t.first()?, 0), (*t.last()?, 1)]))
        .flatten()
        .collect();
    events.sort();
    let (mut now, mut most) = (0i64, 0i64);
    for (_, kind) in events {
        now += if kind == 0 { 1 } else { -1 };
        most = most.max(now);
    }
    most as usize
}

fn stats(tl: &Timeline) -> ModeStats {
    let ms = |t: Instant| (t - tl.t0).as_secs_f64() * 1e3;
    let total_s = (tl.end - tl.t0).as_secs_f64().max(1e-9);
    let num_output_tokens = tl.times.iter().map(Vec::len).sum();
    let first_ms = tl.times.iter().filter_map(|t| t.first().map(|&x| ms(x)));
    let last_ms = tl.times.iter().filter_map(|t| t.last().map(|&x| ms(x)));
    let group_span = |g: &Range<usize>| {
        let first = tl.times[g.clone()].iter().filter_map(|t| t.first()).min();
        let last = tl.times[g.clone()].iter().filter_map(|t| t.last()).max();
        (first.copied(), last.copied())
    };
    let groups_disjoint =
        tl.groups
            .windows(2)
            .all(|w| match (group_span(&w[0]).1, group_span(&w[1]).0) {
                (Some(prev_last), Some(next_first)) => next_first >= prev_last,
                _ => false,
            });
    ModeStats {
        max_concurrent: max_concurrent(&tl.times),
        num_output_tokens,
        total_s,
        output_tokens_per_s: num_output_tokens as f64 / total_s,
        requests_per_s: tl.times.len() as f64 / total_s,
        ttft_ms: Summary::of(first_ms.collect()),
        latency_ms: Summary::of(last_ms.collect()),
        num_groups: tl.groups.len(),
        groups_disjoint,
    }
}

/// KV cache capacity in tokens: the user's, else room for `batch_size` sequences of the longest
/// possible length, each rounded up to whole blocks. Returns the tokens and which bound chose them.
fn kv_capacity(
    user: Option<usize>,
    batch_size: usize,
    max_seq_len: usize,
    block_size: usize,
) -> (usize, &'static str) {
    match user {
        Some(t) => (t, "--max-tokens-in-paged-kv-cache"),
        None => (
            batch_size * max_seq_len.div_ceil(block_size) * block_size,
            "batch_size x (max prompt + max output), rounded up to blocks",
        ),
    }
}

pub fn run(
    model: BenchModel,
    engine: &EngineArgs,
    batch_size: usize,
    a: &MixedArgs,
    as_json: bool,
) -> CliResult {
    let BenchModel { ckpt, source } = model;
    if batch_size == 0 || a.rounds == 0 {
        return Err(format!(
            "--workload mixed needs --batch-size >= 1 and --rounds >= 1 (got {batch_size}, {})",
            a.rounds
        )
        .into());
    }
    let cfg = WorkloadConfig::from_args(a);
    // Refused before weights are loaded; the engine's max_model_len is checked again after.
    cfg.validate(ckpt.arch.spec.max_position_embeddings)?;
    let inflight_seqs = a.inflight_max_num_seqs.unwrap_or(batch_size);
    if inflight_seqs < batch_size {
        return Err(format!(
            "--inflight-max-num-seqs must be >= --batch-size {batch_size} (got {inflight_seqs})"
        )
        .into());
    }
    let mut opts = common::engine_options(engine);
    // Static mode keeps B in flight by its groups; the engine admits up to M in-flight ones.
    opts.batching.max_num_seqs = inflight_seqs;
    let need = cfg.max_seq_len();
    opts.max_model_len = Some(opts.max_model_len.unwrap_or(need).max(need));
    let (kv_tokens_asked, kv_bound) =
        kv_capacity(opts.kv.max_tokens, batch_size, need, opts.kv.block_size);
    opts.kv.max_tokens = Some(kv_tokens_asked);
    let t_load = Instant::now();
    let loaded = options::start_checkpoint(ckpt, &opts)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let handle = loaded.engine.handle();
    let requests = generate_workload(&cfg, loaded.spec.vocab_size, loaded.max_model_len)?;
    let kv_tokens = loaded.num_kv_blocks * loaded.block_size;
    let num_prompt_tokens: usize = requests.iter().map(|r| r.prompt_ids.len()).sum();
    let gen_lens: Vec<usize> = requests.iter().map(|r| r.max_tokens).collect();
    let prompt_lens: Vec<usize> = requests.iter().map(|r| r.prompt_ids.len()).collect();
    let common = json!({
        "workload": "mixed", "source": source, "arch": loaded.spec.arch, "device": loaded.device,
        "weight_format": common::weights_label(&loaded), "num_requests": requests.len(),
        "batch_size": batch_size, "inflight_max_num_seqs": inflight_seqs,
        "batch_scheduler_policy": opts.batching.policy.name(),
        "kv_cache_tokens": kv_tokens, "num_prompt_tokens": num_prompt_tokens,
    });

    // Warm-up: the whole workload once, in flight, unmeasured (first touch of weights and
    // thread pools; on the GPU, kernel compiles, GEMM plans per shape and decode graphs).
    let t_warm = Instant::now();
    run_mode(&handle, &requests, Batching::InFlight, batch_size)?;
    let warmup_s = t_warm.elapsed().as_secs_f64();
    if !as_json {
        println!(
            "ferrum bench --workload mixed: {source}, {} ({:.1} M params, weights {} {:.1} MiB), {}, load {load_s:.2} s",
            loaded.spec.arch,
            loaded.spec.num_params() as f64 / 1e6,
            common::weights_label(&loaded),
            loaded.weight_bytes as f64 / 1048576.0,
            loaded.device,
        );
        println!(
            "{} requests (seed {}), prompt {}..={} tokens ({num_prompt_tokens} in all), output {}..={} ({} in all), batch size {batch_size}",
            requests.len(),
            cfg.seed,
            cfg.prompt_len.start(),
            cfg.prompt_len.end(),
            cfg.gen_len.start(),
            cfg.gen_len.end(),
            gen_lens.iter().sum::<usize>(),
        );
        println!(
            "KV cache {kv_tokens} tokens in both modes ({kv_bound}; asked {kv_tokens_asked}); \
             in flight at most {batch_size} (static) and {inflight_seqs} (in-flight) sequences"
        );
        println!(
            "{:>5} {:>9} {:>7} {:>7} {:>9} {:>10} {:>8} {:>25} {:>25} {:>7}",
            "round",
            "mode",
            "groups",
            "max c.",
            "total s",
            "output t/s",
            "req/s",
            "TTFT ms mean/p50/p99",
            "latency ms mean/p50/p99",
            "preempt"
        );
    }
    // (tokens, seconds) summed over rounds, per mode.
    let mut totals = [(0usize, 0.0f64); 2];
    for round in 0..a.rounds {
        let order = match round % 2 {
            0 => [Batching::Static, Batching::InFlight],
            _ => [Batching::InFlight, Batching::Static],
        };
        for batching in order {
            let preempted_before = handle.stats().map_or(0, |s| s.num_preemptions);
            let tl = run_mode(&handle, &requests, batching, batch_size)?;
            let num_preemptions = handle
                .stats()
                .map_or(0, |s| s.num_preemptions.saturating_sub(preempted_before));
            let s = stats(&tl);
            let slot = &mut totals[(batching == Batching::InFlight) as usize];
            slot.0 += s.num_output_tokens;
            slot.1 += s.total_s;
            if as_json {
                let mut obj = common.clone();
                extend(
                    &mut obj,
                    json!({
                        "mode": batching.name(), "round": round, "num_groups": s.num_groups,
                        "groups_disjoint": s.groups_disjoint, "max_concurrent": s.max_concurrent,
                        "num_output_tokens": s.num_output_tokens,
                        "total_s": s.total_s, "output_tokens_per_s": s.output_tokens_per_s,
                        "requests_per_s": s.requests_per_s, "ttft_ms_mean": s.ttft_ms.mean,
                        "ttft_ms_p50": s.ttft_ms.p50, "ttft_ms_p99": s.ttft_ms.p99,
                        "latency_ms_mean": s.latency_ms.mean, "latency_ms_p50": s.latency_ms.p50,
                        "latency_ms_p99": s.latency_ms.p99, "num_preemptions": num_preemptions,
                    }),
                );
                println!("{obj}");
            } else {
                let trio = |x: Summary| format!("{:.0}/{:.0}/{:.0}", x.mean, x.p50, x.p99);
                println!(
                    "{round:>5} {:>9} {:>7} {:>7} {:>9.2} {:>10.1} {:>8.2} {:>25} {:>25} {:>7}",
                    batching.name(),
                    s.num_groups,
                    s.max_concurrent,
                    s.total_s,
                    s.output_tokens_per_s,
                    s.requests_per_s,
                    trio(s.ttft_ms),
                    trio(s.latency_ms),
                    num_preemptions
                );
            }
        }
    }
    let rate = |(tokens, secs): (usize, f64)| tokens as f64 / secs.max(1e-9);
    let static_tps = rate(totals[0]);
    let inflight_tps = rate(totals[1]);
    let ratio = inflight_tps / static_tps.max(1e-9);
    if as_json {
        let mut obj = common;
        extend(
            &mut obj,
            json!({
                "mode": "summary", "rounds": a.rounds, "seed": cfg.seed, "warmup_s": warmup_s,
                "min_prompt_len": cfg.prompt_len.start(), "max_prompt_len": cfg.prompt_len.end(),
                "min_gen_len": cfg.gen_len.start(), "max_gen_len": cfg.gen_len.end(),
                "kv_cache_tokens_asked": kv_tokens_asked, "kv_cache_bound": kv_bound,
                "prompt_lens": prompt_lens, "gen_lens": gen_lens,
                "static_output_tokens_per_s": static_tps, "inflight_output_tokens_per_s": inflight_tps,
                "inflight_over_static": ratio,
            }),
        );
        println!("{obj}");
    } else {
        println!(
            "in-flight / static output tok/s: {ratio:.2}x ({inflight_tps:.1} / {static_tps:.1}, over {} round(s))",
            a.rounds
        );
    }
    Ok(())
}

/// Adds the fields of `more` to the object `obj`.
fn extend(obj: &mut Value, more: Value) {
    if let (Value::Object(o), Value::Object(m)) = (obj, more) {
        o.extend(m);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {

    #[test]
    fn max_concurrent_counts_overlapping_first_to_last_token_spans() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        // [0,10], [5,20], [10,12] (touches the first at 10), [30,30], no tokens.
        let times = vec![
            vec![at(0), at(4), at(10)],
            vec![at(5), at(20)],
            vec![at(10), at(12)],
            vec![at(30)],
            vec![],
        ];
        assert_eq!(max_concurrent(&times), 3);
        // Back to back, not overlapping: one at a time.
        assert_eq!(max_concurrent(&[vec![at(0), at(1)], vec![at(2), at(3)]]), 1);
        assert_eq!(max_concurrent(&[]), 0);
    }

    use super::*;

    fn cfg(seed: u64) -> WorkloadConfig {
        WorkloadConfig {
            num_requests: 500,
            prompt_len: 3..=40,
            gen_len: 2..=24,
            seed,
        }
    }

    #[test]
    fn workload_is_deterministic_within_bounds_and_mixed() {
        let a = generate_workload(&cfg(5), 97, 64).unwrap();
        assert_eq!(a, generate_workload(&cfg(5), 97, 64).unwrap());
        assert_ne!(a, generate_workload(&cfg(6), 97, 64).unwrap());
        assert_eq!(a.len(), 500);
        for r in &a {
            assert!(
                (3..=40).contains(&r.prompt_ids.len()),
                "{}",
                r.prompt_ids.len()
            );
            assert!((2..=24).contains(&r.max_tokens), "{}", r.max_tokens);
            assert!(r.prompt_ids.len() + r.max_tokens <= 64);
            assert!(r.prompt_ids.iter().all(|&id| id < 97));
        }
        // Uniform draws over 500 requests reach both ends of each range.
        let lens = |f: fn(&BenchRequest) -> usize| {
            let v: Vec<usize> = a.iter().map(f).collect();
            (*v.iter().min().unwrap(), *v.iter().max().unwrap())
        };
        assert_eq!(lens(|r| r.prompt_ids.len()), (3, 40));
        assert_eq!(lens(|r| r.max_tokens), (2, 24));
        // Requests of equal length still get different prompts.
        assert_ne!(a[0].prompt_ids[..3], a[1].prompt_ids[..3]);
    }

    #[test]
    fn workload_refuses_bad_bounds() {
        assert_eq!(
            generate_workload(&cfg(0), 97, 63),
            Err(WorkloadError::TooLong {
                need: 64,
                max_model_len: 63
            })
        );
        let empty = WorkloadConfig {
            gen_len: RangeInclusive::new(5, 4),
            ..cfg(0)
        };
        assert!(matches!(
            empty.validate(1000),
            Err(WorkloadError::BadRange { min: 5, max: 4, .. })
        ));
        let zero = WorkloadConfig {
            prompt_len: 0..=4,
            ..cfg(0)
        };
        assert!(matches!(
            zero.validate(1000),
            Err(WorkloadError::BadRange { min: 0, .. })
        ));
        let none = WorkloadConfig {
            num_requests: 0,
            ..cfg(0)
        };
        assert_eq!(none.validate(1000), Err(WorkloadError::NoRequests));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let xs: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), 100.0);
        assert_eq!(percentile(&xs, 99.0), 198.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        let s = Summary::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.mean, s.p50, s.p99), (2.0, 2.0, 3.0));
    }

    #[test]
    fn kv_capacity_fits_the_batch_at_the_longest_length() {
        // 4 sequences of up to 40 + 24 = 64 tokens in blocks of 16: 4 blocks each.
        assert_eq!(kv_capacity(None, 4, 64, 16).0, 256);
        assert_eq!(kv_capacity(None, 4, 65, 16).0, 4 * 80);
        assert_eq!(
            kv_capacity(Some(100), 4, 65, 16),
            (100, "--max-tokens-in-paged-kv-cache")
        );
    }
}
