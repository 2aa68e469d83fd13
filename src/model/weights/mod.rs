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
//!
//! Files: `mod.rs` (the weight types and `WeightReader`, the public way in), `loader.rs` (reading
//! and checking tensors, the fused q/k/v and gate/up layouts), `fp8.rs` (FP8 linears with their
//! scales, KV-cache scales, online FP8 quantization), `layout.rs` (fused-qkv row orders and the
//! tensor list a checkpoint must have).

mod fp8;
mod layout;
mod loader;
mod pieces;

pub use layout::{expected_tensors, fused_qkv_source_rows};
use loader::Loader;
use pieces::{Cut, Piece};

use crate::loader::{HostTensor, LoadError, TensorSource};
use crate::model::arch::{ArchInfo, GlobalTensor};
use crate::model::spec::PosEmbedding;
use crate::model::tp::RankLayout;
use crate::ops::fp8::Fp8Weight;
use crate::ops::linear::{Weight, WeightFormat};

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
/// `W` is how the four linears are held: `Weight` for the CPU engine (FP8 dequantized), `Linear`
/// as stored (`WeightReader::stored_layer`, for the GPU's FP8 products).
pub struct LayerWeights<W = Weight> {
    /// The norm before attention (also before the MLP when the spec shares it).
    pub attn_norm: NormWeights,
    /// None when the spec shares one norm between attention and MLP.
    pub mlp_norm: Option<NormWeights>,
    /// [q_dim + 2 * kv_dim, hidden]
    pub qkv: W,
    /// [q_dim + 2 * kv_dim], q | k | v like the rows of `qkv`; None without qkv biases.
    pub qkv_bias: Option<Vec<f32>>,
    /// [hidden, q_dim]
    pub attn_out: W,
    /// [hidden]; None without an output-projection bias.
    pub attn_out_bias: Option<Vec<f32>>,
    /// Gated: [2 * intermediate, hidden] (gate rows, then up rows). Plain: [intermediate, hidden].
    pub gate_up: W,
    /// Same row order as `gate_up`; None without MLP biases.
    pub gate_up_bias: Option<Vec<f32>>,
    /// [hidden, intermediate]
    pub down: W,
    /// [hidden]; None without MLP biases.
    pub down_bias: Option<Vec<f32>>,
    /// The checkpoint's FP8 KV-cache scales; None when it has none (the CPU engine ignores them).
    pub kv_scales: Option<KvScales>,
}

impl<W> LayerWeights<W> {
    /// The same layer with each linear converted by `f(which, linear)`.
    pub fn try_map_linears<V, E>(
        self,
        mut f: impl FnMut(LayerLinear, W) -> Result<V, E>,
    ) -> Result<LayerWeights<V>, E> {
        Ok(LayerWeights {
            attn_norm: self.attn_norm,
            mlp_norm: self.mlp_norm,
            qkv: f(LayerLinear::Qkv, self.qkv)?,
            qkv_bias: self.qkv_bias,
            attn_out: f(LayerLinear::AttnOut, self.attn_out)?,
            attn_out_bias: self.attn_out_bias,
            gate_up: f(LayerLinear::GateUp, self.gate_up)?,
            gate_up_bias: self.gate_up_bias,
            down: f(LayerLinear::Down, self.down)?,
            down_bias: self.down_bias,
            kv_scales: self.kv_scales,
        })
    }
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
        on_layer: impl FnMut(usize),
    ) -> Result<DecoderWeights, LoadError> {
        Self::load_rank(src, arch, format, RankLayout::single(&arch.spec), on_layer)
    }

    /// Reads the weights tensor-parallel rank `rank` holds (`WeightReader::for_rank`).
    pub fn load_rank(
        src: &dyn TensorSource,
        arch: &ArchInfo,
        format: WeightFormat,
        rank: RankLayout,
        mut on_layer: impl FnMut(usize),
    ) -> Result<DecoderWeights, LoadError> {
        let r = WeightReader::for_rank(src, arch, format, rank);
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
        Self::for_rank(src, arch, format, RankLayout::single(&arch.spec))
    }

    /// A reader of the slices tensor-parallel rank `rank` holds: its query and KV heads of
    /// q | k | v and the matching input columns of the attention output, its MLP columns of
    /// gate | up and of down, its vocabulary rows of the embedding and LM head (each read from
    /// the file as a slice); norms and positions whole; row-parallel biases on rank 0 only.
    pub fn for_rank(
        src: &'a dyn TensorSource,
        arch: &'a ArchInfo,
        format: WeightFormat,
        rank: RankLayout,
    ) -> Self {
        WeightReader {
            l: Loader {
                src,
                arch,
                format,
                rank,
            },
        }
    }

    /// This rank's rows of the vocabulary.
    fn vocab_cut(&self) -> Cut {
        let r = &self.l.rank;
        Cut::rows(
            r.vocab_start..r.vocab_start + r.vocab_len,
            self.l.spec().vocab_size,
        )
    }

    /// [vocab, hidden] (this rank's vocabulary rows); also the LM head when embeddings are tied.
    pub fn embedding(&self) -> Result<Weight, LoadError> {
        let (l, spec) = (&self.l, self.l.spec());
        l.matrix(&Piece::of(
            &l.global(GlobalTensor::TokenEmbedding)?,
            spec.vocab_size,
            spec.hidden_size,
            &self.vocab_cut(),
        ))
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
                let w = l.linear_rows(&Piece::of(
                    &name,
                    spec.vocab_size,
                    spec.hidden_size,
                    &self.vocab_cut(),
                ))?;
                Ok(Some(l.to_format(&name, w)?))
            }
        }
    }

    /// [vocab] when the spec has an LM head bias.
    pub fn lm_head_bias(&self) -> Result<Option<Vec<f32>>, LoadError> {
        let (l, spec) = (&self.l, self.l.spec());
        match spec.biases.lm_head {
            true => Ok(Some(l.vector_cut(
                &l.global(GlobalTensor::LmHeadBias)?,
                spec.vocab_size,
                &self.vocab_cut(),
            )?)),
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

    /// Layer `i` with its linears as stored (`layer_linear`): an FP8 checkpoint's (or online
    /// `quantization: fp8`'s) linears as codes and scales, the others dense in the reader's
    /// format. What the GPU upload reads.
    pub fn stored_layer(&self, i: usize) -> Result<LayerWeights<Linear>, LoadError> {
        self.l.stored_layer(i)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::loader::Shard;
    use crate::loader::random::RandomSource;
    use crate::model::presets;
    use crate::model::spec::FusedQkv;

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
