//! GPT-2 (`GPT2LMHeadModel`, GGUF `gpt2`) and the GPT-3 layout it shares: learned positions,
//! LayerNorm with bias, fused q|k|v, plain GELU-tanh MLP, biases on every linear, tied head.
//!
//! Quirks handled here, as data:
//! - Hugging Face stores GPT-2's linears as `Conv1D`, `[in_features, out_features]`
//!   (`TensorNames::transposed_linears`); llama.cpp's converter transposes them, so GGUF is
//!   `[out, in]` like every other model.
//! - `c_attn` is q | k | v concatenated (`FusedQkv::Concat`), in both formats.
//! - `scale_attn_weights: false` drops the 1/sqrt(head_dim) score scale; the per-layer scaling
//!   options (`scale_attn_by_inverse_layer_idx`) and cross-attention are refused.

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
        GlobalTensor::TokenEmbedding => Some("transformer.wte.weight"),
        GlobalTensor::PositionEmbedding => Some("transformer.wpe.weight"),
        GlobalTensor::FinalNorm => Some("transformer.ln_f.weight"),
        GlobalTensor::FinalNormBias => Some("transformer.ln_f.bias"),
        GlobalTensor::LmHead => Some("lm_head.weight"),
        _ => None,
    }
}

pub(super) fn hf_layer(t: LayerTensor) -> Option<&'static str> {
    use LayerTensor::*;
    Some(match t {
        AttnNorm => "ln_1.weight",
        AttnNormBias => "ln_1.bias",
        Qkv => "attn.c_attn.weight",
        QkvBias => "attn.c_attn.bias",
        AttnOut => "attn.c_proj.weight",
        AttnOutBias => "attn.c_proj.bias",
        MlpNorm => "ln_2.weight",
        MlpNormBias => "ln_2.bias",
        Up => "mlp.c_fc.weight",
        UpBias => "mlp.c_fc.bias",
        Down => "mlp.c_proj.weight",
        DownBias => "mlp.c_proj.bias",
        Q | K | V | QBias | KBias | VBias | Gate | GateBias => return None,
    })
}

/// The GPT-2 layer as a spec, from its numbers (shared by the loaders and the GPT-3 presets).
#[allow(clippy::too_many_arguments)]
pub fn gpt2_spec(
    vocab_size: usize,
    hidden_size: usize,
    num_layers: usize,
    num_heads: usize,
    intermediate_size: usize,
    num_positions: usize,
    eps: f32,
    act: Activation,
) -> DecoderSpec {
    let head_dim = hidden_size / num_heads.max(1);
    DecoderSpec {
        arch: "gpt2".to_string(),
        vocab_size,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        intermediate_size,
        max_position_embeddings: num_positions,
        norm: Norm::Layer { eps, bias: true },
        pos: PosEmbedding::Learned { num_positions },
        residual: Residual::Sequential,
        act,
        mlp: Mlp::Plain,
        qkv: QkvLayout::Fused {
            layout: FusedQkv::Concat,
        },
        biases: Biases {
            qkv: true,
            attn_out: true,
            mlp: true,
            lm_head: false,
        },
        tie_embeddings: true,
        embedding_norm: false,
        sliding_window: None,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        clip_qkv: None,
    }
}

/// The spec of a `GPT2LMHeadModel` config.json (`n_embd`, `n_head`, `n_layer`, `n_inner`,
/// `n_positions`, `activation_function`, `scale_attn_weights`); refuses per-layer attention
/// scaling and cross-attention.
pub fn from_hf(config: &Value) -> Result<ArchInfo, ModelError> {
    let c = HfConfig(config);
    c.reject_true(
        "scale_attn_by_inverse_layer_idx",
        "per-layer attention scaling",
    )?;
    c.reject_true("add_cross_attention", "cross-attention")?;
    let hidden_size = c.usize_any(&["n_embd", "hidden_size"])?;
    let num_heads = c.usize_any(&["n_head", "num_attention_heads"])?;
    if num_heads == 0 || hidden_size % num_heads != 0 {
        return Err(ModelError::Config(format!(
            "config.json: n_embd ({hidden_size}) must be a positive multiple of n_head ({num_heads})"
        )));
    }
    let mut spec = gpt2_spec(
        c.usize("vocab_size")?,
        hidden_size,
        c.usize_any(&["n_layer", "num_hidden_layers"])?,
        num_heads,
        c.opt_usize("n_inner")?.unwrap_or(4 * hidden_size),
        c.usize_any(&["n_positions", "max_position_embeddings"])?,
        c.opt_f32("layer_norm_epsilon")?.unwrap_or(1e-5),
        c.activation("activation_function", "gelu_new")?,
    );
    spec.tie_embeddings = c.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    if !c.opt_bool("scale_attn_weights")?.unwrap_or(true) {
        spec.attn_scale = 1.0;
    }
    spec.validate()
        .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
    Ok(ArchInfo {
        spec,
        names: TensorNames::HfGpt2,
        quant: Quantization::None,
    })
}

/// The spec of GGUF `gpt2` metadata (`gpt2.*` keys; GELU-tanh MLP).
pub fn from_gguf(md: &BTreeMap<String, MetadataValue>) -> Result<ArchInfo, ModelError> {
    let g = GgufMeta { md, arch: "gpt2" };
    let hidden_size = g.usize("embedding_length")?;
    let num_heads = g.num_heads()?;
    let spec = gpt2_spec(
        g.vocab_size()?,
        hidden_size,
        g.usize("block_count")?,
        num_heads,
        g.usize("feed_forward_length")?,
        g.usize("context_length")?,
        g.opt_f32("attention.layer_norm_epsilon")?.unwrap_or(1e-5),
        Activation::GeluTanh,
    );
    spec.validate()
        .map_err(|e| ModelError::Config(format!("GGUF metadata: {e}")))?;
    Ok(ArchInfo {
        spec,
        names: TensorNames::Gguf,
        quant: Quantization::None,
    })
}
