//! MPT (`MptForCausalLM`, GGUF `mpt`): ALiBi, LayerNorm without bias, fused q|k|v (`Wqkv`),
//! optional `clip_qkv`, plain GELU (erf) MLP, no linear biases (`no_bias`), tied head.
//!
//! Quirks handled here:
//! - ALiBi slopes honour `attn_config.alibi_bias_max`; scores use `attn_config.softmax_scale` if
//!   set.
//!   transformers' `MptForCausalLM` always uses max_bias 8 whatever the config says; ferrum
//!   follows the config (as MosaicML's code, llama.cpp and vLLM do).
//! - The MLP width: transformers' `MptMLP` is always `4 * d_model` wide and ignores
//!   `expansion_ratio`, so a checkpoint it saves can disagree with its own config. The config
//!   gives the width first; `ffn_width_from_tensors` then lets layer 0's `up_proj`/`down_proj`
//!   overrule it when the two agree with each other (as loading in transformers would), with a
//!   load note. Any other FFN shape mismatch stays a shape error naming the tensor.
//! - Features transformers' MPT does not run either are refused by name: no-ALiBi (learned
//!   positions), `qk_ln`, `prefix_lm`, and attention types other than multi-head.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{ArchInfo, GgufMeta, GlobalTensor, HfConfig, LayerTensor, TensorNames};
use crate::loader::TensorSource;
use crate::loader::gguf::MetadataValue;
use crate::model::ModelError;
use crate::model::quant::Quantization;
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

/// The spec of an `MptForCausalLM` config.json (`d_model`, `n_heads`, `n_layers`,
/// `expansion_ratio`, `max_seq_len`, `no_bias` and `attn_config`'s ALiBi, softmax scale and
/// `clip_qkv`); refuses the variants listed in the module docs.
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
        quant: Quantization::None,
    })
}

/// Settles the MLP width of a Hugging Face MPT checkpoint from its tensors (see the module
/// quirks): when layer 0's `up_proj: [width, d_model]` and `down_proj: [d_model, width]` agree on
/// a `width` other than the config's, `spec.intermediate_size` becomes `width` and the returned
/// note says what was overruled. Returns None, changing nothing, when the tensors match the
/// config, are missing, or disagree with each other: the weight loader then reports the first
/// tensor whose shape is wrong, by name.
pub(crate) fn ffn_width_from_tensors(
    spec: &mut DecoderSpec,
    src: &dyn TensorSource,
) -> Option<String> {
    let h = spec.hidden_size;
    let up = TensorNames::HfMpt.layer(0, LayerTensor::Up)?;
    let down = TensorNames::HfMpt.layer(0, LayerTensor::Down)?;
    let up_shape = src.info(&up)?.shape;
    let down_shape = src.info(&down)?.shape;
    // up: [width, d_model], down: [d_model, width]
    let [width, up_in] = up_shape[..] else {
        return None;
    };
    if up_in != h || down_shape != [h, width] || width == 0 || width == spec.intermediate_size {
        return None;
    }
    let configured = spec.intermediate_size;
    spec.intermediate_size = width;
    Some(format!(
        "config.json's expansion_ratio gives an MLP width of {configured} ({} x d_model {h}), but \
         {up} is {up_shape:?} and {down} is {down_shape:?}: following the tensors (width {width}), \
         as transformers' MptForCausalLM does (its MLP ignores expansion_ratio)",
        configured as f64 / h as f64
    ))
}

/// The spec of GGUF `mpt` metadata (`mpt.*` keys: `attention.max_alibi_bias`,
/// `attention.clamp_kqv`, ...).
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
        quant: Quantization::None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::loader::random::RandomSource;

    /// d_model 8: an `expansion_ratio` of 2 configures a width of 16.
    fn spec_with_ratio(ratio: f64) -> DecoderSpec {
        let config = serde_json::json!({
            "d_model": 8, "n_heads": 2, "n_layers": 1, "vocab_size": 16,
            "expansion_ratio": ratio, "attn_config": {"alibi": true},
        });
        from_hf(&config).unwrap().spec
    }

    fn ffn_tensors(up: Option<[usize; 2]>, down: [usize; 2]) -> RandomSource {
        let mut tensors = vec![(
            "transformer.blocks.0.ffn.down_proj.weight".to_string(),
            down.to_vec(),
        )];
        if let Some(up) = up {
            tensors.push((
                "transformer.blocks.0.ffn.up_proj.weight".to_string(),
                up.to_vec(),
            ));
        }
        RandomSource::new(tensors, 1)
    }

    #[test]
    fn mlp_width_follows_tensors_that_agree_with_each_other() {
        let mut spec = spec_with_ratio(2.0);
        assert_eq!(spec.intermediate_size, 16);
        let note = ffn_width_from_tensors(&mut spec, &ffn_tensors(Some([32, 8]), [8, 32]));
        assert_eq!(spec.intermediate_size, 32);
        assert_eq!(
            note.as_deref(),
            Some(
                "config.json's expansion_ratio gives an MLP width of 16 (2 x d_model 8), but \
                 transformer.blocks.0.ffn.up_proj.weight is [32, 8] and \
                 transformer.blocks.0.ffn.down_proj.weight is [8, 32]: following the tensors \
                 (width 32), as transformers' MptForCausalLM does (its MLP ignores \
                 expansion_ratio)"
            )
        );
    }

    #[test]
    fn mlp_width_stays_when_tensors_match_or_disagree() {
        let cases = [
            // Matching the config: nothing to settle.
            (Some([16, 8]), [8, 16]),
            // up and down disagree on the width (3x vs 4x): the loader reports up_proj.
            (Some([24, 8]), [8, 32]),
            // Wrong input / output width.
            (Some([32, 4]), [8, 32]),
            (Some([32, 8]), [4, 32]),
            // Missing up_proj: the loader reports it.
            (None, [8, 32]),
        ];
        for (up, down) in cases {
            let mut spec = spec_with_ratio(2.0);
            let note = ffn_width_from_tensors(&mut spec, &ffn_tensors(up, down));
            assert!(note.is_none(), "{up:?} {down:?}: {note:?}");
            assert_eq!(spec.intermediate_size, 16, "{up:?} {down:?}");
        }
    }
}
