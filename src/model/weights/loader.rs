//! `Loader`: reads the decoder's tensors from a `TensorSource`, each checked against the spec,
//! and builds the fused layouts (q | k | v, gate | up) the forward pass runs on.

use super::layout::{fused_qkv_source_rows, gather_rows};
use super::pieces::{Cut, Piece, transpose};
use super::{LayerLinear, LayerWeights, Linear, NormWeights};
use crate::loader::{HostTensor, LoadError, Q8Tensor, Shard, TensorSource};
use crate::model::arch::{ArchInfo, GlobalTensor, LayerTensor};
use crate::model::quant::Quantization;
use crate::model::spec::{DecoderSpec, Mlp, Norm, QkvLayout, Residual};
use crate::model::tp::RankLayout;
use crate::ops::fp8::Fp8Weight;
use crate::ops::linear::{Weight, WeightFormat};
use crate::ops::quant::{BlockQ8, QK};

pub(super) struct Loader<'a> {
    pub(super) src: &'a dyn TensorSource,
    pub(super) arch: &'a ArchInfo,
    pub(super) format: WeightFormat,
    /// What this rank reads (everything for one rank).
    pub(super) rank: RankLayout,
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

    /// This rank's `cut` of the 1-D tensor `name` of `len` elements (`Cut::Rows` only slices).
    pub(super) fn vector_cut(
        &self,
        name: &str,
        len: usize,
        cut: &Cut,
    ) -> Result<Vec<f32>, LoadError> {
        let Cut::Rows(runs) = cut else {
            return self.vector(name, len);
        };
        self.check_shape(name, &[len])?;
        let mut out = vec![];
        for r in runs {
            let shard = Shard::OutRange {
                start: r.start,
                len: r.len(),
            };
            out.extend(self.src.get(name, shard)?.data);
        }
        Ok(out)
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

    /// Row-concatenation of the reads `pieces` (2-D tensors, each sliced by its shard, all of
    /// the same local width) into one weight.
    pub(super) fn matrix(&self, pieces: &[Piece]) -> Result<Weight, LoadError> {
        let Some(first) = pieces.first() else {
            return Err(self.bad("(none)", "a matrix of no tensors"));
        };
        let cols = first.local_cols();
        for p in pieces {
            self.check_shape(&p.name, &[p.rows, p.cols])?;
            if p.local_cols() != cols {
                return Err(self.bad(&p.name, "parts of one matrix differ in width"));
            }
        }
        let label = || {
            let mut names: Vec<&str> = pieces.iter().map(|p| p.name.as_str()).collect();
            names.dedup();
            names.join("+")
        };
        let total_rows: usize = pieces.iter().map(Piece::local_rows).sum();
        if self.format == WeightFormat::Q8
            && first.cols.is_multiple_of(QK)
            && !cols.is_multiple_of(QK)
        {
            return Err(self.bad(
                &label(),
                &format!(
                    "tensor_parallel_size = {} leaves {cols} of its {} input columns on each \
                     rank, not a multiple of the q8 block ({QK}): a row-parallel split must fall \
                     on a block boundary (use weight_format f32, or a tensor_parallel_size that \
                     splits it into whole blocks)",
                    self.rank.tp.world_size, first.cols
                ),
            ));
        }
        let use_q8 = self.format == WeightFormat::Q8 && cols.is_multiple_of(QK);
        if use_q8 {
            let mut blocks: Vec<BlockQ8> = Vec::with_capacity(total_rows * cols / QK);
            for p in pieces {
                match self.src.get_q8(&p.name, p.shard)? {
                    Some(q) => blocks.extend_from_slice(&q.blocks),
                    None => {
                        let t = self.src.get(&p.name, p.shard)?;
                        let w = Weight::from_f32(t, WeightFormat::Q8)
                            .map_err(|e| self.bad(&p.name, &e.to_string()))?;
                        match w {
                            Weight::Q8(q) => blocks.extend_from_slice(&q.blocks),
                            Weight::F32 { .. } => {
                                return Err(self.bad(&p.name, "could not be converted to q8"));
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
        for p in pieces {
            data.extend_from_slice(&self.src.get(&p.name, p.shard)?.data);
        }
        Weight::from_f32(
            HostTensor {
                shape: vec![total_rows, cols],
                data,
            },
            WeightFormat::F32,
        )
        .map_err(|e| self.bad(&label(), &e.to_string()))
    }

    /// This rank's `cut` of the linear weight `[rows, cols]` (out, in), transposed at load when
    /// the checkpoint stores it `[cols, rows]`.
    pub(super) fn linear(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        cut: &Cut,
    ) -> Result<Linear, LoadError> {
        if self.arch.names.transposed_linears() {
            let data = self.read_transposed(name, rows, cols, cut)?;
            let p = Piece::of(name, rows, cols, cut);
            let local_rows = p.iter().map(Piece::local_rows).sum();
            let local_cols = p.first().map_or(cols, Piece::local_cols);
            return self
                .weight_from_f32(name, local_rows, local_cols, data)
                .map(Linear::Dense);
        }
        self.linear_rows(&Piece::of(name, rows, cols, cut))
    }

    /// This rank's `cut` of the linear `name` stored `[cols, rows]` (in, out), transposed:
    /// `[local rows, local cols]`.
    pub(super) fn read_transposed(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        cut: &Cut,
    ) -> Result<Vec<f32>, LoadError> {
        if self.src.info(name).is_some_and(|i| i.dtype.is_fp8()) {
            return Err(self.bad(
                name,
                "FP8 weights of linears stored [in, out] (Conv1D) are not supported",
            ));
        }
        self.check_shape(name, &[cols, rows])?;
        Ok(match cut {
            // t: [cols, rows]
            Cut::Whole => transpose(&self.src.get(name, Shard::Replicated)?.data, cols, rows),
            Cut::Rows(runs) => {
                let mut out = Vec::new();
                for r in runs {
                    let shard = Shard::InRange {
                        start: r.start,
                        len: r.len(),
                    };
                    // t: [cols, run]
                    out.extend(transpose(&self.src.get(name, shard)?.data, cols, r.len()));
                }
                out
            }
            Cut::Cols(r) => {
                let shard = Shard::OutRange {
                    start: r.start,
                    len: r.len(),
                };
                // t: [local cols, rows]
                transpose(&self.src.get(name, shard)?.data, r.len(), rows)
            }
        })
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

    /// This rank's query-head rows, KV-head rows and MLP columns (cuts of the full layers).
    pub(super) fn head_cuts(&self) -> (Cut, Cut, Cut) {
        let (spec, r) = (self.spec(), &self.rank);
        let d = spec.head_dim;
        (
            Cut::rows(
                r.head_start * d..(r.head_start + r.num_heads) * d,
                spec.q_dim(),
            ),
            Cut::rows(
                r.kv_head_start * d..(r.kv_head_start + r.num_kv_heads) * d,
                spec.kv_dim(),
            ),
            Cut::rows(
                r.inter_start..r.inter_start + r.intermediate_size,
                spec.intermediate_size,
            ),
        )
    }

    /// The rows of a fused qkv tensor this rank reads, in its q | k | v order.
    fn fused_qkv_cut(&self) -> Cut {
        let spec = self.spec();
        let dst = self.rank.qkv_rows(spec);
        let src: Vec<usize> = match self.qkv_order() {
            Some(order) => dst.iter().map(|&r| order[r]).collect(),
            None => dst,
        };
        Cut::row_list(&src, spec.q_dim() + 2 * spec.kv_dim())
    }

    /// q | k | v weight `[q_dim + 2 * kv_dim, hidden]` (this rank's heads), from separate or
    /// fused tensors.
    pub(super) fn qkv(&self, i: usize) -> Result<Linear, LoadError> {
        use LayerTensor::*;
        let spec = self.spec();
        let (h, q, kv) = (spec.hidden_size, spec.q_dim(), spec.kv_dim());
        let transposed = self.arch.names.transposed_linears();
        let (q_cut, kv_cut, _) = self.head_cuts();
        if spec.qkv == QkvLayout::Separate {
            let names = [
                self.layer_name(i, Q)?,
                self.layer_name(i, K)?,
                self.layer_name(i, V)?,
            ];
            let parts = [(q, &q_cut), (kv, &kv_cut), (kv, &kv_cut)];
            if transposed {
                let mut data = Vec::new();
                for (name, (rows, cut)) in names.iter().zip(parts) {
                    data.extend(self.read_transposed(name, rows, h, cut)?);
                }
                let rows = data.len() / h;
                return self
                    .weight_from_f32(&names.join("+"), rows, h, data)
                    .map(Linear::Dense);
            }
            let pieces: Vec<Piece> = names
                .iter()
                .zip(parts)
                .flat_map(|(name, (rows, cut))| Piece::of(name, rows, h, cut))
                .collect();
            return self.linear_rows(&pieces);
        }
        let total = q + 2 * kv;
        let name = self.layer_name(i, Qkv)?;
        if !self.rank.is_single() {
            // This rank's heads, read as runs of the fused tensor's rows in q | k | v order.
            return self.linear(&name, total, h, &self.fused_qkv_cut());
        }
        let order = self.qkv_order();
        if transposed {
            let data = self.read_transposed(&name, total, h, &Cut::Whole)?;
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
            return self.linear(&name, total, h, &Cut::Whole);
        };
        if let Some(w) = self.fp8_part(&Piece::of(&name, total, h, &Cut::Whole)[0])? {
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

    /// q | k | v bias `[q_dim + 2 * kv_dim]` (this rank's heads), None without qkv biases.
    pub(super) fn qkv_bias(&self, i: usize) -> Result<Option<Vec<f32>>, LoadError> {
        use LayerTensor::*;
        let spec = self.spec();
        let (q, kv) = (spec.q_dim(), spec.kv_dim());
        let (q_cut, kv_cut, _) = self.head_cuts();
        if spec.qkv == QkvLayout::Separate {
            return self.opt_bias(
                spec.biases.qkv,
                &[
                    (q, QBias, &q_cut),
                    (kv, KBias, &kv_cut),
                    (kv, VBias, &kv_cut),
                ],
                i,
            );
        }
        if !spec.biases.qkv {
            return Ok(None);
        }
        let name = self.layer_name(i, QkvBias)?;
        if !self.rank.is_single() {
            return self
                .vector_cut(&name, q + 2 * kv, &self.fused_qkv_cut())
                .map(Some);
        }
        let b = self.vector(&name, q + 2 * kv)?;
        Ok(Some(match self.qkv_order() {
            Some(rows) => gather_rows(&b, 1, &rows),
            None => b,
        }))
    }

    /// The concatenation of this rank's cuts of the bias vectors `parts`, if `present`.
    pub(super) fn opt_bias(
        &self,
        present: bool,
        parts: &[(usize, LayerTensor, &Cut)],
        i: usize,
    ) -> Result<Option<Vec<f32>>, LoadError> {
        if !present {
            return Ok(None);
        }
        let mut out = vec![];
        for &(len, t, cut) in parts {
            out.extend(self.vector_cut(&self.layer_name(i, t)?, len, cut)?);
        }
        Ok(Some(out))
    }

    /// The bias of a row-parallel linear (`[hidden]`, if `present`): whole on rank 0, None on
    /// the others, so that the all-reduce of the partial products adds it once.
    fn row_parallel_bias(
        &self,
        present: bool,
        t: LayerTensor,
        i: usize,
    ) -> Result<Option<Vec<f32>>, LoadError> {
        let h = self.spec().hidden_size;
        match self.rank.tp.rank {
            0 => self.opt_bias(present, &[(h, t, &Cut::Whole)], i),
            _ => Ok(None),
        }
    }

    /// Linear `which` of layer `i`: as stored, or quantized to FP8 when the checkpoint is
    /// quantized at load (`Quantization::Fp8Online`).
    pub(super) fn layer_linear(&self, i: usize, which: LayerLinear) -> Result<Linear, LoadError> {
        let row_parallel = matches!(which, LayerLinear::AttnOut | LayerLinear::Down);
        if row_parallel
            && !self.rank.is_single()
            && matches!(self.arch.quant, Quantization::Fp8Online)
        {
            return self.online_fp8_columns(i, which);
        }
        self.stored_linear(i, which)
            .map(|w| self.quantize_online(w))
    }

    /// A row-parallel linear quantized to FP8 at load with one rank's per-row scales: each
    /// row's scale comes from its maximum over all its columns, so the rank's columns are
    /// exactly those of the one-rank weight and N ranks compute what one does. This reads the
    /// whole tensor (only in this mode: the scales need every column).
    fn online_fp8_columns(&self, i: usize, which: LayerLinear) -> Result<Linear, LoadError> {
        let whole = Loader {
            src: self.src,
            arch: self.arch,
            format: self.format,
            rank: RankLayout::single(self.spec()),
        };
        let Linear::Fp8(w) = whole.quantize_online(whole.stored_linear(i, which)?) else {
            return Err(self.bad(&format!("layer {i} {which:?}"), "was not quantized to FP8"));
        };
        let (spec, r) = (self.spec(), &self.rank);
        let (start, len) = match which {
            LayerLinear::AttnOut => (r.head_start * spec.head_dim, r.num_heads * spec.head_dim),
            _ => (r.inter_start, r.intermediate_size),
        };
        let codes = w
            .codes
            .chunks(w.cols.max(1))
            .flat_map(|row| row[start..start + len].iter().copied())
            .collect();
        Ok(Linear::Fp8(Fp8Weight {
            rows: w.rows,
            cols: len,
            codes,
            scale: w.scale,
            input_scale: w.input_scale,
        }))
    }

    /// This rank's part of linear `which` of layer `i` as the checkpoint stores it: q | k | v
    /// and gate | up column-parallel (its heads, its MLP columns), the attention output and
    /// down row-parallel (the same heads' and columns' inputs).
    fn stored_linear(&self, i: usize, which: LayerLinear) -> Result<Linear, LoadError> {
        use LayerTensor::*;
        let spec = self.spec();
        let (h, q, inter) = (spec.hidden_size, spec.q_dim(), spec.intermediate_size);
        let name = |t| self.layer_name(i, t);
        let (q_cut, _, inter_cut) = self.head_cuts();
        let in_cut = |c: Cut, total| match c {
            Cut::Rows(r) => Cut::cols(r[0].clone(), total),
            other => other,
        };
        match which {
            LayerLinear::Qkv => self.qkv(i),
            LayerLinear::AttnOut => self.linear(&name(AttnOut)?, h, q, &in_cut(q_cut, q)),
            LayerLinear::GateUp => match spec.mlp {
                Mlp::Gated if self.arch.names.transposed_linears() => {
                    let (gate, up) = (name(Gate)?, name(Up)?);
                    let mut data = self.read_transposed(&gate, inter, h, &inter_cut)?;
                    data.extend(self.read_transposed(&up, inter, h, &inter_cut)?);
                    let rows = data.len() / h;
                    self.weight_from_f32(&format!("{gate}+{up}"), rows, h, data)
                        .map(Linear::Dense)
                }
                Mlp::Gated => {
                    let mut pieces = Piece::of(&name(Gate)?, inter, h, &inter_cut);
                    pieces.extend(Piece::of(&name(Up)?, inter, h, &inter_cut));
                    self.linear_rows(&pieces)
                }
                Mlp::Plain => self.linear(&name(Up)?, inter, h, &inter_cut),
            },
            LayerLinear::Down => self.linear(&name(Down)?, h, inter, &in_cut(inter_cut, inter)),
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
        let inter = spec.intermediate_size;
        let attn_norm = self.norm_layer(i, AttnNorm, AttnNormBias)?;
        let mlp_norm = match spec.residual {
            Residual::Parallel { shared_norm: true } => None,
            _ => Some(self.norm_layer(i, MlpNorm, MlpNormBias)?),
        };
        let weight = |which: LayerLinear| self.layer_linear(i, which);
        let (_, _, inter_cut) = self.head_cuts();
        let qkv = weight(LayerLinear::Qkv)?;
        let qkv_bias = self.qkv_bias(i)?;
        let attn_out = weight(LayerLinear::AttnOut)?;
        let attn_out_bias = self.row_parallel_bias(spec.biases.attn_out, AttnOutBias, i)?;
        let gate_up = weight(LayerLinear::GateUp)?;
        let gate_up_bias = match spec.mlp {
            Mlp::Gated => self.opt_bias(
                spec.biases.mlp,
                &[(inter, GateBias, &inter_cut), (inter, UpBias, &inter_cut)],
                i,
            )?,
            Mlp::Plain => self.opt_bias(spec.biases.mlp, &[(inter, UpBias, &inter_cut)], i)?,
        };
        let down = weight(LayerLinear::Down)?;
        let down_bias = self.row_parallel_bias(spec.biases.mlp, DownBias, i)?;
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
