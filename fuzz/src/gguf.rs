//! GGUF: any bytes through `GgufFile::from_bytes` (header, metadata, tensor infos, data layout),
//! then everything a model load reads from an opened file: the metadata accessors, the
//! architecture (`model::arch::from_gguf`), the tokenizer built from the GGUF vocabulary (and one
//! encode with it), and every tensor through `TensorSource` (f32, Q8 and FP8 reads, whole and
//! sharded for tensor parallelism). Errors are expected; a panic, abort, hang or out-of-memory is
//! a bug.

use crate::shards::SHARDS;
use triton_ferrum::loader::gguf::GgufFile;
use triton_ferrum::loader::{Shard, TensorSource};
use triton_ferrum::model::arch;
use triton_ferrum::tokenizer::Tokenizer;

/// Runs one input; true when it opened as a GGUF file (what the corpus replay test checks of the
/// seeds).
pub fn run(data: &[u8]) -> bool {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return false;
    };
    let _ = (file.version(), file.alignment(), file.data_offset());
    for key in file.metadata().keys() {
        let _ = file.get_u64(key);
        let _ = file.get_i64(key);
        let _ = file.get_f32(key);
        let _ = file.get_bool(key);
        let _ = file.get_str(key);
        let _ = file.get_str_array(key);
        let _ = file.get_f32_array(key);
        let _ = file.get_i64_array(key);
    }
    let _ = file.architecture();
    let _ = arch::from_gguf(file.metadata());
    if let Ok(Some(tokenizer)) = Tokenizer::from_gguf_metadata(file.metadata()) {
        let _ = tokenizer.encode("Hello, world! <0x0A> 123 ▁é", true);
        let _ = tokenizer.decode(&[0, 1, 2, 3], false);
    }
    for name in file.names() {
        let _ = file.info(&name);
        let _ = file.tensor_bytes(&name);
        for shard in SHARDS {
            let _ = file.get(&name, shard);
            let _ = file.get_q8(&name, shard);
        }
        let _ = file.get_e4m3(&name, Shard::Replicated);
    }
    let _ = file.get("no.such.tensor", Shard::Replicated);
    true
}
