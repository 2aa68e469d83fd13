//! The leaf of ferrum's module graph: plain data types shared by the layers above it (the CPU
//! ops, the CUDA layer, the loaders and the model), so that none of those imports another for a
//! type. It holds op-level enums (norm kind, activation, rotary pairing), host tensors as the
//! loaders return them (f32, and raw FP8 codes), the compact 8-bit block format, and the plain data of one sampling step
//! (penalty strengths, a sampled token and its logprobs), which the CPU sampler and the GPU
//! sampler share. It imports nothing from the crate.

use serde::Serialize;

/// Normalization applied before attention and MLP (and at the end of the decoder); `eps` is
/// added to the variance before the square root.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Norm {
    /// x / rms(x) * w
    Rms {
        /// Added to the mean square before the square root.
        eps: f32,
    },
    /// (x - mean) / std * w (+ b)
    Layer {
        /// Added to the variance before the square root.
        eps: f32,
        /// Whether the norm has a learned bias `b` besides the weight `w`.
        bias: bool,
    },
}

/// How rotary embedding pairs dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Pairs (i, i + rotary_dim/2): Hugging Face Llama/GPT-NeoX `rotate_half`.
    NeoX,
    /// Pairs (2i, 2i+1): GPT-J, and llama.cpp's GGUF Llama (whose converter permutes Q/K rows).
    GptJ,
}

/// Element-wise activation of the MLP (applied to the gate projection in a gated MLP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(x)` (SiLU / swish): Llama, Mistral, Qwen.
    Silu,
    /// GELU, tanh approximation (GPT-2 `gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// GELU, exact (erf).
    Gelu,
    /// `max(x, 0)`.
    Relu,
}

/// Number of weights per block.
pub const QK: usize = 32;

/// 32 consecutive weights of one row as `w[i] = scale * qs[i] + min`; `min = 0` for the symmetric
/// 8-bit format, a per-block minimum for GGUF's asymmetric formats (see `ops::quant`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    /// Step between quantized levels (multiplies `qs`).
    pub scale: f32,
    /// Offset added to every dequantized value of the block; 0 for symmetric blocks.
    pub min: f32,
    /// The 32 quantized values, in [-127, 127] for symmetric blocks.
    pub qs: [i8; QK],
}

/// A dense f32 tensor in host memory, row-major, shape in PyTorch order.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first; the product equals `data.len()`.
    pub shape: Vec<usize>,
    /// Elements in row-major order.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Number of elements (product of `shape`).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A 2-D weight `[rows, cols]` in the compact block format: `rows * cols / 32` blocks, row-major,
/// each block covering 32 consecutive elements of one row (`cols % 32 == 0`).
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Tensor {
    /// Output features (one row per output).
    pub rows: usize,
    /// Input features; a multiple of 32 (`QK`).
    pub cols: usize,
    /// `rows * cols / 32` blocks, row-major: block `r * cols / 32 + c` holds `row r, cols [32c, 32c
    /// + 32)`.
    pub blocks: Vec<BlockQ8>,
}

/// A tensor of FP8 E4M3 codes as a loader reads it (`TensorSource::get_e4m3`): one byte per
/// element, row-major, shape in PyTorch order. The codes carry no scale; the checkpoint's
/// quantization scheme says where the scales are (`model::quant`).
#[derive(Debug, Clone, PartialEq)]
pub struct E4m3Tensor {
    /// Dimensions, outermost first; the product equals `codes.len()`.
    pub shape: Vec<usize>,
    /// E4M3 codes (sign, 4 exponent bits with bias 7, 3 mantissa bits; see `ops::fp8`).
    pub codes: Vec<u8>,
}

/// The three penalty strengths of one request; `Penalties::default()` disables all of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Penalties {
    /// 1.0 disables.
    pub repetition: f32,
    /// 0.0 disables.
    pub presence: f32,
    /// 0.0 disables.
    pub frequency: f32,
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties {
            repetition: 1.0,
            presence: 0.0,
            frequency: 0.0,
        }
    }
}

impl Penalties {
    /// Whether any penalty differs from its neutral value, i.e. whether the sampler must apply
    /// penalties.
    pub fn is_enabled(&self) -> bool {
        *self != Penalties::default()
    }
}

/// Log-probability information of one generated token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprobs {
    /// Log-probability of the sampled token under the model's (unprocessed) distribution.
    pub logprob: f32,
    /// The `n` most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The result of one sampling step.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The sampled token's id in the model's vocabulary.
    pub token_id: u32,
    /// Present when the request asked for logprobs.
    pub logprobs: Option<TokenLogprobs>,
}
