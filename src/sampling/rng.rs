//! The per-request pseudo-random generator: xoshiro256** (Blackman & Vigna, 2018) with its state
//! seeded by SplitMix64, the seeding its authors recommend. Both are fixed integer recipes, so a
//! seed gives the same stream on every platform, compiler and crate version; that is the whole
//! point of this module, and why it must never call a system or thread-local RNG.

/// Deterministic, seedable PRNG (xoshiro256**). Not cryptographic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    state: [u64; 4],
}

/// One SplitMix64 step: advances `state` and returns the next output.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// Expands `seed` into the 256-bit state with four SplitMix64 outputs (never all zero).
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let state = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Rng { state }
    }

    /// Next 64 uniformly distributed bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 24 random bits (every value is exactly representable).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [0, 1) with 53 random bits (every value is exactly representable).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_published_vector() {
        // Reference outputs of SplitMix64 for seed 1234567 (Vigna's splitmix64.c).
        let mut s = 1_234_567u64;
        let got: Vec<u64> = (0..5).map(|_| splitmix64(&mut s)).collect();
        assert_eq!(
            got,
            [
                6457827717110365317,
                3203168211198807973,
                9817491932198370423,
                4593380528125082431,
                16408922859458223821
            ]
        );
    }

    #[test]
    fn stream_is_pinned_across_versions() {
        // Golden values from an independent Python transcription of xoshiro256** + SplitMix64
        // seeding. If this fails, every seeded request in the wild changes its output.
        let mut rng = Rng::new(0);
        let got: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(
            got,
            [
                11091344671253066420,
                13793997310169335082,
                1900383378846508768,
                7684712102626143532
            ]
        );
        let mut rng = Rng::new(42);
        let got: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(
            got,
            [
                1546998764402558742,
                6990951692964543102,
                12544586762248559009,
                17057574109182124193
            ]
        );
        let mut rng = Rng::new(42);
        let got: Vec<f32> = (0..3).map(|_| rng.next_f32()).collect();
        assert_eq!(got, [0.083_862_96, 0.378_980_22, 0.680_043_4]);
    }

    #[test]
    fn floats_are_in_unit_interval_and_spread() {
        let mut rng = Rng::new(7);
        let mut num_below_half = 0usize;
        for _ in 0..10_000 {
            let x = rng.next_f32();
            let y = rng.next_f64();
            assert!((0.0..1.0).contains(&x), "{x}");
            assert!((0.0..1.0).contains(&y), "{y}");
            if y < 0.5 {
                num_below_half += 1;
            }
        }
        // Binomial(10000, 0.5): sd = 50; 5 sd of slack.
        assert!((4750..=5250).contains(&num_below_half), "{num_below_half}");
    }
}
