//! The truncation filters of random sampling (top-k, top-p, min-p) and the final draw, over a
//! reusable candidate list of temperature-scaled probabilities. Owns only that scratch list; it never
//! sees penalties, suppression or logprobs, and never allocates after the list has grown to the
//! vocabulary size once.
//!
//! Determinism: candidates are either in token-id order (as built) or fully sorted by
//! (weight descending, token id ascending), a strict total order, so for a given input and random
//! number the drawn token never depends on the internals of `select_nth_unstable`/`sort_unstable`.
//!
//! Cost for a vocab of V tokens: building is one pass and the only `exp` of the path; top-k is `select_nth_unstable` (O(V)) plus a
//! sort of k; top-p without a preceding top-k selects a growing window (64, 512, ...) of the most
//! likely tokens until the window's mass reaches `top_p`, so a small nucleus costs O(V), not a sort
//! of V; min-p and the draw are one or two cheap passes over the survivors.

use std::cmp::Ordering;

use super::exp::exp_nonpositive;
use super::rng::Rng;

/// One token still in the running. `weight` is its unnormalized probability at the request's
/// temperature, `exp((raw - max_raw) / temperature)`: in [0, 1], 1 for the most likely token.
/// Exponentiating once at build time spares every later filter (and the draw) its own exp pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub token_id: u32,
    pub weight: f32,
}

/// Most likely first; equal weights: lower token id first.
fn by_rank(a: &Candidate, b: &Candidate) -> Ordering {
    b.weight
        .total_cmp(&a.weight)
        .then(a.token_id.cmp(&b.token_id))
}

/// Relative slack of the top-p mass test, so that rounding cannot add a token to a nucleus that
/// exactly reaches `top_p` (e.g. probabilities 0.5 + 0.3 with top_p = 0.8).
const TOP_P_REL_TOL: f64 = 1e-5;
/// First window of the top-p search when the candidates are not sorted yet.
const TOP_P_FIRST_WINDOW: usize = 64;
/// Growth factor of the top-p window.
const TOP_P_WINDOW_GROWTH: usize = 8;

/// A composable truncation filter of random sampling. Each keeps at least the most likely token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Filter {
    /// Keep the `k` most likely tokens (ties: lower id). Only built with `k >= 1`.
    TopK(usize),
    /// Keep the smallest most-likely-first prefix whose renormalized mass is >= `p`.
    TopP(f32),
    /// Drop tokens whose probability is < `min_p` times the largest probability.
    MinP(f32),
}

/// Scratch list of sampling candidates, reused across steps of one request.
#[derive(Debug, Clone, Default)]
pub struct Candidates {
    items: Vec<Candidate>,
    /// True when `items` is sorted by `by_rank`; otherwise it is in token-id order.
    sorted: bool,
}

impl Candidates {
    /// Refills the list with every token and its weight at `temperature` (> 0). Subtracting the
    /// max before scaling keeps tiny temperatures from overflowing. Tokens of weight 0 (suppressed
    /// `-inf` logits, underflow at low temperature; every token for a NaN temperature) stay in the
    /// list but can never be drawn. One branch-free pass, so it vectorizes.
    // logits: [vocab_size], no NaN (the sampler has sanitized them)
    pub fn fill(&mut self, logits: &[f32], temperature: f32) {
        self.items.clear();
        self.sorted = false;
        let max_raw = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max_raw == f32::NEG_INFINITY {
            return;
        }
        // Divide, not multiply by 1/temperature: that is infinite for a subnormal temperature.
        self.items.extend(
            logits
                .iter()
                .enumerate()
                .map(|(token_idx, &raw)| Candidate {
                    token_id: token_idx as u32,
                    weight: exp_nonpositive((raw - max_raw) / temperature),
                }),
        );
    }

    /// The candidates' token ids, in the order `draw` walks them.
    pub fn token_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.items.iter().map(|c| c.token_id)
    }

    fn max_weight(&self) -> f32 {
        if self.sorted {
            self.items.first().map_or(0.0, |c| c.weight)
        } else {
            self.items.iter().map(|c| c.weight).fold(0.0, f32::max)
        }
    }

    fn total_weight(&self) -> f64 {
        self.items.iter().map(|c| f64::from(c.weight)).sum()
    }

    pub fn apply(&mut self, filter: Filter) {
        match filter {
            Filter::TopK(k) => self.top_k(k),
            Filter::TopP(p) => self.top_p(p),
            Filter::MinP(min_p) => self.min_p(min_p),
        }
    }

    fn top_k(&mut self, k: usize) {
        if k == 0 || k >= self.items.len() {
            return;
        }
        if !self.sorted {
            self.items.select_nth_unstable_by(k - 1, by_rank);
            self.items.truncate(k);
            self.items.sort_unstable_by(by_rank);
            self.sorted = true;
        } else {
            self.items.truncate(k);
        }
    }

    fn top_p(&mut self, p: f32) {
        if p.is_nan() || p >= 1.0 || self.items.len() <= 1 {
            return;
        }
        let target = f64::from(p) * self.total_weight() * (1.0 - TOP_P_REL_TOL);
        let num_items = self.items.len();
        let mut window = if self.sorted {
            num_items
        } else {
            TOP_P_FIRST_WINDOW.min(num_items)
        };
        loop {
            if !self.sorted {
                if window < num_items {
                    self.items.select_nth_unstable_by(window - 1, by_rank);
                }
                self.items[..window].sort_unstable_by(by_rank);
            }
            let mut mass = 0.0f64;
            let num_keep = self.items[..window].iter().position(|c| {
                mass += f64::from(c.weight);
                mass >= target
            });
            if let Some(last_idx) = num_keep {
                self.items.truncate(last_idx + 1);
                self.sorted = true;
                return;
            }
            if window == num_items {
                // Only rounding can get here: the whole list is the nucleus.
                self.sorted = true;
                return;
            }
            window = (window * TOP_P_WINDOW_GROWTH).min(num_items);
        }
    }

    fn min_p(&mut self, min_p: f32) {
        if min_p.is_nan() || min_p <= 0.0 {
            return;
        }
        // Probabilities and weights differ by one common factor; retain keeps the order.
        let threshold = min_p * self.max_weight();
        self.items.retain(|c| c.weight >= threshold);
    }

    /// Draws one token from the renormalized distribution of the survivors with one uniform
    /// number from `rng` (always exactly one, so streams stay aligned). None if no candidate has a
    /// non-zero weight.
    pub fn draw(&mut self, rng: &mut Rng) -> Option<u32> {
        let total = self.total_weight();
        let threshold = rng.next_f64() * total;
        let mut mass = 0.0f64;
        // The running sum repeats `total`'s additions in order, so when `total` > 0 it ends at
        // `total` > `threshold` and the loop returns; the token where the sum first exceeds
        // `threshold` has weight > 0. With `total` == 0 (nothing possible) no token is drawn.
        for c in &self.items {
            mass += f64::from(c.weight);
            if mass > threshold {
                return Some(c.token_id);
            }
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ids(c: &Candidates) -> Vec<u32> {
        let mut ids: Vec<u32> = c.items.iter().map(|c| c.token_id).collect();
        ids.sort_unstable();
        ids
    }

    fn filled(logits: &[f32], temperature: f32) -> Candidates {
        let mut c = Candidates::default();
        c.fill(logits, temperature);
        c
    }

    /// Probabilities of `logits` at `temperature`, computed in f64 the obvious way.
    fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exps: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / temperature).exp())
            .collect();
        let z: f64 = exps.iter().sum();
        exps.iter().map(|e| e / z).collect()
    }

    /// Brute-force top-p: sort everything, keep the smallest prefix with mass >= p.
    fn reference_top_p(logits: &[f32], p: f64) -> Vec<u32> {
        let probs = softmax(logits, 1.0);
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            probs[b as usize]
                .total_cmp(&probs[a as usize])
                .then(a.cmp(&b))
        });
        let mut mass = 0.0;
        let mut kept = Vec::new();
        for id in order {
            kept.push(id);
            mass += probs[id as usize];
            if mass >= p * (1.0 - 1e-9) {
                break;
            }
        }
        kept.sort_unstable();
        kept
    }

    /// Logits with a known, spread distribution: pseudo-random values from a seeded rng.
    fn random_logits(rng: &mut Rng, num_tokens: usize, scale: f32) -> Vec<f32> {
        (0..num_tokens)
            .map(|_| (rng.next_f32() - 0.5) * scale)
            .collect()
    }

    #[test]
    fn fill_weights_are_scaled_probabilities() {
        let c = filled(&[1.0, f32::NEG_INFINITY, 3.0], 2.0);
        let expected = [
            Candidate {
                token_id: 0,
                weight: exp_nonpositive(-1.0),
            },
            Candidate {
                token_id: 1,
                weight: 0.0,
            },
            Candidate {
                token_id: 2,
                weight: 1.0,
            },
        ];
        assert_eq!(c.items, expected);
        // Tiny temperatures (even subnormal) must not produce inf/NaN: the max keeps weight 1, the
        // rest underflow to 0.
        for temperature in [1e-38, 1e-45] {
            let c = filled(&[1.0, 30.0, 2.0], temperature);
            let weights: Vec<f32> = c.items.iter().map(|c| c.weight).collect();
            assert_eq!(weights, [0.0, 1.0, 0.0], "{temperature}");
        }
        assert!(filled(&[f32::NEG_INFINITY; 3], 1.0).items.is_empty());
        let mut c = filled(&[1.0, 2.0], f32::NAN);
        assert_eq!(c.draw(&mut Rng::new(0)), None);
    }

    #[test]
    fn top_k_keeps_k_best_with_lower_id_on_ties() {
        let mut c = filled(&[0.0, 5.0, 3.0, 5.0, 4.0, 3.0], 1.0);
        c.apply(Filter::TopK(3));
        let kept: Vec<u32> = c.items.iter().map(|c| c.token_id).collect();
        // Sorted most likely first; tie 1/3 by id, then 4; the 2/5 tie is cut.
        assert_eq!(kept, [1, 3, 4]);
        c.apply(Filter::TopK(10));
        assert_eq!(c.items.len(), 3);
    }

    #[test]
    fn top_p_keeps_smallest_nucleus() {
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        for (p, expected) in [
            (0.8, vec![0, 1]),
            (0.79, vec![0, 1]),
            (0.81, vec![0, 1, 2]),
            (0.5, vec![0]),
            (0.3, vec![0]),
            (0.99, vec![0, 1, 2, 3]),
        ] {
            let mut c = filled(&logits, 1.0);
            c.apply(Filter::TopP(p));
            assert_eq!(ids(&c), expected, "top_p = {p}");
        }
    }

    #[test]
    fn top_p_window_search_matches_brute_force() {
        let mut rng = Rng::new(3);
        for (num_tokens, scale) in [(10, 4.0), (1000, 2.0), (1000, 30.0), (5000, 0.5), (3, 1.0)] {
            let logits = random_logits(&mut rng, num_tokens, scale);
            for p in [0.1f32, 0.5, 0.9, 0.97] {
                let mut c = filled(&logits, 1.0);
                c.apply(Filter::TopP(p));
                assert_eq!(
                    ids(&c),
                    reference_top_p(&logits, p as f64),
                    "n={num_tokens} p={p}"
                );
                // Sorted most likely first after top-p.
                assert!(c.items.windows(2).all(|w| by_rank(&w[0], &w[1]).is_lt()));
            }
        }
    }

    #[test]
    fn top_p_renormalizes_after_top_k() {
        // Probabilities 0.4/0.3/0.2/0.1; after top-k=2 they become 0.571/0.429, so top_p = 0.5
        // keeps only token 0 (without top-k it would need tokens 0 and 1).
        let logits: Vec<f32> = [0.4f32, 0.3, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let mut c = filled(&logits, 1.0);
        c.apply(Filter::TopP(0.5));
        assert_eq!(ids(&c), [0, 1]);
        let mut c = filled(&logits, 1.0);
        c.apply(Filter::TopK(2));
        c.apply(Filter::TopP(0.5));
        assert_eq!(ids(&c), [0]);
    }

    #[test]
    fn min_p_drops_tokens_below_fraction_of_max() {
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        for (min_p, expected) in [
            (0.2, vec![0, 1, 2]),
            (0.5, vec![0, 1]),
            (0.7, vec![0]),
            (1.0, vec![0]),
            (0.05, vec![0, 1, 2, 3]),
        ] {
            let mut c = filled(&logits, 1.0);
            c.apply(Filter::MinP(min_p));
            assert_eq!(ids(&c), expected, "min_p = {min_p}");
        }
        // At temperature 2 the probabilities flatten to ~0.38/0.29/0.21/0.12, so min_p = 0.5
        // (threshold ~0.19) now keeps token 2 as well: min-p sees temperature-scaled probabilities.
        let mut c = filled(&logits, 2.0);
        c.apply(Filter::MinP(0.5));
        assert_eq!(ids(&c), [0, 1, 2]);
    }

    #[test]
    fn draw_never_picks_filtered_or_zero_probability_tokens() {
        let mut rng = Rng::new(11);
        let mut c = Candidates::default();
        let mut num_seen = [0usize; 4];
        for _ in 0..2000 {
            // Token 2 is a candidate whose probability underflows to exactly 0.
            c.fill(&[1.0, 0.0, -200.0, 0.5], 1.0);
            num_seen[c.draw(&mut rng).unwrap() as usize] += 1;
            c.fill(&[1.0, 0.0, -200.0, 0.5], 1.0);
            c.apply(Filter::TopK(2));
            let token_id = c.draw(&mut rng).unwrap();
            assert!(token_id == 0 || token_id == 3, "{token_id}");
        }
        assert_eq!(num_seen[2], 0);
        assert!(
            num_seen[0] > 0 && num_seen[1] > 0 && num_seen[3] > 0,
            "{num_seen:?}"
        );
        c.fill(&[f32::NEG_INFINITY], 1.0);
        assert_eq!(c.draw(&mut rng), None);
        // All weights 0 (every token suppressed but one that underflows): nothing is drawn.
        c.fill(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY], 1.0);
        c.items[1].weight = 0.0;
        assert_eq!(c.draw(&mut rng), None);
    }
}
