//! The GGUF container: header, metadata section, tensor infos and data section.
//!
//! `GgufFile::open` memory-maps the file and validates its whole layout up front (version,
//! counts against the file size, string lengths, tensor byte ranges, alignment, block
//! divisibility, duplicate names); tensor data is read lazily through `TensorSource`: `get`
//! (dequantized to f32 by `quants`) or `get_q8` (exact conversion to `BlockQ8`), sharded at
//! read. This module must never panic or allocate from an untrusted count before checking the
//! bytes it claims are present: a bad file is a `LoadError` naming the file, the key or tensor,
//! and the offending value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::metadata::{MetadataValue, min_value_size, short_value, value_type};
use super::quants::{DequantError, GgmlType, convert_to_q8, dequantize};
use crate::loader::mmap::{FileBytes, memory_label};
use crate::loader::shard::{Run, plan_shard};
use crate::loader::{
    E4m3Tensor, HostTensor, LoadError, Q8Tensor, Shard, SourceDType, TensorInfo, TensorSource,
};
use crate::tensor::{BlockQ8, QK};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Key of the data alignment in the metadata.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted (real files use 1; protects the stack).
const MAX_ARRAY_DEPTH: usize = 8;
/// Elements dequantized per parallel task.
const PAR_CHUNK_ELEMS: usize = 1 << 16;

/// Layout of one tensor in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor's name in the file, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// How the data is stored (f32, f16, or a block-quantized type).
    pub ggml_type: GgmlType,
    /// GGUF order: `ne[0]` is the innermost (contiguous) dimension.
    pub ne: Vec<u64>,
    /// PyTorch order (reversed `ne`), outermost first.
    pub shape: Vec<usize>,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Elements in the tensor (product of `shape`).
    pub num_elems: usize,
    /// Bytes of stored data (whole blocks for a quantized type).
    pub num_bytes: usize,
}

/// A parsed, validated GGUF file whose tensor data stays in the (mapped) file until read.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    bytes: FileBytes,
    version: u32,
    alignment: u64,
    /// Absolute offset of the (aligned) data section.
    data_start: usize,
    metadata: BTreeMap<String, MetadataValue>,
    /// File order.
    tensors: Vec<GgufTensorInfo>,
    by_name: BTreeMap<String, usize>,
}

impl GgufFile {
    /// Memory-maps and validates the GGUF file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let bytes = FileBytes::map(path)?;
        Self::parse(path.to_path_buf(), bytes)
    }

    /// Parses a GGUF file held in memory; `name` labels it in error messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self, LoadError> {
        Self::parse(memory_label(name), FileBytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: FileBytes) -> Result<Self, LoadError> {
        let header = parse_layout(&path, &bytes)?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path,
            bytes,
            version: header.version,
            alignment: header.alignment,
            data_start: header.data_start,
            metadata: header.metadata,
            tensors: header.tensors,
            by_name,
        })
    }

    /// The file this was read from (named in every error).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Byte alignment of the data section and of every tensor's offset (`general.alignment`, else
    /// 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_offset(&self) -> usize {
        self.data_start
    }

    /// Every metadata key-value pair, by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetadataValue> {
        &self.metadata
    }

    /// Tensor layouts in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The layout of tensor `name`, or None when the file has no such tensor.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    fn entry(&self, name: &str) -> Result<&GgufTensorInfo, LoadError> {
        self.tensor_info(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// The raw (still quantized) bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], LoadError> {
        let info = self.entry(name)?;
        self.raw(info)
    }

    fn raw(&self, info: &GgufTensorInfo) -> Result<&[u8], LoadError> {
        // Validated at open; checked again so a logic error cannot become a panic.
        usize::try_from(info.offset)
            .ok()
            .and_then(|off| self.data_start.checked_add(off))
            .and_then(|start| self.bytes.get(start..start.checked_add(info.num_bytes)?))
            .ok_or_else(|| self.tensor_err(info, "data range outside the file".to_string()))
    }

    fn tensor_err(&self, info: &GgufTensorInfo, reason: String) -> LoadError {
        LoadError::BadTensor {
            path: self.path.clone(),
            tensor: info.name.clone(),
            reason,
        }
    }

    fn unsupported(&self, info: &GgufTensorInfo) -> LoadError {
        LoadError::UnsupportedType {
            path: self.path.clone(),
            tensor: info.name.clone(),
            dtype: format!("{} (ggml type {})", info.ggml_type, info.ggml_type.0),
        }
    }

    /// Dequantizes elements `[run.start, run.start + run.len)` of the tensor into `out`.
    fn read_run(
        &self,
        info: &GgufTensorInfo,
        raw: &[u8],
        run: Run,
        out: &mut [f32],
    ) -> Result<(), LoadError> {
        let ty = info.ggml_type;
        let (Some(block_size), Some(type_size)) = (ty.block_size(), ty.type_size()) else {
            return Err(self.unsupported(info));
        };
        let first_block = run.start / block_size;
        let end_block = (run.start + run.len).div_ceil(block_size);
        let src = raw
            .get(first_block * type_size..end_block * type_size)
            .ok_or_else(|| self.tensor_err(info, format!("elements {run:?} outside the tensor")))?;
        let map = |e: DequantError| match e {
            DequantError::Unsupported(_) => self.unsupported(info),
            other => self.tensor_err(info, other.to_string()),
        };
        if run.start.is_multiple_of(block_size) && run.len.is_multiple_of(block_size) {
            // Large runs (embeddings, whole projections) are dequantized in parallel chunks.
            let num_chunk_blocks = PAR_CHUNK_ELEMS.div_ceil(block_size);
            out.par_chunks_mut(num_chunk_blocks * block_size)
                .zip(src.par_chunks(num_chunk_blocks * type_size))
                .try_for_each(|(out, src)| dequantize(ty, src, out))
                .map_err(map)
        } else {
            let mut tmp = vec![0.0f32; (end_block - first_block) * block_size];
            dequantize(ty, src, &mut tmp).map_err(map)?;
            let skip = run.start - first_block * block_size;
            out.copy_from_slice(&tmp[skip..skip + run.len]);
            Ok(())
        }
    }
}

impl TensorSource for GgufFile {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        let info = self.tensor_info(name)?;
        let dtype = match info.ggml_type {
            GgmlType::F32 => SourceDType::F32,
            GgmlType::F16 => SourceDType::F16,
            GgmlType::BF16 => SourceDType::BF16,
            other => SourceDType::Ggml(other),
        };
        Some(TensorInfo {
            shape: info.shape.clone(),
            dtype,
        })
    }

    fn get(&self, name: &str, shard: Shard) -> Result<HostTensor, LoadError> {
        let info = self.entry(name)?;
        if !info.ggml_type.is_dequantizable() {
            return Err(self.unsupported(info));
        }
        let raw = self.raw(info)?;
        let plan = plan_shard(&self.path, name, &info.shape, shard)?;
        let mut data = vec![0.0f32; plan.numel()];
        let mut pos = 0;
        for run in &plan.runs {
            self.read_run(info, raw, *run, &mut data[pos..pos + run.len])?;
            pos += run.len;
        }
        Ok(HostTensor {
            shape: plan.shape,
            data,
        })
    }

    fn get_e4m3(&self, name: &str, _shard: Shard) -> Result<E4m3Tensor, LoadError> {
        // GGUF has no FP8 type.
        let info = self.entry(name)?;
        Err(self.unsupported(info))
    }

    fn get_q8(&self, name: &str, shard: Shard) -> Result<Option<Q8Tensor>, LoadError> {
        let info = self.entry(name)?;
        let ty = info.ggml_type;
        if !ty.converts_to_q8() {
            return Ok(None);
        }
        let [rows, cols] = info.shape[..] else {
            return Err(self.tensor_err(
                info,
                format!("get_q8 needs a 2-D tensor, shape is {:?}", info.shape),
            ));
        };
        let raw = self.raw(info)?;
        let plan = plan_shard(&self.path, name, &info.shape, shard)?;
        let out_cols = plan.shape[1];
        if out_cols % QK != 0 {
            return Err(LoadError::BadShard {
                path: self.path.clone(),
                tensor: name.to_string(),
                shape: vec![rows, cols],
                shard,
            });
        }
        let (Some(block_size), Some(type_size)) = (ty.block_size(), ty.type_size()) else {
            return Err(self.unsupported(info));
        };
        let mut blocks = Vec::with_capacity(plan.numel() / QK);
        let mut tmp = Vec::new();
        for run in &plan.runs {
            // Runs start and end on 32-element boundaries (cols and the shard width are multiples
            // of 32); K-quant runs may start inside a 256-element super-block.
            let first_block = run.start / block_size;
            let end_block = (run.start + run.len).div_ceil(block_size);
            let src = raw
                .get(first_block * type_size..end_block * type_size)
                .ok_or_else(|| {
                    self.tensor_err(info, format!("elements {run:?} outside the tensor"))
                })?;
            tmp.clear();
            tmp.resize((end_block - first_block) * block_size / QK, EMPTY_BLOCK);
            convert_to_q8(ty, src, &mut tmp).map_err(|e| self.tensor_err(info, e.to_string()))?;
            let skip = (run.start - first_block * block_size) / QK;
            blocks.extend_from_slice(&tmp[skip..skip + run.len / QK]);
        }
        Ok(Some(Q8Tensor {
            rows: plan.shape[0],
            cols: out_cols,
            blocks,
        }))
    }
}

const EMPTY_BLOCK: BlockQ8 = BlockQ8 {
    scale: 0.0,
    min: 0.0,
    qs: [0; QK],
};

// ---------------------------------------------------------------------------------------------
// Layout parsing
// ---------------------------------------------------------------------------------------------

struct Layout {
    version: u32,
    alignment: u64,
    data_start: usize,
    metadata: BTreeMap<String, MetadataValue>,
    tensors: Vec<GgufTensorInfo>,
}

/// Bounds-checked little-endian cursor; errors are reasons (the caller adds file/key/tensor).
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "{what} at byte {} needs {n} bytes but the file has {} left (truncated?)",
                    self.pos,
                    self.remaining()
                )
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let b = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count of items that each take at least `min_item_size` bytes: must fit what is left.
    fn count(&mut self, min_item_size: usize, what: &str) -> Result<usize, String> {
        let at = self.pos;
        let n = self.u64(what)?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n.checked_mul(min_item_size).is_some_and(|b| b <= self.remaining()))
            .ok_or_else(|| {
                format!(
                    "{what} {n} at byte {at} is impossible: {} bytes remain and each item needs at least {min_item_size}",
                    self.remaining()
                )
            })
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let at = self.pos;
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.remaining())
            .ok_or_else(|| {
                format!(
                    "{what} at byte {at} has length {len} but only {} bytes remain",
                    self.remaining()
                )
            })?;
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|e| format!("{what} at byte {at} is not valid UTF-8: {e}"))
    }

    fn value(&mut self, vtype: u32, depth: usize) -> Result<MetadataValue, String> {
        Ok(match vtype {
            value_type::U8 => MetadataValue::U8(self.array::<1>("u8 value").map(|b| b[0])?),
            value_type::I8 => MetadataValue::I8(self.array("i8 value").map(i8::from_le_bytes)?),
            value_type::U16 => MetadataValue::U16(self.array("u16 value").map(u16::from_le_bytes)?),
            value_type::I16 => MetadataValue::I16(self.array("i16 value").map(i16::from_le_bytes)?),
            value_type::U32 => MetadataValue::U32(self.u32("u32 value")?),
            value_type::I32 => MetadataValue::I32(self.array("i32 value").map(i32::from_le_bytes)?),
            value_type::U64 => MetadataValue::U64(self.u64("u64 value")?),
            value_type::I64 => MetadataValue::I64(self.array("i64 value").map(i64::from_le_bytes)?),
            value_type::F32 => MetadataValue::F32(self.array("f32 value").map(f32::from_le_bytes)?),
            value_type::F64 => MetadataValue::F64(self.array("f64 value").map(f64::from_le_bytes)?),
            value_type::BOOL => {
                let at = self.pos;
                match self.array::<1>("bool value")?[0] {
                    0 => MetadataValue::Bool(false),
                    1 => MetadataValue::Bool(true),
                    other => return Err(format!("bool value at byte {at} is {other}, not 0 or 1")),
                }
            }
            value_type::STRING => MetadataValue::String(self.string("string value")?),
            value_type::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let at = self.pos;
                let elem_type = self.u32("array element type")?;
                let min_size = min_value_size(elem_type).ok_or_else(|| {
                    format!("array at byte {at} has unknown element type {elem_type}")
                })?;
                let n = self.count(min_size, "array length")?;
                // Bounded by the bytes left; capped so tiny elements cannot amplify memory early.
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(elem_type, depth + 1)?);
                }
                MetadataValue::Array(items)
            }
            other => return Err(format!("unknown value type {other}")),
        })
    }
}

fn parse_layout(path: &Path, bytes: &[u8]) -> Result<Layout, LoadError> {
    let bad = |reason: String| LoadError::BadFormat {
        path: path.to_path_buf(),
        format: "GGUF",
        reason,
    };
    let mut cur = Cursor { bytes, pos: 0 };
    let magic = cur.array::<4>("magic").map_err(bad)?;
    if magic != GGUF_MAGIC {
        return Err(bad(format!(
            "bad magic {magic:02x?} (expected \"GGUF\" = {GGUF_MAGIC:02x?})"
        )));
    }
    let version = cur.u32("version").map_err(bad)?;
    match version {
        2 | 3 => {}
        v if v & 0xffff == 0 && (1..=3).contains(&v.swap_bytes()) => {
            return Err(bad(format!(
                "big-endian GGUF (version {} byte-swapped) is not supported",
                v.swap_bytes()
            )));
        }
        v => {
            return Err(bad(format!(
                "unsupported GGUF version {v} (supported: 2, 3)"
            )));
        }
    }
    // Each tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
    let num_tensors = cur.count(24, "tensor count").map_err(bad)?;
    // Each key/value takes at least 8 (key length) + 4 (type) + 1 (smallest value) bytes.
    let num_kv = cur.count(13, "metadata count").map_err(bad)?;

    let mut metadata = BTreeMap::new();
    for kv_idx in 0..num_kv {
        let key = cur
            .string("metadata key")
            .map_err(|r| bad(format!("metadata entry {kv_idx}: {r}")))?;
        let meta_err = |reason: String| LoadError::BadMetadata {
            path: path.to_path_buf(),
            key: key.clone(),
            reason,
        };
        let vtype = cur.u32("value type").map_err(meta_err)?;
        let value = cur.value(vtype, 0).map_err(meta_err)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(meta_err("duplicate key".to_string()));
        }
    }

    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two() && *a <= 1 << 30)
            .ok_or_else(|| LoadError::BadMetadata {
                path: path.to_path_buf(),
                key: ALIGNMENT_KEY.to_string(),
                reason: format!(
                    "must be a power of two up to 2^30, found {} {}",
                    v.type_name(),
                    short_value(v)
                ),
            })?,
    };

    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(num_tensors);
    let mut seen = BTreeMap::new();
    for tensor_idx in 0..num_tensors {
        let name = cur
            .string("tensor name")
            .map_err(|r| bad(format!("tensor info {tensor_idx}: {r}")))?;
        let tensor_err = |reason: String| LoadError::BadTensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            reason,
        };
        let n_dims = cur.u32("n_dims").map_err(tensor_err)?;
        let n_dims = usize::try_from(n_dims)
            .ok()
            .filter(|&n| n <= MAX_DIMS)
            .ok_or_else(|| tensor_err(format!("n_dims {n_dims} exceeds {MAX_DIMS}")))?;
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let dim = cur.u64("dimension").map_err(tensor_err)?;
            if dim > i64::MAX as u64 {
                return Err(tensor_err(format!(
                    "dimension {dim} is negative or too large"
                )));
            }
            ne.push(dim);
        }
        let ggml_type = GgmlType(cur.u32("type").map_err(tensor_err)?);
        let offset = cur.u64("offset").map_err(tensor_err)?;
        let (Some(block_size), Some(_)) = (ggml_type.block_size(), ggml_type.type_size()) else {
            return Err(LoadError::UnsupportedType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: format!("unknown ggml type {}", ggml_type.0),
            });
        };
        let shape = ne
            .iter()
            .rev()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| tensor_err(format!("shape {ne:?} does not fit in memory")))?;
        let num_elems = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| tensor_err(format!("element count of shape {ne:?} overflows")))?;
        let row_len = ne.first().copied().unwrap_or(1);
        if row_len % block_size as u64 != 0 {
            return Err(tensor_err(format!(
                "row length ne[0] = {row_len} is not a multiple of the {ggml_type} block size {block_size}"
            )));
        }
        let num_bytes = ggml_type.bytes_for(num_elems).ok_or_else(|| {
            tensor_err(format!(
                "byte size of {num_elems} {ggml_type} elements overflows"
            ))
        })?;
        if offset % alignment != 0 {
            return Err(tensor_err(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if seen.insert(name.clone(), tensor_idx).is_some() {
            return Err(tensor_err("duplicate tensor name".to_string()));
        }
        tensors.push(GgufTensorInfo {
            name,
            ggml_type,
            ne,
            shape,
            offset,
            num_elems,
            num_bytes,
        });
    }

    let data_start = u64::try_from(cur.pos)
        .ok()
        .and_then(|p| p.checked_next_multiple_of(alignment))
        .and_then(|p| usize::try_from(p).ok())
        .ok_or_else(|| bad("data section offset overflows".to_string()))?;
    let data_len = bytes.len().saturating_sub(data_start) as u64;
    for t in &tensors {
        let end = t.offset.checked_add(t.num_bytes as u64);
        if data_start > bytes.len() || end.is_none_or(|end| end > data_len) {
            return Err(LoadError::BadTensor {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                reason: format!(
                    "data [{}, +{}) relative to the data section at byte {data_start} runs past the end of the file ({} bytes)",
                    t.offset,
                    t.num_bytes,
                    bytes.len()
                ),
            });
        }
    }
    let mut by_offset: Vec<&GgufTensorInfo> = tensors.iter().filter(|t| t.num_bytes > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.offset + a.num_bytes as u64 > b.offset {
            return Err(LoadError::BadTensor {
                path: path.to_path_buf(),
                tensor: b.name.clone(),
                reason: format!(
                    "data at offset {} overlaps tensor '{}' at [{}, +{})",
                    b.offset, a.name, a.offset, a.num_bytes
                ),
            });
        }
    }
    Ok(Layout {
        version,
        alignment,
        data_start,
        metadata,
        tensors,
    })
}
