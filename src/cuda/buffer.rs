//! Typed device memory: `DeviceBuffer<T>` owns one allocation on one device (freed on drop, on
//! the device's stream). Element types are sealed: the float types kernels compute on (f32, bf16,
//! f16) and the integer types of ids, tables and slot mappings. Copies live on `CudaDevice` and
//! check lengths before calling cudarc (whose copies assert, i.e. panic, on a short buffer).

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::dtype::DType;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
    impl Sealed for u8 {}
    impl Sealed for u32 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
}

/// A plain-old-data element type that device buffers can hold.
pub trait DeviceElem:
    sealed::Sealed + DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static
{
}
impl DeviceElem for f32 {}
impl DeviceElem for half::bf16 {}
impl DeviceElem for half::f16 {}
impl DeviceElem for u8 {}
impl DeviceElem for u32 {}
impl DeviceElem for i32 {}
impl DeviceElem for i64 {}

/// A float type the kernels are instantiated for; `DTYPE` picks the `{op}_{dtype}` entry point.
pub trait FloatElem: DeviceElem {
    /// The dtype this type stores; picks the `{op}_{dtype}` kernel entry point.
    const DTYPE: DType;
    /// Widens to f32 (exact for every implementor).
    fn to_f32(self) -> f32;
    /// Rounds an f32 to this type (round to nearest even for bf16 and f16).
    fn from_f32(v: f32) -> Self;
}

impl FloatElem for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl FloatElem for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

impl FloatElem for half::f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// One allocation of `capacity()` elements of `T` on a device, of which the first `len()` are in
/// use. Launchers check shapes against `len()` and pass the allocation's start to the kernels,
/// so a buffer allocated once for the largest step serves every smaller step at the same device
/// address (what CUDA graph replays need): `set_len` picks the prefix in use.
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    pub(crate) slice: CudaSlice<T>,
    pub(crate) len: usize,
}

impl<T> DeviceBuffer<T> {
    pub(crate) fn from_slice(slice: CudaSlice<T>) -> Self {
        let len = slice.len();
        DeviceBuffer { slice, len }
    }

    /// Elements in use (what launchers and copies see).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no element is in use (`len() == 0`); the allocation may still be larger.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements allocated.
    pub fn capacity(&self) -> usize {
        self.slice.len()
    }

    /// Uses the first `len` elements from now on; fails when `len > capacity()`. The contents
    /// are kept.
    pub fn set_len(&mut self, len: usize) -> Result<(), super::CudaError> {
        if len > self.capacity() {
            return Err(super::CudaError::invalid(
                "set_len",
                "len",
                len,
                format!("must be <= the buffer's capacity {}", self.capacity()),
            ));
        }
        self.len = len;
        Ok(())
    }

    /// The ordinal of the device that holds the buffer.
    pub fn ordinal(&self) -> usize {
        self.slice.ordinal()
    }

    /// Bytes in use: `len() * size_of::<T>()`.
    pub fn num_bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}
