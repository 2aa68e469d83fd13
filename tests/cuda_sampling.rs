//! The GPU sampler (`cuda::sampling`, kernels/sample.cu) against the CPU sampler
//! (`sampling::Sampler`), the reference: greedy ids, the exact candidate set each filter (alone
//! and combined) keeps, penalties, logprobs, seeded draws, edge cases; plus a micro-benchmark.
//! These need an NVIDIA GPU (the compile test only libnvrtc) and are ignored in CPU CI:
//! `ci/gpu.sh` builds them and runs them on the GPU machine with `--include-ignored`.
#![allow(clippy::unwrap_used)]

mod cuda_common;

use std::time::Instant;

use cuda_common::dev;
use half::bf16;
use triton_ferrum::cuda::sampling::{GpuSampler, SampleBatch, TokenHistory};
use triton_ferrum::cuda::{CudaLibrary, DeviceBuffer, FloatElem, KernelId, SmArch};
use triton_ferrum::executor::cuda::row_sampling;
use triton_ferrum::request::SamplingParams;
use triton_ferrum::sampling::{Rng, Sampled, Sampler, Strategy, candidate_ids};

const VOCABS: [usize; 3] = [50257, 128256, 151936];

/// LLM-like logits: a bell-ish bulk (sum of three uniforms) of width `scale`, plus a few
/// clear favourites, so top-p nuclei range from a handful of tokens to most of the vocabulary.
fn random_logits(rng: &mut Rng, vocab_size: usize, scale: f32) -> Vec<f32> {
    const UNIT: f32 = 1.0 / (1u32 << 21) as f32;
    let mut row: Vec<f32> = (0..vocab_size)
        .map(|_| {
            // Three 21-bit uniforms from one draw.
            let bits = rng.next_u64();
            let sum = (bits & 0x1f_ffff) + ((bits >> 21) & 0x1f_ffff) + (bits >> 43);
            (sum as f32 * UNIT - 1.5) * scale
        })
        .collect();
    for _ in 0..5 {
        let idx = (rng.next_u64() % vocab_size as u64) as usize;
        row[idx] += scale * (1.0 + 2.0 * rng.next_f32());
    }
    row
}

/// One request as both samplers see it.
struct Row {
    params: SamplingParams,
    seed: u64,
    prompt: Vec<u32>,
    suppressed: Vec<u32>,
}

impl Row {
    fn new(params: SamplingParams, seed: u64) -> Self {
        Row {
            params,
            seed,
            prompt: Vec::new(),
            suppressed: Vec::new(),
        }
    }
}

/// A parameter mix covering each filter alone and combined, temperatures, and greedy.
fn param_mix(idx: usize) -> SamplingParams {
    let base = SamplingParams {
        temperature: [1.0, 0.7, 1.3, 0.4][idx % 4],
        ..SamplingParams::default()
    };
    match idx % 12 {
        0 => base,
        1 => SamplingParams { top_k: 50, ..base },
        2 => SamplingParams { top_p: 0.9, ..base },
        3 => SamplingParams {
            min_p: 0.05,
            ..base
        },
        4 => SamplingParams {
            top_k: 1000,
            top_p: 0.95,
            ..base
        },
        5 => SamplingParams {
            top_k: 40,
            top_p: 0.8,
            min_p: 0.1,
            ..base
        },
        6 => SamplingParams {
            top_p: 0.5,
            min_p: 0.02,
            ..base
        },
        7 => SamplingParams {
            top_k: 5000,
            min_p: 0.001,
            ..base
        },
        8 => SamplingParams { top_k: 1, ..base },
        9 => SamplingParams {
            top_p: 0.999,
            ..base
        },
        10 => SamplingParams {
            temperature: 0.0,
            ..base
        },
        _ => SamplingParams {
            top_k: 20_000,
            top_p: 0.6,
            ..base
        },
    }
}

struct CpuResult {
    sampled: Sampled,
    /// Sorted ids of the candidate list (greedy: the token).
    candidates: Vec<u32>,
}

/// One CPU step of a fresh sampler for `row` whose output so far is `output`.
fn cpu_step(row: &Row, output: &[u32], logits: &[f32]) -> CpuResult {
    let mut sampler = Sampler::new(&row.params, row.seed, &row.prompt, logits.len());
    for &t in output {
        sampler.accept(t);
    }
    let mut scratch = logits.to_vec();
    let sampled = sampler.sample(&mut scratch, &row.suppressed);
    // The sampler leaves the row suppressed, sanitized and penalized: the filters' input.
    let mut candidates = match Strategy::from_params(&row.params) {
        Strategy::Greedy => vec![sampled.token_id],
        Strategy::Random {
            temperature,
            filters,
        } => candidate_ids(&scratch, temperature, &filters),
    };
    candidates.sort_unstable();
    CpuResult {
        sampled,
        candidates,
    }
}

struct GpuResult {
    sampled: Vec<Sampled>,
    /// Per row: sorted ids with mask 1.
    candidates: Vec<Vec<u32>>,
}

/// One GPU step over all rows (`logits`: [rows, vocab]); first step of each seeded stream.
fn gpu_step<T: FloatElem>(
    sampler: &mut GpuSampler,
    rows: &[Row],
    outputs: &[Vec<u32>],
    logits: &[f32],
    vocab_size: usize,
) -> GpuResult {
    let mut batch = SampleBatch::new();
    for (row, output) in rows.iter().zip(outputs) {
        let mut rng = Rng::new(row.seed);
        let device_row = row_sampling(&row.params, &mut rng);
        let mut history = TokenHistory::new(&row.prompt, vocab_size);
        for &t in output {
            history.accept(t);
        }
        batch
            .push(&device_row, Some(&history), &row.suppressed)
            .unwrap();
    }
    let host: Vec<T> = logits.iter().map(|&x| T::from_f32(x)).collect();
    let logits_d = dev().upload(&host).unwrap();
    let mut mask_d = dev().alloc_zeros::<u32>(logits.len()).unwrap();
    sampler
        .sample_with_candidates(dev(), &logits_d, vocab_size, &batch, &mut mask_d)
        .unwrap();
    let sampled = sampler.fetch(dev()).unwrap();
    let mask = dev().download(&mask_d).unwrap();
    let candidates = mask
        .chunks(vocab_size)
        .map(|m| {
            m.iter()
                .enumerate()
                .filter(|&(_, &v)| v != 0)
                .map(|(i, _)| i as u32)
                .collect()
        })
        .collect();
    GpuResult {
        sampled,
        candidates,
    }
}

/// Compares one batch; returns (token mismatches, rows). Candidate sets must match exactly,
/// greedy tokens exactly, logprobs within 1e-4; seeded tokens are counted, not asserted.
fn compare(
    what: &str,
    rows: &[Row],
    outputs: &[Vec<u32>],
    logits: &[f32],
    gpu: &GpuResult,
) -> usize {
    let vocab_size = logits.len() / rows.len();
    let mut num_token_mismatches = 0;
    for (row_idx, row) in rows.iter().enumerate() {
        let cpu = cpu_step(
            row,
            &outputs[row_idx],
            &logits[row_idx * vocab_size..(row_idx + 1) * vocab_size],
        );
        let got = &gpu.sampled[row_idx];
        let ctx = format!("{what}: row {row_idx} params {:?}", row.params);
        let got_set = &gpu.candidates[row_idx];
        if got_set != &cpu.candidates {
            let only_gpu: Vec<_> = got_set
                .iter()
                .filter(|t| cpu.candidates.binary_search(t).is_err())
                .take(10)
                .collect();
            let only_cpu: Vec<_> = cpu
                .candidates
                .iter()
                .filter(|t| got_set.binary_search(t).is_err())
                .take(10)
                .collect();
            panic!(
                "{ctx}: candidate sets differ: gpu {} cpu {} (only gpu {only_gpu:?}, only cpu {only_cpu:?})",
                got_set.len(),
                cpu.candidates.len()
            );
        }
        if row.params.is_greedy() {
            assert_eq!(got.token_id, cpu.sampled.token_id, "{ctx}: greedy token");
        } else if got.token_id != cpu.sampled.token_id {
            num_token_mismatches += 1;
            println!(
                "MISMATCH {ctx}: gpu {} cpu {}",
                got.token_id, cpu.sampled.token_id
            );
        }
        match (&got.logprobs, &cpu.sampled.logprobs) {
            (None, None) => {}
            (Some(g), Some(c)) => {
                if got.token_id == cpu.sampled.token_id {
                    assert!(
                        close(g.logprob, c.logprob),
                        "{ctx}: logprob {} vs {}",
                        g.logprob,
                        c.logprob
                    );
                }
                let g_ids: Vec<u32> = g.top.iter().map(|e| e.0).collect();
                let c_ids: Vec<u32> = c.top.iter().map(|e| e.0).collect();
                assert_eq!(g_ids, c_ids, "{ctx}: top logprob ids");
                for (a, b) in g.top.iter().zip(&c.top) {
                    assert!(close(a.1, b.1), "{ctx}: top logprob {a:?} vs {b:?}");
                }
            }
            (g, c) => panic!("{ctx}: logprobs presence differs: {g:?} vs {c:?}"),
        }
    }
    num_token_mismatches
}

fn close(a: f32, b: f32) -> bool {
    a == b || (a - b).abs() <= 1e-4
}

// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs libnvrtc (an NVIDIA GPU machine): run ci/gpu.sh"]
fn nvrtc_compiles_the_sampler_for_every_tested_arch() {
    let nvrtc = triton_ferrum::cuda::probe_library(CudaLibrary::Nvrtc).unwrap();
    for arch in SmArch::TESTED {
        let t = Instant::now();
        let compiled = triton_ferrum::cuda::compile(KernelId::Sample, arch, &[]).unwrap();
        assert_eq!(&compiled.cubin[..4], b"\x7fELF");
        println!(
            "NVRTC {} sample.cu {arch}: {} bytes in {:.0} ms; log: {:?}",
            nvrtc.version,
            compiled.cubin.len(),
            t.elapsed().as_secs_f64() * 1e3,
            compiled.log
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn greedy_is_the_cpu_argmax() {
    let mut sampler = GpuSampler::new();
    let mut rng = Rng::new(1);
    for &vocab_size in &VOCABS {
        for num_rows in [1usize, 13, 64] {
            let mut logits = Vec::new();
            for _ in 0..num_rows {
                logits.extend(random_logits(&mut rng, vocab_size, 8.0));
            }
            // A planted tie at the maximum in row 0: the lower id wins.
            logits[vocab_size - 1] = 1e4;
            logits[vocab_size / 2] = 1e4;
            let rows: Vec<Row> = (0..num_rows)
                .map(|i| Row::new(SamplingParams::default(), i as u64))
                .collect();
            let outputs = vec![Vec::new(); num_rows];
            let gpu = gpu_step::<f32>(&mut sampler, &rows, &outputs, &logits, vocab_size);
            compare("greedy", &rows, &outputs, &logits, &gpu);
            assert_eq!(gpu.sampled[0].token_id, (vocab_size / 2) as u32);
        }
        // Rows the argmax must survive (they were the retired argmax kernel's cases): all -inf,
        // NaNs sprinkled in, and the maximum at the very last id.
        let mut logits = vec![f32::NEG_INFINITY; vocab_size];
        let mut nan_row = random_logits(&mut rng, vocab_size, 8.0);
        for i in (0..vocab_size).step_by(3) {
            nan_row[i] = f32::NAN;
        }
        logits.extend(nan_row);
        let mut last = random_logits(&mut rng, vocab_size, 8.0);
        last[vocab_size - 1] = 1e4;
        logits.extend(last);
        let rows: Vec<Row> = (0..3)
            .map(|i| Row::new(SamplingParams::default(), i as u64))
            .collect();
        let outputs = vec![Vec::new(); 3];
        let gpu = gpu_step::<f32>(&mut sampler, &rows, &outputs, &logits, vocab_size);
        compare("greedy edge rows", &rows, &outputs, &logits, &gpu);
        assert_eq!(gpu.sampled[2].token_id, (vocab_size - 1) as u32);
    }
    println!("CHECK sampler greedy: exact");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn filters_keep_exactly_the_cpu_candidates() {
    let mut sampler = GpuSampler::new();
    let mut rng = Rng::new(2);
    let mut num_draws = 0;
    let mut num_mismatches = 0;
    for &vocab_size in &VOCABS {
        for (num_rows, scale) in [(1usize, 3.0f32), (24, 6.0), (64, 2.0)] {
            let mut logits = Vec::new();
            for _ in 0..num_rows {
                logits.extend(random_logits(&mut rng, vocab_size, scale));
            }
            let rows: Vec<Row> = (0..num_rows)
                .map(|i| Row::new(param_mix(i + num_rows), 1000 + i as u64))
                .collect();
            let outputs = vec![Vec::new(); num_rows];
            let gpu = gpu_step::<f32>(&mut sampler, &rows, &outputs, &logits, vocab_size);
            num_mismatches += compare(
                &format!("filters vocab {vocab_size}"),
                &rows,
                &outputs,
                &logits,
                &gpu,
            );
            num_draws += num_rows;
        }
    }
    // bf16 logits: both samplers see the same bf16-rounded values (many exact ties).
    let vocab_size = 50257;
    let logits: Vec<f32> = (0..16)
        .flat_map(|_| random_logits(&mut rng, vocab_size, 4.0))
        .map(|x| bf16::from_f32(x).to_f32())
        .collect();
    let rows: Vec<Row> = (0..16)
        .map(|i| Row::new(param_mix(i), 7 + i as u64))
        .collect();
    let outputs = vec![Vec::new(); 16];
    let gpu = gpu_step::<bf16>(&mut sampler, &rows, &outputs, &logits, vocab_size);
    num_mismatches += compare("filters bf16", &rows, &outputs, &logits, &gpu);
    num_draws += 16;
    println!(
        "CHECK sampler filters: candidate sets exact; tokens {num_mismatches}/{num_draws} differ"
    );
    assert!(
        num_mismatches * 100 <= num_draws,
        "{num_mismatches}/{num_draws}"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn penalties_suppression_and_logprobs_match() {
    let mut sampler = GpuSampler::new();
    let mut rng = Rng::new(3);
    let vocab_size = 128256;
    let num_rows = 32;
    let mut logits = Vec::new();
    for _ in 0..num_rows {
        logits.extend(random_logits(&mut rng, vocab_size, 3.0));
    }
    let mut rows = Vec::new();
    let mut outputs = Vec::new();
    for i in 0..num_rows {
        let mut params = param_mix(i);
        params.repetition_penalty = [1.0, 1.3, 0.8, 2.0][i % 4];
        params.presence_penalty = [0.0, 0.5, -0.5, 1.5][(i / 4) % 4];
        params.frequency_penalty = [0.0, 0.3, 0.0, -0.2][(i / 2) % 4];
        params.logprobs = [None, Some(0), Some(5), Some(20)][i % 4];
        let mut row = Row::new(params, 50 + i as u64);
        // Prompt and output favour the likely tokens, so penalties change the outcome.
        let row_logits = &logits[i * vocab_size..(i + 1) * vocab_size];
        let mut order: Vec<u32> = (0..vocab_size as u32).collect();
        order.sort_by(|&a, &b| row_logits[b as usize].total_cmp(&row_logits[a as usize]));
        row.prompt = order[..8].iter().chain(&order[20..40]).copied().collect();
        row.prompt.push(vocab_size as u32 + 5); // out of range: ignored by both
        let output: Vec<u32> = order[4..12].iter().chain(&order[4..6]).copied().collect();
        if i % 3 == 0 {
            row.suppressed = vec![order[0], order[1], 7, vocab_size as u32 + 1];
        }
        rows.push(row);
        outputs.push(output);
    }
    let gpu = gpu_step::<f32>(&mut sampler, &rows, &outputs, &logits, vocab_size);
    let num_mismatches = compare("penalties", &rows, &outputs, &logits, &gpu);
    println!(
        "CHECK sampler penalties/logprobs: sets exact, logprobs within 1e-4; tokens {num_mismatches}/{num_rows} differ"
    );
    assert!(num_mismatches <= 1);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn edge_cases_behave_as_the_cpu() {
    let mut sampler = GpuSampler::new();
    let vocab_size = 50257;
    let mut rng = Rng::new(4);
    let mut rows = Vec::new();
    let mut logits = Vec::new();
    let neg = f32::NEG_INFINITY;
    let random = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    };
    let mut push = |params: SamplingParams, suppressed: Vec<u32>, row: Vec<f32>| {
        let mut r = Row::new(params, 77 + rows.len() as u64);
        r.suppressed = suppressed;
        rows.push(r);
        logits.extend(row);
    };
    // all -inf but one: greedy and random pick it
    let mut one = vec![neg; vocab_size];
    one[12345] = -3.0;
    push(SamplingParams::default(), vec![], one.clone());
    push(random.clone(), vec![], one.clone());
    push(
        SamplingParams {
            top_p: 0.5,
            top_k: 3,
            ..random.clone()
        },
        vec![],
        one,
    );
    // NaN logits: NaN never wins; all NaN -> the fallback (lowest id not suppressed)
    let mut some_nan = random_logits(&mut rng, vocab_size, 4.0);
    for i in (0..vocab_size).step_by(3) {
        some_nan[i] = f32::NAN;
    }
    push(SamplingParams::default(), vec![], some_nan.clone());
    push(
        SamplingParams {
            top_k: 10,
            ..random.clone()
        },
        vec![],
        some_nan,
    );
    push(random.clone(), vec![0, 1, 3], vec![f32::NAN; vocab_size]);
    push(SamplingParams::default(), vec![1, 0], vec![neg; vocab_size]);
    // +inf becomes f32::MAX
    let mut inf = random_logits(&mut rng, vocab_size, 4.0);
    inf[99] = f32::INFINITY;
    inf[98] = f32::INFINITY;
    push(random.clone(), vec![], inf);
    // top_k > vocab, top_k == vocab - 1, top_p = 0 (keeps the most likely, as the CPU)
    let row = random_logits(&mut rng, vocab_size, 4.0);
    push(
        SamplingParams {
            top_k: vocab_size + 10,
            ..random.clone()
        },
        vec![],
        row.clone(),
    );
    push(
        SamplingParams {
            top_k: vocab_size - 1,
            ..random.clone()
        },
        vec![],
        row.clone(),
    );
    push(
        SamplingParams {
            top_p: 0.0,
            ..random.clone()
        },
        vec![],
        row.clone(),
    );
    push(
        SamplingParams {
            min_p: 1.0,
            ..random.clone()
        },
        vec![],
        row.clone(),
    );
    // tiny temperature: every weight but the max underflows; ties in the top-k
    push(
        SamplingParams {
            temperature: 1e-30,
            top_k: 7,
            ..random.clone()
        },
        vec![],
        row.clone(),
    );
    let mut ties = vec![0.0f32; vocab_size];
    ties[100..200].fill(1.0);
    push(
        SamplingParams {
            top_k: 50,
            ..random.clone()
        },
        vec![],
        ties.clone(),
    );
    push(
        SamplingParams {
            top_p: 0.3,
            ..random.clone()
        },
        vec![],
        ties,
    );
    // logprobs of a row with fewer possible tokens than asked
    let mut few = vec![neg; vocab_size];
    few[5] = 1.0;
    few[6] = 2.0;
    push(
        SamplingParams {
            logprobs: Some(20),
            ..random.clone()
        },
        vec![6],
        few,
    );
    let num_rows = rows.len();
    let outputs = vec![Vec::new(); num_rows];
    let gpu = gpu_step::<f32>(&mut sampler, &rows, &outputs, &logits, vocab_size);
    let num_mismatches = compare("edge", &rows, &outputs, &logits, &gpu);
    assert_eq!(num_mismatches, 0);
    assert_eq!(gpu.sampled[0].token_id, 12345);
    assert_eq!(gpu.sampled[1].token_id, 12345);
    assert_eq!(gpu.sampled[5].token_id, 2);
    assert_eq!(gpu.sampled[6].token_id, 2);
    println!("CHECK sampler edge cases: {num_rows} rows as the CPU");
}

/// Seeded sampling over many steps: the GPU's tokens equal the CPU sampler's in >= 99.9% of 10^4
/// draws. Both sides accept the CPU's token, so streams stay aligned after a mismatch.
#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn seeded_draws_match_the_cpu() {
    let vocab_size = 50257;
    let num_rows = 64;
    let num_steps = 160;
    let mut sampler = GpuSampler::new();
    let mut data_rng = Rng::new(5);
    let mut cpu: Vec<Sampler> = Vec::new();
    let mut gpu_rngs: Vec<Rng> = Vec::new();
    let mut histories: Vec<TokenHistory> = Vec::new();
    let mut params_of: Vec<SamplingParams> = Vec::new();
    for i in 0..num_rows {
        let mut params = param_mix(i);
        if params.is_greedy() {
            params.temperature = 0.9;
        }
        if i % 5 == 0 {
            params.repetition_penalty = 1.1;
            params.frequency_penalty = 0.2;
        }
        let seed = 9000 + i as u64;
        let prompt: Vec<u32> = (0..16).map(|j| (i * 131 + j * 7) as u32).collect();
        cpu.push(Sampler::new(&params, seed, &prompt, vocab_size));
        gpu_rngs.push(Rng::new(seed));
        histories.push(TokenHistory::new(&prompt, vocab_size));
        params_of.push(params);
    }
    let mut num_draws = 0usize;
    let mut num_mismatches = 0usize;
    let mut batch = SampleBatch::new();
    for _ in 0..num_steps {
        let mut logits = Vec::with_capacity(num_rows * vocab_size);
        for i in 0..num_rows {
            logits.extend(random_logits(
                &mut data_rng,
                vocab_size,
                1.0 + (i % 7) as f32,
            ));
        }
        batch.clear();
        for i in 0..num_rows {
            let row = row_sampling(&params_of[i], &mut gpu_rngs[i]);
            batch.push(&row, Some(&histories[i]), &[]).unwrap();
        }
        let logits_d = dev().upload(&logits).unwrap();
        sampler
            .sample(dev(), &logits_d, vocab_size, &batch)
            .unwrap();
        let got = sampler.fetch(dev()).unwrap();
        for i in 0..num_rows {
            let mut row = logits[i * vocab_size..(i + 1) * vocab_size].to_vec();
            let want = cpu[i].sample(&mut row, &[]).token_id;
            num_draws += 1;
            if got[i].token_id != want {
                num_mismatches += 1;
                println!(
                    "SEEDED MISMATCH row {i}: gpu {} cpu {want}",
                    got[i].token_id
                );
            }
            cpu[i].accept(want);
            histories[i].accept(want);
        }
    }
    let rate = 1.0 - num_mismatches as f64 / num_draws as f64;
    println!(
        "CHECK sampler seeded: {}/{num_draws} draws equal the CPU's ({:.4}%)",
        num_draws - num_mismatches,
        rate * 100.0
    );
    assert!(rate >= 0.999, "{num_mismatches} of {num_draws} differ");
}

fn bench_case(name: &str, params: &SamplingParams, num_rows: usize, vocab_size: usize) -> f64 {
    let mut rng = Rng::new(6);
    let mut logits = Vec::with_capacity(num_rows * vocab_size);
    for _ in 0..num_rows {
        logits.extend(random_logits(&mut rng, vocab_size, 3.0));
    }
    let logits_d: DeviceBuffer<f32> = dev().upload(&logits).unwrap();
    let mut sampler = GpuSampler::new();
    let mut row_rng = Rng::new(1);
    let mut batch = SampleBatch::new();
    let mut step = |sampler: &mut GpuSampler, batch: &mut SampleBatch| {
        batch.clear();
        for _ in 0..num_rows {
            batch
                .push(&row_sampling(params, &mut row_rng), None, &[])
                .unwrap();
        }
        sampler.sample(dev(), &logits_d, vocab_size, batch).unwrap();
        sampler.fetch(dev()).unwrap()
    };
    for _ in 0..3 {
        step(&mut sampler, &mut batch);
    }
    let num_iters = 30;
    let t = Instant::now();
    for _ in 0..num_iters {
        step(&mut sampler, &mut batch);
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / num_iters as f64;
    println!(
        "{{\"bench\":\"gpu_sample\",\"case\":\"{name}\",\"rows\":{num_rows},\"vocab\":{vocab_size},\"us_per_step\":{us:.1}}}"
    );
    us
}

/// µs per step (upload + kernel + ids back) at vocab 128256 for 1/16/64/256 rows.
#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn bench_sampler_steps() {
    let vocab_size = 128256;
    let random = SamplingParams {
        temperature: 0.8,
        ..SamplingParams::default()
    };
    let cases = [
        ("greedy", SamplingParams::default()),
        ("temperature", random.clone()),
        (
            "top_k50_top_p0.9",
            SamplingParams {
                top_k: 50,
                top_p: 0.9,
                ..random.clone()
            },
        ),
        (
            "top_p0.95",
            SamplingParams {
                top_p: 0.95,
                ..random.clone()
            },
        ),
    ];
    println!("device: {}", dev().info().name);
    for (name, params) in &cases {
        let line: Vec<String> = [1usize, 16, 64, 256]
            .iter()
            .map(|&rows| {
                format!(
                    "{rows} rows {:.1} us",
                    bench_case(name, params, rows, vocab_size)
                )
            })
            .collect();
        println!(
            "BENCH sampler {name} vocab {vocab_size}: {}",
            line.join(", ")
        );
    }
}
