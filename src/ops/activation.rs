//! Elementwise activations, and the gated form `act(gate) * up` used by Llama-style MLPs.

use crate::tensor::Activation;

/// `act(x)` for one value (the reference the GPU kernels are checked against).
pub fn apply(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluTanh => {
            const SQRT_2_OVER_PI: f32 = 0.797_884_6;
            0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::Gelu => 0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2)),
        Activation::Relu => x.max(0.0),
    }
}

/// `gate_up: [num_tokens, 2 * inter]` (gate rows first, then up) → `out: [num_tokens, inter]`.
pub fn gated(act: Activation, gate_up: &[f32], inter: usize, out: &mut [f32]) {
    for (row, o) in gate_up.chunks(2 * inter).zip(out.chunks_mut(inter)) {
        let (gate, up) = row.split_at(inter);
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            *o = apply(act, g) * u;
        }
    }
}

/// Applies `act` to every element of `x`, in place (the plain, non-gated MLP).
pub fn in_place(act: Activation, x: &mut [f32]) {
    for v in x {
        *v = apply(act, *v);
    }
}

/// erf evaluated in f64: Taylor series for |x| < 2.5, asymptotic expansion of erfc beyond
/// (absolute error < 1e-7 everywhere, far below f32 resolution of GELU's output).
fn erf(x: f32) -> f32 {
    erf_f64(x as f64) as f32
}

fn erf_f64(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 2.5 {
        // erf(x) = 2/sqrt(pi) * sum_{n} (-1)^n x^(2n+1) / (n! (2n+1))
        let mut term = ax;
        let mut sum = ax;
        let x2 = ax * ax;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(x) ~ exp(-x²)/(x sqrt(pi)) * (1 - 1/(2x²) + 3/(4x⁴) - 15/(8x⁶)); error < 1e-7 here
        let x2 = ax * ax;
        let corr = 1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2);
        1.0 - (-x2).exp() / (ax * std::f64::consts::PI.sqrt()) * corr
    };
    if x < 0.0 { -r } else { r }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_match_known_values() {
        assert!((apply(Activation::Silu, 1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((apply(Activation::Gelu, 1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((apply(Activation::Gelu, -3.0) - (-0.004_049_8)).abs() < 1e-6);
        assert!((apply(Activation::GeluTanh, 1.0) - 0.841_192).abs() < 1e-5);
        assert_eq!(apply(Activation::Relu, -2.0), 0.0);
        assert!((erf_f64(0.5) - 0.520_499_877_813_046_5).abs() < 1e-12);
        assert!((erf_f64(3.0) - 0.999_977_909_503_001_4).abs() < 1e-7);
    }

    #[test]
    fn gated_multiplies_activated_gate_by_up() {
        let gate_up = [1.0f32, -1.0, 2.0, 3.0];
        let mut out = [0.0f32; 2];
        gated(Activation::Silu, &gate_up, 2, &mut out);
        assert!((out[0] - apply(Activation::Silu, 1.0) * 2.0).abs() < 1e-6);
        assert!((out[1] - apply(Activation::Silu, -1.0) * 3.0).abs() < 1e-6);
    }
}
