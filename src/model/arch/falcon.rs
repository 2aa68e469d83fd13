//! Falcon (`FalconForCausalLM`, the RW-era `RefinedWeb`/`RefinedWebModel` configs, GGUF `falcon`).
//!
//! Three layer shapes, all as data:
//! ```text
//!   old, parallel_attn (falcon-7b):  y = x + attn(ln(x)) + mlp(ln(x))          one input_layernorm
//!   old, sequential   (falcon-rw):   h = x + attn(ln1(x)); y = h + mlp(ln2(h))
//!   new_decoder_architecture (40b):  y = x + attn(ln_attn(x)) + mlp(ln_mlp(x))  (one norm if
//!                                    num_ln_in_parallel_attn == 1)
//! ```
//! Quirks handled here:
//! - The fused `query_key_value` layout depends on the variant: grouped
//!   `[num_kv, heads_per_group + 2, head_dim]` for multi-query (one KV head) and the new
//!   architecture, per head `[num_heads, 3, head_dim]` otherwise. llama.cpp's converter re-orders
//!   it to q | k | v, so GGUF is `FusedQkv::Concat`.
//! - ALiBi variants (falcon-rw) add `slope * (k - q)` to the scores *before* the 1/sqrt(head_dim)
//!   scale, so the bias is scaled too (`bias_scale`). transformers' eager Falcon attention adds
//!   the bias a second time through its mask; its SDPA path, the original RW code and vLLM add it
//!   once, which is what ferrum does (the fixture is generated with SDPA).
//! - RW-era keys: `n_head`, `n_layer`, `n_head_kv`; `RefinedWeb` implies the new architecture.

use std::collections::BTreeMap;

use serde_json::Value;

use super::llama::hf_rope;
use super::{ArchInfo, GgufMeta, GlobalTensor, HfConfig, LayerTensor, TensorNames};
use crate::loader::gguf::MetadataValue;
use crate::model::ModelError;
use crate::model::quant::Quantization;
use crate::model::spec::{
    Activation, Biases, DecoderSpec, FusedQkv, Mlp, Norm, PosEmbedding, QkvLayout, Residual, Rope,
    RopeScaling, RopeStyle,
};

pub(super) fn hf_global(t: GlobalTensor) -> Option<&'static str> {
    match t {
        GlobalTensor::TokenEmbedding => Some("transformer.word_embeddings.weight"),
        GlobalTensor::FinalNorm => Some("transformer.ln_f.weight"),
        GlobalTensor::FinalNormBias => Some("transformer.ln_f.bias"),
        GlobalTensor::LmHead => Some("lm_head.weight"),
        _ => None,
    }
}

pub(super) fn hf_layer(t: LayerTensor, ln_attn_mlp: bool) -> Option<&'static str> {
    use LayerTensor::*;
    Some(match (t, ln_attn_mlp) {
        (AttnNorm, true) => "ln_attn.weight",
        (AttnNormBias, true) => "ln_attn.bias",
        (MlpNorm, true) => "ln_mlp.weight",
        (MlpNormBias, true) => "ln_mlp.bias",
        (AttnNorm, false) => "input_layernorm.weight",
        (AttnNormBias, false) => "input_layernorm.bias",
        (MlpNorm, false) => "post_attention_layernorm.weight",
        (MlpNormBias, false) => "post_attention_layernorm.bias",
        (Qkv, _) => "self_attention.query_key_value.weight",
        (QkvBias, _) => "self_attention.query_key_value.bias",
        (AttnOut, _) => "self_attention.dense.weight",
        (AttnOutBias, _) => "self_attention.dense.bias",
        (Up, _) => "mlp.dense_h_to_4h.weight",
        (UpBias, _) => "mlp.dense_h_to_4h.bias",
        (Down, _) => "mlp.dense_4h_to_h.weight",
        (DownBias, _) => "mlp.dense_4h_to_h.bias",
        (Q | K | V | QBias | KBias | VBias | Gate | GateBias, _) => return None,
    })
}

/// The Falcon layer as a spec (rotary, no ALiBi), from its numbers; `shared_norm` for
/// falcon-7b-style layers with one LayerNorm.
#[allow(clippy::too_many_arguments)]
pub fn falcon_spec(
    vocab_size: usize,
    hidden_size: usize,
    num_layers: usize,
    num_heads: usize,
    num_kv_heads: usize,
    intermediate_size: usize,
    shared_norm: bool,
    eps: f32,
) -> DecoderSpec {
    let head_dim = hidden_size / num_heads.max(1);
    DecoderSpec {
        arch: "falcon".to_string(),
        vocab_size,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size,
        max_position_embeddings: 2048,
        norm: Norm::Layer { eps, bias: true },
        pos: PosEmbedding::Rope(Rope {
            theta: 10000.0,
            rotary_dim: head_dim,
            style: RopeStyle::NeoX,
            scaling: RopeScaling::None,
        }),
        residual: Residual::Parallel { shared_norm },
        act: Activation::Gelu,
        mlp: Mlp::Plain,
        qkv: QkvLayout::Fused {
            layout: FusedQkv::KvGroups,
        },
        biases: Biases::default(),
        tie_embeddings: true,
        embedding_norm: false,
        sliding_window: None,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        clip_qkv: None,
    }
}

/// The spec of a `FalconForCausalLM` (or RW-era `RefinedWeb`/`RefinedWebModel`) config.json:
/// picks the layer shape, fused qkv layout and KV heads from `new_decoder_architecture`,
/// `multi_query`, `parallel_attn` and `num_ln_in_parallel_attn`, and ALiBi or rotary positions.
pub fn from_hf(model_type: &str, config: &Value) -> Result<ArchInfo, ModelError> {
    let c = HfConfig(config);
    let hidden_size = c.usize_any(&["hidden_size", "n_embed"])?;
    let num_heads = c.usize_any(&["num_attention_heads", "n_head"])?;
    if num_heads == 0 || hidden_size % num_heads != 0 {
        return Err(ModelError::Config(format!(
            "config.json: hidden_size ({hidden_size}) must be a positive multiple of num_attention_heads ({num_heads})"
        )));
    }
    let head_dim = hidden_size / num_heads;
    let new_arch = c
        .opt_bool("new_decoder_architecture")?
        .unwrap_or(model_type == "RefinedWeb");
    let multi_query = c.opt_bool("multi_query")?.unwrap_or(true);
    let parallel_attn = c.opt_bool("parallel_attn")?.unwrap_or(true);
    let alibi = c.opt_bool("alibi")?.unwrap_or(false);
    let bias = c.opt_bool("bias")?.unwrap_or(false);

    let kv_heads_key = || -> Result<usize, ModelError> {
        Ok(c.opt_usize("num_kv_heads")?
            .or(c.opt_usize("n_head_kv")?)
            .unwrap_or(num_heads))
    };
    let (num_kv_heads, layout) = if new_arch {
        (kv_heads_key()?, FusedQkv::KvGroups)
    } else if multi_query {
        (1, FusedQkv::KvGroups)
    } else {
        (num_heads, FusedQkv::PerHead)
    };
    let (residual, ln_attn_mlp) = if new_arch {
        if !parallel_attn {
            return Err(ModelError::Config(
                "config.json: 'new_decoder_architecture: true' with 'parallel_attn: false' is not a Falcon layout (transformers cannot run it either)".into(),
            ));
        }
        let num_ln = c.opt_usize("num_ln_in_parallel_attn")?.unwrap_or(2);
        match num_ln {
            1 => (Residual::Parallel { shared_norm: true }, false),
            2 => (Residual::Parallel { shared_norm: false }, true),
            other => {
                return Err(ModelError::Config(format!(
                    "config.json: 'num_ln_in_parallel_attn' must be 1 or 2, got {other}"
                )));
            }
        }
    } else if parallel_attn {
        (Residual::Parallel { shared_norm: true }, false)
    } else {
        (Residual::Sequential, false)
    };
    let pos = if alibi {
        PosEmbedding::Alibi {
            max_bias: 8.0,
            bias_scale: 1.0 / (head_dim as f32).sqrt(),
        }
    } else {
        PosEmbedding::Rope(hf_rope(&c, head_dim)?)
    };
    let mut spec = falcon_spec(
        c.usize("vocab_size")?,
        hidden_size,
        c.usize_any(&["num_hidden_layers", "n_layer"])?,
        num_heads,
        num_kv_heads,
        c.opt_usize("ffn_hidden_size")?.unwrap_or(4 * hidden_size),
        false,
        c.opt_f32("layer_norm_epsilon")?.unwrap_or(1e-5),
    );
    spec.max_position_embeddings = c.opt_usize("max_position_embeddings")?.unwrap_or(2048);
    spec.residual = residual;
    spec.pos = pos;
    spec.qkv = QkvLayout::Fused { layout };
    spec.act = c.activation("activation", "gelu")?;
    spec.biases = Biases {
        qkv: bias,
        attn_out: bias,
        mlp: bias,
        lm_head: false,
    };
    spec.tie_embeddings = c.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    spec.validate()
        .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
    Ok(ArchInfo {
        spec,
        names: TensorNames::HfFalcon { ln_attn_mlp },
        quant: Quantization::None,
    })
}

/// GGUF `falcon` (llama.cpp: rotary NeoX, parallel attention; two norms when `attn_norm_2`
/// exists, which `Checkpoint` settles from the tensors present).
pub fn from_gguf(md: &BTreeMap<String, MetadataValue>) -> Result<ArchInfo, ModelError> {
    let g = GgufMeta { md, arch: "falcon" };
    let hidden_size = g.usize("embedding_length")?;
    let num_heads = g.num_heads()?;
    let num_kv_heads = g.opt_usize("attention.head_count_kv")?.unwrap_or(1);
    let mut spec = falcon_spec(
        g.vocab_size()?,
        hidden_size,
        g.usize("block_count")?,
        num_heads,
        num_kv_heads,
        g.usize("feed_forward_length")?,
        true,
        g.opt_f32("attention.layer_norm_epsilon")?.unwrap_or(1e-5),
    );
    spec.qkv = QkvLayout::Fused {
        layout: FusedQkv::Concat,
    };
    spec.max_position_embeddings = g.opt_usize("context_length")?.unwrap_or(2048);
    if let PosEmbedding::Rope(rope) = &mut spec.pos {
        rope.theta = g.opt_f32("rope.freq_base")?.unwrap_or(10000.0);
    }
    spec.validate()
        .map_err(|e| ModelError::Config(format!("GGUF metadata: {e}")))?;
    Ok(ArchInfo {
        spec,
        names: TensorNames::GgufFalcon,
        quant: Quantization::None,
    })
}
