//! MPT (`MptForCausalLM`, GGUF `mpt`): ALiBi, LayerNorm without bias, fused q|k|v (`Wqkv`),
//! optional `clip_qkv`, plain GELU (erf) MLP, no linear biases (`no_bias`), tied head.
//!
//! Quirks handled here:
//! - ALiBi slopes honour `attn_config.alibi_bias_max`; scores use `attn_config.softmax_scale` if
//!   set.
//!   transformers' `MptForCausalLM` always uses max_bias 8 and a 4x MLP whatever the config says;
//!   ferrum follows the config (as MosaicML's code and vLLM do), and checks the MLP width against
//!   the tensors.
//! - Features transformers' MPT does not run either are refused by name: no-ALiBi (learned
//!   positions), `qk_ln`, `prefix_lm`, and attention types other than multi-head.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{ArchInfo, GgufMeta, GlobalTensor, HfConfig, LayerTensor, TensorNames};
use crate::loader::gguf::MetadataValue;
use crate::model::ModelError;
use crate::model::spec::{
    Activation, Biases, DecoderSpec, FusedQkv, Mlp, Norm, PosEmbedding, QkvLayout, Residual,
};

pub(super) fn hf_global(t: GlobalTensor) -> Option<&'static str> {
    match t {
        GlobalTensor::TokenEmbedding => Some("transformer.wte.weight"),
        GlobalTensor::FinalNorm => Some("transformer.norm_f.weight"),
        GlobalTensor::FinalNormBias => Some("transformer.norm_f.bias"),
        GlobalTensor::LmHead => Some("lm_head.weight"),
        _ => None,
    }
}

pub(super) fn hf_layer(t: LayerTensor) -> Option<&'static str> {
    use LayerTensor::*;
    Some(match t {
        AttnNorm => "norm_1.weight",
        AttnNormBias => "norm_1.bias",
        Qkv => "attn.Wqkv.weight",
        QkvBias => "attn.Wqkv.bias",
        AttnOut => "attn.out_proj.weight",
        AttnOutBias => "attn.out_proj.bias",
        MlpNorm => "norm_2.weight",
        MlpNormBias => "norm_2.bias",
        Up => "ffn.up_proj.weight",
        UpBias => "ffn.up_proj.bias",
        Down => "ffn.down_proj.weight",
        DownBias => "ffn.down_proj.bias",
        Q | K | V | QBias | KBias | VBias | Gate | GateBias => return None,
    })
}

/// The MPT layer as a spec, from its numbers (shared by the loaders and the presets).
#[allow(clippy::too_many_arguments)]
pub fn mpt_spec(
    vocab_size: usize,
    hidden_size: usize,
    num_layers: usize,
    num_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    alibi_bias_max: f32,
    no_bias: bool,
    eps: f32,
) -> DecoderSpec {
    let head_dim = hidden_size / num_heads.max(1);
    DecoderSpec {
        arch: "mpt".to_string(),
        vocab_size,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        intermediate_size,
        max_position_embeddings,
        norm: Norm::Layer {
            eps,
            bias: !no_bias,
        },
        pos: PosEmbedding::Alibi {
            max_bias: alibi_bias_max,
            bias_scale: 1.0,
        },
        residual: Residual::Sequential,
        act: Activation::Gelu,
        mlp: Mlp::Plain,
        qkv: QkvLayout::Fused {
            layout: FusedQkv::Concat,
        },
        biases: Biases {
            qkv: !no_bias,
            attn_out: !no_bias,
            mlp: !no_bias,
            lm_head: false,
        },
        tie_embeddings: true,
        embedding_norm: false,
        sliding_window: None,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        clip_qkv: None,
    }
}

pub fn from_hf(config: &Value) -> Result<ArchInfo, ModelError> {
    let c = HfConfig(config);
    let hidden_size = c.usize_any(&["d_model", "hidden_size"])?;
    let num_heads = c.usize_any(&["n_heads", "num_attention_heads"])?;
    if num_heads == 0 || hidden_size % num_heads != 0 {
        return Err(ModelError::Config(format!(
            "config.json: d_model ({hidden_size}) must be a positive multiple of n_heads ({num_heads})"
        )));
    }
    let empty = Value::Object(Default::default());
    let attn = HfConfig(config.get("attn_config").unwrap_or(&empty));
    if !attn.opt_bool("alibi")?.unwrap_or(false) {
        return Err(ModelError::Config(
            "config.json: MPT without 'attn_config.alibi: true' (learned positions) is not supported".into(),
        ));
    }
    for (key, what) in [
        ("qk_ln", "LayerNorm on q and k"),
        ("prefix_lm", "prefix-LM attention"),
    ] {
        if attn.opt_bool(key)?.unwrap_or(false) {
            return Err(ModelError::Config(format!(
                "config.json: 'attn_config.{key}: true' ({what}) is not supported"
            )));
        }
    }
    match attn.opt_str("attn_type").unwrap_or("multihead_attention") {
        "multihead_attention" => {}
        other => {
            return Err(ModelError::Config(format!(
                "config.json: 'attn_config.attn_type' '{other}' is not supported (supported: multihead_attention)"
            )));
        }
    }
    let expansion_ratio = c.opt_f32("expansion_ratio")?.unwrap_or(4.0);
    let no_bias = c.opt_bool("no_bias")?.unwrap_or(true);
    let mut spec = mpt_spec(
        c.usize("vocab_size")?,
        hidden_size,
        c.usize_any(&["n_layers", "num_hidden_layers"])?,
        num_heads,
        (expansion_ratio * hidden_size as f32).round() as usize,
        c.opt_usize("max_seq_len")?.unwrap_or(2048),
        attn.opt_f32("alibi_bias_max")?.unwrap_or(8.0),
        no_bias,
        c.opt_f32("layer_norm_epsilon")?.unwrap_or(1e-5),
    );
    if let Some(scale) = attn.opt_f32("softmax_scale")? {
        spec.attn_scale = scale;
    }
    spec.clip_qkv = attn.opt_f32("clip_qkv")?.filter(|&v| v > 0.0);
    spec.tie_embeddings = c.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    spec.validate()
        .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
    Ok(ArchInfo {
        spec,
        names: TensorNames::HfMpt,
    })
}

pub fn from_gguf(md: &BTreeMap<String, MetadataValue>) -> Result<ArchInfo, ModelError> {
    let g = GgufMeta { md, arch: "mpt" };
    let mut spec = mpt_spec(
        g.vocab_size()?,
        g.usize("embedding_length")?,
        g.usize("block_count")?,
        g.num_heads()?,
        g.usize("feed_forward_length")?,
        g.opt_usize("context_length")?.unwrap_or(2048),
        g.opt_f32("attention.max_alibi_bias")?.unwrap_or(8.0),
        true,
        g.opt_f32("attention.layer_norm_epsilon")?.unwrap_or(1e-5),
    );
    spec.clip_qkv = g.opt_f32("attention.clamp_kqv")?.filter(|&v| v > 0.0);
    spec.validate()
        .map_err(|e| ModelError::Config(format!("GGUF metadata: {e}")))?;
    Ok(ArchInfo {
        spec,
        names: TensorNames::Gguf,
    })
}
