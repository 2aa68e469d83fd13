//! Linear layers on the CPU: `y = x · Wᵀ (+ bias)` over f32 or compact `BlockQ8` weights, the hot
//! path of the CPU engine.
//!
//! This module owns the weight representation of a linear layer (`Weight`), the choice of kernel
//! per call and the thread scheduling of the f32 products. Paths:
//! - f32 weights, any `m`: the `gemm` crate (multithreaded through rayon);
//! - `BlockQ8` weights, any `m` (`Q8Kernel::Auto`): the int8 product of `ops::q8` — activations
//!   quantized per 32-block, exact int32 block sums, one f32 formula per output whatever `m`, so
//!   a sequence's outputs do not depend on the batch it runs in. m = 1 uses the portable row
//!   kernel (it reads each weight once anyway); m >= 2 the SIMD kernel the CPU supports best,
//!   which applies each weight block to every activation row;
//! - `BlockQ8` weights, `Q8Kernel::DequantGemm` (kept for comparison in tests and the benchmark):
//!   weight tiles are dequantized to f32 into per-thread scratch and multiplied with `gemm`.
//!
//! Callers on the latency path (the engine's forward pass) should run inside the rayon pool
//! (`pool.install`): a call from a plain thread pays a worker wake-up and a latch per call,
//! measured at ~20 µs, a third of a small decode matmul.
//!
//! It must never allocate per call in the hot path (scratch is thread-local and reused) and never
//! panics on shapes in `try_linear` (they become `OpsError`). The one `unsafe` block of the module
//! is the call into `gemm`, whose API takes raw pointers; its bounds are checked right before it.

use std::cell::RefCell;

use multiversion::multiversion;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::OpsError;
use super::q8::{self, Isa};
use super::quant::{self, BlockQ8, QK};
use crate::tensor::{HostTensor, Q8Tensor};

/// Number of f32 elements of a dequantized weight tile in the prefill path (256 KiB: stays in L2
/// while `gemm` sweeps it).
const TILE_ELEMS: usize = 64 * 1024;

/// Storage format requested for a linear weight at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// Dense f32, exact.
    F32,
    /// `BlockQ8` symmetric requantization (`min = 0`, `scale = max|w| / 127` per 32 weights):
    /// 1.25 bytes per weight.
    Q8,
}

/// A linear-layer weight `[rows = out_features, cols = in_features]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum Weight {
    /// Dense f32 weights, exact.
    F32 {
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
        /// `rows * cols` elements, row-major.
        data: Vec<f32>,
    },
    /// Compact 8-bit blocks (`cols % 32 == 0`): symmetric from `WeightFormat::Q8`, or GGUF's
    /// asymmetric blocks kept exactly.
    Q8(Q8Tensor),
}

/// Kernel choice for `BlockQ8` weights (f32 weights always use `gemm`). `Auto` is what `linear`
/// uses; the others exist for tests and the benchmark, which compare the paths side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q8Kernel {
    /// `Int8(Isa::Scalar)` for m = 1, `Int8(Isa::detect())` above.
    Auto,
    /// Activations quantized per 32-block, int8 dot products on the given instruction set (one
    /// this CPU lacks runs as `Isa::Scalar`). Every `Isa` gives the same bits.
    Int8(Isa),
    /// Weight tiles dequantized to f32, then `gemm`. Exact f32 semantics for the dequantized weights.
    DequantGemm,
}

impl Q8Kernel {
    /// The kernel `self` runs for `m` activation rows (`Auto` resolved).
    pub fn resolve(self, m: usize) -> Q8Kernel {
        match self {
            Q8Kernel::Auto if m == 1 => Q8Kernel::Int8(Isa::Scalar),
            Q8Kernel::Auto => Q8Kernel::Int8(Isa::detect()),
            k => k,
        }
    }
}

impl Weight {
    /// Builds a weight from a 2-D f32 tensor `[rows, cols]`.
    ///
    /// `WeightFormat::Q8` needs `cols % 32 == 0` (and `cols > 0`); other shapes fall back to
    /// `Weight::F32`, so callers must not assume the requested format (check `size_in_bytes` or
    /// match on the result).
    pub fn from_f32(t: HostTensor, format: WeightFormat) -> Result<Weight, OpsError> {
        const OP: &str = "Weight::from_f32";
        let &[rows, cols] = t.shape.as_slice() else {
            return Err(OpsError::NotMatrix {
                op: OP,
                operand: "tensor",
                shape: t.shape,
            });
        };
        let expected = rows.saturating_mul(cols);
        if t.data.len() != expected {
            return Err(OpsError::LengthMismatch {
                op: OP,
                operand: "data",
                shape: t.shape,
                expected,
                actual: t.data.len(),
            });
        }
        if format == WeightFormat::F32 || cols == 0 || cols % QK != 0 {
            return Ok(Weight::F32 {
                rows,
                cols,
                data: t.data,
            });
        }
        let num_row_blocks = cols / QK;
        let mut blocks = vec![
            BlockQ8 {
                scale: 0.0,
                min: 0.0,
                qs: [0; QK]
            };
            rows * num_row_blocks
        ];
        blocks
            .par_chunks_mut(num_row_blocks)
            .zip(t.data.par_chunks(cols))
            .with_min_len(64)
            .for_each(|(dst, src)| quant::quantize_row_q8(src, dst));
        Ok(Weight::Q8(Q8Tensor { rows, cols, blocks }))
    }

    /// Wraps a block-quantized weight as loaded (possibly asymmetric blocks from GGUF). Its block
    /// count is checked by `try_linear` / `try_row_to_f32`.
    pub fn from_q8(t: Q8Tensor) -> Weight {
        Weight::Q8(t)
    }

    /// Output features (`out_features`).
    pub fn rows(&self) -> usize {
        match self {
            Weight::F32 { rows, .. } => *rows,
            Weight::Q8(t) => t.rows,
        }
    }

    /// Input features (`in_features`).
    pub fn cols(&self) -> usize {
        match self {
            Weight::F32 { cols, .. } => *cols,
            Weight::Q8(t) => t.cols,
        }
    }

    /// Bytes of weight data (what one matrix-vector product reads from memory).
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Weight::F32 { data, .. } => std::mem::size_of_val(data.as_slice()),
            Weight::Q8(t) => std::mem::size_of_val(t.blocks.as_slice()),
        }
    }

    /// Dequantized row `row_idx` into `out[cols]` (embedding lookup from a possibly tied, compact
    /// table).
    ///
    /// # Panics
    /// If `row_idx >= rows` or `out.len() != cols`; callers holding untrusted indices (token ids)
    /// validate them first or use `try_row_to_f32`.
    pub fn row_to_f32(&self, row_idx: usize, out: &mut [f32]) {
        if let Err(e) = self.try_row_to_f32(row_idx, out) {
            panic!("{e}");
        }
    }

    /// `row_to_f32` returning an error instead of panicking.
    pub fn try_row_to_f32(&self, row_idx: usize, out: &mut [f32]) -> Result<(), OpsError> {
        const OP: &str = "Weight::row_to_f32";
        let (rows, cols) = (self.rows(), self.cols());
        if row_idx >= rows {
            return Err(OpsError::IndexOutOfRange {
                op: OP,
                what: "row",
                index: row_idx,
                bound: rows,
            });
        }
        if out.len() != cols {
            return Err(OpsError::LengthMismatch {
                op: OP,
                operand: "out",
                shape: vec![cols],
                expected: cols,
                actual: out.len(),
            });
        }
        match self {
            Weight::F32 { data, .. } => {
                out.copy_from_slice(&data[row_idx * cols..(row_idx + 1) * cols])
            }
            Weight::Q8(t) => {
                check_blocks(OP, t)?;
                let num_row_blocks = cols / QK;
                quant::dequantize_row_q8(
                    &t.blocks[row_idx * num_row_blocks..(row_idx + 1) * num_row_blocks],
                    out,
                );
            }
        }
        Ok(())
    }
}

fn check_blocks(op: &'static str, t: &Q8Tensor) -> Result<(), OpsError> {
    let expected = if t.cols.is_multiple_of(QK) {
        t.rows.saturating_mul(t.cols / QK)
    } else {
        usize::MAX
    };
    if t.blocks.len() != expected {
        return Err(OpsError::BadBlockCount {
            op,
            rows: t.rows,
            cols: t.cols,
            num_blocks: t.blocks.len(),
            expected,
        });
    }
    Ok(())
}

/// `y[m, rows] = x[m, cols] · Wᵀ (+ bias[rows])`, multithreaded on the rayon pool.
///
/// f32 weights: exact f32 semantics up to summation order. `BlockQ8` weights: the activations are
/// quantized to 8 bits per 32-block, llama.cpp-style (`Σ (s*q + mn) * x ≈ s*xd * Σ q*xq + mn*xd *
/// Σ xq`), which adds a relative error of about 0.5/127 per block of x; each output row's value
/// does not depend on `m` or on the other rows of x.
///
/// # Panics
/// If the slice lengths do not match the shapes (a programming error, like out-of-bounds
/// indexing); `try_linear` returns an `OpsError` instead.
pub fn linear(x: &[f32], m: usize, w: &Weight, bias: Option<&[f32]>, y: &mut [f32]) {
    if let Err(e) = try_linear(x, m, w, bias, y) {
        panic!("{e}");
    }
}

/// `linear` returning an error on shape mismatch.
pub fn try_linear(
    x: &[f32],
    m: usize,
    w: &Weight,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<(), OpsError> {
    linear_with(x, m, w, bias, y, Q8Kernel::Auto)
}

/// `try_linear` with an explicit kernel for `BlockQ8` weights.
pub fn linear_with(
    x: &[f32],
    m: usize,
    w: &Weight,
    bias: Option<&[f32]>,
    y: &mut [f32],
    kernel: Q8Kernel,
) -> Result<(), OpsError> {
    const OP: &str = "linear";
    let (rows, cols) = (w.rows(), w.cols());
    let check = |operand: &'static str, shape: Vec<usize>, actual: usize| {
        let expected = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .unwrap_or(usize::MAX);
        if actual == expected {
            Ok(())
        } else {
            Err(OpsError::LengthMismatch {
                op: OP,
                operand,
                shape,
                expected,
                actual,
            })
        }
    };
    check("x", vec![m, cols], x.len())?;
    check("y", vec![m, rows], y.len())?;
    if let Some(b) = bias {
        check("bias", vec![rows], b.len())?;
    }
    if let Weight::F32 { data, .. } = w {
        check("weight", vec![rows, cols], data.len())?;
    }
    if let Weight::Q8(t) = w {
        check_blocks(OP, t)?;
    }
    if m == 0 || rows == 0 {
        return Ok(());
    }
    if cols == 0 {
        fill_bias(y, rows, bias);
        return Ok(());
    }
    match w {
        Weight::F32 { data, .. } => {
            let accumulate = fill_bias(y, rows, bias);
            gemm_xwt(x, m, cols, data, rows, y, rows, accumulate, true);
        }
        Weight::Q8(t) => match kernel.resolve(m) {
            Q8Kernel::Int8(isa) => q8::matmul(x, m, t, bias, y, isa),
            _ => q8_dequant_gemm(x, m, t, bias, y),
        },
    }
    Ok(())
}

/// Writes the bias (or nothing) into every row of `y[m, rows]`; returns whether `y` now holds
/// values to accumulate onto.
fn fill_bias(y: &mut [f32], rows: usize, bias: Option<&[f32]>) -> bool {
    match bias {
        Some(b) => {
            for y_row in y.chunks_exact_mut(rows) {
                y_row.copy_from_slice(b);
            }
            true
        }
        None => {
            y.fill(0.0);
            false
        }
    }
}

/// `y[i, n] (+)= Σ_l x[i, l] * w[n, l]` with `y` rows `y_row_stride` apart:
/// x: [m, k], w: [n, k], y: [(m - 1) * y_row_stride + n]. Threads: the rayon pool, for products
/// above `gemm`'s threading threshold.
#[allow(clippy::too_many_arguments)]
fn gemm_xwt(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    y: &mut [f32],
    y_row_stride: usize,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        x.len() >= m * k
            && w.len() >= n * k
            && y_row_stride >= n
            && y.len() >= (m - 1) * y_row_stride + n
    );
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // dst = alpha * dst + beta * lhs · rhs, with lhs = x (row-major), rhs[l, j] = w[j, l].
    // SAFETY: the assert above bounds every access: gemm reads lhs[i*k + l] (i < m, l < k) within
    // x, rhs at j*k + l (j < n, l < k) within w, and reads/writes dst[i*y_row_stride + j] within y.
    // `y` is a unique borrow, so dst aliases neither input; all pointers come from live slices that
    // outlive the (synchronous) call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            y_row_stride as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Reusable per-thread buffers of the dequantize + gemm path.
#[derive(Default)]
struct Scratch {
    /// A dequantized weight tile, [tile_rows, cols].
    tile: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch, or with fresh buffers when it is already in use (a nested
/// call: rayon may run another `linear` on this thread while it waits for its own tasks).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Dequantizes whole rows: w: [n * num_row_blocks] → out: [n, num_row_blocks * 32].
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn dequantize_rows(w: &[BlockQ8], out: &mut [f32]) {
    for (block, chunk) in w.iter().zip(out.chunks_exact_mut(QK)) {
        for (d, &q) in chunk.iter_mut().zip(&block.qs) {
            *d = block.scale * f32::from(q) + block.min;
        }
    }
}

/// Prefill path: dequantize tiles of weight rows into scratch, `gemm` each into its columns of y.
fn q8_dequant_gemm(x: &[f32], m: usize, t: &Q8Tensor, bias: Option<&[f32]>, y: &mut [f32]) {
    let (rows, cols) = (t.rows, t.cols);
    let num_row_blocks = cols / QK;
    // Row ranges are split across threads; each thread walks its range in L2-sized tiles
    // (dequantize, then a single-threaded gemm into its own [m, range] output), so a call costs
    // one parallel dispatch instead of two per tile.
    let num_tasks = 2 * rayon::current_num_threads().max(1);
    let task_rows = rows.div_ceil(num_tasks).max(1);
    let tile_rows = (TILE_ELEMS / cols).clamp(1, task_rows);
    let row_starts: Vec<usize> = (0..rows).step_by(task_rows).collect();
    let parts: Vec<(usize, Vec<f32>)> = row_starts
        .into_par_iter()
        .map(|row0| {
            let n = task_rows.min(rows - row0);
            let mut out = vec![0.0f32; m * n];
            with_scratch(|scratch| {
                let tile = &mut scratch.tile;
                tile.resize(tile_rows * cols, 0.0);
                let mut r = 0;
                while r < n {
                    let nr = tile_rows.min(n - r);
                    let w =
                        &t.blocks[(row0 + r) * num_row_blocks..(row0 + r + nr) * num_row_blocks];
                    dequantize_rows(w, &mut tile[..nr * cols]);
                    gemm_xwt(
                        x,
                        m,
                        cols,
                        &tile[..nr * cols],
                        nr,
                        &mut out[r..],
                        n,
                        false,
                        false,
                    );
                    r += nr;
                }
            });
            (row0, out)
        })
        .collect();
    for (row0, out) in parts {
        let n = out.len() / m;
        for (y_row, part) in y.chunks_exact_mut(rows).zip(out.chunks_exact(n)) {
            y_row[row0..row0 + n].copy_from_slice(part);
        }
    }
    if let Some(b) = bias {
        for y_row in y.chunks_exact_mut(rows) {
            for (v, b) in y_row.iter_mut().zip(b) {
                *v += b;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ops::quant::tests::random_values;

    /// The weights a `Weight` stands for, as f32 [rows, cols].
    fn dense(w: &Weight) -> Vec<f32> {
        let mut out = vec![0.0; w.rows() * w.cols()];
        for (row_idx, row) in out.chunks_exact_mut(w.cols()).enumerate() {
            w.row_to_f32(row_idx, row);
        }
        out
    }

    /// Naive f64 reference y[m, rows] and Σ|x·w| per output (the scale of the rounding error).
    fn reference(
        x: &[f32],
        m: usize,
        w: &[f32],
        rows: usize,
        cols: usize,
        bias: Option<&[f32]>,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0.0f64; m * rows];
        let mut magnitude = vec![0.0f64; m * rows];
        for i in 0..m {
            for r in 0..rows {
                let mut acc = bias.map_or(0.0, |b| f64::from(b[r]));
                let mut mag = bias.map_or(0.0, |b| f64::from(b[r]).abs());
                for l in 0..cols {
                    let p = f64::from(x[i * cols + l]) * f64::from(w[r * cols + l]);
                    acc += p;
                    mag += p.abs();
                }
                y[i * rows + r] = acc;
                magnitude[i * rows + r] = mag;
            }
        }
        (y, magnitude)
    }

    /// Random asymmetric blocks: Q4_1-like (unsigned 4-bit values, negative min) and Q8_0-like
    /// (full i8 range, including -128).
    fn random_asymmetric_q8(seed: u64, rows: usize, cols: usize) -> Q8Tensor {
        let num_blocks = rows * cols / QK;
        let vals = random_values(seed, num_blocks * (QK + 2));
        let blocks = (0..num_blocks)
            .map(|b| {
                let mut qs = [0i8; QK];
                for (i, q) in qs.iter_mut().enumerate() {
                    let r = vals[b * QK + i];
                    *q = if b % 2 == 0 {
                        ((r + 1.0) * 7.99) as i8
                    } else if i == 5 {
                        -128
                    } else {
                        (r * 127.0) as i8
                    };
                }
                let scale = 0.002 + vals[num_blocks * QK + b].abs() * 0.02;
                let min = if b % 2 == 0 {
                    -8.0 * scale + 0.1 * vals[num_blocks * (QK + 1) + b]
                } else {
                    0.0
                };
                BlockQ8 { scale, min, qs }
            })
            .collect();
        Q8Tensor { rows, cols, blocks }
    }

    /// Checks `linear_with(kernel)` against the f64 reference on the weight's exact values.
    /// Tolerances: f32 accumulation, |err| <= 2e-6 * Σ|x·w| (k <= 200 terms, pairwise-ish sums);
    /// int8 dot: each activation moves by at most half a quantization step d/2, so
    /// |err| <= Σ_l |w_l| * d(block of l) / 2, plus the f32 term.
    fn check(w: &Weight, m: usize, with_bias: bool, kernel: Q8Kernel, seed: u64) {
        let (rows, cols) = (w.rows(), w.cols());
        let x = random_values(seed, m * cols);
        let bias = with_bias.then(|| random_values(seed + 1, rows));
        let mut y = vec![f32::NAN; m * rows];
        linear_with(&x, m, w, bias.as_deref(), &mut y, kernel).unwrap();
        let wd = dense(w);
        let (y_ref, magnitude) = reference(&x, m, &wd, rows, cols, bias.as_deref());
        let int8 = matches!(w, Weight::Q8(_)) && matches!(kernel.resolve(m), Q8Kernel::Int8(_));
        for i in 0..m {
            let x_row = &x[i * cols..(i + 1) * cols];
            let steps: Vec<f64> = x_row
                .chunks(QK)
                .map(|c| f64::from(c.iter().fold(0.0f32, |a, v| a.max(v.abs()))) / 127.0)
                .collect();
            for r in 0..rows {
                let idx = i * rows + r;
                let mut tol = 2e-6 * magnitude[idx] + 1e-7;
                if int8 {
                    tol += (0..cols)
                        .map(|l| f64::from(wd[r * cols + l]).abs() * 0.5 * steps[l / QK])
                        .sum::<f64>()
                        * 1.001;
                }
                let err = (f64::from(y[idx]) - y_ref[idx]).abs();
                assert!(
                    err <= tol,
                    "{kernel:?} m={m} rows={rows} cols={cols} y[{i},{r}]={} ref={} err={err} tol={tol}",
                    y[idx],
                    y_ref[idx]
                );
            }
        }
    }

    #[test]
    fn f32_gemm_matches_reference() {
        for (rows, cols) in [(37, 45), (131, 100), (5, 1)] {
            let w = Weight::from_f32(
                HostTensor {
                    shape: vec![rows, cols],
                    data: random_values(7, rows * cols),
                },
                WeightFormat::F32,
            )
            .unwrap();
            for m in [1, 3, 17, 70] {
                check(&w, m, m % 2 == 1, Q8Kernel::Auto, 100 + m as u64);
            }
        }
    }

    #[test]
    fn q8_int8_dot_matches_reference() {
        for (rows, cols) in [(37, 96), (131, 160), (1, 32)] {
            let w = Weight::from_f32(
                HostTensor {
                    shape: vec![rows, cols],
                    data: random_values(8, rows * cols),
                },
                WeightFormat::Q8,
            )
            .unwrap();
            assert!(matches!(w, Weight::Q8(_)));
            for m in [1, 3, 8, 17, 70] {
                for isa in Isa::ALL {
                    check(&w, m, m % 2 == 1, Q8Kernel::Int8(isa), 200 + m as u64);
                }
            }
        }
    }

    #[test]
    fn q8_dequant_gemm_matches_reference() {
        // 1000 rows x 96 cols spans several tiles of TILE_ELEMS.
        for (rows, cols) in [(37, 96), (1000, 96), (131, 160)] {
            let w = Weight::from_f32(
                HostTensor {
                    shape: vec![rows, cols],
                    data: random_values(9, rows * cols),
                },
                WeightFormat::Q8,
            )
            .unwrap();
            for m in [1, 3, 17, 70] {
                check(&w, m, m % 2 == 1, Q8Kernel::DequantGemm, 300 + m as u64);
            }
        }
    }

    #[test]
    fn asymmetric_blocks_match_reference_on_both_kernels() {
        let w = Weight::from_q8(random_asymmetric_q8(11, 67, 128));
        for m in [1, 3, 17] {
            check(&w, m, true, Q8Kernel::Int8(Isa::detect()), 400 + m as u64);
            check(&w, m, true, Q8Kernel::DequantGemm, 500 + m as u64);
            check(&w, m, false, Q8Kernel::Auto, 600 + m as u64);
        }
    }

    #[test]
    fn auto_picks_the_int8_kernel_for_every_m() {
        let w = Weight::from_f32(
            HostTensor {
                shape: vec![50, 64],
                data: random_values(12, 50 * 64),
            },
            WeightFormat::Q8,
        )
        .unwrap();
        for (m, expected) in [
            (1, Q8Kernel::Int8(Isa::Scalar)),
            (2, Q8Kernel::Int8(Isa::detect())),
            (300, Q8Kernel::Int8(Isa::detect())),
        ] {
            assert_eq!(Q8Kernel::Auto.resolve(m), expected);
            let x = random_values(13, m * 64);
            let mut auto = vec![0.0; m * 50];
            let mut explicit = vec![0.0; m * 50];
            let mut gemm = vec![0.0; m * 50];
            linear(&x, m, &w, None, &mut auto);
            linear_with(&x, m, &w, None, &mut explicit, expected).unwrap();
            linear_with(&x, m, &w, None, &mut gemm, Q8Kernel::DequantGemm).unwrap();
            assert_eq!(auto, explicit, "m={m}");
            // The two kernels really differ (activation quantization), so equality above is meaningful.
            assert_ne!(auto, gemm, "m={m}");
        }
    }

    #[test]
    fn nested_calls_from_rayon_tasks_match_sequential_calls() {
        let weights: Vec<Weight> = (0..6)
            .map(|s| {
                Weight::from_f32(
                    HostTensor {
                        shape: vec![300, 64],
                        data: random_values(20 + s, 300 * 64),
                    },
                    WeightFormat::Q8,
                )
                .unwrap()
            })
            .collect();
        let x = random_values(30, 3 * 64);
        let sequential: Vec<Vec<f32>> = weights
            .iter()
            .map(|w| {
                let mut y = vec![0.0; 3 * 300];
                linear(&x, 3, w, None, &mut y);
                y
            })
            .collect();
        let nested: Vec<Vec<f32>> = weights
            .par_iter()
            .map(|w| {
                let mut y = vec![0.0; 3 * 300];
                linear(&x, 3, w, None, &mut y);
                y
            })
            .collect();
        assert_eq!(sequential, nested);
    }

    #[test]
    fn q8_falls_back_to_f32_when_cols_are_not_blocks() {
        let data = random_values(40, 3 * 33);
        let w = Weight::from_f32(
            HostTensor {
                shape: vec![3, 33],
                data: data.clone(),
            },
            WeightFormat::Q8,
        )
        .unwrap();
        assert_eq!(
            w,
            Weight::F32 {
                rows: 3,
                cols: 33,
                data
            }
        );
        assert_eq!(w.size_in_bytes(), 3 * 33 * 4);
        let q = Weight::from_f32(
            HostTensor {
                shape: vec![3, 64],
                data: random_values(41, 3 * 64),
            },
            WeightFormat::Q8,
        )
        .unwrap();
        assert_eq!((q.rows(), q.cols(), q.size_in_bytes()), (3, 64, 3 * 2 * 40));
    }

    #[test]
    fn row_to_f32_returns_dequantized_rows() {
        let data = random_values(42, 4 * 64);
        let w = Weight::from_f32(
            HostTensor {
                shape: vec![4, 64],
                data: data.clone(),
            },
            WeightFormat::Q8,
        )
        .unwrap();
        let Weight::Q8(t) = &w else {
            panic!("expected Q8")
        };
        let mut row = vec![0.0; 64];
        let mut expected = vec![0.0; 64];
        w.row_to_f32(2, &mut row);
        quant::dequantize_row_q8(&t.blocks[4..6], &mut expected);
        assert_eq!(row, expected);
        let f = Weight::from_f32(
            HostTensor {
                shape: vec![4, 64],
                data: data.clone(),
            },
            WeightFormat::F32,
        )
        .unwrap();
        f.row_to_f32(3, &mut row);
        assert_eq!(row, data[3 * 64..]);
        assert!(matches!(
            w.try_row_to_f32(4, &mut row),
            Err(OpsError::IndexOutOfRange {
                index: 4,
                bound: 4,
                ..
            })
        ));
        assert!(matches!(
            f.try_row_to_f32(0, &mut row[..10]),
            Err(OpsError::LengthMismatch { actual: 10, .. })
        ));
    }

    #[test]
    fn shape_errors_name_the_operand() {
        let w = Weight::from_f32(
            HostTensor {
                shape: vec![4, 64],
                data: random_values(43, 4 * 64),
            },
            WeightFormat::Q8,
        )
        .unwrap();
        let x = vec![0.0; 2 * 64];
        let mut y = vec![0.0; 2 * 4];
        let err = try_linear(&x[..100], 2, &w, None, &mut y).unwrap_err();
        assert!(
            matches!(
                err,
                OpsError::LengthMismatch {
                    operand: "x",
                    expected: 128,
                    actual: 100,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("linear: x has 100 elements, expected 128 for shape [2, 64]"),
            "{err}"
        );
        let err = try_linear(&x, 2, &w, None, &mut y[..7]).unwrap_err();
        assert!(
            matches!(err, OpsError::LengthMismatch { operand: "y", .. }),
            "{err}"
        );
        let err = try_linear(&x, 2, &w, Some(&[0.0; 3]), &mut y).unwrap_err();
        assert!(
            matches!(
                err,
                OpsError::LengthMismatch {
                    operand: "bias",
                    ..
                }
            ),
            "{err}"
        );
        let bad = Weight::from_q8(Q8Tensor {
            rows: 4,
            cols: 64,
            blocks: vec![
                BlockQ8 {
                    scale: 1.0,
                    min: 0.0,
                    qs: [0; QK]
                };
                7
            ],
        });
        assert!(matches!(
            try_linear(&x, 2, &bad, None, &mut y),
            Err(OpsError::BadBlockCount {
                num_blocks: 7,
                expected: 8,
                ..
            })
        ));
        let err = Weight::from_f32(
            HostTensor {
                shape: vec![2, 2, 2],
                data: vec![0.0; 8],
            },
            WeightFormat::Q8,
        )
        .unwrap_err();
        assert!(matches!(err, OpsError::NotMatrix { .. }), "{err}");
        let err = Weight::from_f32(
            HostTensor {
                shape: vec![2, 32],
                data: vec![0.0; 63],
            },
            WeightFormat::Q8,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                OpsError::LengthMismatch {
                    operand: "data",
                    expected: 64,
                    actual: 63,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn empty_inner_dimension_gives_bias() {
        let w = Weight::from_f32(
            HostTensor {
                shape: vec![3, 0],
                data: vec![],
            },
            WeightFormat::Q8,
        )
        .unwrap();
        let mut y = vec![f32::NAN; 2 * 3];
        linear(&[], 2, &w, Some(&[1.0, 2.0, 3.0]), &mut y);
        assert_eq!(y, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        linear(&[], 2, &w, None, &mut y);
        assert_eq!(y, [0.0; 6]);
    }

    #[test]
    fn weight_format_serializes_lowercase() {
        assert_eq!(serde_json::to_string(&WeightFormat::Q8).unwrap(), "\"q8\"");
        assert_eq!(
            serde_json::from_str::<WeightFormat>("\"f32\"").unwrap(),
            WeightFormat::F32
        );
        assert!(serde_json::from_str::<WeightFormat>("\"Q8\"").is_err());
    }
}
