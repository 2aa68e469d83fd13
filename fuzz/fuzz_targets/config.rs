//! cargo-fuzz target: `ferrum_fuzz::config::run` under libFuzzer (see that module and docs/fuzzing.md).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ferrum_fuzz::config::run(data);
});
