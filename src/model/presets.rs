//! Published model shapes as `DecoderSpec`s, for benchmarks on random weights
//! (`ferrum bench --preset NAME`). Numbers are the models' published configurations.

use super::arch::{ArchInfo, TensorNames};
use super::spec::{
    Activation, Biases, DecoderSpec, Mlp, Norm, PosEmbedding, Residual, Rope, RopeScaling,
    RopeStyle,
};

pub const PRESETS: &[&str] = &[
    "smollm2-135m",
    "llama2-7b",
    "llama3-8b",
    "mistral-7b",
    "qwen2-0.5b",
    "tiny-llama",
    "tiny-qwen2",
];

#[allow(clippy::too_many_arguments)]
fn llama_like(
    arch: &str,
    vocab_size: usize,
    hidden_size: usize,
    num_layers: usize,
    num_heads: usize,
    num_kv_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    theta: f32,
    eps: f32,
) -> DecoderSpec {
    let head_dim = hidden_size / num_heads;
    DecoderSpec {
        arch: arch.to_string(),
        vocab_size,
        hidden_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size,
        max_position_embeddings,
        norm: Norm::Rms { eps },
        pos: PosEmbedding::Rope(Rope {
            theta,
            rotary_dim: head_dim,
            style: RopeStyle::NeoX,
            scaling: RopeScaling::None,
        }),
        residual: Residual::Sequential,
        act: Activation::Silu,
        mlp: Mlp::Gated,
        biases: Biases {
            qkv: arch == "qwen2",
            ..Biases::default()
        },
        tie_embeddings: false,
        embedding_norm: false,
        sliding_window: None,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        clip_qkv: None,
    }
}

/// The spec of a preset, named as in `PRESETS`.
pub fn preset(name: &str) -> Option<ArchInfo> {
    let spec = match name {
        "smollm2-135m" => DecoderSpec {
            tie_embeddings: true,
            ..llama_like("llama", 49152, 576, 30, 9, 3, 1536, 8192, 100000.0, 1e-5)
        },
        "llama2-7b" => llama_like("llama", 32000, 4096, 32, 32, 32, 11008, 4096, 10000.0, 1e-5),
        "llama3-8b" => llama_like(
            "llama", 128256, 4096, 32, 32, 8, 14336, 8192, 500000.0, 1e-5,
        ),
        "mistral-7b" => llama_like(
            "mistral", 32000, 4096, 32, 32, 8, 14336, 32768, 1000000.0, 1e-5,
        ),
        "qwen2-0.5b" => DecoderSpec {
            tie_embeddings: true,
            ..llama_like(
                "qwen2", 151936, 896, 24, 14, 2, 4864, 32768, 1000000.0, 1e-6,
            )
        },
        "tiny-llama" => llama_like("llama", 97, 64, 2, 4, 2, 96, 128, 10000.0, 1e-5),
        "tiny-qwen2" => DecoderSpec {
            tie_embeddings: true,
            ..llama_like("qwen2", 97, 64, 2, 4, 2, 96, 128, 10000.0, 1e-6)
        },
        _ => return None,
    };
    Some(ArchInfo {
        spec,
        names: TensorNames::HfLlama,
    })
}
