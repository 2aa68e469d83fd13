//! ferrum's fuzz harnesses, one module per parser, each a `run(data) -> bool` that feeds one input
//! through the parser and everything that reads its result. The cargo-fuzz targets
//! (`fuzz_targets/`) call them under libFuzzer; the main crate's `tests/fuzz_corpus.rs` includes
//! the same files to replay the committed seeds and corpus in every test run, so a crash once
//! found stays fixed. They use only `triton_ferrum`, `triton_api` and `serde_json`.

pub mod config;
pub mod gguf;
pub mod request;
pub mod safetensors;
pub mod shards;
