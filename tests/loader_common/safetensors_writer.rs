//! `SafetensorsWriter`: builds safetensors files for the tests (kept out of the library: only
//! tests write checkpoints).

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};

/// Builds safetensors files: tensors in insertion order, packed back to back.
/// Raw entries are written as given, so tests can also produce broken files.
#[derive(Debug, Clone, Default)]
pub struct SafetensorsWriter {
    tensors: Vec<(String, String, Vec<usize>, Vec<u8>)>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsWriter {
    /// A writer with no tensors and no metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a `__metadata__` string entry (e.g. `format` = `pt`); a repeated key overwrites.
    pub fn metadata(&mut self, key: &str, value: &str) -> &mut Self {
        self.metadata.insert(key.to_string(), value.to_string());
        self
    }

    /// Appends an F32 tensor; `data` must hold the product of `shape` elements (not checked).
    pub fn f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        self.raw(
            name,
            "F32",
            shape,
            data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// Stores `data` rounded to f16.
    pub fn f16(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        self.raw(
            name,
            "F16",
            shape,
            data.iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        )
    }

    /// Stores `data` rounded to bf16.
    pub fn bf16(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        self.raw(
            name,
            "BF16",
            shape,
            data.iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        )
    }

    /// Any dtype string and raw bytes (not checked against the shape).
    pub fn raw(&mut self, name: &str, dtype: &str, shape: &[usize], bytes: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dtype.to_string(), shape.to_vec(), bytes));
        self
    }

    /// The complete file: 8-byte little-endian header length, the JSON header padded with spaces
    /// to 8-byte alignment, then the tensors' bytes in insertion order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        if !self.metadata.is_empty() {
            header.insert("__metadata__".to_string(), serde_json::json!(self.metadata));
        }
        let mut offset = 0;
        for (name, dtype, shape, bytes) in &self.tensors {
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
            );
            offset += bytes.len();
        }
        let mut json = serde_json::Value::Object(header).to_string().into_bytes();
        // Pad the header with spaces so the data starts 8-byte aligned, as the reference does.
        while !(8 + json.len()).is_multiple_of(8) {
            json.push(b' ');
        }
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend(json);
        for (_, _, _, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
        }
        out
    }

    /// Writes `to_bytes()` to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}
