//! The Llama family: Llama 2/3/3.1, Mistral and Qwen2 (config → spec; tensor names).
//!
//! Quirks handled here, as data:
//! - Qwen2 has q/k/v biases (`attention_bias` is implicit), Llama has them only with
//!   `attention_bias: true` (then o_proj has one too), `mlp_bias` adds MLP biases.
//! - rope parameters live in `rope_parameters` (transformers ≥ 5) or `rope_theta` + `rope_scaling`.
//! - llama.cpp's converter permutes GGUF Llama Q/K rows so that its interleaved ("normal") rope
//!   applies: GGUF `llama` therefore uses `RopeStyle::GptJ`, which gives the same results as NeoX
//!   rope on the unpermuted Hugging Face weights. GGUF `qwen2` is not permuted (NeoX).

use std::collections::BTreeMap;

use serde_json::Value;

use super::{ArchInfo, GgufMeta, GlobalTensor, HfConfig, LayerTensor, TensorNames};
use crate::loader::gguf::MetadataValue;
use crate::model::ModelError;
use crate::model::quant::Quantization;
use crate::model::spec::{
    Activation, Biases, DecoderSpec, Mlp, Norm, PosEmbedding, QkvLayout, Residual, Rope,
    RopeScaling, RopeStyle,
};

pub(super) fn hf_global(t: GlobalTensor) -> Option<&'static str> {
    match t {
        GlobalTensor::TokenEmbedding => Some("model.embed_tokens.weight"),
        GlobalTensor::FinalNorm => Some("model.norm.weight"),
        GlobalTensor::LmHead => Some("lm_head.weight"),
        _ => None,
    }
}

pub(super) fn hf_layer(t: LayerTensor) -> Option<&'static str> {
    use LayerTensor::*;
    Some(match t {
        AttnNorm => "input_layernorm.weight",
        Q => "self_attn.q_proj.weight",
        K => "self_attn.k_proj.weight",
        V => "self_attn.v_proj.weight",
        QBias => "self_attn.q_proj.bias",
        KBias => "self_attn.k_proj.bias",
        VBias => "self_attn.v_proj.bias",
        AttnOut => "self_attn.o_proj.weight",
        AttnOutBias => "self_attn.o_proj.bias",
        MlpNorm => "post_attention_layernorm.weight",
        Gate => "mlp.gate_proj.weight",
        GateBias => "mlp.gate_proj.bias",
        Up => "mlp.up_proj.weight",
        UpBias => "mlp.up_proj.bias",
        Down => "mlp.down_proj.weight",
        DownBias => "mlp.down_proj.bias",
        AttnNormBias | MlpNormBias | Qkv | QkvBias => return None,
    })
}

/// The spec of a Llama, Mistral or Qwen2 config.json (`model_type` as given): GQA heads,
/// `head_dim`, rope parameters and scaling, biases, Mistral's sliding window; refuses Qwen2's
/// per-layer `use_sliding_window`.
pub fn from_hf(model_type: &str, config: &Value) -> Result<ArchInfo, ModelError> {
    let c = HfConfig(config);
    let hidden_size = c.usize("hidden_size")?;
    let num_heads = c.usize("num_attention_heads")?;
    if num_heads == 0 {
        return Err(ModelError::Config(
            "config.json: 'num_attention_heads' must be > 0, got 0".into(),
        ));
    }
    let num_kv_heads = c.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
    let head_dim = c.opt_usize("head_dim")?.unwrap_or(hidden_size / num_heads);
    let act = c.activation("hidden_act", "silu")?;
    let attention_bias = c.opt_bool("attention_bias")?.unwrap_or(false);
    let biases = Biases {
        qkv: model_type == "qwen2" || attention_bias,
        attn_out: attention_bias,
        mlp: c.opt_bool("mlp_bias")?.unwrap_or(false),
        lm_head: false,
    };
    let rope = hf_rope(&c, head_dim)?;
    let sliding_window = match model_type {
        "mistral" => c.opt_usize("sliding_window")?,
        "qwen2" if c.opt_bool("use_sliding_window")?.unwrap_or(false) => {
            return Err(ModelError::Config(
                "config.json: 'use_sliding_window: true' (per-layer sliding window of Qwen2) is not supported".into(),
            ));
        }
        _ => None,
    };
    let spec = DecoderSpec {
        arch: model_type.to_string(),
        vocab_size: c.usize("vocab_size")?,
        hidden_size,
        num_layers: c.usize("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size: c.usize("intermediate_size")?,
        max_position_embeddings: c.opt_usize("max_position_embeddings")?.unwrap_or(4096),
        norm: Norm::Rms {
            eps: c.opt_f32("rms_norm_eps")?.unwrap_or(1e-6),
        },
        pos: PosEmbedding::Rope(rope),
        residual: Residual::Sequential,
        act,
        mlp: Mlp::Gated,
        qkv: QkvLayout::Separate,
        biases,
        tie_embeddings: c.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        embedding_norm: false,
        sliding_window,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        clip_qkv: None,
    };
    spec.validate()
        .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
    Ok(ArchInfo {
        spec,
        names: TensorNames::HfLlama,
        quant: Quantization::None,
    })
}

pub(super) fn hf_rope(c: &HfConfig<'_>, head_dim: usize) -> Result<Rope, ModelError> {
    // transformers >= 5: everything in `rope_parameters`; older: rope_theta + rope_scaling.
    let params = c.0.get("rope_parameters").filter(|v| v.is_object());
    let scaling = params.or_else(|| c.0.get("rope_scaling").filter(|v| v.is_object()));
    let theta = match params {
        Some(p) => HfConfig(p).opt_f32("rope_theta")?,
        None => None,
    }
    .or(c.opt_f32("rope_theta")?)
    .unwrap_or(10000.0);
    let scaling = match scaling {
        None => RopeScaling::None,
        Some(s) => {
            let s = HfConfig(s);
            let kind = s
                .opt_str("rope_type")
                .or(s.opt_str("type"))
                .unwrap_or("default");
            let factor = || {
                s.opt_f32("factor")?.ok_or_else(|| {
                    ModelError::Config(format!("config.json: rope scaling '{kind}' needs 'factor'"))
                })
            };
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear { factor: factor()? },
                "llama3" => RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor: s.opt_f32("low_freq_factor")?.unwrap_or(1.0),
                    high_freq_factor: s.opt_f32("high_freq_factor")?.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .opt_usize("original_max_position_embeddings")?
                        .unwrap_or(8192),
                },
                other => {
                    return Err(ModelError::Config(format!(
                        "config.json: unsupported rope scaling type '{other}' (supported: default, linear, llama3)"
                    )));
                }
            }
        }
    };
    let partial = c.opt_f32("partial_rotary_factor")?.unwrap_or(1.0);
    Ok(Rope {
        theta,
        rotary_dim: (head_dim as f32 * partial) as usize,
        style: RopeStyle::NeoX,
        scaling,
    })
}

/// The spec of GGUF `llama`, `mistral` or `qwen2` metadata (`{arch}.*` keys): GPT-J-style
/// rope pairing for the permuted llama/mistral Q/K rows, NeoX for qwen2; linear rope scaling
/// only. Biases and tied embeddings are settled later from the tensors present.
pub fn from_gguf(arch: &str, md: &BTreeMap<String, MetadataValue>) -> Result<ArchInfo, ModelError> {
    let g = GgufMeta { md, arch };
    let hidden_size = g.usize("embedding_length")?;
    let num_heads = g.usize("attention.head_count")?;
    if num_heads == 0 {
        return Err(ModelError::Config(format!(
            "GGUF metadata '{arch}.attention.head_count' must be > 0, got 0"
        )));
    }
    let num_kv_heads = g.opt_usize("attention.head_count_kv")?.unwrap_or(num_heads);
    let head_dim = g
        .opt_usize("attention.key_length")?
        .unwrap_or(hidden_size / num_heads);
    let vocab_size = g.vocab_size()?;
    let scaling = match g.opt_str("rope.scaling.type") {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: g.opt_f32("rope.scaling.factor")?.unwrap_or(1.0),
        },
        Some(other) => {
            return Err(ModelError::Config(format!(
                "GGUF metadata '{arch}.rope.scaling.type' = '{other}' is not supported"
            )));
        }
    };
    let rope = Rope {
        theta: g.opt_f32("rope.freq_base")?.unwrap_or(10000.0),
        rotary_dim: g.opt_usize("rope.dimension_count")?.unwrap_or(head_dim),
        style: if arch == "qwen2" {
            RopeStyle::NeoX
        } else {
            RopeStyle::GptJ
        },
        scaling,
    };
    let spec = DecoderSpec {
        arch: arch.to_string(),
        vocab_size,
        hidden_size,
        num_layers: g.usize("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size: g.usize("feed_forward_length")?,
        max_position_embeddings: g.opt_usize("context_length")?.unwrap_or(4096),
        norm: Norm::Rms {
            eps: g
                .opt_f32("attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5),
        },
        pos: PosEmbedding::Rope(rope),
        residual: Residual::Sequential,
        act: Activation::Silu,
        mlp: Mlp::Gated,
        qkv: QkvLayout::Separate,
        // Biases and tied embeddings are decided from which tensors exist (see `Checkpoint::fix_up_from_tensors`).
        biases: Biases {
            qkv: arch == "qwen2",
            ..Biases::default()
        },
        tie_embeddings: false,
        embedding_norm: false,
        sliding_window: None,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        clip_qkv: None,
    };
    spec.validate()
        .map_err(|e| ModelError::Config(format!("GGUF metadata: {e}")))?;
    Ok(ArchInfo {
        spec,
        names: TensorNames::Gguf,
        quant: Quantization::None,
    })
}
