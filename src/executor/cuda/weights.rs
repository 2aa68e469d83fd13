//! The CUDA executor's weights: uploaded once from the host `DecoderWeights`, converted to the
//! executor's dtype (an FP8 linear kept in E4M3 with per-channel scales where the GPU can run
//! it), and its per-layer paged KV cache.

use super::device_err;
use crate::cuda::gemm::fp8::{Fp8Weights, fp8_supported};
use crate::cuda::{CudaDevice, DeviceBuffer, FloatElem};
use crate::model::weights::{LayerWeights, Linear, NormWeights, WeightReader};
use crate::ops::fp8::{Fp8Scale, Fp8Weight};
use crate::ops::linear::Weight;

pub(super) struct DeviceNorm<T> {
    /// [dim]
    pub(super) weight: DeviceBuffer<T>,
    /// [dim]
    pub(super) bias: Option<DeviceBuffer<T>>,
}

/// A linear's weight matrix on the device.
pub(super) enum DeviceMatrix<T> {
    /// [n, k] in the executor's dtype.
    Dense(DeviceBuffer<T>),
    /// [n, k] E4M3 codes with [n] scales (an FP8 checkpoint or `quantization: fp8`).
    Fp8(Fp8Weights),
}

pub(super) struct DeviceLinear<T> {
    /// [n = out_features, k = in_features]
    pub(super) w: DeviceMatrix<T>,
    /// [n]
    pub(super) bias: Option<DeviceBuffer<T>>,
    pub(super) n: usize,
    pub(super) k: usize,
}

pub(super) struct DeviceLayer<T> {
    pub(super) attn_norm: DeviceNorm<T>,
    pub(super) mlp_norm: Option<DeviceNorm<T>>,
    /// [q_dim + 2 kv_dim, hidden]
    pub(super) qkv: DeviceLinear<T>,
    /// [hidden, q_dim]
    pub(super) attn_out: DeviceLinear<T>,
    /// [2 inter, hidden] (gated) or [inter, hidden]
    pub(super) gate_up: DeviceLinear<T>,
    /// [hidden, inter]
    pub(super) down: DeviceLinear<T>,
}

/// How the layer linears were uploaded, for the load log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct LinearFormats {
    /// Linears in FP8 E4M3 (per-channel scales).
    pub(super) fp8: usize,
    /// FP8 linears dequantized to the executor's dtype, each with why (block scales, a shape the
    /// FP8 products cannot take).
    pub(super) dequantized: Vec<String>,
    /// Linears in the executor's dtype from the start.
    pub(super) dense: usize,
}

impl LinearFormats {
    /// One line for the load log: which format the layer linears run in (embeddings, norms
    /// and the LM head always run in `dtype`).
    pub(super) fn describe(&self, dtype: &str) -> String {
        let mut s = format!(
            "weights: {} layer linears in FP8 E4M3 (per-channel scales; activations quantized \
             per token for m > {}, weight-only gemv below), {} in {dtype}",
            self.fp8,
            crate::cuda::gemm::fp8::FP8_GEMV_AUTO_MAX_M,
            self.dense + self.dequantized.len()
        );
        if let Some(first) = self.dequantized.first() {
            s.push_str(&format!(
                " ({} of them FP8 in the checkpoint, dequantized: {first}{})",
                self.dequantized.len(),
                if self.dequantized.len() > 1 {
                    ", ..."
                } else {
                    ""
                }
            ));
        }
        s.push_str(&format!("; embeddings, norms and the LM head in {dtype}"));
        s
    }
}

pub(super) struct DeviceWeights<T> {
    /// [vocab, hidden]; also the LM head when tied.
    pub(super) embedding: DeviceBuffer<T>,
    /// [num_positions, hidden]
    pub(super) position_embedding: Option<DeviceBuffer<T>>,
    pub(super) embedding_norm: Option<DeviceNorm<T>>,
    pub(super) final_norm: DeviceNorm<T>,
    /// [vocab, hidden]; None when tied to `embedding`.
    pub(super) lm_head: Option<DeviceBuffer<T>>,
    /// [vocab]
    pub(super) lm_head_bias: Option<DeviceBuffer<T>>,
    pub(super) layers: Vec<DeviceLayer<T>>,
    /// What the layer linears were uploaded as.
    pub(super) formats: LinearFormats,
}

/// One layer's paged cache.
pub(super) struct LayerKv<T> {
    /// [num_blocks, block_size, num_kv_heads, head_dim]
    pub(super) k: DeviceBuffer<T>,
    /// [num_blocks, block_size, num_kv_heads, head_dim]
    pub(super) v: DeviceBuffer<T>,
}

pub(super) fn upload_f32<T: FloatElem>(
    dev: &CudaDevice,
    v: &[f32],
) -> crate::Result<DeviceBuffer<T>> {
    let mut host = vec![T::from_f32(0.0); v.len()];
    // Converted in parallel chunks: a 7B model is 7e9 values.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = v.len().div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (out, src) in host.chunks_mut(chunk).zip(v.chunks(chunk)) {
            s.spawn(move || {
                for (o, &x) in out.iter_mut().zip(src) {
                    *o = T::from_f32(x);
                }
            });
        }
    });
    Ok(dev.upload(&host)?)
}

pub(super) fn upload_weight<T: FloatElem>(
    dev: &CudaDevice,
    w: &Weight,
    name: &str,
) -> crate::Result<DeviceBuffer<T>> {
    match w {
        Weight::F32 { data, .. } => upload_f32(dev, data),
        Weight::Q8(_) => {
            // Compact CPU weights: dequantize row by row (exact for the block formats).
            let (rows, cols) = (w.rows(), w.cols());
            let mut row = vec![0.0f32; cols];
            let mut host = Vec::with_capacity(rows * cols);
            for r in 0..rows {
                w.try_row_to_f32(r, &mut row)
                    .map_err(|e| device_err(format!("dequantizing {name} for the GPU: {e}")))?;
                host.extend(row.iter().map(|&x| T::from_f32(x)));
            }
            Ok(dev.upload(&host)?)
        }
    }
}

/// The per-output-channel scales an FP8 linear runs with on the GPU, or why it cannot run as
/// FP8 there: block scales (no per-channel form) or a shape the FP8 products do not take.
fn fp8_channel_scales(w: &Fp8Weight) -> Result<Vec<f32>, String> {
    let scales = match &w.scale {
        Fp8Scale::Tensor(s) => vec![*s; w.rows],
        Fp8Scale::Channel(s) => s.clone(),
        Fp8Scale::Block { block, .. } => {
            return Err(format!(
                "block scales {}x{} (no per-channel form)",
                block.0, block.1
            ));
        }
    };
    match fp8_supported(w.rows, w.cols) {
        true => Ok(scales),
        false => Err(format!(
            "shape [{}, {}] (FP8 products need multiples of 16)",
            w.rows, w.cols
        )),
    }
}

pub(super) fn upload_linear<T: FloatElem>(
    dev: &CudaDevice,
    w: Linear,
    bias: Option<&Vec<f32>>,
    name: &str,
    formats: &mut LinearFormats,
) -> crate::Result<DeviceLinear<T>> {
    let bias = bias.map(|b| upload_f32(dev, b)).transpose()?;
    let (n, k, w) = match w {
        Linear::Dense(d) => {
            formats.dense += 1;
            (
                d.rows(),
                d.cols(),
                DeviceMatrix::Dense(upload_weight(dev, &d, name)?),
            )
        }
        Linear::Fp8(f) => match fp8_channel_scales(&f) {
            Ok(scales) => {
                formats.fp8 += 1;
                let up = Fp8Weights::upload(dev, &f.codes, &scales, f.input_scale, f.rows, f.cols)?;
                (f.rows, f.cols, DeviceMatrix::Fp8(up))
            }
            Err(why) => {
                formats.dequantized.push(format!("{name}: {why}"));
                (
                    f.rows,
                    f.cols,
                    DeviceMatrix::Dense(upload_f32(dev, &f.dequantize())?),
                )
            }
        },
    };
    Ok(DeviceLinear { w, bias, n, k })
}

pub(super) fn upload_norm<T: FloatElem>(
    dev: &CudaDevice,
    n: &NormWeights,
) -> crate::Result<DeviceNorm<T>> {
    Ok(DeviceNorm {
        weight: upload_f32(dev, &n.weight)?,
        bias: n.bias.as_deref().map(|b| upload_f32(dev, b)).transpose()?,
    })
}

pub(super) fn upload_layer<T: FloatElem>(
    dev: &CudaDevice,
    l: LayerWeights<Linear>,
    idx: usize,
    formats: &mut LinearFormats,
) -> crate::Result<DeviceLayer<T>> {
    Ok(DeviceLayer {
        attn_norm: upload_norm(dev, &l.attn_norm)?,
        mlp_norm: l
            .mlp_norm
            .as_ref()
            .map(|n| upload_norm(dev, n))
            .transpose()?,
        qkv: upload_linear(
            dev,
            l.qkv,
            l.qkv_bias.as_ref(),
            &format!("layer {idx} qkv"),
            formats,
        )?,
        attn_out: upload_linear(
            dev,
            l.attn_out,
            l.attn_out_bias.as_ref(),
            &format!("layer {idx} attn_out"),
            formats,
        )?,
        gate_up: upload_linear(
            dev,
            l.gate_up,
            l.gate_up_bias.as_ref(),
            &format!("layer {idx} gate_up"),
            formats,
        )?,
        down: upload_linear(
            dev,
            l.down,
            l.down_bias.as_ref(),
            &format!("layer {idx} down"),
            formats,
        )?,
    })
}

impl<T: FloatElem> DeviceWeights<T> {
    /// Reads the weights one tensor at a time from `r` and uploads each, converted to `T`,
    /// before reading the next: the host holds at most one layer (or one global tensor) in f32
    /// at a time, never the whole model. `on_layer(i)` runs after layer i is on the device.
    pub(super) fn upload(
        dev: &CudaDevice,
        r: &WeightReader<'_>,
        on_layer: &mut dyn FnMut(usize),
    ) -> crate::Result<Self> {
        let embedding = upload_weight(dev, &r.embedding()?, "embedding")?;
        let position_embedding = match r.position_embedding()? {
            Some(p) => Some(upload_f32(dev, &p)?),
            None => None,
        };
        let embedding_norm = match r.embedding_norm()? {
            Some(n) => Some(upload_norm(dev, &n)?),
            None => None,
        };
        let final_norm = upload_norm(dev, &r.final_norm()?)?;
        let lm_head = match r.lm_head()? {
            Some(l) => Some(upload_weight(dev, &l, "lm_head")?),
            None => None,
        };
        let lm_head_bias = match r.lm_head_bias()? {
            Some(b) => Some(upload_f32(dev, &b)?),
            None => None,
        };
        let num_layers = r.num_layers();
        let mut layers = Vec::with_capacity(num_layers);
        let mut formats = LinearFormats::default();
        for i in 0..num_layers {
            layers.push(upload_layer(dev, r.stored_layer(i)?, i, &mut formats)?);
            on_layer(i);
        }
        Ok(DeviceWeights {
            embedding,
            position_embedding,
            embedding_norm,
            final_norm,
            lm_head,
            lm_head_bias,
            layers,
            formats,
        })
    }

    /// Device bytes of every weight.
    pub(super) fn size_in_bytes(&self) -> usize {
        let b = |x: &DeviceBuffer<T>| x.len() * std::mem::size_of::<T>();
        let ob = |x: &Option<DeviceBuffer<T>>| x.as_ref().map_or(0, b);
        let norm = |n: &DeviceNorm<T>| b(&n.weight) + ob(&n.bias);
        let linear = |l: &DeviceLinear<T>| {
            ob(&l.bias)
                + match &l.w {
                    DeviceMatrix::Dense(w) => b(w),
                    DeviceMatrix::Fp8(w) => w.num_bytes(),
                }
        };
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                norm(&l.attn_norm)
                    + l.mlp_norm.as_ref().map_or(0, norm)
                    + linear(&l.qkv)
                    + linear(&l.attn_out)
                    + linear(&l.gate_up)
                    + linear(&l.down)
            })
            .sum();
        b(&self.embedding)
            + ob(&self.position_embedding)
            + self.embedding_norm.as_ref().map_or(0, norm)
            + norm(&self.final_norm)
            + ob(&self.lm_head)
            + ob(&self.lm_head_bias)
            + layers
    }
}
