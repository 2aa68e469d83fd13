//! The tensor splits the GGUF and safetensors harnesses read every tensor with.

use triton_ferrum::loader::Shard;

/// The splits a model load asks for: whole, column ranks 0 and 1 of 2, row rank 1 of 2, row rank
/// 2 of 3, and a rank out of range (an error, never a panic).
pub const SHARDS: [Shard; 6] = [
    Shard::Replicated,
    Shard::Column {
        rank: 0,
        world_size: 2,
    },
    Shard::Column {
        rank: 1,
        world_size: 2,
    },
    Shard::Row {
        rank: 1,
        world_size: 2,
    },
    Shard::Row {
        rank: 2,
        world_size: 3,
    },
    Shard::Column {
        rank: 2,
        world_size: 2,
    },
];
