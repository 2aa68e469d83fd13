//! Reading one value of a request: a `Tensor` (an input with its batch dimension removed, read
//! as integers, floats or strings) and a `Given` (a value from a tensor or under a JSON key),
//! whose readers make a value mean the same whichever source carries it. It knows nothing of
//! fields or defaults (`fields`, `parse`).

use serde_json::Value;
use triton_api::{DataType, InputTensor};

use super::{invalid, token_id};
use crate::request::RequestError;

/// A tensor with its batch dimension (if any) checked and removed.
pub(super) struct Tensor<'a> {
    pub(super) field: &'static str,
    dtype: DataType,
    shape: Vec<i64>,
    data: &'a [u8],
}

impl<'a> Tensor<'a> {
    /// `field`: the table's name of the tensor (errors name it).
    pub(super) fn new(
        t: &'a InputTensor,
        field: &'static str,
        max_batch_size: usize,
    ) -> Result<Self, RequestError> {
        let mut shape = t.shape.clone();
        if max_batch_size > 0 {
            match shape.first() {
                Some(1) => {
                    shape.remove(0);
                }
                Some(&b) => {
                    return Err(invalid(
                        field,
                        format!("batch size {b}"),
                        "the batch dimension must be 1: ferrum takes one sequence per request (send separate requests; the engine batches them)",
                    ));
                }
                None => {
                    return Err(invalid(
                        field,
                        "shape []",
                        "a batched model needs a leading batch dimension of 1",
                    ));
                }
            }
        }
        Ok(Tensor {
            field,
            dtype: t.dtype,
            shape,
            data: &t.data,
        })
    }

    /// Checks that the data holds exactly the shape's elements of `elem` bytes. A shape whose
    /// byte count does not fit a `usize` (`[1, i64::MAX]`) is refused like any other mismatch:
    /// unchecked, its product would wrap and could match a short buffer.
    fn check_size(&self, elem: usize) -> Result<(), RequestError> {
        let expected = self
            .shape
            .iter()
            .try_fold(elem, |n, &d| n.checked_mul(usize::try_from(d.max(0)).ok()?));
        if expected == Some(self.data.len()) {
            return Ok(());
        }
        Err(invalid(
            self.field,
            format!("{} bytes for shape {:?}", self.data.len(), self.shape),
            match expected {
                Some(n) => format!("size mismatch: the shape needs {n} bytes"),
                None => "size mismatch: the shape's byte count overflows".to_string(),
            },
        ))
    }

    fn wrong_dtype(&self, bound: &str) -> RequestError {
        invalid(
            self.field,
            format!("{} data", self.dtype.config_name()),
            bound,
        )
    }

    /// The data as little-endian words of `elem` bytes, zero-extended.
    fn words(&self, elem: usize) -> impl Iterator<Item = u64> + '_ {
        self.data.chunks_exact(elem).map(move |c| {
            let mut b = [0u8; 8];
            b[..elem].copy_from_slice(c);
            u64::from_le_bytes(b)
        })
    }

    /// Every element of an integer (or BOOL) tensor. UINT64 values above i64::MAX wrap;
    /// `seed_u64` reads them exactly.
    pub(super) fn ints(&self) -> Result<Vec<i64>, RequestError> {
        let elem = match self.dtype {
            DataType::Fp16 | DataType::Fp32 | DataType::Fp64 | DataType::Bf16 => None,
            dtype => dtype.byte_size(),
        };
        let Some(elem) = elem else {
            return Err(self.wrong_dtype("expected an integer tensor"));
        };
        self.check_size(elem)?;
        let sign_extend = |w: u64| match self.dtype {
            DataType::Int8 => w as i8 as i64,
            DataType::Int16 => w as i16 as i64,
            DataType::Int32 => w as i32 as i64,
            _ => w as i64,
        };
        Ok(self.words(elem).map(sign_extend).collect())
    }

    /// Every element of a float (or integer) tensor.
    fn floats(&self) -> Result<Vec<f64>, RequestError> {
        let elem = match self.dtype {
            DataType::Fp32 => 4,
            DataType::Fp64 => 8,
            DataType::Bytes | DataType::Fp16 | DataType::Bf16 | DataType::Invalid => {
                return Err(self.wrong_dtype("expected TYPE_FP32 (or another numeric type)"));
            }
            _ => return Ok(self.ints()?.into_iter().map(|i| i as f64).collect()),
        };
        self.check_size(elem)?;
        let float = |w: u64| match elem {
            4 => f32::from_bits(w as u32) as f64,
            _ => f64::from_bits(w),
        };
        Ok(self.words(elem).map(float).collect())
    }

    /// Every element of a BYTES tensor (each a 4-byte length, then the bytes), as UTF-8 text.
    pub(super) fn strings(&self) -> Result<Vec<String>, RequestError> {
        if self.dtype != DataType::Bytes {
            return Err(self.wrong_dtype("expected TYPE_STRING (BYTES)"));
        }
        let mut out = Vec::new();
        let mut rest = self.data;
        while !rest.is_empty() {
            let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                return Err(invalid(
                    self.field,
                    "truncated BYTES element",
                    "each element needs a 4-byte length",
                ));
            };
            let len = u32::from_le_bytes(*len) as usize;
            let Some(bytes) = tail.get(..len) else {
                return Err(invalid(
                    self.field,
                    format!("element length {len}"),
                    "exceeds the tensor's bytes",
                ));
            };
            let s = std::str::from_utf8(bytes).map_err(|e| {
                invalid(
                    self.field,
                    format!("invalid UTF-8 at byte {}", e.valid_up_to()),
                    "must be valid UTF-8 text",
                )
            })?;
            out.push(s.to_string());
            rest = &tail[len..];
        }
        Ok(out)
    }

    pub(super) fn one<T>(&self, v: Vec<T>) -> Result<T, RequestError> {
        let n = v.len();
        match <[T; 1]>::try_from(v) {
            Ok([x]) => Ok(x),
            Err(_) => Err(invalid(
                self.field,
                format!("{n} elements (shape {:?})", self.shape),
                "must have exactly one element",
            )),
        }
    }

    fn int(&self) -> Result<i64, RequestError> {
        self.one(self.ints()?)
    }
    fn float(&self) -> Result<f64, RequestError> {
        self.one(self.floats()?)
    }
    fn boolean(&self) -> Result<bool, RequestError> {
        Ok(self.int()? != 0)
    }
    fn seed_u64(&self) -> Result<u64, RequestError> {
        if let (DataType::Uint64, Some(w), 8) = (self.dtype, self.words(8).next(), self.data.len())
        {
            return Ok(w);
        }
        let v = self.int()?;
        u64::try_from(v).map_err(|_| invalid(self.field, v, "must be >= 0"))
    }
}

/// One value as a source carries it: a tensor, or a JSON value (in `sampling_parameters` or a
/// request parameter) under its key. Every kind reads both through these methods, so a value
/// means the same whichever source carries it.
#[derive(Clone, Copy)]
pub(super) enum Given<'a> {
    Tensor(&'a Tensor<'a>),
    Json(&'static str, &'a Value),
}

impl<'a> Given<'a> {
    /// The name the value came under.
    pub(super) fn name(self) -> &'static str {
        match self {
            Given::Tensor(t) => t.field,
            Given::Json(key, _) => key,
        }
    }

    pub(super) fn int(self) -> Result<i64, RequestError> {
        match self {
            Given::Tensor(t) => t.int(),
            Given::Json(key, v) => match (v.as_i64(), v.as_f64()) {
                (Some(i), _) => Ok(i),
                (None, Some(x)) if x.fract() == 0.0 && x.abs() < 9.0e15 => Ok(x as i64),
                _ => Err(invalid(key, v, "must be an integer")),
            },
        }
    }

    pub(super) fn float(self) -> Result<f64, RequestError> {
        match self {
            Given::Tensor(t) => t.float(),
            Given::Json(key, v) => v
                .as_f64()
                .ok_or_else(|| invalid(key, v, "must be a number")),
        }
    }

    pub(super) fn boolean(self) -> Result<bool, RequestError> {
        match self {
            Given::Tensor(t) => t.boolean(),
            Given::Json(_, Value::Bool(b)) => Ok(*b),
            Given::Json(_, Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
            Given::Json(_, Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
            Given::Json(key, v) => Err(invalid(key, v, "must be true or false")),
        }
    }

    /// A UINT64 tensor is read exactly; anything else must be an integer >= 0.
    pub(super) fn seed(self) -> Result<u64, RequestError> {
        match self {
            Given::Tensor(t) => t.seed_u64(),
            Given::Json(key, _) => {
                let s = self.int()?;
                u64::try_from(s).map_err(|_| invalid(key, s, "must be >= 0"))
            }
        }
    }

    /// Strings, empty ones dropped: a BYTES tensor, or JSON's string or list of strings.
    pub(super) fn strings(self) -> Result<Vec<String>, RequestError> {
        let strings = match self {
            Given::Tensor(t) => t.strings()?,
            Given::Json(key, v) => {
                // A single string is a list of one.
                let items = v.as_array().map_or(std::slice::from_ref(v), Vec::as_slice);
                let string = |item: &Value| {
                    let bound = format!("{key} must be a string or a list of strings");
                    item.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| invalid(key, item, bound))
                };
                items.iter().map(string).collect::<Result<_, _>>()?
            }
        };
        Ok(strings.into_iter().filter(|s| !s.is_empty()).collect())
    }

    /// Token ids: JSON's list, or one tensor id where a negative one means none (`end_id = -1`).
    pub(super) fn token_ids(self) -> Result<Vec<u32>, RequestError> {
        match self {
            Given::Tensor(t) => match t.int()? {
                id if id < 0 => Ok(vec![]),
                id => Ok(vec![token_id(t.field, id)?]),
            },
            // A JSON list; a request parameter (which cannot hold a list) may also give one id
            // or a string holding the list ("[2, 5]" or "2, 5").
            Given::Json(key, v) => {
                let bound = "must be a list of token ids (a request parameter may also be one id or \
                             a string such as \"[2, 5]\" or \"2, 5\")";
                let items: Vec<Value> = match v {
                    Value::Array(a) => a.clone(),
                    Value::Number(_) => vec![v.clone()],
                    Value::String(s) => match serde_json::from_str::<Value>(s) {
                        Ok(Value::Array(a)) => a,
                        _ => s
                            .split(',')
                            .map(|t| t.trim().parse::<i64>().map(Value::from))
                            .collect::<Result<_, _>>()
                            .map_err(|_| invalid(key, v, bound))?,
                    },
                    _ => return Err(invalid(key, v, bound)),
                };
                items
                    .iter()
                    .map(|item| token_id(key, Given::Json(key, item).int()?))
                    .collect()
            }
        }
    }

    /// The tensor, for the kinds that only a tensor carries.
    pub(super) fn tensor(self) -> Result<&'a Tensor<'a>, RequestError> {
        match self {
            Given::Tensor(t) => Ok(t),
            Given::Json(key, v) => Err(invalid(key, v, "only accepted as a tensor")),
        }
    }
}

/// tensorrtllm's word list `[2, N]`: row 0 the flattened token ids, row 1 the end offset of
/// each word (padded with -1).
pub(super) fn word_list(t: &Tensor<'_>) -> Result<Vec<Vec<u32>>, RequestError> {
    let v = t.ints()?;
    if v.is_empty() {
        return Ok(vec![]);
    }
    if t.shape.len() != 2 || t.shape[0] != 2 {
        return Err(invalid(
            t.field,
            format!("shape {:?}", t.shape),
            "must be [2, N]: row 0 token ids, row 1 end offsets",
        ));
    }
    // `ints` checked that `v` holds 2 x shape[1] elements.
    let n = t.shape[1].max(0) as usize;
    let Some((ids, offsets)) = v.split_at_checked(n) else {
        return Err(invalid(
            t.field,
            format!("{} elements for shape {:?}", v.len(), t.shape),
            "size mismatch",
        ));
    };
    let mut words = Vec::new();
    let mut start = 0usize;
    for &end in offsets.iter().take_while(|&&o| o >= 0) {
        let end = end as usize;
        if end < start || end > n {
            return Err(invalid(
                t.field,
                format!("offset {end}"),
                format!("offsets must be ascending and <= {n}"),
            ));
        }
        if end > start {
            words.push(
                ids[start..end]
                    .iter()
                    .map(|&id| token_id(t.field, id))
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        start = end;
    }
    Ok(words)
}
