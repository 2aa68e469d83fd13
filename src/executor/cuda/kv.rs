//! KV cache sizing of the CUDA executor: how many blocks of K and V (all layers) fit in the
//! device memory left after the weights and the step workspace, bounded by what the model's
//! settings can ever use (`plan_kv_blocks`).

use crate::dtype::DType;
use crate::kv_cache::KvCacheOptions;
use crate::model::DecoderSpec;
use crate::scheduler::BatchingOptions;

/// Device memory kept free beside the activation estimate: CUDA context growth, cuBLAS(Lt)
/// internals, the stream-ordered allocator's rounding.
pub const RESERVED_GPU_BYTES: usize = 256 << 20;

/// What the KV cache and the step buffers are sized from: the KV cache and batching settings as
/// given, and the resolved prompt + output limit.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCacheConfig {
    /// Block size, capacity and memory fraction.
    pub kv: KvCacheOptions,
    /// `max_num_batched_tokens` sizes the activation workspace; `max_num_seqs` with
    /// `max_model_len` bounds the cache to what can ever be used.
    pub batching: BatchingOptions,
    /// Longest prompt + output in tokens; sizes block-table rows and bounds the cache.
    pub max_model_len: usize,
}

/// What the KV cache sizing decided, and from which numbers (for the load log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvCachePlan {
    /// KV cache blocks to allocate (each `bytes_per_block`, all layers).
    pub num_blocks: usize,
    /// K and V of every layer for one block.
    pub bytes_per_block: usize,
    /// Free device memory in bytes when the cache was sized (after the weights were uploaded).
    pub free_bytes: usize,
    /// The activation workspace estimate held back from `free_bytes`
    /// (`activation_workspace_bytes`).
    pub workspace_bytes: usize,
    /// Which bound decided `num_blocks`: "memory fraction", "max_tokens_in_paged_kv_cache" or
    /// "max_num_seqs x max_model_len".
    pub limited_by: &'static str,
}

impl KvCachePlan {
    /// One line for the load log: blocks, tokens per block, MiB, the deciding bound and the inputs.
    pub fn describe(&self, cfg: &KvCacheConfig) -> String {
        format!(
            "KV cache: {} blocks of {} tokens ({:.1} MiB, {} bytes/block; limited by {}; free after weights {:.1} MiB, activation workspace {:.1} MiB, fraction {})",
            self.num_blocks,
            cfg.kv.block_size,
            (self.num_blocks * self.bytes_per_block) as f64 / 1048576.0,
            self.bytes_per_block,
            self.limited_by,
            self.free_bytes as f64 / 1048576.0,
            self.workspace_bytes as f64 / 1048576.0,
            cfg.kv.free_gpu_mem_fraction
        )
    }
}

/// Bytes of K and V, all layers, for one block of `block_size` tokens in `dtype`.
pub fn kv_bytes_per_block(spec: &DecoderSpec, block_size: usize, dtype: DType) -> usize {
    spec.num_layers * 2 * block_size * spec.kv_dim() * dtype.size_in_bytes()
}

/// Device memory one step of `cfg.batching.max_num_batched_tokens` tokens needs beside weights and cache:
/// activations of one layer (reused across layers), step inputs, the sampling rows' logits,
/// plus `RESERVED_GPU_BYTES`.
pub fn activation_workspace_bytes(spec: &DecoderSpec, cfg: &KvCacheConfig, dtype: DType) -> usize {
    let (h, q, kv, inter) = (
        spec.hidden_size,
        spec.q_dim(),
        spec.kv_dim(),
        spec.intermediate_size,
    );
    let gate_up = spec.gate_up_dim();
    // x, normed, qkv, attn, attn_proj, gate_up, act, mlp_out (Workspace, per token)
    let per_token_elems = h + h + (q + 2 * kv) + q + h + gate_up + inter + h;
    let mb = max_blocks_per_seq(cfg);
    let m = cfg
        .batching
        .max_num_batched_tokens
        .max(cfg.batching.max_num_seqs);
    let seqs = cfg.batching.max_num_seqs.max(1);
    // token ids, positions, slots (i64) and their packed words
    let per_token_inputs = 4 + 4 + 8 + 16;
    // per sequence: last, last_normed, logits rows; decode and prefill tables, typed and packed;
    // the per-sequence lengths
    let per_seq = (2 * h + spec.vocab_size) * dtype.size_in_bytes() + 4 * (4 * mb + 16);
    // split-K partials: at most (SMs * 8 CTAs * 8 heads per CTA) + one per (sequence, head),
    // bounded here for 256 SMs, each (head_dim + 2) f32.
    let splitk = (256 * 8 * 8 + seqs * spec.num_heads) * (spec.head_dim + 2) * 4;
    m * (per_token_elems * dtype.size_in_bytes() + per_token_inputs)
        + seqs * per_seq
        + splitk
        + RESERVED_GPU_BYTES
}

/// The number of KV blocks: the smallest of what `free_gpu_mem_fraction` of the memory left
/// after the activation workspace holds, what `max_tokens` asks for, and what `max_num_seqs`
/// sequences of `max_model_len` tokens can ever use. Fails, naming the numbers, when not one
/// block fits.
pub fn plan_kv_blocks(
    spec: &DecoderSpec,
    cfg: &KvCacheConfig,
    dtype: DType,
    free_bytes: usize,
) -> Result<KvCachePlan, String> {
    let f = cfg.kv.free_gpu_mem_fraction;
    if !(f > 0.0 && f <= 1.0) {
        return Err(format!(
            "kv_cache_free_gpu_mem_fraction = {f} must be in (0, 1]"
        ));
    }
    if cfg.kv.block_size == 0 {
        return Err("block_size must be > 0".into());
    }
    let bytes_per_block = kv_bytes_per_block(spec, cfg.kv.block_size, dtype);
    let workspace_bytes = activation_workspace_bytes(spec, cfg, dtype);
    let budget = (free_bytes.saturating_sub(workspace_bytes) as f64 * f as f64) as usize;
    let by_memory = budget / bytes_per_block.max(1);
    let mut limits = vec![(by_memory, "memory fraction")];
    if let Some(t) = cfg.kv.max_tokens {
        limits.push((
            t.div_ceil(cfg.kv.block_size),
            "max_tokens_in_paged_kv_cache",
        ));
    }
    limits.push((
        cfg.batching.max_num_seqs * cfg.max_model_len.div_ceil(cfg.kv.block_size),
        "max_num_seqs x max_model_len",
    ));
    let (num_blocks, limited_by) = limits
        .into_iter()
        .min_by_key(|&(n, _)| n)
        .unwrap_or((by_memory, "memory fraction"));
    if num_blocks == 0 {
        return Err(format!(
            "no KV cache block fits: {free_bytes} bytes free after the weights, {workspace_bytes} \
             bytes of activation workspace for max_num_batched_tokens {}, fraction {f}, \
             {bytes_per_block} bytes per block of {} tokens; lower max_num_batched_tokens or \
             use a smaller dtype",
            cfg.batching.max_num_batched_tokens, cfg.kv.block_size
        ));
    }
    Ok(KvCachePlan {
        num_blocks,
        bytes_per_block,
        free_bytes,
        workspace_bytes,
        limited_by,
    })
}

/// Tokens and sequences the step buffers hold: a step of max_num_seqs decodes fits even when
/// max_num_batched_tokens is smaller.
pub(super) fn step_capacity(cfg: &KvCacheConfig) -> (usize, usize) {
    let max_seqs = cfg.batching.max_num_seqs.max(1);
    (cfg.batching.max_num_batched_tokens.max(max_seqs), max_seqs)
}

/// Block-table entries per sequence in the step inputs: enough for `max_model_len` tokens.
pub(super) fn max_blocks_per_seq(cfg: &KvCacheConfig) -> usize {
    cfg.max_model_len.div_ceil(cfg.kv.block_size.max(1)).max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec() -> DecoderSpec {
        crate::model::presets::preset("llama2-7b").unwrap().spec
    }

    fn cfg() -> KvCacheConfig {
        KvCacheConfig {
            kv: KvCacheOptions::default(),
            batching: BatchingOptions::default(),
            max_model_len: 4096,
        }
    }

    #[test]
    fn kv_blocks_from_the_memory_fraction() {
        let s = spec();
        // Llama-2-7B: 32 layers x 2 x 16 tokens x 4096 x 2 bytes = 8 MiB per bf16 block.
        assert_eq!(kv_bytes_per_block(&s, 16, DType::BF16), 8 << 20);
        let free = 60usize << 30;
        let p = plan_kv_blocks(&s, &cfg(), DType::BF16, free).unwrap();
        let ws = activation_workspace_bytes(&s, &cfg(), DType::BF16);
        assert!(ws > RESERVED_GPU_BYTES && ws < (2 << 30), "{ws}");
        assert_eq!(
            p.num_blocks,
            ((free - ws) as f64 * 0.9) as usize / (8 << 20)
        );
        assert_eq!(p.limited_by, "memory fraction");
        // f32 halves the blocks.
        let p32 = plan_kv_blocks(&s, &cfg(), DType::F32, free).unwrap();
        assert!(p32.num_blocks * 2 <= p.num_blocks + 1);
    }

    #[test]
    fn smallest_bound_wins_and_is_named() {
        let s = spec();
        let free = 60usize << 30;
        let mut c = cfg();
        c.kv.max_tokens = Some(1000);
        let p = plan_kv_blocks(&s, &c, DType::BF16, free).unwrap();
        assert_eq!(
            (p.num_blocks, p.limited_by),
            (63, "max_tokens_in_paged_kv_cache")
        );
        let mut c = KvCacheConfig {
            max_model_len: 100,
            ..cfg()
        };
        c.batching.max_num_seqs = 2;
        let p = plan_kv_blocks(&s, &c, DType::BF16, free).unwrap();
        assert_eq!(
            (p.num_blocks, p.limited_by),
            (14, "max_num_seqs x max_model_len")
        );
        let mut c = cfg();
        c.kv.free_gpu_mem_fraction = 0.5;
        let half = plan_kv_blocks(&s, &c, DType::BF16, free).unwrap();
        let full = plan_kv_blocks(&s, &cfg(), DType::BF16, free).unwrap();
        assert!((half.num_blocks as f64 / full.num_blocks as f64 - 0.5 / 0.9).abs() < 0.01);
    }

    #[test]
    fn no_block_fits_is_an_error_naming_the_numbers() {
        let s = spec();
        let err = plan_kv_blocks(&s, &cfg(), DType::BF16, 300 << 20).unwrap_err();
        assert!(
            err.contains("no KV cache block fits") && err.contains("max_num_batched_tokens 2048"),
            "{err}"
        );
        let mut c = cfg();
        c.kv.free_gpu_mem_fraction = 1.5;
        let err = plan_kv_blocks(&s, &c, DType::BF16, 1 << 40).unwrap_err();
        assert!(err.contains("1.5"), "{err}");
    }
}
