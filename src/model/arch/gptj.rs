//! GPT-J (`GPTJForCausalLM`, GGUF `gptj`): attention and MLP in parallel off one shared
//! LayerNorm, partial rotary (`rotary_dim` < head_dim) with GPT-J's interleaved pairs, separate
//! q/k/v without biases, MLP with biases, untied head with a bias.
//!
//! Quirk: GPT-J's rotary base is fixed at 10000 and pairs dimensions (2i, 2i+1) (`rotate_every_two`),
//! in both the Hugging Face and the GGUF weights (llama.cpp does not permute GPT-J).

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
        GlobalTensor::TokenEmbedding => Some("transformer.wte.weight"),
        GlobalTensor::FinalNorm => Some("transformer.ln_f.weight"),
        GlobalTensor::FinalNormBias => Some("transformer.ln_f.bias"),
        GlobalTensor::LmHead => Some("lm_head.weight"),
        GlobalTensor::LmHeadBias => Some("lm_head.bias"),
        _ => None,
    }
}

pub(super) fn hf_layer(t: LayerTensor) -> Option<&'static str> {
    use LayerTensor::*;
    Some(match t {
        AttnNorm => "ln_1.weight",
        AttnNormBias => "ln_1.bias",
        Q => "attn.q_proj.weight",
        K => "attn.k_proj.weight",
        V => "attn.v_proj.weight",
        AttnOut => "attn.out_proj.weight",
        Up => "mlp.fc_in.weight",
        UpBias => "mlp.fc_in.bias",
        Down => "mlp.fc_out.weight",
        DownBias => "mlp.fc_out.bias",
        QBias | KBias | VBias | Qkv | QkvBias | AttnOutBias | MlpNorm | MlpNormBias | Gate
        | GateBias => return None,
    })
}

/// The GPT-J layer as a spec, from its numbers (shared by the loaders and the presets).
#[allow(clippy::too_many_arguments)]
pub fn gptj_spec(
    vocab_size: usize,
    hidden_size: usize,
    num_layers: usize,
    num_heads: usize,
    intermediate_size: usize,
    rotary_dim: usize,
    max_position_embeddings: usize,
    eps: f32,
    act: Activation,
) -> DecoderSpec {
    let head_dim = hidden_size / num_heads.max(1);
    DecoderSpec {
        arch: "gptj".to_string(),
        vocab_size,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        intermediate_size,
        max_position_embeddings,
        norm: Norm::Layer { eps, bias: true },
        pos: PosEmbedding::Rope(Rope {
            theta: 10000.0,
            rotary_dim,
            style: RopeStyle::GptJ,
            scaling: RopeScaling::None,
        }),
        residual: Residual::Parallel { shared_norm: true },
        act,
        mlp: Mlp::Plain,
        qkv: QkvLayout::Separate,
        biases: Biases {
            qkv: false,
            attn_out: false,
            mlp: true,
            lm_head: true,
        },
        tie_embeddings: false,
        embedding_norm: false,
        sliding_window: None,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        clip_qkv: None,
    }
}

/// The spec of a `GPTJForCausalLM` config.json (partial rotary from `rotary_dim`, untied head
/// unless `tie_word_embeddings: true`).
pub fn from_hf(config: &Value) -> Result<ArchInfo, ModelError> {
    let c = HfConfig(config);
    let hidden_size = c.usize_any(&["n_embd", "hidden_size"])?;
    let num_heads = c.usize_any(&["n_head", "num_attention_heads"])?;
    if num_heads == 0 || hidden_size % num_heads != 0 {
        return Err(ModelError::Config(format!(
            "config.json: n_embd ({hidden_size}) must be a positive multiple of n_head ({num_heads})"
        )));
    }
    let head_dim = hidden_size / num_heads;
    let mut spec = gptj_spec(
        c.usize("vocab_size")?,
        hidden_size,
        c.usize_any(&["n_layer", "num_hidden_layers"])?,
        num_heads,
        c.opt_usize("n_inner")?.unwrap_or(4 * hidden_size),
        c.opt_usize("rotary_dim")?.unwrap_or(head_dim),
        c.usize_any(&["n_positions", "max_position_embeddings"])?,
        c.opt_f32("layer_norm_epsilon")?.unwrap_or(1e-5),
        c.activation("activation_function", "gelu_new")?,
    );
    spec.tie_embeddings = c.opt_bool("tie_word_embeddings")?.unwrap_or(false);
    spec.validate()
        .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
    Ok(ArchInfo {
        spec,
        names: TensorNames::HfGptJ,
        quant: Quantization::None,
    })
}

/// The spec of GGUF `gptj` metadata (`gptj.*` keys; rotary width from `rope.dimension_count`,
/// context 2048 unless `context_length` is set).
pub fn from_gguf(md: &BTreeMap<String, MetadataValue>) -> Result<ArchInfo, ModelError> {
    let g = GgufMeta { md, arch: "gptj" };
    let hidden_size = g.usize("embedding_length")?;
    let num_heads = g.num_heads()?;
    let head_dim = hidden_size / num_heads;
    let spec = gptj_spec(
        g.vocab_size()?,
        hidden_size,
        g.usize("block_count")?,
        num_heads,
        g.usize("feed_forward_length")?,
        g.opt_usize("rope.dimension_count")?.unwrap_or(head_dim),
        g.opt_usize("context_length")?.unwrap_or(2048),
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
