//! Row-wise normalizations. `x: [num_rows, dim]`, `weight`/`bias: [dim]`, computed in f32 with an
//! f64-free two-pass mean like PyTorch's reference.

use rayon::prelude::*;

use crate::tensor::Norm;

/// Below this many elements the rows are normalized on the calling thread.
const PAR_THRESHOLD: usize = 1 << 14;

/// out[r] = norm(x[r]) * weight (+ bias), for every row.
pub fn norm_rows(norm: Norm, x: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    let dim = weight.len();
    debug_assert_eq!(x.len(), out.len());
    debug_assert_eq!(x.len() % dim, 0);
    let one = |(xr, or): (&[f32], &mut [f32])| match norm {
        Norm::Rms { eps } => rms_norm_row(xr, weight, eps, or),
        Norm::Layer { eps, .. } => layer_norm_row(xr, weight, bias, eps, or),
    };
    if x.len() >= PAR_THRESHOLD {
        x.par_chunks(dim).zip(out.par_chunks_mut(dim)).for_each(one);
    } else {
        x.chunks(dim).zip(out.chunks_mut(dim)).for_each(one);
    }
}

/// Hugging Face `LlamaRMSNorm`: x * rsqrt(mean(x²) + eps) * w.
pub fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// `torch.nn.LayerNorm`: (x - mean) * rsqrt(var + eps) * w + b, biased variance.
pub fn layer_norm_row(x: &[f32], weight: &[f32], bias: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        *o = (v - mean) * inv * weight[i] + bias.map_or(0.0, |b| b[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_formula() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [0.5f32, 1.0, 2.0, -1.0];
        let mut out = [0.0f32; 4];
        rms_norm_row(&x, &w, 1e-6, &mut out);
        let ms = (1.0 + 4.0 + 9.0 + 0.25) / 4.0f64;
        let inv = 1.0 / (ms + 1e-6).sqrt();
        for i in 0..4 {
            assert!((out[i] as f64 - x[i] as f64 * inv * w[i] as f64).abs() < 1e-6);
        }
    }

    #[test]
    fn layer_norm_has_zero_mean_unit_variance() {
        let x: Vec<f32> = (0..64)
            .map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.5)
            .collect();
        let w = vec![1.0f32; 64];
        let b = vec![0.25f32; 64];
        let mut out = vec![0.0f32; 64];
        layer_norm_row(&x, &w, Some(&b), 1e-5, &mut out);
        let mean = out.iter().map(|v| v - 0.25).sum::<f32>() / 64.0;
        let var = out.iter().map(|v| (v - 0.25 - mean).powi(2)).sum::<f32>() / 64.0;
        assert!(mean.abs() < 1e-5, "mean {mean}");
        assert!((var - 1.0).abs() < 1e-3, "var {var}");
    }
}
