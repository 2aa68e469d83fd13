//! BLOOM (`BloomForCausalLM`, GGUF `bloom`): ALiBi with BLOOM's slopes, a LayerNorm on the word
//! embeddings, LayerNorms and linears with biases, GELU-tanh MLP (4x), tied head.
//!
//! Quirks handled here:
//! - `query_key_value` is interleaved per head, `[num_heads, 3, head_dim]` (`FusedQkv::PerHead`);
//!   llama.cpp's converter re-orders it to q | k | v, so GGUF is `FusedQkv::Concat`.
//! - ALiBi for non-power-of-two head counts takes the extra slopes from the `2c` series; the
//!   bias is added unscaled.
//! - `apply_residual_connection_post_layernorm: true` (residual taken after the norm) is refused.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{ArchInfo, GgufMeta, GlobalTensor, HfConfig, LayerTensor, TensorNames};
use crate::loader::gguf::MetadataValue;
use crate::model::ModelError;
use crate::model::quant::Quantization;
use crate::model::spec::{
    Activation, Biases, DecoderSpec, FusedQkv, Mlp, Norm, PosEmbedding, QkvLayout, Residual,
};

pub(super) fn hf_global(t: GlobalTensor) -> Option<&'static str> {
    match t {
        GlobalTensor::TokenEmbedding => Some("transformer.word_embeddings.weight"),
        GlobalTensor::EmbeddingNorm => Some("transformer.word_embeddings_layernorm.weight"),
        GlobalTensor::EmbeddingNormBias => Some("transformer.word_embeddings_layernorm.bias"),
        GlobalTensor::FinalNorm => Some("transformer.ln_f.weight"),
        GlobalTensor::FinalNormBias => Some("transformer.ln_f.bias"),
        GlobalTensor::LmHead => Some("lm_head.weight"),
        _ => None,
    }
}

pub(super) fn hf_layer(t: LayerTensor) -> Option<&'static str> {
    use LayerTensor::*;
    Some(match t {
        AttnNorm => "input_layernorm.weight",
        AttnNormBias => "input_layernorm.bias",
        Qkv => "self_attention.query_key_value.weight",
        QkvBias => "self_attention.query_key_value.bias",
        AttnOut => "self_attention.dense.weight",
        AttnOutBias => "self_attention.dense.bias",
        MlpNorm => "post_attention_layernorm.weight",
        MlpNormBias => "post_attention_layernorm.bias",
        Up => "mlp.dense_h_to_4h.weight",
        UpBias => "mlp.dense_h_to_4h.bias",
        Down => "mlp.dense_4h_to_h.weight",
        DownBias => "mlp.dense_4h_to_h.bias",
        Q | K | V | QBias | KBias | VBias | Gate | GateBias => return None,
    })
}

/// The BLOOM layer as a spec, from its numbers (shared by the loaders and the presets).
pub fn bloom_spec(
    vocab_size: usize,
    hidden_size: usize,
    num_layers: usize,
    num_heads: usize,
    eps: f32,
    qkv: FusedQkv,
) -> DecoderSpec {
    let head_dim = hidden_size / num_heads.max(1);
    DecoderSpec {
        arch: "bloom".to_string(),
        vocab_size,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        intermediate_size: 4 * hidden_size,
        // ALiBi extrapolates; this only bounds max_model_len.
        max_position_embeddings: 2048,
        norm: Norm::Layer { eps, bias: true },
        pos: PosEmbedding::Alibi {
            max_bias: 8.0,
            bias_scale: 1.0,
        },
        residual: Residual::Sequential,
        act: Activation::GeluTanh,
        mlp: Mlp::Plain,
        qkv: QkvLayout::Fused { layout: qkv },
        biases: Biases {
            qkv: true,
            attn_out: true,
            mlp: true,
            lm_head: false,
        },
        tie_embeddings: true,
        embedding_norm: true,
        sliding_window: None,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        clip_qkv: None,
    }
}

/// The spec of a `BloomForCausalLM` config.json (fused qkv interleaved per head, tied head unless
/// `tie_word_embeddings: false`); refuses `apply_residual_connection_post_layernorm: true`.
pub fn from_hf(config: &Value) -> Result<ArchInfo, ModelError> {
    let c = HfConfig(config);
    c.reject_true(
        "apply_residual_connection_post_layernorm",
        "residual taken after the LayerNorm",
    )?;
    let hidden_size = c.usize_any(&["hidden_size", "n_embed"])?;
    let num_heads = c.usize_any(&["n_head", "num_attention_heads"])?;
    if num_heads == 0 || hidden_size % num_heads != 0 {
        return Err(ModelError::Config(format!(
            "config.json: hidden_size ({hidden_size}) must be a positive multiple of n_head ({num_heads})"
        )));
    }
    let mut spec = bloom_spec(
        c.usize("vocab_size")?,
        hidden_size,
        c.usize_any(&["n_layer", "num_hidden_layers"])?,
        num_heads,
        c.opt_f32("layer_norm_epsilon")?.unwrap_or(1e-5),
        FusedQkv::PerHead,
    );
    if let Some(n) = c.opt_usize("seq_length")? {
        spec.max_position_embeddings = n;
    }
    spec.tie_embeddings = c.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    spec.validate()
        .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
    Ok(ArchInfo {
        spec,
        names: TensorNames::HfBloom,
        quant: Quantization::None,
    })
}

/// The spec of GGUF `bloom` metadata (`bloom.*` keys; the converter's q | k | v row order, MLP
/// width `4 * hidden` unless `feed_forward_length` says otherwise).
pub fn from_gguf(md: &BTreeMap<String, MetadataValue>) -> Result<ArchInfo, ModelError> {
    let g = GgufMeta { md, arch: "bloom" };
    let hidden_size = g.usize("embedding_length")?;
    let mut spec = bloom_spec(
        g.vocab_size()?,
        hidden_size,
        g.usize("block_count")?,
        g.num_heads()?,
        g.opt_f32("attention.layer_norm_epsilon")?.unwrap_or(1e-5),
        FusedQkv::Concat,
    );
    spec.intermediate_size = g
        .opt_usize("feed_forward_length")?
        .unwrap_or(4 * hidden_size);
    spec.max_position_embeddings = g.opt_usize("context_length")?.unwrap_or(2048);
    spec.validate()
        .map_err(|e| ModelError::Config(format!("GGUF metadata: {e}")))?;
    Ok(ArchInfo {
        spec,
        names: TensorNames::Gguf,
        quant: Quantization::None,
    })
}
