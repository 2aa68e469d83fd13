//! GGUF metadata: `MetadataValue` (the typed key/value model), the GGUF value type ids the
//! parser reads (`value_type`), and `GgufFile`'s typed reads of its metadata (`get_u64`,
//! `get_str_array`, ...), whose errors name the file, the key, the type expected and the value
//! found. Parsing the bytes is `file.rs`'s job; nothing here reads the file.

use super::file::GgufFile;
use crate::loader::LoadError;

/// One GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    /// GGUF type 0: unsigned 8-bit integer.
    U8(u8),
    /// GGUF type 1: signed 8-bit integer.
    I8(i8),
    /// GGUF type 2: unsigned 16-bit integer.
    U16(u16),
    /// GGUF type 3: signed 16-bit integer.
    I16(i16),
    /// GGUF type 4: unsigned 32-bit integer.
    U32(u32),
    /// GGUF type 5: signed 32-bit integer.
    I32(i32),
    /// GGUF type 10: unsigned 64-bit integer.
    U64(u64),
    /// GGUF type 11: signed 64-bit integer.
    I64(i64),
    /// GGUF type 6: 32-bit float.
    F32(f32),
    /// GGUF type 12: 64-bit float.
    F64(f64),
    /// GGUF type 7: boolean (one byte).
    Bool(bool),
    /// GGUF type 8: UTF-8 string (u64 length, then bytes).
    String(String),
    /// GGUF type 9: array of values of one element type (nesting allowed, at most 8 deep).
    Array(Vec<MetadataValue>),
}

/// GGUF value type ids (`gguf_type`).
pub(super) mod value_type {
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

impl MetadataValue {
    /// Any integer type that fits u64 (negative values give None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type that fits i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetadataValue::I8(v) => Some(v.into()),
            MetadataValue::I16(v) => Some(v.into()),
            MetadataValue::I32(v) => Some(v.into()),
            MetadataValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any integer or float type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v.into()),
            MetadataValue::F64(v) => Some(v),
            MetadataValue::I8(v) => Some(v.into()),
            MetadataValue::I16(v) => Some(v.into()),
            MetadataValue::I32(v) => Some(v.into()),
            MetadataValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value of a `Bool`; None for any other type (integers are not coerced).
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The text of a `String`; None for any other type.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements of an `Array`; None for any other type.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetadataValue::U8(_) => "u8",
            MetadataValue::I8(_) => "i8",
            MetadataValue::U16(_) => "u16",
            MetadataValue::I16(_) => "i16",
            MetadataValue::U32(_) => "u32",
            MetadataValue::I32(_) => "i32",
            MetadataValue::U64(_) => "u64",
            MetadataValue::I64(_) => "i64",
            MetadataValue::F32(_) => "f32",
            MetadataValue::F64(_) => "f64",
            MetadataValue::Bool(_) => "bool",
            MetadataValue::String(_) => "string",
            MetadataValue::Array(_) => "array",
        }
    }
}

/// Smallest number of bytes one value of a GGUF value type occupies (for count sanity checks).
pub(super) fn min_value_size(vtype: u32) -> Option<usize> {
    Some(match vtype {
        value_type::U8 | value_type::I8 | value_type::BOOL => 1,
        value_type::U16 | value_type::I16 => 2,
        value_type::U32 | value_type::I32 | value_type::F32 => 4,
        value_type::U64 | value_type::I64 | value_type::F64 | value_type::STRING => 8,
        value_type::ARRAY => 12,
        _ => return None,
    })
}

/// A short rendering of a metadata value for error messages.
pub(super) fn short_value(value: &MetadataValue) -> String {
    match value {
        MetadataValue::Array(a) => format!("of {} elements", a.len()),
        MetadataValue::String(s) if s.len() > 40 => {
            format!("{:?}...", s.chars().take(40).collect::<String>())
        }
        other => format!("{other:?}"),
    }
}

/// Typed metadata reads: `Ok(None)` when a key is absent, an error naming the key when its
/// value has another type.
impl GgufFile {
    fn meta_err(&self, key: &str, reason: String) -> LoadError {
        LoadError::BadMetadata {
            path: self.path().to_path_buf(),
            key: key.to_string(),
            reason,
        }
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        conv: impl FnOnce(&'a MetadataValue) -> Option<T>,
    ) -> Result<Option<T>, LoadError> {
        let Some(value) = self.metadata().get(key) else {
            return Ok(None);
        };
        match conv(value) {
            Some(v) => Ok(Some(v)),
            None => Err(self.meta_err(
                key,
                format!(
                    "expected {expected}, found {} {}",
                    value.type_name(),
                    short_value(value)
                ),
            )),
        }
    }

    /// A non-negative integer of any integer type; `Ok(None)` when absent.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, LoadError> {
        self.typed(key, "a non-negative integer", MetadataValue::as_u64)
    }

    /// Like `get_u64`, checked to fit `usize`.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>, LoadError> {
        self.typed(key, "a non-negative integer", |v| {
            v.as_u64().and_then(|v| usize::try_from(v).ok())
        })
    }

    /// A signed integer of any integer type.
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>, LoadError> {
        self.typed(key, "an integer", MetadataValue::as_i64)
    }

    /// A number (f32, f64 or integer) as f32.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, LoadError> {
        self.typed(key, "a number", |v| v.as_f64().map(|v| v as f32))
    }

    /// A string value; `Ok(None)` when absent, an error naming the key for any other type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, LoadError> {
        self.typed(key, "a string", MetadataValue::as_str)
    }

    /// A bool value; `Ok(None)` when absent, an error naming the key for any other type.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, LoadError> {
        self.typed(key, "a bool", MetadataValue::as_bool)
    }

    /// An array value of any element type; `Ok(None)` when absent, an error for any other type.
    pub fn get_array(&self, key: &str) -> Result<Option<&[MetadataValue]>, LoadError> {
        self.typed(key, "an array", MetadataValue::as_array)
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, LoadError> {
        self.typed(key, "an array of strings", |v| {
            v.as_array()?
                .iter()
                .map(MetadataValue::as_str)
                .collect::<Option<Vec<_>>>()
        })
    }

    /// An array of numbers as f32 (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, LoadError> {
        self.typed(key, "an array of numbers", |v| {
            v.as_array()?
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32))
                .collect::<Option<Vec<_>>>()
        })
    }

    /// An array of integers (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>, LoadError> {
        self.typed(key, "an array of integers", |v| {
            v.as_array()?
                .iter()
                .map(MetadataValue::as_i64)
                .collect::<Option<Vec<_>>>()
        })
    }

    /// `general.architecture` (e.g. `"llama"`); an error when absent or not a string.
    pub fn architecture(&self) -> Result<&str, LoadError> {
        self.get_str("general.architecture")?
            .ok_or_else(|| self.meta_err("general.architecture", "missing".to_string()))
    }
}
