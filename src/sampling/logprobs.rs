//! Log-probabilities reported to clients: the log-softmax of the logits as the model produced
//! them (after suppression only; before penalties, temperature and filters: vLLM's default "raw"
//! logprobs), so a token's reported logprob does not depend on the request's sampling knobs.
//! Owns nothing; pure functions over one logit row. Must never modify the logits.

use super::exp::exp_nonpositive;

/// `ln(sum(exp(logits)))`, computed stably (max-shifted) and summed in f64. `-inf` when every logit is `-inf` (or empty).
// logits: [vocab_size], no NaN
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    // f32 exp (each term within 2 ulp) over blocks of 16 that vectorize, each block summed in
    // f32 and accumulated in f64 (no drift over 150k terms); a fixed order, so deterministic.
    const BLOCK: usize = 16;
    let mut sum = 0.0f64;
    let mut blocks = logits.chunks_exact(BLOCK);
    for block in &mut blocks {
        let mut terms = [0.0f32; BLOCK];
        for (term, &l) in terms.iter_mut().zip(block) {
            *term = exp_nonpositive(l - max);
        }
        sum += f64::from(terms.iter().sum::<f32>());
    }
    for &l in blocks.remainder() {
        sum += f64::from(exp_nonpositive(l - max));
    }
    f64::from(max) + sum.ln()
}

/// Log-probability of one logit given the row's `log_sum_exp`; `-inf` for an impossible token.
pub fn logprob(logit: f32, log_sum_exp: f64) -> f32 {
    if logit == f32::NEG_INFINITY || log_sum_exp == f64::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    (f64::from(logit) - log_sum_exp) as f32
}

/// The `num_top` most likely tokens as (token id, logprob), most likely first, ties broken by
/// lower token id. Tokens of probability zero (`-inf` logit, e.g. suppressed) are never listed,
/// so fewer than `num_top` pairs come back when fewer tokens are possible.
///
/// One pass with a bounded insertion list: O(vocab) for typical rows, O(vocab * num_top) worst
/// case (ascending logits), with `num_top` <= `MAX_LOGPROBS` (20).
// logits: [vocab_size], no NaN
pub fn top_logprobs(logits: &[f32], num_top: usize, log_sum_exp: f64) -> Vec<(u32, f32)> {
    // (token id, logit), most likely first.
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(num_top + 1);
    if num_top == 0 {
        return top;
    }
    for (token_idx, &logit) in logits.iter().enumerate() {
        if logit == f32::NEG_INFINITY {
            continue;
        }
        // Ids arrive in increasing order, so an equal logit never displaces an earlier id.
        let is_full = top.len() == num_top;
        if is_full && top.last().is_some_and(|&(_, worst)| logit <= worst) {
            continue;
        }
        let insert_idx = top.partition_point(|&(_, l)| l >= logit);
        top.insert(insert_idx, (token_idx as u32, logit));
        if top.len() > num_top {
            top.pop();
        }
    }
    for entry in &mut top {
        entry.1 = logprob(entry.1, log_sum_exp);
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_is_stable_and_exact() {
        let lse = log_sum_exp(&[1000.0, 1000.0]);
        assert!((lse - (1000.0 + 2f64.ln())).abs() < 1e-9, "{lse}");
        let lse = log_sum_exp(&[0.0, f32::NEG_INFINITY, 0.0, 0.0]);
        assert!((lse - 3f64.ln()).abs() < 1e-12, "{lse}");
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 2]), f64::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
        assert_eq!(logprob(0.0, f64::NEG_INFINITY), f32::NEG_INFINITY);
    }

    #[test]
    fn log_sum_exp_is_accurate_on_a_large_vocab() {
        // 151,936 tokens (Qwen2's vocab), not a multiple of the 16-wide blocks.
        let mut rng = crate::sampling::Rng::new(1);
        let logits: Vec<f32> = (0..151_935)
            .map(|_| (rng.next_f32() - 0.5) * 40.0)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exact = max
            + logits
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let got = log_sum_exp(&logits);
        assert!((got - exact).abs() < 1e-5, "{got} vs {exact}");
    }

    #[test]
    fn top_is_sorted_with_ties_by_lower_id_and_skips_impossible() {
        let logits = [1.0, 3.0, f32::NEG_INFINITY, 3.0, 2.0, 0.5, 3.0];
        let lse = log_sum_exp(&logits);
        let top = top_logprobs(&logits, 4, lse);
        let top_ids: Vec<u32> = top.iter().map(|&(id, _)| id).collect();
        assert_eq!(top_ids, [1, 3, 6, 4]);
        for &(id, lp) in &top {
            assert_eq!(lp, logprob(logits[id as usize], lse));
        }
        // Only 6 tokens are possible: asking for 10 returns 6, never the -inf one.
        let top = top_logprobs(&logits, 10, lse);
        assert_eq!(top.len(), 6);
        assert!(top.iter().all(|&(id, _)| id != 2));
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(top_logprobs(&logits, 0, lse).is_empty());
    }

    #[test]
    fn top_handles_ascending_rows() {
        // Worst case for the insertion list: every token displaces the current worst.
        let logits: Vec<f32> = (0..1000).map(|i| i as f32 * 0.01).collect();
        let top = top_logprobs(&logits, 5, log_sum_exp(&logits));
        let top_ids: Vec<u32> = top.iter().map(|&(id, _)| id).collect();
        assert_eq!(top_ids, [999, 998, 997, 996, 995]);
    }
}
