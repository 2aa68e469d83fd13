//! Replays the fuzz seeds and the committed fuzz corpus (`fuzz/seeds/<target>/`,
//! `fuzz/corpus/<target>/`) through the fuzz harnesses (`fuzz/src/`, included here as they are),
//! without libFuzzer, in every test run: an input that once crashed a parser is kept in the corpus
//! and stays fixed. The seeds also check the harnesses reach past the first parse: every GGUF,
//! safetensors and config seed opens, and every request seed parses unless its name starts with
//! `bad_` (those must be refused). Fuzzing itself is `ci/fuzz.sh` (docs/fuzzing.md).

#![allow(clippy::unwrap_used)]

#[path = "../fuzz/src/config.rs"]
mod config;
#[path = "../fuzz/src/gguf.rs"]
mod gguf;
#[path = "../fuzz/src/request.rs"]
mod request;
#[path = "../fuzz/src/safetensors.rs"]
mod safetensors;
#[path = "../fuzz/src/shards.rs"]
mod shards;

use std::path::{Path, PathBuf};

/// The files of `fuzz/<dir>/<target>/` (none when the folder does not exist), sorted.
fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(dir)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return vec![];
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// Runs every seed and corpus input of `target` (no panic is the test); each seed's result must be
/// `expect(seed name)`.
fn replay(target: &str, run: fn(&[u8]) -> bool, expect: fn(&str) -> bool) {
    let seeds = inputs("seeds", target);
    assert!(
        seeds.len() >= 4,
        "fuzz/seeds/{target} has {} seeds: rerun fuzz/make_seeds.py",
        seeds.len()
    );
    for seed in &seeds {
        let name = seed.file_name().unwrap().to_str().unwrap();
        let got = run(&std::fs::read(seed).unwrap());
        assert_eq!(got, expect(name), "{target} seed {name}");
    }
    for input in inputs("corpus", target) {
        run(&std::fs::read(&input).unwrap());
    }
}

#[test]
fn gguf_seeds_open_and_corpus_replays() {
    replay("gguf", gguf::run, |_| true);
}

#[test]
fn safetensors_seeds_open_and_corpus_replays() {
    replay("safetensors", safetensors::run, |_| true);
}

#[test]
fn config_seeds_parse_and_corpus_replays() {
    replay("config", config::run, |_| true);
}

#[test]
fn request_seeds_parse_or_are_refused_and_corpus_replays() {
    replay("request", request::run, |name| !name.contains("bad_"));
}
