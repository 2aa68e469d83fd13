//! Helpers shared by the GPU integration tests (tests/cuda_*.rs, used with `mod cuda_common;`):
//! the device, a seeded generator, host <-> device copies through a dtype, NaN-poisoned outputs,
//! dtype-aware tolerances and the comparison against a CPU reference. It owns no test and checks
//! nothing by itself; every test keeps its own seeds, shapes and references. Needs a GPU only
//! when a helper touching `dev()` runs.
#![allow(dead_code, unused_imports, unused_macros, clippy::unwrap_used)]

use std::sync::OnceLock;

use triton_ferrum::cuda::{CudaDevice, DeviceBuffer, FloatElem};
use triton_ferrum::dtype::DType;

/// Device 0, opened once per test binary (prints what it is and which libraries it loaded).
pub fn dev() -> &'static CudaDevice {
    static DEV: OnceLock<CudaDevice> = OnceLock::new();
    DEV.get_or_init(|| {
        let dev = CudaDevice::open(0).unwrap();
        eprintln!("device: {:?}", dev.info());
        eprintln!("libraries: {}", dev.libraries());
        dev
    })
}

/// A 64-bit LCG (Knuth's MMIX constants), high bits out: the tests' data generator. `Rng(seed)`
/// gives the same stream every run, so a failing case reproduces.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 29) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Rounds through T, so the CPU reference sees exactly the values the GPU holds.
pub fn round<T: FloatElem>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

/// Uploads `v` converted to T.
pub fn up<T: FloatElem>(v: &[f32]) -> DeviceBuffer<T> {
    let host: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    dev().upload(&host).unwrap()
}

/// Downloads `b` (synchronizing) as f32.
pub fn down<T: FloatElem>(b: &DeviceBuffer<T>) -> Vec<f32> {
    dev()
        .download(b)
        .unwrap()
        .into_iter()
        .map(T::to_f32)
        .collect()
}

/// An output buffer filled with NaN: an element the kernel does not write fails `check`.
pub fn poisoned<T: FloatElem>(n: usize) -> DeviceBuffer<T> {
    up::<T>(&vec![f32::NAN; n])
}

/// Relative tolerance per dtype: the kernels compute in f32, so the error is the output's
/// rounding (bf16 2^-9, f16 2^-12) plus f32 summation order. The tensor-core prefill also
/// rounds P to the input dtype before P·V (as flash-attention does), which bf16's 1e-2 and
/// f16's 2e-3 cover.
pub fn tol<T: FloatElem>() -> f32 {
    match T::DTYPE {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
    }
}

/// Whether `check_with` lets an element that is NaN on both sides pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NanRule {
    /// NaN never passes (so a `poisoned` element the kernel left unwritten fails).
    Never,
    /// NaN passes where the reference is NaN too (kernels that propagate NaN inputs).
    WhereReferenceIsNan,
}

/// |got - want| <= tol * (|want| + 0.25 * max|want|) everywhere (the floor covers elements near
/// zero, whose relative error means nothing after cancellation); NaN never passes. Prints the
/// observed errors.
pub fn check<T: FloatElem>(what: &str, got: &[f32], want: &[f32]) {
    check_with::<T>(what, got, want, NanRule::Never);
}

/// As `check`, but an element that is NaN in both `got` and `want` passes.
pub fn check_nan_propagating<T: FloatElem>(what: &str, got: &[f32], want: &[f32]) {
    check_with::<T>(what, got, want, NanRule::WhereReferenceIsNan);
}

/// `check` / `check_nan_propagating`; prints one `CHECK` line: max absolute error, max relative
/// error over elements above a tenth of the scale, relative L2 error, max error / scale.
pub fn check_with<T: FloatElem>(what: &str, got: &[f32], want: &[f32], nan: NanRule) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let tol = tol::<T>();
    let scale = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
    let (mut max_abs, mut max_rel, mut err2, mut ref2) = (0.0f32, 0.0f32, 0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let both_nan = nan == NanRule::WhereReferenceIsNan && g.is_nan() && w.is_nan();
        assert!(
            err <= tol * (w.abs() + 0.25 * scale) || both_nan,
            "{what} [{}]: element {i}: got {g}, want {w} (tol {tol}, scale {scale})",
            T::DTYPE
        );
        if both_nan {
            continue;
        }
        max_abs = max_abs.max(err);
        if w.abs() > 0.1 * scale {
            max_rel = max_rel.max(err / w.abs());
        }
        err2 += (err as f64).powi(2);
        ref2 += (w as f64).powi(2);
    }
    println!(
        "CHECK {what} [{}]: n={} max_abs_err={max_abs:.3e} max_rel_err={max_rel:.3e} \
         rel_l2_err={:.3e} max_err/scale={:.3e} scale={scale:.3e} tol={tol:e}",
        T::DTYPE,
        got.len(),
        (err2 / ref2.max(1e-30)).sqrt(),
        max_abs / scale.max(f32::MIN_POSITIVE)
    );
}

/// Runs the generic function `$f` for f32, bf16 and f16, in that order.
macro_rules! for_each_dtype {
    ($f:ident) => {{
        $f::<f32>();
        $f::<::half::bf16>();
        $f::<::half::f16>();
    }};
}
pub(crate) use for_each_dtype;
