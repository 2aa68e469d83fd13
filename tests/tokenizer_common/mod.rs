//! Shared helpers of the tokenizer integration tests: fixture loading (typed GGUF metadata JSON
//! written by scripts/make_tokenizer_fixtures.py) and a small deterministic RNG.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use triton_ferrum::loader::gguf::MetadataValue;
use triton_ferrum::tokenizer::Tokenizer;

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(name)
}

pub fn read_json(name: &str) -> serde_json::Value {
    let path = fixture_path(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with scripts/make_tokenizer_fixtures.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn scalar(ty: &str, v: &serde_json::Value) -> MetadataValue {
    match ty {
        "u8" => MetadataValue::U8(v.as_u64().unwrap().try_into().unwrap()),
        "i8" => MetadataValue::I8(v.as_i64().unwrap().try_into().unwrap()),
        "u16" => MetadataValue::U16(v.as_u64().unwrap().try_into().unwrap()),
        "i16" => MetadataValue::I16(v.as_i64().unwrap().try_into().unwrap()),
        "u32" => MetadataValue::U32(v.as_u64().unwrap().try_into().unwrap()),
        "i32" => MetadataValue::I32(v.as_i64().unwrap().try_into().unwrap()),
        "u64" => MetadataValue::U64(v.as_u64().unwrap()),
        "i64" => MetadataValue::I64(v.as_i64().unwrap()),
        "f32" => MetadataValue::F32(v.as_f64().unwrap() as f32),
        "f64" => MetadataValue::F64(v.as_f64().unwrap()),
        "bool" => MetadataValue::Bool(v.as_bool().unwrap()),
        "string" => MetadataValue::String(v.as_str().unwrap().to_string()),
        other => panic!("unknown metadata type {other}"),
    }
}

/// `{key: {"type", "value"[, "item_type"]}}` → the map `Tokenizer::from_gguf_metadata` takes.
pub fn metadata_from_json(name: &str) -> BTreeMap<String, MetadataValue> {
    let json = read_json(name);
    json.as_object()
        .unwrap()
        .iter()
        .map(|(key, entry)| {
            let ty = entry["type"].as_str().unwrap();
            let value = if ty == "array" {
                let item_type = entry["item_type"].as_str().unwrap();
                MetadataValue::Array(
                    entry["value"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| scalar(item_type, v))
                        .collect(),
                )
            } else {
                scalar(ty, &entry["value"])
            };
            (key.clone(), value)
        })
        .collect()
}

pub fn smollm2() -> Arc<Tokenizer> {
    let md = metadata_from_json("smollm2_metadata.json");
    Arc::new(Tokenizer::from_gguf_metadata(&md).unwrap().unwrap())
}

pub fn spm() -> Arc<Tokenizer> {
    let md = metadata_from_json("spm_metadata.json");
    Arc::new(Tokenizer::from_gguf_metadata(&md).unwrap().unwrap())
}

pub fn hf_tiny() -> Arc<Tokenizer> {
    Arc::new(
        Tokenizer::from_hf_dir(&fixture_path("hf_tiny"))
            .unwrap()
            .unwrap(),
    )
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn messages(v: &serde_json::Value) -> Vec<triton_ferrum::tokenizer::ChatMessage> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            triton_ferrum::tokenizer::ChatMessage::new(
                m["role"].as_str().unwrap(),
                m["content"].as_str().unwrap(),
            )
        })
        .collect()
}

/// xorshift64*: deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
