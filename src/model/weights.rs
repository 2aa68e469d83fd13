//! The weights of the generic decoder, loaded from any `TensorSource`.
//!
//! Layout choices made at load (so the forward pass does fewer, larger matrix products):
//! - q, k and v are concatenated into one `[q_dim + 2 * kv_dim, hidden]` matrix (`qkv`);
//! - gated MLPs concatenate gate and up into one `[2 * intermediate, hidden]` matrix (`gate_up`).
//!
//! Checkpoint layouts are undone here, once: fused qkv tensors are re-ordered into q | k | v rows
//! (`fused_qkv_source_rows`), and `[in, out]` linears (GPT-2's Conv1D) are transposed.
//!
//! Each part is read with its own `Shard`, so tensor parallelism slices heads consistently.
//! Every tensor's shape is checked against the spec before it is read.
//!
//! FP8 checkpoints (`model::quant`): a linear stored in `F8_E4M3` is read with its scales into an
//! `Fp8Weight` (`WeightReader::layer_linear` hands it on as it is, for an FP8 GEMM); fused layers
//! keep each shard's scale on its own rows (per-tensor shard scales become per-channel rows).
//! `layer` dequantizes exactly to f32 and then converts to the reader's `WeightFormat`, so the
//! CPU engine runs an FP8 checkpoint as its dequantized twin.

use crate::loader::{HostTensor, LoadError, Q8Tensor, Shard, SourceDType, TensorSource};
use crate::model::arch::{ArchInfo, GlobalTensor, LayerTensor};
use crate::model::quant::{Activations, Fp8Scheme, Quantization, WeightScales};
use crate::model::spec::{DecoderSpec, FusedQkv, Mlp, Norm, PosEmbedding, QkvLayout, Residual};
use crate::ops::fp8::{Fp8Scale, Fp8Weight};
use crate::ops::linear::{Weight, WeightFormat};
use crate::ops::quant::{BlockQ8, QK};

/// A linear weight as read: dense (in the reader's `WeightFormat`) or FP8 as the checkpoint
/// stores it.
#[derive(Debug, Clone)]
pub enum Linear {
    /// f32 or 8-bit blocks, ready for the CPU engine.
    Dense(Weight),
    /// E4M3 codes with their scales (an FP8 checkpoint's quantized linear).
    Fp8(Fp8Weight),
}

impl Linear {
    /// The weight in `format`: FP8 is dequantized exactly to f32 first.
    pub fn into_weight(self, format: WeightFormat) -> Result<Weight, String> {
        match self {
            Linear::Dense(w) => Ok(w),
            Linear::Fp8(w) => Weight::from_f32(
                HostTensor {
                    shape: vec![w.rows, w.cols],
                    data: w.dequantize(),
                },
                format,
            )
            .map_err(|e| e.to_string()),
        }
    }
}

/// The four linears of a decoder layer, in the decoder's fused layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerLinear {
    /// q | k | v: `[q_dim + 2 * kv_dim, hidden]`.
    Qkv,
    /// Attention output: `[hidden, q_dim]`.
    AttnOut,
    /// gate | up (gated MLP) or up: `[2 * intermediate or intermediate, hidden]`.
    GateUp,
    /// Down: `[hidden, intermediate]`.
    Down,
}

/// The per-tensor scales of a layer's keys and values in an FP8 KV cache (`k = e4m3 * k`):
/// ModelOpt `k_proj.k_scale`, `self_attn.k_scale`, compressed-tensors `k_proj.output_scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvScales {
    /// Key scale.
    pub k: f32,
    /// Value scale.
    pub v: f32,
}

/// The weight and optional bias of one norm, f32 on the host.
pub struct NormWeights {
    /// [hidden]
    pub weight: Vec<f32>,
    /// [hidden]
    pub bias: Option<Vec<f32>>,
}

/// Every weight of one decoder layer, in the decoder's layout (fused qkv and gate_up, `[out, in]`).
pub struct LayerWeights {
    /// The norm before attention (also before the MLP when the spec shares it).
    pub attn_norm: NormWeights,
    /// None when the spec shares one norm between attention and MLP.
    pub mlp_norm: Option<NormWeights>,
    /// [q_dim + 2 * kv_dim, hidden]
    pub qkv: Weight,
    /// [q_dim + 2 * kv_dim], q | k | v like the rows of `qkv`; None without qkv biases.
    pub qkv_bias: Option<Vec<f32>>,
    /// [hidden, q_dim]
    pub attn_out: Weight,
    /// [hidden]; None without an output-projection bias.
    pub attn_out_bias: Option<Vec<f32>>,
    /// Gated: [2 * intermediate, hidden] (gate rows, then up rows). Plain: [intermediate, hidden].
    pub gate_up: Weight,
    /// Same row order as `gate_up`; None without MLP biases.
    pub gate_up_bias: Option<Vec<f32>>,
    /// [hidden, intermediate]
    pub down: Weight,
    /// [hidden]; None without MLP biases.
    pub down_bias: Option<Vec<f32>>,
    /// The checkpoint's FP8 KV-cache scales; None when it has none (the CPU engine ignores them).
    pub kv_scales: Option<KvScales>,
}

/// Every weight of a model as the CPU engine keeps them: the layers plus the embedding, position
/// table, norms and LM head. Built by `DecoderWeights::load`.
pub struct DecoderWeights {
    /// [vocab, hidden]; also the LM head when embeddings are tied.
    pub embedding: Weight,
    /// [num_positions, hidden]
    pub position_embedding: Option<Vec<f32>>,
    /// The norm applied to the embeddings before layer 0 (BLOOM); None for other models.
    pub embedding_norm: Option<NormWeights>,
    /// The norm after the last layer.
    pub final_norm: NormWeights,
    /// [vocab, hidden]; None when tied to `embedding`.
    pub lm_head: Option<Weight>,
    /// [vocab]; None without an LM head bias.
    pub lm_head_bias: Option<Vec<f32>>,
    /// One entry per decoder layer, in order.
    pub layers: Vec<LayerWeights>,
}

impl DecoderWeights {
    /// The LM head: `lm_head`, or the embedding table when the embeddings are tied.
    pub fn lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embedding)
    }

    /// Bytes of weight data held (matrices in their format, vectors as f32).
    pub fn size_in_bytes(&self) -> usize {
        let v = |o: &Option<Vec<f32>>| o.as_ref().map_or(0, |v| v.len() * 4);
        let n = |o: &NormWeights| o.weight.len() * 4 + v(&o.bias);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                n(&l.attn_norm)
                    + l.mlp_norm.as_ref().map_or(0, n)
                    + l.qkv.size_in_bytes()
                    + v(&l.qkv_bias)
                    + l.attn_out.size_in_bytes()
                    + v(&l.attn_out_bias)
                    + l.gate_up.size_in_bytes()
                    + v(&l.gate_up_bias)
                    + l.down.size_in_bytes()
                    + v(&l.down_bias)
            })
            .sum();
        self.embedding.size_in_bytes()
            + v(&self.position_embedding)
            + self.embedding_norm.as_ref().map_or(0, n)
            + n(&self.final_norm)
            + self.lm_head.as_ref().map_or(0, Weight::size_in_bytes)
            + v(&self.lm_head_bias)
            + layers
    }

    /// Reads every weight of `arch` from `src`. `on_layer(i)` is called after each layer (progress).
    pub fn load(
        src: &dyn TensorSource,
        arch: &ArchInfo,
        format: WeightFormat,
        mut on_layer: impl FnMut(usize),
    ) -> Result<DecoderWeights, LoadError> {
        let r = WeightReader::new(src, arch, format);
        let embedding = r.embedding()?;
        let position_embedding = r.position_embedding()?;
        let embedding_norm = r.embedding_norm()?;
        let final_norm = r.final_norm()?;
        let lm_head = r.lm_head()?;
        let lm_head_bias = r.lm_head_bias()?;
        let mut layers = Vec::with_capacity(arch.spec.num_layers);
        for i in 0..arch.spec.num_layers {
            layers.push(r.layer(i)?);
            on_layer(i);
        }
        Ok(DecoderWeights {
            embedding,
            position_embedding,
            embedding_norm,
            final_norm,
            lm_head,
            lm_head_bias,
            layers,
        })
    }
}

/// Reads the decoder's weights one piece at a time, each checked against the spec, so that a
/// consumer that converts and drops each piece (the GPU upload) never holds more than one
/// tensor (or one layer) on the host. `DecoderWeights::load` reads them all.
pub struct WeightReader<'a> {
    l: Loader<'a>,
}

impl<'a> WeightReader<'a> {
    /// A reader of `arch`'s weights from `src`, converting matrices to `format` (f32 or compact
    /// 8-bit blocks) as they are read.
    pub fn new(src: &'a dyn TensorSource, arch: &'a ArchInfo, format: WeightFormat) -> Self {
        WeightReader {
            l: Loader { src, arch, format },
        }
    }

    /// [vocab, hidden]; also the LM head when embeddings are tied.
    pub fn embedding(&self) -> Result<Weight, LoadError> {
        let (l, spec) = (&self.l, self.l.spec());
        l.matrix(
            &[l.global(GlobalTensor::TokenEmbedding)?],
            &[spec.vocab_size],
            spec.hidden_size,
        )
    }

    /// [num_positions, hidden] for learned positions (GPT-2), else None.
    pub fn position_embedding(&self) -> Result<Option<Vec<f32>>, LoadError> {
        let (l, spec) = (&self.l, self.l.spec());
        match spec.pos {
            PosEmbedding::Learned { num_positions } => Ok(Some(l.vector(
                &l.global(GlobalTensor::PositionEmbedding)?,
                num_positions * spec.hidden_size,
            )?)),
            _ => Ok(None),
        }
    }

    /// The embedding norm when the spec has one (BLOOM), else None.
    pub fn embedding_norm(&self) -> Result<Option<NormWeights>, LoadError> {
        match self.l.spec().embedding_norm {
            true => Ok(Some(self.l.norm_global(
                GlobalTensor::EmbeddingNorm,
                GlobalTensor::EmbeddingNormBias,
            )?)),
            false => Ok(None),
        }
    }

    /// The norm after the last layer.
    pub fn final_norm(&self) -> Result<NormWeights, LoadError> {
        self.l
            .norm_global(GlobalTensor::FinalNorm, GlobalTensor::FinalNormBias)
    }

    /// [vocab, hidden]; None when tied to the embedding.
    pub fn lm_head(&self) -> Result<Option<Weight>, LoadError> {
        let (l, spec) = (&self.l, self.l.spec());
        match spec.tie_embeddings {
            true => Ok(None),
            false => {
                let name = l.global(GlobalTensor::LmHead)?;
                let w = l.linear_rows(
                    std::slice::from_ref(&name),
                    &[spec.vocab_size],
                    spec.hidden_size,
                )?;
                Ok(Some(l.to_format(&name, w)?))
            }
        }
    }

    /// [vocab] when the spec has an LM head bias.
    pub fn lm_head_bias(&self) -> Result<Option<Vec<f32>>, LoadError> {
        let (l, spec) = (&self.l, self.l.spec());
        match spec.biases.lm_head {
            true => Ok(Some(
                l.vector(&l.global(GlobalTensor::LmHeadBias)?, spec.vocab_size)?,
            )),
            false => Ok(None),
        }
    }

    /// Decoder layers to read (`layer(0..num_layers())`).
    pub fn num_layers(&self) -> usize {
        self.l.spec().num_layers
    }

    /// Layer `i`'s weights (FP8 linears dequantized to the reader's format).
    pub fn layer(&self, i: usize) -> Result<LayerWeights, LoadError> {
        self.l.layer(i)
    }

    /// One linear of layer `i` as stored: `Linear::Fp8` for a linear an FP8 checkpoint keeps in
    /// E4M3 (fused shards concatenated, each with its scale), else dense in the reader's format.
    pub fn layer_linear(&self, i: usize, which: LayerLinear) -> Result<Linear, LoadError> {
        self.l.layer_linear(i, which)
    }

    /// Layer `i`'s FP8 KV-cache scales, if the checkpoint has them.
    pub fn kv_scales(&self, i: usize) -> Result<Option<KvScales>, LoadError> {
        self.l.kv_scales(i)
    }
}

struct Loader<'a> {
    src: &'a dyn TensorSource,
    arch: &'a ArchInfo,
    format: WeightFormat,
}

impl Loader<'_> {
    fn spec(&self) -> &DecoderSpec {
        &self.arch.spec
    }

    fn global(&self, t: GlobalTensor) -> Result<String, LoadError> {
        self.arch
            .names
            .global(t)
            .ok_or_else(|| self.bad(&format!("{t:?}"), "this architecture has no such tensor"))
    }

    fn layer_name(&self, i: usize, t: LayerTensor) -> Result<String, LoadError> {
        self.arch.names.layer(i, t).ok_or_else(|| {
            self.bad(
                &format!("layer {i} {t:?}"),
                "this architecture has no such tensor",
            )
        })
    }

    fn bad(&self, tensor: &str, reason: &str) -> LoadError {
        LoadError::BadTensor {
            path: self.src.describe().into(),
            tensor: tensor.to_string(),
            reason: reason.to_string(),
        }
    }

    fn check_shape(&self, name: &str, expected: &[usize]) -> Result<(), LoadError> {
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
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
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

    fn norm_global(&self, w: GlobalTensor, b: GlobalTensor) -> Result<NormWeights, LoadError> {
        let h = self.spec().hidden_size;
        let weight = self.vector(&self.global(w)?, h)?;
        let bias = match self.spec().norm {
            Norm::Layer { bias: true, .. } => Some(self.vector(&self.global(b)?, h)?),
            _ => None,
        };
        Ok(NormWeights { weight, bias })
    }

    fn norm_layer(
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
    fn matrix(&self, names: &[String], rows: &[usize], cols: usize) -> Result<Weight, LoadError> {
        for (name, &r) in names.iter().zip(rows) {
            self.check_shape(name, &[r, cols])?;
        }
        let total_rows: usize = rows.iter().sum();
        let use_q8 = self.format == WeightFormat::Q8 && cols % QK == 0;
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
    fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<Linear, LoadError> {
        if self.arch.names.transposed_linears() {
            let data = self.read_transposed(name, rows, cols)?;
            return self
                .weight_from_f32(name, rows, cols, data)
                .map(Linear::Dense);
        }
        self.linear_rows(&[name.to_string()], &[rows], cols)
    }

    /// Reads `name: [cols, rows]` and returns it transposed: `[rows, cols]`.
    fn read_transposed(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>, LoadError> {
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

    fn weight_from_f32(
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
    fn to_format(&self, name: &str, w: Linear) -> Result<Weight, LoadError> {
        w.into_weight(self.format).map_err(|e| self.bad(name, &e))
    }

    /// The FP8 scheme of the checkpoint, if it has one.
    fn fp8_scheme(&self) -> Option<&Fp8Scheme> {
        match &self.arch.quant {
            Quantization::Fp8(s) => Some(s),
            Quantization::None => None,
        }
    }

    /// Linear `name` (`[rows, cols]` as stored) with its scales when it is stored in F8_E4M3;
    /// None when it is stored in a float type.
    fn fp8_part(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Fp8Weight>, LoadError> {
        let dtype = self.src.info(name).map(|i| i.dtype);
        match dtype {
            Some(SourceDType::F8E4M3) => {}
            Some(SourceDType::F8E5M2) => {
                return Err(self.bad(
                    name,
                    "F8_E5M2 weights are not supported: ferrum loads FP8 E4M3 (F8_E4M3) weights",
                ));
            }
            _ => return Ok(None),
        }
        let Some(scheme) = self.fp8_scheme() else {
            return Err(self.bad(
                name,
                "stored F8_E4M3, but the checkpoint has no FP8 quantization_config in config.json                  (nor an hf_quant_config.json): its scales are unknown",
            ));
        };
        let module = name.strip_suffix(".weight").unwrap_or(name);
        if !scheme.quantizes(module) {
            return Err(self.bad(
                name,
                &format!(
                    "stored F8_E4M3, but {} lists module '{module}' as unquantized",
                    scheme.ignore.key
                ),
            ));
        }
        self.check_shape(name, &[rows, cols])?;
        let codes = self.src.get_e4m3(name, Shard::Replicated)?.codes;
        let scale = self.weight_scale(scheme, module, rows, cols)?;
        let input_name = scheme.input_scale_name(module);
        let input_scale = match self.src.contains(&input_name) {
            true => Some(self.scalar(&input_name)?),
            false if scheme.activations == Activations::Static => {
                return Err(LoadError::MissingTensor {
                    path: self.src.describe().into(),
                    tensor: input_name,
                });
            }
            false => None,
        };
        let w = Fp8Weight {
            rows,
            cols,
            codes,
            scale,
            input_scale,
        };
        w.check().map_err(|e| self.bad(name, &e))?;
        Ok(Some(w))
    }

    /// A one-element tensor (scalar `[]`, or `[1]`).
    fn scalar(&self, name: &str) -> Result<f32, LoadError> {
        let data = self.vector(name, 1)?;
        Ok(data[0])
    }

    /// The weight scales of `module` in the scheme's granularity, shape-checked.
    fn weight_scale(
        &self,
        scheme: &Fp8Scheme,
        module: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Fp8Scale, LoadError> {
        let name = scheme.weight_scale_name(module);
        let info = self
            .src
            .info(&name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.src.describe().into(),
                tensor: name.clone(),
            })?;
        let shape = info.shape;
        let numel: usize = shape.iter().product();
        let (ok, expected) = match scheme.weights {
            WeightScales::Tensor => (numel == 1, vec![1]),
            WeightScales::Channel => (
                shape == [rows, 1] || shape == [rows] || (rows == 1 && numel == 1),
                vec![rows, 1],
            ),
            WeightScales::Block { rows: br, cols: bc } => {
                let grid = vec![rows.div_ceil(br), cols.div_ceil(bc)];
                (shape == grid, grid)
            }
        };
        if !ok {
            return Err(LoadError::ShapeMismatch {
                path: self.src.describe().into(),
                tensor: name,
                expected,
                actual: shape,
            });
        }
        let data = self.src.get(&name, Shard::Replicated)?.data;
        Ok(match scheme.weights {
            WeightScales::Tensor => Fp8Scale::Tensor(data[0]),
            WeightScales::Channel => Fp8Scale::Channel(data),
            WeightScales::Block { rows: br, cols: bc } => Fp8Scale::Block {
                block: (br, bc),
                scales: data,
            },
        })
    }

    /// Row-concatenation of the linears `names[j]: [rows[j], cols]`: FP8 when every part is
    /// stored in FP8 and their scales share one form (`Fp8Weight::concat_rows`), else dense (FP8
    /// parts dequantized exactly).
    fn linear_rows(
        &self,
        names: &[String],
        rows: &[usize],
        cols: usize,
    ) -> Result<Linear, LoadError> {
        let mut parts = Vec::with_capacity(names.len());
        for (name, &r) in names.iter().zip(rows) {
            parts.push(self.fp8_part(name, r, cols)?);
        }
        if parts.iter().all(Option::is_none) {
            return self.matrix(names, rows, cols).map(Linear::Dense);
        }
        if let Some(all) = parts.iter().cloned().collect::<Option<Vec<Fp8Weight>>>() {
            if let Some(w) = Fp8Weight::concat_rows(&all) {
                return Ok(Linear::Fp8(w));
            }
        }
        let total: usize = rows.iter().sum();
        let mut data = Vec::with_capacity(total * cols);
        for (name, part) in names.iter().zip(parts) {
            match part {
                Some(w) => data.extend(w.dequantize()),
                None => data.extend(self.src.get(name, Shard::Replicated)?.data),
            }
        }
        self.weight_from_f32(&names.join("+"), total, cols, data)
            .map(Linear::Dense)
    }

    /// The row order of layer `i`'s fused qkv tensor (None: separate tensors, or already q | k | v).
    fn qkv_order(&self) -> Option<Vec<usize>> {
        let spec = self.spec();
        match spec.qkv {
            QkvLayout::Separate => None,
            QkvLayout::Fused { layout } => {
                fused_qkv_source_rows(layout, spec.num_heads, spec.num_kv_heads, spec.head_dim)
            }
        }
    }

    /// q | k | v weight `[q_dim + 2 * kv_dim, hidden]`, from separate or fused tensors.
    fn qkv(&self, i: usize) -> Result<Linear, LoadError> {
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
    fn qkv_bias(&self, i: usize) -> Result<Option<Vec<f32>>, LoadError> {
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

    fn opt_bias(
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

    fn layer_linear(&self, i: usize, which: LayerLinear) -> Result<Linear, LoadError> {
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

    /// The first of `candidates` the checkpoint has, read as a scalar.
    fn first_scalar(&self, candidates: &[String]) -> Result<Option<f32>, LoadError> {
        match candidates.iter().find(|n| self.src.contains(n)) {
            Some(n) => self.scalar(n).map(Some),
            None => Ok(None),
        }
    }

    fn kv_scales(&self, i: usize) -> Result<Option<KvScales>, LoadError> {
        use LayerTensor::*;
        let Some(scheme) = self.fp8_scheme() else {
            return Ok(None);
        };
        let module = |t: LayerTensor| {
            let fused = self.arch.names.layer(i, Qkv);
            self.arch
                .names
                .layer(i, t)
                .or(fused)
                .map(|n| n.trim_end_matches(".weight").to_string())
        };
        // ModelOpt `k_proj.k_scale`, renamed `self_attn.k_scale`, compressed-tensors
        // `k_proj.output_scale`, vLLM's `self_attn.attn.k_scale`.
        let candidates = |proj: Option<String>, s: &str| -> Vec<String> {
            let Some(proj) = proj else { return vec![] };
            let parent = proj
                .rsplit_once('.')
                .map_or(proj.as_str(), |p| p.0)
                .to_string();
            vec![
                format!("{proj}.{s}"),
                format!("{parent}.{s}"),
                format!("{proj}.output_scale"),
                format!("{parent}.attn.{s}"),
            ]
        };
        let (kc, vc) = (
            candidates(module(K), "k_scale"),
            candidates(module(V), "v_scale"),
        );
        let (k, v) = (self.first_scalar(&kc)?, self.first_scalar(&vc)?);
        match (k, v) {
            (Some(k), Some(v)) => Ok(Some(KvScales { k, v })),
            (None, None) if !scheme.kv_cache_scales => Ok(None),
            (k, _) => {
                let missing = if k.is_none() { kc } else { vc };
                Err(LoadError::MissingTensor {
                    path: self.src.describe().into(),
                    tensor: missing.first().cloned().unwrap_or_default(),
                })
            }
        }
    }

    fn layer(&self, i: usize) -> Result<LayerWeights, LoadError> {
        use LayerTensor::*;
        let spec = self.spec();
        let (h, inter) = (spec.hidden_size, spec.intermediate_size);
        let attn_norm = self.norm_layer(i, AttnNorm, AttnNormBias)?;
        let mlp_norm = match spec.residual {
            Residual::Parallel { shared_norm: true } => None,
            _ => Some(self.norm_layer(i, MlpNorm, MlpNormBias)?),
        };
        let weight = |which: LayerLinear| {
            let w = self.layer_linear(i, which)?;
            self.to_format(&format!("layer {i} {which:?}"), w)
        };
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

/// For each row of the decoder's q | k | v layout, the row of a fused checkpoint tensor it comes
/// from; None when the fused layout already is q | k | v.
///
/// ```text
///   PerHead  [num_heads, 3, head_dim]:             q of head h = rows (3h + 0) * d ..
///                                                  k of head h = rows (3h + 1) * d ..
///   KvGroups [num_kv, group + 2, head_dim], group = num_heads / num_kv:
///            q head h (group j = h / group, i = h % group) = rows (j (group + 2) + i) * d ..
///            k head j = rows (j (group + 2) + group) * d ..,  v head j = the next d rows
/// ```
pub fn fused_qkv_source_rows(
    layout: FusedQkv,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
) -> Option<Vec<usize>> {
    let d = head_dim;
    let mut heads: Vec<usize> = Vec::with_capacity(num_heads + 2 * num_kv_heads);
    match layout {
        FusedQkv::Concat => return None,
        FusedQkv::PerHead => {
            // Source head-slot (in units of head_dim rows) of each destination head.
            heads.extend((0..num_heads).map(|h| 3 * h));
            heads.extend((0..num_kv_heads).map(|h| 3 * h + 1));
            heads.extend((0..num_kv_heads).map(|h| 3 * h + 2));
        }
        FusedQkv::KvGroups => {
            let group = num_heads / num_kv_heads.max(1);
            heads.extend((0..num_heads).map(|h| (h / group) * (group + 2) + h % group));
            heads.extend((0..num_kv_heads).map(|j| j * (group + 2) + group));
            heads.extend((0..num_kv_heads).map(|j| j * (group + 2) + group + 1));
        }
    }
    Some(
        heads
            .into_iter()
            .flat_map(|slot| slot * d..(slot + 1) * d)
            .collect(),
    )
}

/// out row r = src row `rows[r]`; `src: [_, row_len]`.
fn gather_rows(src: &[f32], row_len: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * row_len);
    for &r in rows {
        out.extend_from_slice(&src[r * row_len..(r + 1) * row_len]);
    }
    out
}

/// Every tensor (name, shape) that `DecoderWeights::load` reads for `arch`: used to build random
/// checkpoints for benchmarks, and kept honest by a test that loads from exactly this list.
pub fn expected_tensors(arch: &ArchInfo) -> Vec<(String, Vec<usize>)> {
    use LayerTensor::*;
    let spec = &arch.spec;
    let names = arch.names;
    let (h, q, kv, inter, vocab) = (
        spec.hidden_size,
        spec.q_dim(),
        spec.kv_dim(),
        spec.intermediate_size,
        spec.vocab_size,
    );
    // Shape of a linear weight with `rows` outputs and `cols` inputs, as the checkpoint stores it.
    let transposed = names.transposed_linears();
    let linear = |rows: usize, cols: usize| {
        if transposed {
            vec![cols, rows]
        } else {
            vec![rows, cols]
        }
    };
    let mut out = vec![];
    let mut global = |t: GlobalTensor, shape: Vec<usize>| {
        if let Some(n) = names.global(t) {
            out.push((n, shape));
        }
    };
    global(GlobalTensor::TokenEmbedding, vec![vocab, h]);
    if let PosEmbedding::Learned { num_positions } = spec.pos {
        global(GlobalTensor::PositionEmbedding, vec![num_positions, h]);
    }
    let norm_bias = matches!(spec.norm, Norm::Layer { bias: true, .. });
    if spec.embedding_norm {
        global(GlobalTensor::EmbeddingNorm, vec![h]);
        if norm_bias {
            global(GlobalTensor::EmbeddingNormBias, vec![h]);
        }
    }
    global(GlobalTensor::FinalNorm, vec![h]);
    if norm_bias {
        global(GlobalTensor::FinalNormBias, vec![h]);
    }
    if !spec.tie_embeddings {
        global(GlobalTensor::LmHead, vec![vocab, h]);
    }
    if spec.biases.lm_head {
        global(GlobalTensor::LmHeadBias, vec![vocab]);
    }
    for i in 0..spec.num_layers {
        let mut layer = |t: LayerTensor, shape: Vec<usize>| {
            if let Some(n) = names.layer(i, t) {
                out.push((n, shape));
            }
        };
        layer(AttnNorm, vec![h]);
        if norm_bias {
            layer(AttnNormBias, vec![h]);
        }
        if !matches!(spec.residual, Residual::Parallel { shared_norm: true }) {
            layer(MlpNorm, vec![h]);
            if norm_bias {
                layer(MlpNormBias, vec![h]);
            }
        }
        match spec.qkv {
            QkvLayout::Separate => {
                layer(Q, linear(q, h));
                layer(K, linear(kv, h));
                layer(V, linear(kv, h));
                if spec.biases.qkv {
                    layer(QBias, vec![q]);
                    layer(KBias, vec![kv]);
                    layer(VBias, vec![kv]);
                }
            }
            QkvLayout::Fused { .. } => {
                layer(Qkv, linear(q + 2 * kv, h));
                if spec.biases.qkv {
                    layer(QkvBias, vec![q + 2 * kv]);
                }
            }
        }
        layer(AttnOut, linear(h, q));
        if spec.biases.attn_out {
            layer(AttnOutBias, vec![h]);
        }
        if spec.mlp == Mlp::Gated {
            layer(Gate, linear(inter, h));
            if spec.biases.mlp {
                layer(GateBias, vec![inter]);
            }
        }
        layer(Up, linear(inter, h));
        layer(Down, linear(h, inter));
        if spec.biases.mlp {
            layer(UpBias, vec![inter]);
            layer(DownBias, vec![h]);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::loader::random::RandomSource;
    use crate::model::presets;

    #[test]
    fn loader_reads_exactly_the_expected_tensors() {
        for name in presets::PRESETS.iter().filter(|p| p.starts_with("tiny-")) {
            let arch = presets::preset(name).unwrap();
            let expected = expected_tensors(&arch);
            let src = RandomSource::new(expected.clone(), 1);
            let w = DecoderWeights::load(&src, &arch, WeightFormat::F32, |_| {}).unwrap();
            assert_eq!(w.layers.len(), arch.spec.num_layers);
            // Removing any one tensor must make loading fail: the loader really reads each.
            for skip in 0..expected.len() {
                let mut fewer = expected.clone();
                let (missing, _) = fewer.remove(skip);
                let src = RandomSource::new(fewer, 1);
                let err = DecoderWeights::load(&src, &arch, WeightFormat::F32, |_| {}).err();
                assert!(
                    err.is_some_and(|e| e.to_string().contains(&missing)),
                    "{name}: loading without {missing} must fail"
                );
            }
        }
    }

    /// A fused tensor whose row r holds the value r, re-ordered: the result names the source
    /// row of each q | k | v row.
    fn reorder(layout: FusedQkv, heads: usize, kv_heads: usize, d: usize) -> Vec<usize> {
        fused_qkv_source_rows(layout, heads, kv_heads, d).unwrap_or_default()
    }

    #[test]
    fn fused_qkv_orders() {
        assert!(fused_qkv_source_rows(FusedQkv::Concat, 4, 2, 3).is_none());
        // BLOOM, 2 heads of 2: source rows [q0 q0 k0 k0 v0 v0 q1 q1 k1 k1 v1 v1].
        assert_eq!(
            reorder(FusedQkv::PerHead, 2, 2, 2),
            [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]
        );
        // Falcon multi-query, 3 query heads of 1: [q0 q1 q2 k v].
        assert_eq!(reorder(FusedQkv::KvGroups, 3, 1, 1), [0, 1, 2, 3, 4]);
        // Falcon new architecture, 4 heads in 2 groups of 2, head_dim 1:
        // source [q0 q1 k0 v0 | q2 q3 k1 v1].
        assert_eq!(
            reorder(FusedQkv::KvGroups, 4, 2, 1),
            [0, 1, 4, 5, 2, 6, 3, 7]
        );
        // Every layout is a permutation of the source rows.
        for (layout, heads, kv) in [(FusedQkv::PerHead, 6, 6), (FusedQkv::KvGroups, 8, 2)] {
            let mut rows = reorder(layout, heads, kv, 5);
            rows.sort_unstable();
            assert_eq!(rows, (0..(heads + 2 * kv) * 5).collect::<Vec<_>>());
        }
    }

    #[test]
    fn transposed_linears_load_transposed() {
        // tiny-gpt2 stores Conv1D weights [in, out]; the loaded weight is [out, in].
        let arch = presets::preset("tiny-gpt2").unwrap();
        let expected = expected_tensors(&arch);
        let src = RandomSource::new(expected.clone(), 3);
        let w = DecoderWeights::load(&src, &arch, WeightFormat::F32, |_| {}).unwrap();
        let name = "transformer.h.0.mlp.c_fc.weight";
        let shape = &expected.iter().find(|(n, _)| n == name).unwrap().1;
        let (inp, out) = (shape[0], shape[1]);
        assert_eq!(
            (inp, out),
            (arch.spec.hidden_size, arch.spec.intermediate_size)
        );
        let raw = src.get(name, Shard::Replicated).unwrap().data;
        let Weight::F32 { rows, cols, data } = &w.layers[0].gate_up else {
            panic!("f32 weight expected");
        };
        assert_eq!((*rows, *cols), (out, inp));
        for r in 0..out {
            for c in 0..inp {
                assert_eq!(data[r * inp + c], raw[c * out + r]);
            }
        }
    }
}
