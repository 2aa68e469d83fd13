//! `Loader`: reads the decoder's tensors from a `TensorSource`, each checked against the spec,
//! and builds the fused layouts (q | k | v, gate | up) the forward pass runs on.

use super::layout::{fused_qkv_source_rows, gather_rows};
use super::{LayerLinear, LayerWeights, Linear, NormWeights};
use crate::loader::{HostTensor, LoadError, Q8Tensor, Shard, TensorSource};
use crate::model::arch::{ArchInfo, GlobalTensor, LayerTensor};
use crate::model::spec::{DecoderSpec, Mlp, Norm, QkvLayout, Residual};
use crate::ops::linear::{Weight, WeightFormat};
use crate::ops::quant::{BlockQ8, QK};

pub(super) struct Loader<'a> {
    pub(super) src: &'a dyn TensorSource,
    pub(super) arch: &'a ArchInfo,
    pub(super) format: WeightFormat,
}

impl Loader<'_> {
    pub(super) fn spec(&self) -> &DecoderSpec {
        &self.arch.spec
    }

    pub(super) fn global(&self, t: GlobalTensor) -> Result<String, LoadError> {
        self.arch
            .names
            .global(t)
            .ok_or_else(|| self.bad(&format!("{t:?}"), "this architecture has no such tensor"))
    }

    pub(super) fn layer_name(&self, i: usize, t: LayerTensor) -> Result<String, LoadError> {
        self.arch.names.layer(i, t).ok_or_else(|| {
            self.bad(
                &format!("layer {i} {t:?}"),
                "this architecture has no such tensor",
            )
        })
    }

    pub(super) fn bad(&self, tensor: &str, reason: &str) -> LoadError {
        LoadError::BadTensor {
            path: self.src.describe().into(),
            tensor: tensor.to_string(),
            reason: reason.to_string(),
        }
    }

    pub(super) fn check_shape(&self, name: &str, expected: &[usize]) -> Result<(), LoadError> {
        let info = self
            .src
            .info(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.src.describe().into(),
                tensor: name.to_string(),
            })?;
        if info.shape != expected {
            return Err(LoadError::ShapeMismatch {
                path: self.src.describe().into(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                actual: info.shape,
            });
        }
        Ok(())
    }

    /// A 1-D tensor of `len` elements (also accepts a 2-D table flattened, for position embeddings).
    pub(super) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
        let info = self
            .src
            .info(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.src.describe().into(),
                tensor: name.to_string(),
            })?;
        let numel: usize = info.shape.iter().product();
        if numel != len {
            return Err(LoadError::ShapeMismatch {
                path: self.src.describe().into(),
                tensor: name.to_string(),
                expected: vec![len],
                actual: info.shape,
            });
        }
        Ok(self.src.get(name, Shard::Replicated)?.data)
    }

    pub(super) fn norm_global(
        &self,
        w: GlobalTensor,
        b: GlobalTensor,
    ) -> Result<NormWeights, LoadError> {
        let h = self.spec().hidden_size;
        let weight = self.vector(&self.global(w)?, h)?;
        let bias = match self.spec().norm {
            Norm::Layer { bias: true, .. } => Some(self.vector(&self.global(b)?, h)?),
            _ => None,
        };
        Ok(NormWeights { weight, bias })
    }

    pub(super) fn norm_layer(
        &self,
        i: usize,
        w: LayerTensor,
        b: LayerTensor,
    ) -> Result<NormWeights, LoadError> {
        let h = self.spec().hidden_size;
        let weight = self.vector(&self.layer_name(i, w)?, h)?;
        let bias = match self.spec().norm {
            Norm::Layer { bias: true, .. } => Some(self.vector(&self.layer_name(i, b)?, h)?),
            _ => None,
        };
        Ok(NormWeights { weight, bias })
    }

    /// Row-concatenation of 2-D tensors `names[j]: [rows[j], cols]` into one weight.
    pub(super) fn matrix(
        &self,
        names: &[String],
        rows: &[usize],
        cols: usize,
    ) -> Result<Weight, LoadError> {
        for (name, &r) in names.iter().zip(rows) {
            self.check_shape(name, &[r, cols])?;
        }
        let total_rows: usize = rows.iter().sum();
        let use_q8 = self.format == WeightFormat::Q8 && cols.is_multiple_of(QK);
        if use_q8 {
            let mut blocks: Vec<BlockQ8> = Vec::with_capacity(total_rows * cols / QK);
            for name in names {
                match self.src.get_q8(name, Shard::Replicated)? {
                    Some(q) => blocks.extend_from_slice(&q.blocks),
                    None => {
                        let t = self.src.get(name, Shard::Replicated)?;
                        let w = Weight::from_f32(t, WeightFormat::Q8)
                            .map_err(|e| self.bad(name, &e.to_string()))?;
                        match w {
                            Weight::Q8(q) => blocks.extend_from_slice(&q.blocks),
                            Weight::F32 { .. } => {
                                return Err(self.bad(name, "could not be converted to q8"));
                            }
                        }
                    }
                }
            }
            return Ok(Weight::from_q8(Q8Tensor {
                rows: total_rows,
                cols,
                blocks,
            }));
        }
        let mut data = Vec::with_capacity(total_rows * cols);
        for name in names {
            data.extend_from_slice(&self.src.get(name, Shard::Replicated)?.data);
        }
        Weight::from_f32(
            HostTensor {
                shape: vec![total_rows, cols],
                data,
            },
            WeightFormat::F32,
        )
        .map_err(|e| self.bad(&names.join("+"), &e.to_string()))
    }

    /// A linear weight `[rows, cols]` (out, in), transposed at load when the checkpoint stores
    /// it `[cols, rows]`.
    pub(super) fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<Linear, LoadError> {
        if self.arch.names.transposed_linears() {
            let data = self.read_transposed(name, rows, cols)?;
            return self
                .weight_from_f32(name, rows, cols, data)
                .map(Linear::Dense);
        }
        self.linear_rows(&[name.to_string()], &[rows], cols)
    }

    /// Reads `name: [cols, rows]` and returns it transposed: `[rows, cols]`.
    pub(super) fn read_transposed(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<f32>, LoadError> {
        if self.src.info(name).is_some_and(|i| i.dtype.is_fp8()) {
            return Err(self.bad(
                name,
                "FP8 weights of linears stored [in, out] (Conv1D) are not supported",
            ));
        }
        self.check_shape(name, &[cols, rows])?;
        // t: [cols, rows]
        let t = self.src.get(name, Shard::Replicated)?.data;
        let mut out = vec![0.0f32; rows * cols];
        for (c, src_row) in t.chunks_exact(rows).enumerate() {
            for (r, &v) in src_row.iter().enumerate() {
                out[r * cols + c] = v;
            }
        }
        Ok(out)
    }

    pub(super) fn weight_from_f32(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    ) -> Result<Weight, LoadError> {
        Weight::from_f32(
            HostTensor {
                shape: vec![rows, cols],
                data,
            },
            self.format,
        )
        .map_err(|e| self.bad(name, &e.to_string()))
    }

    /// `w` in the reader's format (FP8 dequantized exactly); `name` labels errors.
    pub(super) fn to_format(&self, name: &str, w: Linear) -> Result<Weight, LoadError> {
        w.into_weight(self.format).map_err(|e| self.bad(name, &e))
    }

    /// The row order of layer `i`'s fused qkv tensor (None: separate tensors, or already q | k | v).
    pub(super) fn qkv_order(&self) -> Option<Vec<usize>> {
        let spec = self.spec();
        match spec.qkv {
            QkvLayout::Separate => None,
            QkvLayout::Fused { layout } => {
                fused_qkv_source_rows(layout, spec.num_heads, spec.num_kv_heads, spec.head_dim)
            }
        }
    }

    /// q | k | v weight `[q_dim + 2 * kv_dim, hidden]`, from separate or fused tensors.
    pub(super) fn qkv(&self, i: usize) -> Result<Linear, LoadError> {
        use LayerTensor::*;
        let spec = self.spec();
        let (h, q, kv) = (spec.hidden_size, spec.q_dim(), spec.kv_dim());
        let transposed = self.arch.names.transposed_linears();
        if spec.qkv == QkvLayout::Separate {
            let names = [
                self.layer_name(i, Q)?,
                self.layer_name(i, K)?,
                self.layer_name(i, V)?,
            ];
            if transposed {
                let mut data = Vec::with_capacity((q + 2 * kv) * h);
                for (name, rows) in names.iter().zip([q, kv, kv]) {
                    data.extend(self.read_transposed(name, rows, h)?);
                }
                return self
                    .weight_from_f32(&names.join("+"), q + 2 * kv, h, data)
                    .map(Linear::Dense);
            }
            return self.linear_rows(&names, &[q, kv, kv], h);
        }
        let total = q + 2 * kv;
        let name = self.layer_name(i, Qkv)?;
        let order = self.qkv_order();
        if transposed {
            let data = self.read_transposed(&name, total, h)?;
            let data = match &order {
                Some(rows) => gather_rows(&data, h, rows),
                None => data,
            };
            return self
                .weight_from_f32(&name, total, h, data)
                .map(Linear::Dense);
        }
        let Some(order) = order else {
            // Already q | k | v: keeps quantized GGUF tensors compact.
            return self.linear_rows(std::slice::from_ref(&name), &[total], h);
        };
        if let Some(w) = self.fp8_part(&name, total, h)? {
            // Scales follow their rows; block tiles cannot be re-ordered: dequantize those.
            return match w.gather_rows(&order) {
                Some(g) => Ok(Linear::Fp8(g)),
                None => self
                    .weight_from_f32(&name, total, h, gather_rows(&w.dequantize(), h, &order))
                    .map(Linear::Dense),
            };
        }
        self.check_shape(&name, &[total, h])?;
        let data = self.src.get(&name, Shard::Replicated)?.data;
        self.weight_from_f32(&name, total, h, gather_rows(&data, h, &order))
            .map(Linear::Dense)
    }

    /// q | k | v bias `[q_dim + 2 * kv_dim]`, None without qkv biases.
    pub(super) fn qkv_bias(&self, i: usize) -> Result<Option<Vec<f32>>, LoadError> {
        use LayerTensor::*;
        let spec = self.spec();
        let (q, kv) = (spec.q_dim(), spec.kv_dim());
        if spec.qkv == QkvLayout::Separate {
            return self.opt_bias(spec.biases.qkv, &[(q, QBias), (kv, KBias), (kv, VBias)], i);
        }
        if !spec.biases.qkv {
            return Ok(None);
        }
        let b = self.vector(&self.layer_name(i, QkvBias)?, q + 2 * kv)?;
        Ok(Some(match self.qkv_order() {
            Some(rows) => gather_rows(&b, 1, &rows),
            None => b,
        }))
    }

    pub(super) fn opt_bias(
        &self,
        present: bool,
        parts: &[(usize, LayerTensor)],
        i: usize,
    ) -> Result<Option<Vec<f32>>, LoadError> {
        if !present {
            return Ok(None);
        }
        let mut out = vec![];
        for &(len, t) in parts {
            out.extend(self.vector(&self.layer_name(i, t)?, len)?);
        }
        Ok(Some(out))
    }

    /// Linear `which` of layer `i`: as stored, or quantized to FP8 when the checkpoint is
    /// quantized at load (`Quantization::Fp8Online`).
    pub(super) fn layer_linear(&self, i: usize, which: LayerLinear) -> Result<Linear, LoadError> {
        self.stored_linear(i, which)
            .map(|w| self.quantize_online(w))
    }

    /// Linear `which` of layer `i` as the checkpoint stores it.
    fn stored_linear(&self, i: usize, which: LayerLinear) -> Result<Linear, LoadError> {
        use LayerTensor::*;
        let spec = self.spec();
        let (h, q, inter) = (spec.hidden_size, spec.q_dim(), spec.intermediate_size);
        let name = |t| self.layer_name(i, t);
        match which {
            LayerLinear::Qkv => self.qkv(i),
            LayerLinear::AttnOut => self.linear(&name(AttnOut)?, h, q),
            LayerLinear::GateUp => match spec.mlp {
                Mlp::Gated if self.arch.names.transposed_linears() => {
                    let (gate, up) = (name(Gate)?, name(Up)?);
                    let mut data = self.read_transposed(&gate, inter, h)?;
                    data.extend(self.read_transposed(&up, inter, h)?);
                    self.weight_from_f32(&format!("{gate}+{up}"), 2 * inter, h, data)
                        .map(Linear::Dense)
                }
                Mlp::Gated => self.linear_rows(&[name(Gate)?, name(Up)?], &[inter, inter], h),
                Mlp::Plain => self.linear(&name(Up)?, inter, h),
            },
            LayerLinear::Down => self.linear(&name(Down)?, h, inter),
        }
    }

    pub(super) fn layer(&self, i: usize) -> Result<LayerWeights, LoadError> {
        self.stored_layer(i)?
            .try_map_linears(|which, w| self.to_format(&format!("layer {i} {which:?}"), w))
    }

    /// Layer `i` with its linears as stored (`layer_linear`: FP8 kept as codes and scales).
    pub(super) fn stored_layer(&self, i: usize) -> Result<LayerWeights<Linear>, LoadError> {
        use LayerTensor::*;
        let spec = self.spec();
        let (h, inter) = (spec.hidden_size, spec.intermediate_size);
        let attn_norm = self.norm_layer(i, AttnNorm, AttnNormBias)?;
        let mlp_norm = match spec.residual {
            Residual::Parallel { shared_norm: true } => None,
            _ => Some(self.norm_layer(i, MlpNorm, MlpNormBias)?),
        };
        let weight = |which: LayerLinear| self.layer_linear(i, which);
        let qkv = weight(LayerLinear::Qkv)?;
        let qkv_bias = self.qkv_bias(i)?;
        let attn_out = weight(LayerLinear::AttnOut)?;
        let attn_out_bias = self.opt_bias(spec.biases.attn_out, &[(h, AttnOutBias)], i)?;
        let gate_up = weight(LayerLinear::GateUp)?;
        let gate_up_bias = match spec.mlp {
            Mlp::Gated => {
                self.opt_bias(spec.biases.mlp, &[(inter, GateBias), (inter, UpBias)], i)?
            }
            Mlp::Plain => self.opt_bias(spec.biases.mlp, &[(inter, UpBias)], i)?,
        };
        let down = weight(LayerLinear::Down)?;
        let down_bias = self.opt_bias(spec.biases.mlp, &[(h, DownBias)], i)?;
        Ok(LayerWeights {
            attn_norm,
            mlp_norm,
            qkv,
            qkv_bias,
            attn_out,
            attn_out_bias,
            gate_up,
            gate_up_bias,
            down,
            down_bias,
            kv_scales: self.kv_scales(i)?,
        })
    }
}
