//! Architecture modules: checkpoint config → `DecoderSpec`, and the names of its tensors.
//! Nothing here computes; the generic decoder reads the spec and asks `TensorNames` for tensors.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::loader::gguf::MetadataValue;
use crate::model::ModelError;
use crate::model::quant::Quantization;
use crate::model::spec::{Activation, DecoderSpec};

pub mod bloom;
pub mod falcon;
pub mod gpt2;
pub mod gptj;
pub mod llama;
pub mod mpt;

/// A tensor of the model outside the layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalTensor {
    /// Token embedding table `[vocab_size, hidden]`.
    TokenEmbedding,
    /// Learned position table `[num_positions, hidden]` (GPT-2).
    PositionEmbedding,
    /// Weight of the norm applied to the embeddings before layer 0 (BLOOM) `[hidden]`.
    EmbeddingNorm,
    /// Bias of the embedding norm `[hidden]`.
    EmbeddingNormBias,
    /// Weight of the norm after the last layer `[hidden]`.
    FinalNorm,
    /// Bias of the final norm `[hidden]` (LayerNorm models).
    FinalNormBias,
    /// LM head `[vocab_size, hidden]`; absent when the embeddings are tied.
    LmHead,
    /// LM head bias `[vocab_size]`.
    LmHeadBias,
    /// GGUF Llama 3 per-pair rope frequency divisors.
    RopeFreqs,
}

/// A tensor of one decoder layer. Each architecture maps the ones it has to names; fused
/// checkpoints (one qkv tensor) are split or re-laid out at load by the architecture's fix-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerTensor {
    /// Weight of the norm before attention (the shared norm of a parallel layer) `[hidden]`.
    AttnNorm,
    /// Bias of that norm `[hidden]`.
    AttnNormBias,
    /// Query projection `[q_dim, hidden]`.
    Q,
    /// Key projection `[kv_dim, hidden]`.
    K,
    /// Value projection `[kv_dim, hidden]`.
    V,
    /// Query bias `[q_dim]`.
    QBias,
    /// Key bias `[kv_dim]`.
    KBias,
    /// Value bias `[kv_dim]`.
    VBias,
    /// Fused q/k/v projection, rows in the spec's `FusedQkv` order.
    Qkv,
    /// Bias of the fused projection `[q_dim + 2 * kv_dim]`, in the same order as its rows.
    QkvBias,
    /// Attention output projection `[hidden, q_dim]`.
    AttnOut,
    /// Bias of the output projection `[hidden]`.
    AttnOutBias,
    /// Weight of the norm before the MLP `[hidden]` (absent in shared-norm parallel layers).
    MlpNorm,
    /// Bias of that norm `[hidden]`.
    MlpNormBias,
    /// Gate projection of a gated MLP `[intermediate, hidden]`.
    Gate,
    /// Gate bias `[intermediate]`.
    GateBias,
    /// Up projection `[intermediate, hidden]` (the only input projection of a plain MLP).
    Up,
    /// Up bias `[intermediate]`.
    UpBias,
    /// Down projection `[hidden, intermediate]`.
    Down,
    /// Down bias `[hidden]`.
    DownBias,
}

/// Tensor naming schemes: one per checkpoint family. Each architecture module owns its table
/// (`hf_global` / `hf_layer`); this enum only dispatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorNames {
    /// Hugging Face `LlamaForCausalLM` and its relatives (Mistral, Qwen2): `model.layers.N.*`.
    HfLlama,
    /// `GPT2LMHeadModel`: `transformer.h.N.*`, Conv1D weights stored `[in, out]`.
    HfGpt2,
    /// `GPTJForCausalLM`: `transformer.h.N.*`.
    HfGptJ,
    /// `FalconForCausalLM`: `transformer.h.N.*`; `ln_attn_mlp` selects `ln_attn`/`ln_mlp`
    /// (`new_decoder_architecture` with two norms) over `input_layernorm`/`post_attention_layernorm`.
    HfFalcon {
        /// Two-norm layers name their norms `ln_attn`/`ln_mlp` (true) instead of
        /// `input_layernorm`/`post_attention_layernorm` (false).
        ln_attn_mlp: bool,
    },
    /// `MptForCausalLM`: `transformer.blocks.N.*`.
    HfMpt,
    /// `BloomForCausalLM`: `transformer.h.N.*`.
    HfBloom,
    /// llama.cpp GGUF names: `blk.N.*`.
    Gguf,
    /// llama.cpp GGUF Falcon: as `Gguf`, but the MLP norm of two-norm layers is `attn_norm_2`.
    GgufFalcon,
}

impl TensorNames {
    /// The checkpoint's name for a global tensor, or None when this family has no such tensor.
    pub fn global(self, t: GlobalTensor) -> Option<String> {
        let name = match self {
            TensorNames::HfLlama => llama::hf_global(t),
            TensorNames::HfGpt2 => gpt2::hf_global(t),
            TensorNames::HfGptJ => gptj::hf_global(t),
            TensorNames::HfFalcon { .. } => falcon::hf_global(t),
            TensorNames::HfMpt => mpt::hf_global(t),
            TensorNames::HfBloom => bloom::hf_global(t),
            TensorNames::Gguf | TensorNames::GgufFalcon => gguf_global(t),
        }?;
        Some(name.to_string())
    }

    /// The checkpoint's name for tensor `t` of layer `layer_idx` (0-based), or None when this
    /// family has no such tensor.
    pub fn layer(self, layer_idx: usize, t: LayerTensor) -> Option<String> {
        let suffix = match self {
            TensorNames::HfLlama => llama::hf_layer(t),
            TensorNames::HfGpt2 => gpt2::hf_layer(t),
            TensorNames::HfGptJ => gptj::hf_layer(t),
            TensorNames::HfFalcon { ln_attn_mlp } => falcon::hf_layer(t, ln_attn_mlp),
            TensorNames::HfMpt => mpt::hf_layer(t),
            TensorNames::HfBloom => bloom::hf_layer(t),
            TensorNames::GgufFalcon if t == LayerTensor::MlpNorm => Some("attn_norm_2.weight"),
            TensorNames::GgufFalcon if t == LayerTensor::MlpNormBias => Some("attn_norm_2.bias"),
            TensorNames::Gguf | TensorNames::GgufFalcon => gguf_layer(t),
        }?;
        let prefix = match self {
            TensorNames::HfLlama => "model.layers.",
            TensorNames::HfGpt2
            | TensorNames::HfGptJ
            | TensorNames::HfFalcon { .. }
            | TensorNames::HfBloom => "transformer.h.",
            TensorNames::HfMpt => "transformer.blocks.",
            TensorNames::Gguf | TensorNames::GgufFalcon => "blk.",
        };
        Some(format!("{prefix}{layer_idx}.{suffix}"))
    }

    /// Whether the names are llama.cpp's GGUF names (`blk.N.*`).
    pub fn is_gguf(self) -> bool {
        matches!(self, TensorNames::Gguf | TensorNames::GgufFalcon)
    }

    /// Linear weights are stored `[in_features, out_features]` (GPT-2's `Conv1D`) and are
    /// transposed at load.
    pub fn transposed_linears(self) -> bool {
        self == TensorNames::HfGpt2
    }

    /// The prefix of the base model's tensors that some checkpoints omit (the original GPT-2 and
    /// BLOOM uploads name `wte.weight`, `h.0.…` instead of `transformer.wte.weight`, …).
    pub fn optional_prefix(self) -> Option<&'static str> {
        match self {
            TensorNames::HfGpt2
            | TensorNames::HfGptJ
            | TensorNames::HfFalcon { .. }
            | TensorNames::HfMpt
            | TensorNames::HfBloom => Some("transformer."),
            TensorNames::HfLlama | TensorNames::Gguf | TensorNames::GgufFalcon => None,
        }
    }
}

fn gguf_global(t: GlobalTensor) -> Option<&'static str> {
    use GlobalTensor::*;
    Some(match t {
        TokenEmbedding => "token_embd.weight",
        PositionEmbedding => "position_embd.weight",
        EmbeddingNorm => "token_embd_norm.weight",
        EmbeddingNormBias => "token_embd_norm.bias",
        FinalNorm => "output_norm.weight",
        FinalNormBias => "output_norm.bias",
        LmHead => "output.weight",
        LmHeadBias => "output.bias",
        RopeFreqs => "rope_freqs.weight",
    })
}

fn gguf_layer(t: LayerTensor) -> Option<&'static str> {
    use LayerTensor::*;
    Some(match t {
        AttnNorm => "attn_norm.weight",
        AttnNormBias => "attn_norm.bias",
        Q => "attn_q.weight",
        K => "attn_k.weight",
        V => "attn_v.weight",
        QBias => "attn_q.bias",
        KBias => "attn_k.bias",
        VBias => "attn_v.bias",
        Qkv => "attn_qkv.weight",
        QkvBias => "attn_qkv.bias",
        AttnOut => "attn_output.weight",
        AttnOutBias => "attn_output.bias",
        MlpNorm => "ffn_norm.weight",
        MlpNormBias => "ffn_norm.bias",
        Gate => "ffn_gate.weight",
        GateBias => "ffn_gate.bias",
        Up => "ffn_up.weight",
        UpBias => "ffn_up.bias",
        Down => "ffn_down.weight",
        DownBias => "ffn_down.bias",
    })
}

/// An architecture recognized from a checkpoint: its spec, how its tensors are named and how its
/// linears are stored.
#[derive(Debug, Clone)]
pub struct ArchInfo {
    /// The model as data, from the checkpoint's config (fixed up from the tensors present by
    /// `Checkpoint::open`).
    pub spec: DecoderSpec,
    /// How the checkpoint names its tensors.
    pub names: TensorNames,
    /// How its linear weights are stored: plain, or pre-quantized FP8 with scales (set by
    /// `Checkpoint::open` from the checkpoint's config files; `from_hf_config` leaves it None).
    pub quant: Quantization,
}

/// Hugging Face `model_type`s ferrum loads.
pub const HF_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "gpt2",
    "gptj",
    "falcon",
    "RefinedWeb",
    "RefinedWebModel",
    "mpt",
    "bloom",
];

/// GGUF `general.architecture`s ferrum loads.
pub const GGUF_ARCHITECTURES: &[&str] = &[
    "llama", "mistral", "qwen2", "gpt2", "gptj", "falcon", "mpt", "bloom",
];

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
        "gpt2" => gpt2::from_hf(config),
        "gptj" => gptj::from_hf(config),
        "falcon" | "RefinedWeb" | "RefinedWebModel" => falcon::from_hf(model_type, config),
        "mpt" => mpt::from_hf(config),
        "bloom" => bloom::from_hf(config),
        _ => Err(ModelError::UnsupportedArchitecture(format!(
            "{arch_name} (model_type '{model_type}'); supported: {}",
            HF_MODEL_TYPES.join(", ")
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
        "gpt2" => gpt2::from_gguf(metadata),
        "gptj" => gptj::from_gguf(metadata),
        "falcon" => falcon::from_gguf(metadata),
        "mpt" => mpt::from_gguf(metadata),
        "bloom" => bloom::from_gguf(metadata),
        "" => Err(ModelError::Config(
            "GGUF metadata has no 'general.architecture'".into(),
        )),
        other => Err(ModelError::UnsupportedArchitecture(format!(
            "GGUF general.architecture '{other}'; supported: {}",
            GGUF_ARCHITECTURES.join(", ")
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

    /// The first of `keys` that is present (RW-era and current names of one setting).
    pub fn usize_any(&self, keys: &[&str]) -> Result<usize, ModelError> {
        for key in keys {
            if let Some(v) = self.opt_usize(key)? {
                return Ok(v);
            }
        }
        let others: Vec<String> = keys.iter().skip(1).map(|k| format!("'{k}'")).collect();
        let also = if others.is_empty() {
            String::new()
        } else {
            format!(" (also looked for {})", others.join(", "))
        };
        Err(ModelError::Config(format!(
            "config.json: missing '{}'{also}",
            keys.first().copied().unwrap_or_default()
        )))
    }

    /// An activation-function name (`hidden_act`, `activation_function`, ...).
    pub fn activation(&self, key: &str, default: &str) -> Result<Activation, ModelError> {
        match self.opt_str(key).unwrap_or(default) {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(ModelError::Config(format!(
                "config.json: unsupported {key} '{other}' (supported: silu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu)"
            ))),
        }
    }

    /// Fails when `key` is set to a value ferrum does not implement.
    pub fn reject_true(&self, key: &str, what: &str) -> Result<(), ModelError> {
        if self.opt_bool(key)?.unwrap_or(false) {
            return Err(ModelError::Config(format!(
                "config.json: '{key}: true' ({what}) is not supported"
            )));
        }
        Ok(())
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

    /// `{arch}.vocab_size`, else the length of `tokenizer.ggml.tokens`.
    pub fn vocab_size(&self) -> Result<usize, ModelError> {
        match self.opt_usize("vocab_size")? {
            Some(v) => Ok(v),
            None => self
                .md
                .get("tokenizer.ggml.tokens")
                .and_then(MetadataValue::as_array)
                .map(<[MetadataValue]>::len)
                .ok_or_else(|| {
                    ModelError::Config(format!(
                        "GGUF metadata: neither '{}.vocab_size' nor 'tokenizer.ggml.tokens'",
                        self.arch
                    ))
                }),
        }
    }

    /// `{arch}.attention.head_count`, which must be > 0.
    pub fn num_heads(&self) -> Result<usize, ModelError> {
        let n = self.usize("attention.head_count")?;
        if n == 0 {
            return Err(ModelError::Config(format!(
                "GGUF metadata '{}' must be > 0, got 0",
                self.key("attention.head_count")
            )));
        }
        Ok(n)
    }
}
