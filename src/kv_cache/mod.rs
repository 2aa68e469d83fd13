//! Paged KV-cache bookkeeping, pure CPU: which physical cache blocks each sequence owns.
//! `BlockPool` (free list, ref counts) → `KvCacheManager` (per-sequence block tables,
//! `allocate_slots`, slot arithmetic) → `PrefixCache` (full blocks kept for reuse by content,
//! when prefix caching is on). The device-side K/V arrays live in the executor; this
//! module only hands out block and slot numbers. It must never import device, backend or Triton
//! code, and never panics on a bad block id (errors instead).

pub mod block_pool;
pub mod manager;
pub mod prefix_cache;

pub use block_pool::{BlockId, BlockPool};
pub use manager::KvCacheManager;

/// Default fraction of free GPU memory given to the KV cache (tensorrtllm_backend's default).
pub const DEFAULT_KV_CACHE_FREE_GPU_MEM_FRACTION: f32 = 0.9;

/// How to size the paged KV cache, as the user gives it (`EngineOptions::kv`; the config keys are
/// named per field). The executor turns it into a number of blocks at load.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCacheOptions {
    /// Token positions per KV cache block (`block_size`; default 16; the config key takes a power
    /// of two in [1, 256]).
    pub block_size: usize,
    /// Capacity in tokens, rounded up to whole blocks (`max_tokens_in_paged_kv_cache`). None: 1
    /// GiB worth on the CPU, the memory fraction's capacity on the GPU; on the GPU with both
    /// set, the smaller wins.
    pub max_tokens: Option<usize>,
    /// GPU: fraction in (0, 1] of the memory free after loading the weights (less an activation
    /// workspace) that the cache takes (`kv_cache_free_gpu_mem_fraction`; default
    /// `DEFAULT_KV_CACHE_FREE_GPU_MEM_FRACTION`).
    pub free_gpu_mem_fraction: f32,
    /// The cache's element type (`kv_cache_dtype`): the engine's dtype, or FP8 E4M3 with
    /// per-layer K and V scales.
    pub dtype: KvCacheDtype,
}

/// The KV cache's element type (`kv_cache_dtype`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KvCacheDtype {
    /// The engine's dtype (f32 on the CPU, `dtype` on the GPU).
    #[default]
    Auto,
    /// FP8 E4M3, one scale for K and one for V per layer: the checkpoint's when it has them,
    /// else measured at load.
    Fp8,
}

impl std::str::FromStr for KvCacheDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(KvCacheDtype::Auto),
            "fp8" | "fp8_e4m3" => Ok(KvCacheDtype::Fp8),
            _ => Err(format!("'{s}': expected auto, fp8 or fp8_e4m3")),
        }
    }
}

impl Default for KvCacheOptions {
    /// Blocks of 16 tokens, capacity from memory (0.9 of the free GPU memory).
    fn default() -> Self {
        KvCacheOptions {
            block_size: 16,
            max_tokens: None,
            free_gpu_mem_fraction: DEFAULT_KV_CACHE_FREE_GPU_MEM_FRACTION,
            dtype: KvCacheDtype::Auto,
        }
    }
}

/// A refused KV-cache operation; the pool or manager is left unchanged. Each variant names the
/// block or setting concerned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvCacheError {
    /// A size given to `BlockPool::new` or `KvCacheManager::new` is out of range.
    #[error("kv cache: invalid value for '{field}': {value} ({bound})")]
    InvalidConfig {
        /// The setting, e.g. `block_size` or `num_blocks`.
        field: &'static str,
        /// The value given.
        value: usize,
        /// What is allowed, e.g. "must be >= 1".
        bound: String,
    },
    /// A block id at or past the pool's `num_blocks`.
    #[error("kv cache: {block_id} is out of range: the pool has {num_blocks} blocks")]
    BlockOutOfRange {
        /// The offending block id.
        block_id: BlockId,
        /// Blocks in the pool.
        num_blocks: usize,
    },
    /// `free` would drop more owners of a block than it has (freed twice, or listed more often than
    /// it is owned).
    #[error("kv cache: double free of {block_id}: it has {ref_count} owner(s) left")]
    DoubleFree {
        /// The block freed once too often.
        block_id: BlockId,
        /// Owners the block has at the time of the refused call.
        ref_count: u32,
    },
    /// `share` of a block that is free (ref count 0): only a block in use can gain an owner.
    #[error("kv cache: {block_id} is free, so it cannot be shared")]
    NotAllocated {
        /// The free block.
        block_id: BlockId,
    },
}
