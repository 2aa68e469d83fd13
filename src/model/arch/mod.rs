//! Architecture modules: checkpoint config → `DecoderSpec`, and the names of its tensors.
//! Nothing here computes; the generic decoder reads the spec and asks `TensorNames` for tensors.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::loader::gguf::MetadataValue;
use crate::model::ModelError;
use crate::model::spec::DecoderSpec;

pub mod llama;

/// A tensor of the model outside the layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalTensor {
    TokenEmbedding,
    PositionEmbedding,
    EmbeddingNorm,
    EmbeddingNormBias,
    FinalNorm,
    FinalNormBias,
    LmHead,
    LmHeadBias,
    /// GGUF Llama 3 per-pair rope frequency divisors.
    RopeFreqs,
}

/// A tensor of one decoder layer. Each architecture maps the ones it has to names; fused
/// checkpoints (one qkv tensor) are split or re-laid out at load by the architecture's fix-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerTensor {
    AttnNorm,
    AttnNormBias,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    AttnOut,
    AttnOutBias,
    MlpNorm,
    MlpNormBias,
    Gate,
    GateBias,
    Up,
    UpBias,
    Down,
    DownBias,
}

/// Tensor naming schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorNames {
    /// Hugging Face `LlamaForCausalLM` and its relatives (Mistral, Qwen2): `model.layers.N.*`.
    HfLlama,
    /// llama.cpp GGUF names: `blk.N.*`.
    Gguf,
}

impl TensorNames {
    pub fn global(self, t: GlobalTensor) -> Option<String> {
        use GlobalTensor::*;
        let name = match (self, t) {
            (TensorNames::HfLlama, TokenEmbedding) => "model.embed_tokens.weight",
            (TensorNames::HfLlama, FinalNorm) => "model.norm.weight",
            (TensorNames::HfLlama, LmHead) => "lm_head.weight",
            (TensorNames::HfLlama, _) => return None,
            (TensorNames::Gguf, TokenEmbedding) => "token_embd.weight",
            (TensorNames::Gguf, PositionEmbedding) => "position_embd.weight",
            (TensorNames::Gguf, EmbeddingNorm) => "token_embd_norm.weight",
            (TensorNames::Gguf, EmbeddingNormBias) => "token_embd_norm.bias",
            (TensorNames::Gguf, FinalNorm) => "output_norm.weight",
            (TensorNames::Gguf, FinalNormBias) => "output_norm.bias",
            (TensorNames::Gguf, LmHead) => "output.weight",
            (TensorNames::Gguf, LmHeadBias) => "output.bias",
            (TensorNames::Gguf, RopeFreqs) => "rope_freqs.weight",
        };
        Some(name.to_string())
    }

    pub fn layer(self, layer_idx: usize, t: LayerTensor) -> Option<String> {
        use LayerTensor::*;
        let suffix = match (self, t) {
            (TensorNames::HfLlama, AttnNorm) => "input_layernorm.weight",
            (TensorNames::HfLlama, Q) => "self_attn.q_proj.weight",
            (TensorNames::HfLlama, K) => "self_attn.k_proj.weight",
            (TensorNames::HfLlama, V) => "self_attn.v_proj.weight",
            (TensorNames::HfLlama, QBias) => "self_attn.q_proj.bias",
            (TensorNames::HfLlama, KBias) => "self_attn.k_proj.bias",
            (TensorNames::HfLlama, VBias) => "self_attn.v_proj.bias",
            (TensorNames::HfLlama, AttnOut) => "self_attn.o_proj.weight",
            (TensorNames::HfLlama, AttnOutBias) => "self_attn.o_proj.bias",
            (TensorNames::HfLlama, MlpNorm) => "post_attention_layernorm.weight",
            (TensorNames::HfLlama, Gate) => "mlp.gate_proj.weight",
            (TensorNames::HfLlama, GateBias) => "mlp.gate_proj.bias",
            (TensorNames::HfLlama, Up) => "mlp.up_proj.weight",
            (TensorNames::HfLlama, UpBias) => "mlp.up_proj.bias",
            (TensorNames::HfLlama, Down) => "mlp.down_proj.weight",
            (TensorNames::HfLlama, DownBias) => "mlp.down_proj.bias",
            (TensorNames::HfLlama, AttnNormBias | MlpNormBias) => return None,
            (TensorNames::Gguf, AttnNorm) => "attn_norm.weight",
            (TensorNames::Gguf, AttnNormBias) => "attn_norm.bias",
            (TensorNames::Gguf, Q) => "attn_q.weight",
            (TensorNames::Gguf, K) => "attn_k.weight",
            (TensorNames::Gguf, V) => "attn_v.weight",
            (TensorNames::Gguf, QBias) => "attn_q.bias",
            (TensorNames::Gguf, KBias) => "attn_k.bias",
            (TensorNames::Gguf, VBias) => "attn_v.bias",
            (TensorNames::Gguf, AttnOut) => "attn_output.weight",
            (TensorNames::Gguf, AttnOutBias) => "attn_output.bias",
            (TensorNames::Gguf, MlpNorm) => "ffn_norm.weight",
            (TensorNames::Gguf, MlpNormBias) => "ffn_norm.bias",
            (TensorNames::Gguf, Gate) => "ffn_gate.weight",
            (TensorNames::Gguf, GateBias) => "ffn_gate.bias",
            (TensorNames::Gguf, Up) => "ffn_up.weight",
            (TensorNames::Gguf, UpBias) => "ffn_up.bias",
            (TensorNames::Gguf, Down) => "ffn_down.weight",
            (TensorNames::Gguf, DownBias) => "ffn_down.bias",
        };
        let prefix = match self {
            TensorNames::HfLlama => format!("model.layers.{layer_idx}."),
            TensorNames::Gguf => format!("blk.{layer_idx}."),
        };
        Some(prefix + suffix)
    }
}

/// An architecture recognized from a checkpoint: its spec and how its tensors are named.
#[derive(Debug, Clone)]
pub struct ArchInfo {
    pub spec: DecoderSpec,
    pub names: TensorNames,
}

/// Recognizes a Hugging Face `config.json`.
pub fn from_hf_config(config: &Value) -> Result<ArchInfo, ModelError> {
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let arch_name = config
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .unwrap_or(model_type);
    match model_type {
        "llama" | "mistral" | "qwen2" => llama::from_hf(model_type, config),
        _ => Err(ModelError::UnsupportedArchitecture(format!(
            "{arch_name} (model_type '{model_type}'); supported: llama, mistral, qwen2"
        ))),
    }
}

/// Recognizes a GGUF file from its metadata (`general.architecture`).
pub fn from_gguf(metadata: &BTreeMap<String, MetadataValue>) -> Result<ArchInfo, ModelError> {
    let arch = metadata
        .get("general.architecture")
        .and_then(MetadataValue::as_str)
        .unwrap_or("");
    match arch {
        "llama" | "mistral" | "qwen2" => llama::from_gguf(arch, metadata),
        "" => Err(ModelError::Config(
            "GGUF metadata has no 'general.architecture'".into(),
        )),
        other => Err(ModelError::UnsupportedArchitecture(format!(
            "GGUF general.architecture '{other}'; supported: llama, mistral, qwen2"
        ))),
    }
}

/// Typed reads of config values; errors name the key and the value found.
pub(crate) struct HfConfig<'a>(pub &'a Value);

impl HfConfig<'_> {
    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?
            .ok_or_else(|| ModelError::Config(format!("config.json: missing '{key}'")))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    ModelError::Config(format!(
                        "config.json: '{key}' must be a non-negative integer, got {v}"
                    ))
                }),
        }
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, ModelError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(|f| Some(f as f32)).ok_or_else(|| {
                ModelError::Config(format!("config.json: '{key}' must be a number, got {v}"))
            }),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                ModelError::Config(format!(
                    "config.json: '{key}' must be true or false, got {v}"
                ))
            }),
        }
    }

    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }
}

/// Typed reads of GGUF metadata; errors name the key.
pub(crate) struct GgufMeta<'a> {
    pub md: &'a BTreeMap<String, MetadataValue>,
    pub arch: &'a str,
}

impl GgufMeta<'_> {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }

    pub fn opt_usize(&self, suffix: &str) -> Result<Option<usize>, ModelError> {
        let key = self.key(suffix);
        match self.md.get(&key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    ModelError::Config(format!(
                        "GGUF metadata '{key}' must be a non-negative integer, got {v:?}"
                    ))
                }),
        }
    }

    pub fn usize(&self, suffix: &str) -> Result<usize, ModelError> {
        self.opt_usize(suffix)?.ok_or_else(|| {
            ModelError::Config(format!("GGUF metadata: missing '{}'", self.key(suffix)))
        })
    }

    pub fn opt_f32(&self, suffix: &str) -> Result<Option<f32>, ModelError> {
        let key = self.key(suffix);
        match self.md.get(&key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(|f| Some(f as f32)).ok_or_else(|| {
                ModelError::Config(format!("GGUF metadata '{key}' must be a number, got {v:?}"))
            }),
        }
    }

    pub fn opt_str(&self, suffix: &str) -> Option<&str> {
        self.md
            .get(&self.key(suffix))
            .and_then(MetadataValue::as_str)
    }
}
