//! `GgufWriter`: builds small GGUF files for the loader and model tests. Test support only:
//! it is not part of the library (nothing in ferrum writes GGUF), so it lives here rather than
//! in the cdylib. It writes what it is given without validating, so tests can also produce
//! deliberately broken files. The GGUF value type ids are written out here from the GGUF spec,
//! independently of the reader's table, so a wrong id on either side fails a round trip.

use std::path::Path;

use triton_ferrum::loader::gguf::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GgmlType, MetadataValue,
};

/// GGUF value type ids (`gguf_type` in the GGUF spec).
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

fn type_id(value: &MetadataValue) -> u32 {
    match value {
        MetadataValue::U8(_) => value_type::U8,
        MetadataValue::I8(_) => value_type::I8,
        MetadataValue::U16(_) => value_type::U16,
        MetadataValue::I16(_) => value_type::I16,
        MetadataValue::U32(_) => value_type::U32,
        MetadataValue::I32(_) => value_type::I32,
        MetadataValue::U64(_) => value_type::U64,
        MetadataValue::I64(_) => value_type::I64,
        MetadataValue::F32(_) => value_type::F32,
        MetadataValue::F64(_) => value_type::F64,
        MetadataValue::Bool(_) => value_type::BOOL,
        MetadataValue::String(_) => value_type::STRING,
        MetadataValue::Array(_) => value_type::ARRAY,
    }
}

#[derive(Debug, Clone)]
struct WriterTensor {
    name: String,
    /// GGUF order.
    ne: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

/// Builds small GGUF files (v3 by default): metadata in insertion order,
/// tensors laid out in order at the alignment. It writes what it is given without validating
/// tensor byte sizes, so tests can also produce deliberately broken files.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<WriterTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// The version field written in the header (the layout is always v2/v3).
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Sets the data alignment and records it as `general.alignment` (u32).
    pub fn alignment(&mut self, alignment: u32) -> &mut Self {
        self.alignment = alignment.into();
        self.metadata.retain(|(k, _)| k != ALIGNMENT_KEY);
        self.metadata
            .push((ALIGNMENT_KEY.to_string(), MetadataValue::U32(alignment)));
        self
    }

    pub fn metadata(&mut self, key: &str, value: MetadataValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds an F32 tensor; `shape` is in PyTorch order.
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor_raw(name, shape, GgmlType::F32, bytes)
    }

    /// Adds a tensor from its raw encoded bytes; `shape` is in PyTorch order.
    pub fn tensor_raw(
        &mut self,
        name: &str,
        shape: &[usize],
        ggml_type: GgmlType,
        data: Vec<u8>,
    ) -> &mut Self {
        let ne = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push(WriterTensor {
            name: name.to_string(),
            ne,
            ggml_type,
            data,
        });
        self
    }

    /// The encoded file. Fails on arrays mixing element types.
    pub fn to_bytes(&self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&type_id(value).to_le_bytes());
            write_value(&mut out, key, value)?;
        }
        let align = |n: u64| n.next_multiple_of(self.alignment.max(1));
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.0.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align(offset + t.data.len() as u64);
        }
        // The data section starts aligned, so aligning absolute positions aligns the offsets too.
        if self.tensors.is_empty() {
            return Ok(out);
        }
        out.resize(align(out.len() as u64) as usize, 0);
        let data_start = out.len();
        for (t, offset) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + offset as usize, 0);
            out.extend_from_slice(&t.data);
        }
        Ok(out)
    }

    pub fn write(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes()?)
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, key: &str, value: &MetadataValue) -> std::io::Result<()> {
    match value {
        MetadataValue::U8(v) => out.push(*v),
        MetadataValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::Bool(v) => out.push(u8::from(*v)),
        MetadataValue::String(s) => write_string(out, s),
        MetadataValue::Array(items) => {
            let elem_type = items.first().map_or(value_type::U8, type_id);
            if items.iter().any(|v| type_id(v) != elem_type) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("metadata '{key}': array mixes element types"),
                ));
            }
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, key, item)?;
            }
        }
    }
    Ok(())
}
