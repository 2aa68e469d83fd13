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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvCacheError {
    #[error("kv cache: invalid value for '{field}': {value} ({bound})")]
    InvalidConfig {
        field: &'static str,
        value: usize,
        bound: String,
    },
    #[error("kv cache: {block_id} is out of range: the pool has {num_blocks} blocks")]
    BlockOutOfRange {
        block_id: BlockId,
        num_blocks: usize,
    },
    #[error("kv cache: double free of {block_id}: it has {ref_count} owner(s) left")]
    DoubleFree { block_id: BlockId, ref_count: u32 },
    #[error("kv cache: {block_id} is free, so it cannot be shared")]
    NotAllocated { block_id: BlockId },
}
