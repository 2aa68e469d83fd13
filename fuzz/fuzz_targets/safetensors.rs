//! cargo-fuzz target: `ferrum_fuzz::safetensors::run` under libFuzzer (see that module and docs/fuzzing.md).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ferrum_fuzz::safetensors::run(data);
});
