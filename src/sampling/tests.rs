//! Behavior tests of `Sampler` as the engine drives it: strategies, filters, penalties,
//! suppression, seeding and logprobs.

use super::*;

fn random_params() -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    }
}

/// Logits whose softmax is exactly `probs` (up to f32 rounding).
fn logits_of(probs: &[f32]) -> Vec<f32> {
    probs.iter().map(|p| p.ln()).collect()
}

fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - max) / temperature).exp())
        .collect();
    let z: f64 = exps.iter().sum();
    exps.iter().map(|e| e / z).collect()
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    softmax(logits, 1.0).iter().map(|p| p.ln()).collect()
}

/// Samples `num_samples` times from fresh copies of `logits`; returns the frequency of each id.
fn frequencies(sampler: &mut Sampler, logits: &[f32], num_samples: usize) -> Vec<f64> {
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..num_samples {
        let mut row = logits.to_vec();
        counts[sampler.sample(&mut row, &[]).token_id as usize] += 1;
    }
    counts
        .iter()
        .map(|&c| c as f64 / num_samples as f64)
        .collect()
}

fn random_logits(rng: &mut Rng, num_tokens: usize, scale: f32) -> Vec<f32> {
    (0..num_tokens)
        .map(|_| (rng.next_f32() - 0.5) * scale)
        .collect()
}

fn reference_argmax(logits: &[f32]) -> u32 {
    let mut best_idx = 0;
    for (idx, &l) in logits.iter().enumerate() {
        if l > logits[best_idx] {
            best_idx = idx;
        }
    }
    best_idx as u32
}

#[test]
fn greedy_is_argmax_with_lowest_id_on_ties() {
    let mut sampler = Sampler::new(&SamplingParams::default(), 0, &[], 6);
    assert_eq!(sampler.strategy(), &Strategy::Greedy);
    assert_eq!(
        sampler
            .sample(&mut [0.1, 2.0, -3.0, 1.9, 0.0, 0.0], &[])
            .token_id,
        1
    );
    assert_eq!(
        sampler
            .sample(&mut [0.1, 2.0, -3.0, 2.0, 5.0, 5.0], &[])
            .token_id,
        4
    );
    assert_eq!(sampler.sample(&mut [-1.0, -1.0, -1.0], &[]).token_id, 0);
    let mut rng = Rng::new(5);
    for _ in 0..100 {
        let logits = random_logits(&mut rng, 300, 8.0);
        let expected = reference_argmax(&logits);
        assert_eq!(sampler.sample(&mut logits.clone(), &[]).token_id, expected);
    }
}

#[test]
fn temperature_zero_ignores_filters() {
    let params = SamplingParams {
        temperature: 0.0,
        top_k: 50,
        top_p: 0.99,
        min_p: 0.01,
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(&params, 1, &[], 8);
    assert_eq!(sampler.strategy(), &Strategy::Greedy);
    // A nearly flat distribution: any randomness would show up within 200 calls.
    let logits = [1.0, 1.01, 0.99, 1.0, 1.005, 0.98, 1.0, 1.0];
    for _ in 0..200 {
        assert_eq!(sampler.sample(&mut logits.clone(), &[]).token_id, 1);
    }
}

#[test]
fn strategy_lists_enabled_filters_in_order() {
    let params = SamplingParams {
        temperature: 0.7,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.05,
        ..random_params()
    };
    assert_eq!(
        Strategy::from_params(&params),
        Strategy::Random {
            temperature: 0.7,
            filters: vec![Filter::TopK(40), Filter::TopP(0.9), Filter::MinP(0.05)]
        }
    );
    assert_eq!(
        Strategy::from_params(&random_params()),
        Strategy::Random {
            temperature: 1.0,
            filters: vec![]
        }
    );
}

#[test]
fn same_seed_gives_same_stream_and_different_seeds_differ() {
    let mut rng = Rng::new(9);
    let rows: Vec<Vec<f32>> = (0..500)
        .map(|_| random_logits(&mut rng, 1000, 6.0))
        .collect();
    let params = SamplingParams {
        top_k: 100,
        top_p: 0.95,
        ..random_params()
    };
    let run = |seed: u64| -> Vec<u32> {
        let mut sampler = Sampler::new(&params, seed, &[], 1000);
        rows.iter()
            .map(|row| sampler.sample(&mut row.clone(), &[]).token_id)
            .collect()
    };
    let first = run(1234);
    assert_eq!(first, run(1234));
    let other = run(1235);
    let num_same = first.iter().zip(&other).filter(|(a, b)| a == b).count();
    assert!(
        num_same < 250,
        "seeds 1234 and 1235 agree on {num_same} of 500 samples"
    );
}

#[test]
fn top_k_one_is_greedy() {
    let params = SamplingParams {
        temperature: 1.5,
        top_k: 1,
        ..random_params()
    };
    let mut sampler = Sampler::new(&params, 77, &[], 500);
    let mut rng = Rng::new(6);
    for _ in 0..200 {
        let logits = random_logits(&mut rng, 500, 1.0);
        let expected = reference_argmax(&logits);
        assert_eq!(sampler.sample(&mut logits.clone(), &[]).token_id, expected);
    }
}

#[test]
fn top_k_restricts_support_and_renormalizes() {
    let probs = [0.05, 0.2, 0.1, 0.25, 0.15, 0.25];
    let params = SamplingParams {
        top_k: 3,
        ..random_params()
    };
    let mut sampler = Sampler::new(&params, 3, &[], probs.len());
    let freq = frequencies(&mut sampler, &logits_of(&probs), 20_000);
    // Top 3: ids 3 and 5 (0.25 each) and 1 (0.2); renormalized over 0.7.
    let expected = [0.0, 0.2 / 0.7, 0.0, 0.25 / 0.7, 0.0, 0.25 / 0.7];
    for (id, (&f, &e)) in freq.iter().zip(&expected).enumerate() {
        if e == 0.0 {
            assert_eq!(f, 0.0, "token {id} is outside the top-k");
        } else {
            assert!((f - e).abs() < 0.02, "token {id}: {f} vs {e}");
        }
    }
}

#[test]
fn top_p_samples_only_the_smallest_nucleus() {
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    let params = SamplingParams {
        top_p: 0.8,
        ..random_params()
    };
    let mut sampler = Sampler::new(&params, 4, &[], 4);
    let freq = frequencies(&mut sampler, &logits, 20_000);
    assert_eq!((freq[2], freq[3]), (0.0, 0.0), "{freq:?}");
    assert!((freq[0] - 0.625).abs() < 0.02, "{freq:?}");
    // Slightly more than 0.8 needs the third token too.
    let params = SamplingParams {
        top_p: 0.85,
        ..random_params()
    };
    let mut sampler = Sampler::new(&params, 4, &[], 4);
    let freq = frequencies(&mut sampler, &logits, 20_000);
    assert!(freq[2] > 0.1 && freq[3] == 0.0, "{freq:?}");
}

#[test]
fn min_p_drops_tokens_below_threshold() {
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    // min_p 0.2: threshold 0.1 drops only token 3.
    let params = SamplingParams {
        min_p: 0.2,
        ..random_params()
    };
    let mut sampler = Sampler::new(&params, 8, &[], 4);
    let freq = frequencies(&mut sampler, &logits, 20_000);
    assert_eq!(freq[3], 0.0, "{freq:?}");
    assert!((freq[2] - 0.15 / 0.95).abs() < 0.02, "{freq:?}");
}

#[test]
fn empirical_frequencies_match_softmax() {
    let logits = [1.0, 0.5, -0.3, 2.0, 0.0, 1.2, -1.0, 0.8];
    for temperature in [1.0f32, 0.6, 2.5] {
        let params = SamplingParams {
            temperature,
            ..random_params()
        };
        let mut sampler = Sampler::new(&params, 2024, &[], logits.len());
        let freq = frequencies(&mut sampler, &logits, 20_000);
        let expected = softmax(&logits, temperature as f64);
        let max_diff = freq
            .iter()
            .zip(&expected)
            .map(|(f, e)| (f - e).abs())
            .fold(0.0, f64::max);
        assert!(
            max_diff < 0.02,
            "temperature {temperature}: {freq:?} vs {expected:?}"
        );
    }
}

#[test]
fn filters_compose_on_renormalized_distributions() {
    // 0.4/0.3/0.2/0.1 → top-k 2 → 0.571/0.429 → top-p 0.5 keeps token 0 only. Applying top-p to
    // the unrenormalized distribution would keep tokens 0 and 1.
    let logits = logits_of(&[0.4, 0.3, 0.2, 0.1]);
    let params = SamplingParams {
        top_k: 2,
        top_p: 0.5,
        ..random_params()
    };
    let mut sampler = Sampler::new(&params, 10, &[], 4);
    for _ in 0..500 {
        assert_eq!(sampler.sample(&mut logits.clone(), &[]).token_id, 0);
    }
}

#[test]
fn repetition_penalty_changes_the_choice_and_the_row() {
    let params = SamplingParams {
        repetition_penalty: 2.0,
        ..SamplingParams::default()
    };
    // Prompt has token 0 (positive logit) and token 2 (negative logit).
    let mut sampler = Sampler::new(&params, 0, &[0, 2], 4);
    let mut logits = [3.0, 2.0, -1.0, -1.5];
    // 3.0 / 2 = 1.5 < 2.0: the greedy choice moves to token 1.
    assert_eq!(sampler.sample(&mut logits, &[]).token_id, 1);
    assert_eq!(logits, [1.5, 2.0, -2.0, -1.5]);
    // Output tokens count too.
    sampler.accept(1);
    let mut logits = [3.0, 2.0, -1.0, -1.5];
    assert_eq!(sampler.sample(&mut logits, &[]).token_id, 0);
    assert_eq!(logits, [1.5, 1.0, -2.0, -1.5]);
}

#[test]
fn presence_and_frequency_penalties_follow_output_counts() {
    let params = SamplingParams {
        presence_penalty: 0.5,
        frequency_penalty: 0.3,
        ..SamplingParams::default()
    };
    // Token 3 in the prompt is not penalized by presence/frequency.
    let mut sampler = Sampler::new(&params, 0, &[3], 4);
    let raw = [2.0f32, 1.9, 1.0, 2.1];
    let mut logits = raw;
    assert_eq!(sampler.sample(&mut logits, &[]).token_id, 3);
    assert_eq!(logits, raw);
    sampler.accept(0);
    sampler.accept(0);
    sampler.accept(2);
    let mut logits = raw;
    assert_eq!(sampler.sample(&mut logits, &[]).token_id, 3);
    assert_eq!(
        logits,
        [2.0 - (0.5 + 0.3 * 2.0), 1.9, 1.0 - (0.5 + 0.3), 2.1]
    );
    // Enough repeats of token 3 itself push the choice to token 1.
    sampler.accept(3);
    let mut logits = raw;
    assert_eq!(sampler.sample(&mut logits, &[]).token_id, 1);
}

#[test]
fn suppressed_ids_are_never_sampled() {
    let logits = [0.0, 1.0, 0.5, 100.0, 0.2];
    for params in [
        SamplingParams::default(),
        random_params(),
        SamplingParams {
            top_k: 2,
            ..random_params()
        },
    ] {
        let mut sampler = Sampler::new(&params, 13, &[], logits.len());
        let mut num_seen = [0usize; 5];
        for _ in 0..2000 {
            let token_id = sampler.sample(&mut logits.clone(), &[3, 99]).token_id;
            num_seen[token_id as usize] += 1;
        }
        assert_eq!(num_seen[3], 0, "{params:?}");
        assert!(num_seen[1] > 0, "{params:?}");
    }
    // Suppression comes before penalties: a negative-presence-penalty boost cannot revive it.
    let params = SamplingParams {
        presence_penalty: -2.0,
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(&params, 0, &[], 5);
    sampler.accept(3);
    assert_eq!(sampler.sample(&mut logits.clone(), &[3]).token_id, 1);
}

#[test]
fn logprobs_are_raw_log_softmax_with_sorted_top() {
    // Penalties and temperature are on: the reported logprobs must ignore both.
    let params = SamplingParams {
        temperature: 0.5,
        repetition_penalty: 1.3,
        frequency_penalty: 0.4,
        logprobs: Some(3),
        ..random_params()
    };
    let logits = [0.3, 2.0, -1.0, 2.0, 1.5, 0.0, 2.2];
    let expected = log_softmax(&logits);
    let mut sampler = Sampler::new(&params, 21, &[1, 4], logits.len());
    for _ in 0..200 {
        let sampled = sampler.sample(&mut logits.clone(), &[]);
        let lp = sampled.logprobs.unwrap();
        let top_ids: Vec<u32> = lp.top.iter().map(|&(id, _)| id).collect();
        // 2.2 first, then the 2.0 tie broken by lower id.
        assert_eq!(top_ids, [6, 1, 3]);
        for &(id, value) in &lp.top {
            assert!(
                (value as f64 - expected[id as usize]).abs() < 1e-5,
                "{id}: {value}"
            );
        }
        let token_idx = sampled.token_id as usize;
        assert!(
            (lp.logprob as f64 - expected[token_idx]).abs() < 1e-5,
            "{lp:?}"
        );
        sampler.accept(sampled.token_id);
    }
}

#[test]
fn sampled_logprob_is_reported_outside_top_n() {
    // The repetition penalty makes greedy pick token 3, which is not in the raw top-1.
    let params = SamplingParams {
        repetition_penalty: 100.0,
        logprobs: Some(1),
        ..SamplingParams::default()
    };
    let logits = [5.0, 4.0, 3.0, 0.1];
    let expected = log_softmax(&logits);
    let mut sampler = Sampler::new(&params, 0, &[0, 1, 2], 4);
    let sampled = sampler.sample(&mut logits.clone(), &[]);
    assert_eq!(sampled.token_id, 3);
    let lp = sampled.logprobs.unwrap();
    assert_eq!(lp.top.len(), 1);
    assert_eq!(lp.top[0].0, 0);
    assert!((lp.logprob as f64 - expected[3]).abs() < 1e-5, "{lp:?}");
    // Without penalties (no scratch copy) and with random sampling, the same must hold.
    let params = SamplingParams {
        logprobs: Some(0),
        ..random_params()
    };
    let mut sampler = Sampler::new(&params, 5, &[], 4);
    let mut num_checked = 0;
    for _ in 0..300 {
        let sampled = sampler.sample(&mut logits.clone(), &[]);
        let lp = sampled.logprobs.unwrap();
        assert!(lp.top.is_empty());
        assert!((lp.logprob as f64 - expected[sampled.token_id as usize]).abs() < 1e-5);
        num_checked += usize::from(sampled.token_id != 0);
    }
    assert!(num_checked > 0);
}

#[test]
fn logprobs_reflect_suppression_and_are_absent_unless_asked() {
    let params = SamplingParams {
        logprobs: Some(5),
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(&params, 0, &[], 3);
    let sampled = sampler.sample(&mut [1.0, 3.0, 1.0], &[1]);
    let lp = sampled.logprobs.unwrap();
    // Token 1 is impossible now: the other two share the mass.
    assert_eq!(lp.top, [(0, -(2f32.ln())), (2, -(2f32.ln()))]);
    assert_eq!(lp.logprob, -(2f32.ln()));
    let mut sampler = Sampler::new(&SamplingParams::default(), 0, &[], 3);
    assert_eq!(sampler.sample(&mut [1.0, 3.0, 1.0], &[]).logprobs, None);
}

#[test]
fn degenerate_rows_do_not_panic() {
    for params in [
        SamplingParams::default(),
        SamplingParams {
            top_p: 0.5,
            logprobs: Some(2),
            ..random_params()
        },
    ] {
        let mut sampler = Sampler::new(&params, 0, &[], 4);
        // NaN is never sampled; +inf wins.
        let sampled = sampler.sample(&mut [f32::NAN, 1.0, f32::INFINITY, f32::NAN], &[]);
        assert_eq!(sampled.token_id, 2);
        for _ in 0..100 {
            assert_eq!(
                sampler
                    .sample(&mut [f32::NAN, 1.0, f32::NAN, 0.5], &[])
                    .token_id,
                1
            );
        }
        // Nothing possible: lowest id that is not suppressed.
        let sampled = sampler.sample(&mut [f32::NAN, f32::NEG_INFINITY, 0.0, 0.0], &[0, 2, 3]);
        assert_eq!(sampled.token_id, 1);
        if let Some(lp) = sampled.logprobs {
            assert_eq!(lp.logprob, f32::NEG_INFINITY);
            assert!(lp.top.is_empty());
        }
        assert_eq!(sampler.sample(&mut [], &[]).token_id, 0);
    }
}
