//! The CUDA executor's weights: uploaded once from the host `DecoderWeights`, converted to the
//! executor's dtype, and its per-layer paged KV cache.

use super::device_err;
use crate::cuda::{CudaDevice, DeviceBuffer, FloatElem};
use crate::model::weights::{LayerWeights, NormWeights, WeightReader};
use crate::ops::linear::Weight;

pub(super) struct DeviceNorm<T> {
    /// [dim]
    pub(super) weight: DeviceBuffer<T>,
    /// [dim]
    pub(super) bias: Option<DeviceBuffer<T>>,
}

pub(super) struct DeviceLinear<T> {
    /// [n = out_features, k = in_features]
    pub(super) w: DeviceBuffer<T>,
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

pub(super) fn upload_linear<T: FloatElem>(
    dev: &CudaDevice,
    w: &Weight,
    bias: Option<&Vec<f32>>,
    name: &str,
) -> crate::Result<DeviceLinear<T>> {
    Ok(DeviceLinear {
        w: upload_weight(dev, w, name)?,
        bias: bias.map(|b| upload_f32(dev, b)).transpose()?,
        n: w.rows(),
        k: w.cols(),
    })
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
    l: &LayerWeights,
    idx: usize,
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
            &l.qkv,
            l.qkv_bias.as_ref(),
            &format!("layer {idx} qkv"),
        )?,
        attn_out: upload_linear(
            dev,
            &l.attn_out,
            l.attn_out_bias.as_ref(),
            &format!("layer {idx} attn_out"),
        )?,
        gate_up: upload_linear(
            dev,
            &l.gate_up,
            l.gate_up_bias.as_ref(),
            &format!("layer {idx} gate_up"),
        )?,
        down: upload_linear(
            dev,
            &l.down,
            l.down_bias.as_ref(),
            &format!("layer {idx} down"),
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
        for i in 0..num_layers {
            layers.push(upload_layer(dev, &r.layer(i)?, i)?);
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
        })
    }

    /// Device bytes of every weight.
    pub(super) fn size_in_bytes(&self) -> usize {
        let b = |x: &DeviceBuffer<T>| x.len() * std::mem::size_of::<T>();
        let ob = |x: &Option<DeviceBuffer<T>>| x.as_ref().map_or(0, b);
        let norm = |n: &DeviceNorm<T>| b(&n.weight) + ob(&n.bias);
        let linear = |l: &DeviceLinear<T>| b(&l.w) + ob(&l.bias);
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
