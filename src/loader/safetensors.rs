//! safetensors reader: a single `model.safetensors` or a sharded checkpoint described by
//! `model.safetensors.index.json`, each file memory-mapped (through `loader::mmap`) and its JSON
//! header validated on open; plus `read_json` for `config.json`-style files and a small
//! `SafetensorsWriter` for building checkpoints in tests.
//!
//! Validation on open: the header length fits the file, the header is a JSON object, every entry
//! has a known dtype, a shape whose byte size does not overflow and matches its `data_offsets`,
//! and data ranges lie inside the data section without overlapping. Tensors are read (converted
//! to f32) only by `get`. This module never panics on a bad file and never trusts a length before
//! checking it against the file size. F32, F16 and BF16 tensors are readable as f32; FP8 tensors
//! are listed (`info` names their type) but `get` refuses them: `get_e4m3` returns E4M3 codes raw,
//! for the layer that knows the checkpoint's scales, and E5M2 is never read. Others (I64 position
//! ids, U8 masks) are listed by neither `names` nor `info`, and `get` reports them as
//! `UnsupportedType`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use super::mmap::{FileBytes, memory_label};
use super::shard::plan_shard;
use super::{
    E4m3Tensor, HostTensor, LoadError, Q8Tensor, Shard, SourceDType, TensorInfo, TensorSource,
};

/// Name of a single-file checkpoint inside a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the index of a sharded checkpoint inside a model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest JSON header accepted (the reference implementation's limit).
pub const MAX_HEADER_LEN: u64 = 100 << 20;

/// Element types a safetensors header may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SafetensorsDType {
    /// `BOOL`, 1 byte (not readable).
    Bool,
    /// `U8`, 1 byte (not readable).
    U8,
    /// `I8`, 1 byte (not readable).
    I8,
    /// `F8_E5M2` float8, 1 byte (listed, never read).
    F8E5M2,
    /// `F8_E4M3` float8, 1 byte (raw codes through `get_e4m3`).
    F8E4M3,
    /// `I16`, 2 bytes (not readable).
    I16,
    /// `U16`, 2 bytes (not readable).
    U16,
    /// `F16` IEEE half, 2 bytes; read as f32.
    F16,
    /// `BF16` bfloat16, 2 bytes; read as f32.
    BF16,
    /// `I32`, 4 bytes (not readable).
    I32,
    /// `U32`, 4 bytes (not readable).
    U32,
    /// `F32` IEEE single, 4 bytes.
    F32,
    /// `F64`, 8 bytes (not readable).
    F64,
    /// `I64`, 8 bytes (not readable; e.g. position ids).
    I64,
    /// `U64`, 8 bytes (not readable).
    U64,
}

impl SafetensorsDType {
    const ALL: [(SafetensorsDType, &'static str, usize); 15] = [
        (Self::Bool, "BOOL", 1),
        (Self::U8, "U8", 1),
        (Self::I8, "I8", 1),
        (Self::F8E5M2, "F8_E5M2", 1),
        (Self::F8E4M3, "F8_E4M3", 1),
        (Self::I16, "I16", 2),
        (Self::U16, "U16", 2),
        (Self::F16, "F16", 2),
        (Self::BF16, "BF16", 2),
        (Self::I32, "I32", 4),
        (Self::U32, "U32", 4),
        (Self::F32, "F32", 4),
        (Self::F64, "F64", 8),
        (Self::I64, "I64", 8),
        (Self::U64, "U64", 8),
    ];

    /// Parses a header dtype string (`"BF16"`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|e| e.1 == s).map(|e| e.0)
    }

    /// The header's spelling of the dtype, e.g. `"F8_E4M3"`.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|e| e.0 == self).map_or("?", |e| e.1)
    }

    /// Bytes per element in the file.
    pub fn size_in_bytes(self) -> usize {
        Self::ALL.iter().find(|e| e.0 == self).map_or(1, |e| e.2)
    }

    /// The source dtype for types this loader lists (floats, and FP8 which only `get_e4m3` reads).
    fn readable(self) -> Option<SourceDType> {
        match self {
            Self::F32 => Some(SourceDType::F32),
            Self::F16 => Some(SourceDType::F16),
            Self::BF16 => Some(SourceDType::BF16),
            Self::F8E4M3 => Some(SourceDType::F8E4M3),
            Self::F8E5M2 => Some(SourceDType::F8E5M2),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct StFile {
    path: PathBuf,
    bytes: FileBytes,
}

#[derive(Debug, Clone)]
struct Entry {
    file_idx: usize,
    dtype: SafetensorsDType,
    /// PyTorch order.
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    num_bytes: usize,
}

/// A safetensors checkpoint (one or more memory-mapped files).
#[derive(Debug)]
pub struct SafetensorsSource {
    /// The file, or the index of a sharded checkpoint.
    origin: PathBuf,
    files: Vec<StFile>,
    tensors: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsSource {
    /// Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self, LoadError> {
        let dir = dir.as_ref();
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_file(&single);
        }
        let index = dir.join(INDEX_FILE);
        if !index.is_file() {
            return Err(LoadError::BadFormat {
                path: dir.to_path_buf(),
                format: "safetensors",
                reason: format!("directory has neither {SINGLE_FILE} nor {INDEX_FILE}"),
            });
        }
        Self::open_index(dir, &index)
    }

    /// Opens one `.safetensors` file.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let bytes = FileBytes::map(path)?;
        Self::single(path.to_path_buf(), bytes)
    }

    /// Parses a safetensors file held in memory; `name` labels it in error messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self, LoadError> {
        Self::single(memory_label(name), FileBytes::Owned(bytes))
    }

    fn single(path: PathBuf, bytes: FileBytes) -> Result<Self, LoadError> {
        let header = parse_header(&path, &bytes, 0)?;
        Ok(SafetensorsSource {
            origin: path.clone(),
            files: vec![StFile { path, bytes }],
            tensors: header.tensors,
            metadata: header.metadata,
        })
    }

    fn open_index(dir: &Path, index: &Path) -> Result<Self, LoadError> {
        let bad = |reason: String| LoadError::BadFormat {
            path: index.to_path_buf(),
            format: "safetensors index",
            reason,
        };
        let json = read_json(index)?;
        let weight_map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("missing object \"weight_map\"".to_string()))?;
        let mut file_names: BTreeMap<&str, usize> = BTreeMap::new();
        let mut wanted = Vec::with_capacity(weight_map.len());
        for (tensor, file) in weight_map {
            let file = file.as_str().ok_or_else(|| {
                bad(format!(
                    "weight_map entry '{tensor}' is {file}, not a file name"
                ))
            })?;
            if Path::new(file).file_name().and_then(|f| f.to_str()) != Some(file) {
                return Err(bad(format!(
                    "weight_map entry '{tensor}': '{file}' is not a plain file name"
                )));
            }
            let next_idx = file_names.len();
            let file_idx = *file_names.entry(file).or_insert(next_idx);
            wanted.push((tensor.clone(), file_idx));
        }
        if wanted.is_empty() {
            return Err(bad("weight_map is empty".to_string()));
        }
        let mut by_idx: Vec<(&str, usize)> = file_names.into_iter().collect();
        by_idx.sort_by_key(|&(_, idx)| idx);
        let mut files = Vec::with_capacity(by_idx.len());
        let mut per_file = Vec::with_capacity(by_idx.len());
        let mut metadata = BTreeMap::new();
        for (file, file_idx) in by_idx {
            let path = dir.join(file);
            let bytes = FileBytes::map(&path)?;
            let header = parse_header(&path, &bytes, file_idx)?;
            metadata.extend(header.metadata);
            per_file.push(header.tensors);
            files.push(StFile { path, bytes });
        }
        let mut tensors = BTreeMap::new();
        for (tensor, file_idx) in wanted {
            let entry = per_file
                .get(file_idx)
                .and_then(|t| t.get(&tensor))
                .cloned()
                .ok_or_else(|| {
                    let file = files
                        .get(file_idx)
                        .map(|f| f.path.display().to_string())
                        .unwrap_or_default();
                    bad(format!(
                        "weight_map puts tensor '{tensor}' in {file}, which does not contain it"
                    ))
                })?;
            tensors.insert(tensor, entry);
        }
        Ok(SafetensorsSource {
            origin: index.to_path_buf(),
            files,
            tensors,
            metadata,
        })
    }

    /// The files of the checkpoint.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// The `__metadata__` string maps of all files, merged.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The stored dtype of any tensor, including those `get` cannot read.
    pub fn dtype(&self, name: &str) -> Option<SafetensorsDType> {
        self.tensors.get(name).map(|e| e.dtype)
    }

    fn file_path(&self, entry: &Entry) -> PathBuf {
        self.files
            .get(entry.file_idx)
            .map_or_else(|| self.origin.clone(), |f| f.path.clone())
    }

    /// The bytes of `entry` (validated against the file on open).
    fn bytes(&self, entry: &Entry, name: &str) -> Result<&[u8], LoadError> {
        self.files
            .get(entry.file_idx)
            .and_then(|f| f.bytes.get(entry.start..entry.start + entry.num_bytes))
            .ok_or_else(|| LoadError::BadTensor {
                path: self.file_path(entry),
                tensor: name.to_string(),
                reason: "data range outside the file".to_string(),
            })
    }

    fn entry(&self, name: &str) -> Result<&Entry, LoadError> {
        self.tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.origin.clone(),
                tensor: name.to_string(),
            })
    }
}

impl TensorSource for SafetensorsSource {
    fn describe(&self) -> String {
        self.origin.display().to_string()
    }

    fn names(&self) -> Vec<String> {
        self.tensors
            .iter()
            .filter(|(_, e)| e.dtype.readable().is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        let entry = self.tensors.get(name)?;
        Some(TensorInfo {
            shape: entry.shape.clone(),
            dtype: entry.dtype.readable()?,
        })
    }

    fn get(&self, name: &str, shard: Shard) -> Result<HostTensor, LoadError> {
        let entry = self.entry(name)?;
        let path = self.file_path(entry);
        if entry.dtype.readable().is_none_or(SourceDType::is_fp8) {
            return Err(LoadError::UnsupportedType {
                path,
                tensor: name.to_string(),
                dtype: entry.dtype.name().to_string(),
            });
        }
        let bytes = self.bytes(entry, name)?;
        let plan = plan_shard(&path, name, &entry.shape, shard)?;
        let size = entry.dtype.size_in_bytes();
        let mut data = Vec::with_capacity(plan.numel());
        for run in &plan.runs {
            let src = &bytes[run.start * size..(run.start + run.len) * size];
            match entry.dtype {
                SafetensorsDType::F32 => data.extend(
                    src.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
                SafetensorsDType::F16 => data.extend(
                    src.chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
                _ => data.extend(
                    src.chunks_exact(2)
                        .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
            }
        }
        Ok(HostTensor {
            shape: plan.shape,
            data,
        })
    }

    fn get_q8(&self, name: &str, _shard: Shard) -> Result<Option<Q8Tensor>, LoadError> {
        // Dense checkpoints have no exactly convertible block format: the caller quantizes.
        self.entry(name).map(|_| None)
    }

    fn get_e4m3(&self, name: &str, shard: Shard) -> Result<E4m3Tensor, LoadError> {
        let entry = self.entry(name)?;
        let path = self.file_path(entry);
        if entry.dtype != SafetensorsDType::F8E4M3 {
            return Err(LoadError::UnsupportedType {
                path,
                tensor: name.to_string(),
                dtype: format!("{} (an F8_E4M3 tensor was expected)", entry.dtype.name()),
            });
        }
        let bytes = self.bytes(entry, name)?;
        let plan = plan_shard(&path, name, &entry.shape, shard)?;
        let mut codes = Vec::with_capacity(plan.numel());
        for run in &plan.runs {
            codes.extend_from_slice(&bytes[run.start..run.start + run.len]);
        }
        Ok(E4m3Tensor {
            shape: plan.shape,
            codes,
        })
    }
}

struct Header {
    tensors: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Parses and validates the header of the safetensors file `bytes` (the `file_idx`-th file).
fn parse_header(path: &Path, bytes: &[u8], file_idx: usize) -> Result<Header, LoadError> {
    let bad = |reason: String| LoadError::BadFormat {
        path: path.to_path_buf(),
        format: "safetensors",
        reason,
    };
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            bad(format!(
                "file of {} bytes is too short for the 8-byte header length",
                bytes.len()
            ))
        })?;
    let header_len = u64::from_le_bytes(len_bytes);
    let available = (bytes.len() - 8) as u64;
    if header_len > available || header_len > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header length {header_len} exceeds the {available} bytes after it (or the {MAX_HEADER_LEN}-byte limit)"
        )));
    }
    let data_start = 8 + header_len as usize;
    let data_len = bytes.len() - data_start;
    let json: serde_json::Value = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let serde_json::Value::Object(map) = json else {
        return Err(bad("header is not a JSON object".to_string()));
    };
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    let mut ranges: Vec<(usize, usize, &str)> = Vec::with_capacity(map.len());
    for (name, value) in &map {
        if name == "__metadata__" {
            let obj = value
                .as_object()
                .ok_or_else(|| bad("__metadata__ is not an object".to_string()))?;
            for (k, v) in obj {
                let v = v
                    .as_str()
                    .ok_or_else(|| bad(format!("__metadata__ '{k}' is {v}, not a string")))?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let tensor_err = |reason: String| LoadError::BadTensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            reason,
        };
        let raw: RawEntry = serde_json::from_value(value.clone())
            .map_err(|e| tensor_err(format!("bad header entry {value}: {e}")))?;
        let dtype = SafetensorsDType::parse(&raw.dtype)
            .ok_or_else(|| tensor_err(format!("unknown dtype '{}'", raw.dtype)))?;
        let shape = raw
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<usize>, _>>()
            .map_err(|_| tensor_err(format!("shape {:?} does not fit in memory", raw.shape)))?;
        let num_bytes = shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                tensor_err(format!(
                    "byte size of shape {shape:?} of {} overflows",
                    dtype.name()
                ))
            })?;
        let [begin, end] = raw.data_offsets;
        if begin > end || end > data_len as u64 {
            return Err(tensor_err(format!(
                "data_offsets [{begin}, {end}] are outside the data section of {data_len} bytes (past the end of the file?)"
            )));
        }
        let (begin, end) = (begin as usize, end as usize);
        if end - begin != num_bytes {
            return Err(tensor_err(format!(
                "data_offsets [{begin}, {end}] span {} bytes but shape {shape:?} of {} needs {num_bytes}",
                end - begin,
                dtype.name()
            )));
        }
        ranges.push((begin, end, name));
        tensors.insert(
            name.clone(),
            Entry {
                file_idx,
                dtype,
                shape,
                start: data_start + begin,
                num_bytes,
            },
        );
    }
    ranges.retain(|r| r.1 > r.0);
    ranges.sort();
    for pair in ranges.windows(2) {
        let ((a_begin, a_end, a), (b_begin, _, b)) = (pair[0], pair[1]);
        if b_begin < a_end {
            return Err(LoadError::BadTensor {
                path: path.to_path_buf(),
                tensor: b.to_string(),
                reason: format!("data at {b_begin} overlaps tensor '{a}' at [{a_begin}, {a_end}]"),
            });
        }
    }
    Ok(Header { tensors, metadata })
}

/// Reads a JSON file (`config.json`, `tokenizer_config.json`, an index).
pub fn read_json(path: impl AsRef<Path>) -> Result<serde_json::Value, LoadError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| LoadError::BadFormat {
        path: path.to_path_buf(),
        format: "JSON",
        reason: e.to_string(),
    })
}
