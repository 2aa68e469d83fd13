//! safetensors: any bytes through `SafetensorsSource::from_bytes` (8-byte header length, JSON
//! header, dtypes, shapes, data offsets), then every tensor through `TensorSource` (f32 and FP8
//! reads, whole and sharded for tensor parallelism) and the header's metadata. Errors are
//! expected; a panic, abort, hang or out-of-memory is a bug.

use crate::shards::SHARDS;
use triton_ferrum::loader::safetensors::SafetensorsSource;
use triton_ferrum::loader::{Shard, TensorSource};

/// Runs one input; true when it opened as a safetensors file (what the corpus replay test
/// checks of the seeds).
pub fn run(data: &[u8]) -> bool {
    let Ok(source) = SafetensorsSource::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return false;
    };
    let _ = source.metadata().len();
    // `names` lists the readable tensors; the header's others (integer dtypes) are reached
    // through the names the metadata and the fixture seeds use, and through `dtype`.
    for name in source.names() {
        let _ = source.dtype(&name);
        let _ = source.info(&name);
        for shard in SHARDS {
            let _ = source.get(&name, shard);
            let _ = source.get_e4m3(&name, shard);
        }
        let _ = source.get_q8(&name, Shard::Replicated);
    }
    for name in ["t.i64", "t.bool", "t.u8", "scalar"] {
        let _ = source.dtype(name);
        let _ = source.get(name, Shard::Replicated);
        let _ = source.get_e4m3(name, Shard::Replicated);
    }
    true
}
