//! The batched GPU sampler: turns logits `[num_rows, vocab_size]` on the device into one token
//! id per row (plus, when a row asks, the sampled token's logprob and the top-n logprobs), so the
//! executor copies back only ids (+ logprobs). It owns the device scratch of `kernels/sample.cu`
//! (weights, the packed per-step upload, outputs) and the host packing of per-row parameters; it
//! never keeps request state between steps (histories and RNGs stay with the caller) and never
//! synchronizes except in `fetch`.
//!
//! Determinism design: the GPU consumes randomness exactly like the CPU `Sampler`. The caller
//! keeps each request's `Rng` and, for a random (temperature > 0) row, draws the one
//! `next_f64()` the CPU `Candidates::draw` would draw this step into `RowSampling::uniform`
//! (`executor::cuda::row_sampling` does it; greedy rows draw nothing); the kernel applies the CPU's sanitizing, suppression, penalties (same f32
//! operations), the CPU's own `exp` (bit-identical weights), the same filter order and the same
//! inverse-CDF walk over the same candidate order (ranked after top-k/top-p, token-id order
//! otherwise). Seeded requests therefore get the CPU's tokens, except when the uniform falls within
//! rounding (f64, ~1e-15 relative) of a cumulative boundary, since the GPU sums masses in another
//! order (measured by `tests/cuda_sampling.rs`).
//!
//! This module takes plain numbers (`RowSampling`, `TokenHistory`, suppressed ids), never request
//! types: turning a request's parameters into a `RowSampling` is the executor side's job.
//!
//! Per step: `SampleBatch` packs every row's parameters, penalty history and suppressed ids into
//! one `u32` array (one host-to-device copy); `GpuSampler::sample` launches one CTA per row;
//! `GpuSampler::fetch` copies the ids (and logprobs when asked) back.

use std::collections::HashMap;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::buffer::{DeviceBuffer, DeviceElem, FloatElem};
use super::device::CudaDevice;
use super::error::CudaError;
use super::kernels::KernelId;
use crate::tensor::{Penalties, Sampled, TokenLogprobs};

/// `u32` words per row in the packed parameters (`RowParams` in kernels/sample.cu).
pub const PARAM_WORDS: usize = 16;
/// Most top logprobs a row may ask for (`MAX_TOP` in kernels/sample.cu).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Threads per CTA (one CTA per row); must match `SAMPLE_THREADS` in kernels/sample.cu.
const SAMPLE_THREADS: u32 = 1024;
/// `num_logprobs` word meaning "no logprobs".
const LOGPROBS_OFF: u32 = u32::MAX;
/// Id of a missing top-logprob entry.
const NO_ID: u32 = u32::MAX;
const OP: &str = "sample";

/// One row's sampling parameters for one step: plain numbers, as the kernel reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    /// 0: greedy (argmax, no randomness); > 0: random sampling at this temperature.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// Repetition, presence and frequency strengths; when any is on, `SampleBatch::push` needs the
    /// row's `TokenHistory`.
    pub penalties: Penalties,
    /// Number of top logprobs (<= `MAX_TOP_LOGPROBS`); None: no logprobs for this row.
    pub num_logprobs: Option<usize>,
    /// The uniform in [0, 1) this step's draw uses: the request's `Rng::next_f64()`, drawn exactly
    /// when the CPU sampler draws (random rows, once per step). Ignored by greedy rows.
    pub uniform: f64,
}

impl RowSampling {
    /// A greedy row with every filter, penalty and logprob off (e.g. a placeholder row whose
    /// token is dropped).
    pub fn greedy() -> Self {
        RowSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            penalties: Penalties::default(),
            num_logprobs: None,
            uniform: 0.0,
        }
    }
}

/// The penalty bookkeeping of one request in the kernel's layout: the distinct ids of prompt ∪
/// output in first-seen order, each with its output count (0: prompt only). Mirrors the CPU's
/// `PenaltyState`: the repetition penalty hits every entry, presence/frequency the entries with
/// a count > 0. Ids >= `vocab_size` are ignored, as on the CPU.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    /// [num_entries, 2]: (token_id, output_count)
    entries: Vec<[u32; 2]>,
    /// token id -> index into `entries`
    index: HashMap<u32, usize>,
    vocab_size: usize,
}

impl TokenHistory {
    /// The history of a request before any output: the distinct ids of `prompt_ids` below
    /// `vocab_size`, in first-seen order, each with output count 0.
    pub fn new(prompt_ids: &[u32], vocab_size: usize) -> Self {
        let mut history = TokenHistory {
            entries: Vec::new(),
            index: HashMap::new(),
            vocab_size,
        };
        for &token_id in prompt_ids {
            history.entry(token_id);
        }
        history
    }

    fn entry(&mut self, token_id: u32) -> Option<usize> {
        if token_id as usize >= self.vocab_size {
            return None;
        }
        let num_entries = self.entries.len();
        let idx = *self.index.entry(token_id).or_insert(num_entries);
        if idx == num_entries {
            self.entries.push([token_id, 0]);
        }
        Some(idx)
    }

    /// Records one generated token.
    pub fn accept(&mut self, token_id: u32) {
        if let Some(idx) = self.entry(token_id) {
            self.entries[idx][1] = self.entries[idx][1].saturating_add(1);
        }
    }

    /// (token_id, output_count) pairs, distinct ids.
    pub fn entries(&self) -> &[[u32; 2]] {
        &self.entries
    }
}

/// One step's rows, packed on the host for a single upload:
/// `[params: num_rows * PARAM_WORDS | history: num_history * 2 | suppressed: num_suppressed]`.
#[derive(Debug, Clone, Default)]
pub struct SampleBatch {
    params: Vec<u32>,
    history: Vec<u32>,
    suppressed: Vec<u32>,
    /// Rows that asked for logprobs, and the largest top-n among them.
    num_logprob_rows: usize,
    max_top: usize,
    num_rows: usize,
}

impl SampleBatch {
    /// An empty batch (no rows, no allocation).
    pub fn new() -> Self {
        SampleBatch::default()
    }

    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.params.clear();
        self.history.clear();
        self.suppressed.clear();
        self.num_logprob_rows = 0;
        self.max_top = 0;
        self.num_rows = 0;
    }

    /// Rows pushed since the last `clear`: one per sampling sequence, in plan order.
    pub fn num_rows(&self) -> usize {
        self.num_rows
    }

    /// Appends a row. `history`: the request's penalty bookkeeping (None when no penalty is on;
    /// needed when one is). `suppressed_ids`: ids that must not be sampled this step (as the CPU
    /// sampler's `suppressed_ids`).
    pub fn push(
        &mut self,
        row: &RowSampling,
        history: Option<&TokenHistory>,
        suppressed_ids: &[u32],
    ) -> Result<(), CudaError> {
        let row_idx = self.num_rows;
        if let Some(n) = row.num_logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(CudaError::invalid(
                OP,
                "num_logprobs",
                n,
                format!("must be <= {MAX_TOP_LOGPROBS} (row {row_idx})"),
            ));
        }
        let top_k = u32::try_from(row.top_k).unwrap_or(u32::MAX);
        let history_start = to_u32("history offset", self.history.len() / 2)?;
        let suppressed_start = to_u32("suppressed offset", self.suppressed.len())?;
        let mut num_history = 0usize;
        if row.penalties.is_enabled() {
            let Some(history) = history else {
                return Err(CudaError::invalid(
                    OP,
                    "history",
                    "None",
                    format!("row {row_idx} has penalties on and needs its token history"),
                ));
            };
            num_history = history.entries.len();
            self.history.extend(history.entries.iter().flatten());
        }
        self.suppressed.extend_from_slice(suppressed_ids);
        let uniform = row.uniform.to_bits();
        let words: [u32; PARAM_WORDS] = [
            row.temperature.to_bits(),
            top_k,
            row.top_p.to_bits(),
            row.min_p.to_bits(),
            row.penalties.repetition.to_bits(),
            row.penalties.presence.to_bits(),
            row.penalties.frequency.to_bits(),
            row.num_logprobs.map_or(LOGPROBS_OFF, |n| n as u32),
            uniform as u32,
            (uniform >> 32) as u32,
            history_start,
            to_u32("history length", num_history)?,
            suppressed_start,
            to_u32("suppressed length", suppressed_ids.len())?,
            0,
            0,
        ];
        self.params.extend_from_slice(&words);
        if let Some(n) = row.num_logprobs {
            self.num_logprob_rows += 1;
            self.max_top = self.max_top.max(n);
        }
        self.num_rows += 1;
        Ok(())
    }
}

fn to_u32(what: &'static str, v: usize) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| CudaError::invalid(OP, what, v, "must fit in u32"))
}

fn to_i32(what: &'static str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::invalid(OP, what, v, "must fit in i32"))
}

/// A device buffer that grows (never shrinks) to the largest size asked for.
#[derive(Debug, Default)]
struct Scratch<T> {
    buf: Option<DeviceBuffer<T>>,
}

impl<T: DeviceElem> Scratch<T> {
    fn ensure(&mut self, dev: &CudaDevice, len: usize) -> Result<&mut DeviceBuffer<T>, CudaError> {
        let big_enough = self
            .buf
            .as_ref()
            .is_some_and(|b| b.len() >= len && b.ordinal() == dev.ordinal());
        if !big_enough {
            // At least one element, so views and kernel pointers are never null.
            self.buf = None;
            self.buf = Some(dev.alloc_zeros(len.max(1))?);
        }
        match self.buf.as_mut() {
            Some(buf) => Ok(buf),
            None => Err(CudaError::invalid(
                OP,
                "scratch",
                len,
                "allocation vanished",
            )),
        }
    }
}

/// Shape of the last launch, for `fetch`.
#[derive(Debug, Clone, Copy, Default)]
struct LastStep {
    num_rows: usize,
    max_top: usize,
    /// Whether any row asked for logprobs (then the logprob outputs were written).
    logprob_rows: bool,
    /// False until a `sample` call succeeds (and after a failed one).
    launched: bool,
}

/// The GPU sampler: device scratch reused across steps. One per executor (per device).
#[derive(Debug, Default)]
pub struct GpuSampler {
    /// [num_rows, vocab_size] f32: sanitized, penalized logits, then weights.
    work: Scratch<f32>,
    /// The packed `SampleBatch`.
    upload: Scratch<u32>,
    /// [num_rows]
    token_ids: Scratch<u32>,
    /// [num_rows] sampled logprobs, then [num_rows, max_top] top logprobs.
    logprobs: Scratch<f32>,
    /// [num_rows, max_top]
    top_ids: Scratch<u32>,
    last: LastStep,
    /// Per row of the last step: Some(n) when it asked for logprobs.
    last_logprobs: Vec<Option<usize>>,
}

impl GpuSampler {
    /// A sampler with no device scratch yet; buffers are allocated on the first `sample` and grown
    /// to the largest step seen.
    pub fn new() -> Self {
        GpuSampler::default()
    }

    /// Samples one token per row of `logits` ([batch.num_rows(), vocab_size]), which are only
    /// read. Queued on the device's stream; nothing is copied back until `fetch`.
    pub fn sample<T: FloatElem>(
        &mut self,
        dev: &CudaDevice,
        logits: &DeviceBuffer<T>,
        vocab_size: usize,
        batch: &SampleBatch,
    ) -> Result<(), CudaError> {
        self.launch(dev, logits, vocab_size, batch, None)
    }

    /// As `sample`, and writes into `candidate_mask` ([num_rows, vocab_size]) 1 for every token
    /// the row's draw chose from (the CPU sampler's candidate list after its filters; a greedy row
    /// marks its token only; a row with nothing possible marks nothing). For tests and debugging.
    pub fn sample_with_candidates<T: FloatElem>(
        &mut self,
        dev: &CudaDevice,
        logits: &DeviceBuffer<T>,
        vocab_size: usize,
        batch: &SampleBatch,
        candidate_mask: &mut DeviceBuffer<u32>,
    ) -> Result<(), CudaError> {
        dev.check_buffer(OP, "candidate_mask", candidate_mask)?;
        let expected = batch.num_rows * vocab_size;
        if candidate_mask.len() != expected {
            return Err(CudaError::length(
                OP,
                "candidate_mask",
                expected,
                candidate_mask.len(),
            ));
        }
        self.launch(dev, logits, vocab_size, batch, Some(candidate_mask))
    }

    fn launch<T: FloatElem>(
        &mut self,
        dev: &CudaDevice,
        logits: &DeviceBuffer<T>,
        vocab_size: usize,
        batch: &SampleBatch,
        candidate_mask: Option<&mut DeviceBuffer<u32>>,
    ) -> Result<(), CudaError> {
        dev.check_buffer(OP, "logits", logits)?;
        self.last = LastStep::default();
        self.last_logprobs.clear();
        if vocab_size == 0 {
            return Err(CudaError::invalid(OP, "vocab_size", 0, "must be > 0"));
        }
        let num_rows = batch.num_rows;
        if logits.len() != num_rows * vocab_size {
            return Err(CudaError::length(
                OP,
                "logits",
                num_rows * vocab_size,
                logits.len(),
            ));
        }
        if num_rows == 0 {
            self.last.launched = true;
            return Ok(());
        }
        let vocab_i = to_i32("vocab_size", vocab_size)?;
        let num_history = batch.history.len() / 2;
        let num_history_i = to_i32("history entries", num_history)?;
        let num_suppressed_i = to_i32("suppressed ids", batch.suppressed.len())?;
        let grid_rows = to_u32("num_rows", num_rows)?;
        let want_logprobs = batch.num_logprob_rows > 0;
        let max_top = batch.max_top;
        let max_top_i = to_i32("max_top", max_top)?;

        // One upload of params | history | suppressed.
        let num_param_words = batch.params.len();
        let num_history_words = batch.history.len();
        let upload_len = num_param_words + num_history_words + batch.suppressed.len();
        let upload = self.upload.ensure(dev, upload_len)?;
        let mut host = Vec::with_capacity(upload_len);
        host.extend_from_slice(&batch.params);
        host.extend_from_slice(&batch.history);
        host.extend_from_slice(&batch.suppressed);
        {
            let mut dst = upload.slice.slice_mut(0..upload_len);
            dev.stream()
                .memcpy_htod(&host, &mut dst)
                .map_err(|e| CudaError::driver("uploading sampling parameters", e))?;
        }
        let work = self.work.ensure(dev, num_rows * vocab_size)?;
        let token_ids = self.token_ids.ensure(dev, num_rows)?;
        let f = dev.function(KernelId::Sample, &[], &format!("{OP}_{}", T::DTYPE))?;
        let cfg = LaunchConfig {
            grid_dim: (grid_rows, 1, 1),
            block_dim: (SAMPLE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let upload = self
            .upload
            .buf
            .as_ref()
            .ok_or_else(|| CudaError::invalid(OP, "upload", upload_len, "not allocated"))?;
        let params_view = upload.slice.slice(0..num_param_words);
        let history_view = upload
            .slice
            .slice(num_param_words..num_param_words + num_history_words);
        let suppressed_view = upload
            .slice
            .slice(num_param_words + num_history_words..upload_len);
        let null: u64 = 0;
        let (logprobs, top_ids) = if want_logprobs {
            (
                Some(self.logprobs.ensure(dev, num_rows * (1 + max_top))?),
                Some(self.top_ids.ensure(dev, (num_rows * max_top).max(1))?),
            )
        } else {
            (None, None)
        };
        let logprob_views = logprobs.map(|buf| {
            let (sampled, top) = buf.slice.split_at_mut(num_rows);
            (sampled, top)
        });
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&logits.slice)
            .arg(&mut work.slice)
            .arg(&params_view)
            .arg(&history_view)
            .arg(&num_history_i)
            .arg(&suppressed_view)
            .arg(&num_suppressed_i)
            .arg(&vocab_i)
            .arg(&mut token_ids.slice);
        let mut logprob_views = logprob_views;
        match (&mut logprob_views, top_ids) {
            (Some((sampled, top)), Some(ids)) => {
                b.arg(sampled).arg(&mut ids.slice).arg(top);
            }
            _ => {
                b.arg(&null).arg(&null).arg(&null);
            }
        }
        b.arg(&max_top_i);
        match candidate_mask {
            Some(mask) => b.arg(&mut mask.slice),
            None => b.arg(&null),
        };
        // SAFETY: the arguments match sample.cu's entry (logits, work, params, history,
        // num_history, suppressed, num_suppressed, vocab_size, token_ids, sampled_logprobs,
        // top_ids, top_logprobs, max_top, candidate_mask). Sizes, all on this device: logits
        // num_rows * vocab_size (checked), work >= that, params num_rows * PARAM_WORDS (the batch
        // pushes exactly that per row), history 2 * num_history, suppressed num_suppressed (views
        // of the upload), token_ids >= num_rows, sampled >= num_rows and top_logprobs / top_ids
        // >= num_rows * max_top when logprobs are on (null otherwise, which the kernel checks),
        // candidate_mask num_rows * vocab_size (checked) or null. The kernel bounds every id and
        // every per-row range it reads from device data by vocab_size and the buffer lengths.
        // The block has SAMPLE_THREADS threads, the size its shared scratch is laid out for.
        unsafe { b.launch(cfg) }.map_err(|source| CudaError::Launch {
            entry: format!("{OP}_{}", T::DTYPE),
            arch: dev.arch().to_string(),
            source,
        })?;
        self.last = LastStep {
            num_rows,
            max_top,
            logprob_rows: want_logprobs,
            launched: true,
        };
        self.last_logprobs.extend(
            batch
                .params
                .chunks_exact(PARAM_WORDS)
                .map(|w| (w[7] != LOGPROBS_OFF).then_some(w[7] as usize)),
        );
        Ok(())
    }

    /// The sampled ids of the last step, on the device: [num_rows] (a view valid until the next
    /// `sample`), e.g. for the executor's next embedding lookup without a host round trip.
    pub fn token_ids(&self) -> Option<cudarc::driver::CudaView<'_, u32>> {
        let buf = self.token_ids.buf.as_ref()?;
        Some(buf.slice.slice(0..self.last.num_rows))
    }

    /// Copies the last step's results to the host (waits for the device): the ids, and the
    /// logprobs of the rows that asked for them (the only other bytes that cross).
    pub fn fetch(&self, dev: &CudaDevice) -> Result<Vec<Sampled>, CudaError> {
        let LastStep {
            num_rows,
            max_top,
            logprob_rows,
            launched,
        } = self.last;
        if !launched {
            return Err(CudaError::invalid(
                OP,
                "fetch",
                "no step",
                "call sample first (or the last sample failed)",
            ));
        }
        if num_rows == 0 {
            return Ok(Vec::new());
        }
        let ids = download_prefix(dev, &self.token_ids, num_rows)?;
        let (logprobs, top_ids) = if logprob_rows {
            (
                download_prefix(dev, &self.logprobs, num_rows * (1 + max_top))?,
                download_prefix(dev, &self.top_ids, num_rows * max_top)?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        dev.synchronize()?;
        Ok(ids
            .iter()
            .enumerate()
            .map(|(row_idx, &token_id)| {
                let logprobs = self
                    .last_logprobs
                    .get(row_idx)
                    .copied()
                    .flatten()
                    .map(|num_top| {
                        let top_start = num_rows + row_idx * max_top;
                        let top = (0..num_top.min(max_top))
                            .filter_map(|j| {
                                let id = top_ids.get(row_idx * max_top + j).copied()?;
                                let lp = logprobs.get(top_start + j).copied()?;
                                (id != NO_ID).then_some((id, lp))
                            })
                            .collect();
                        TokenLogprobs {
                            logprob: logprobs.get(row_idx).copied().unwrap_or(f32::NEG_INFINITY),
                            top,
                        }
                    });
                Sampled { token_id, logprobs }
            })
            .collect())
    }
}

/// The first `len` elements of a scratch buffer (queued; the caller synchronizes).
fn download_prefix<T: DeviceElem>(
    dev: &CudaDevice,
    scratch: &Scratch<T>,
    len: usize,
) -> Result<Vec<T>, CudaError> {
    let mut host = vec![T::default(); len];
    if len == 0 {
        return Ok(host);
    }
    let buf = scratch
        .buf
        .as_ref()
        .filter(|b| b.len() >= len)
        .ok_or_else(|| CudaError::length("fetch", "sampler output", len, 0))?;
    dev.stream()
        .memcpy_dtoh(&buf.slice.slice(0..len), &mut host)
        .map_err(|e| CudaError::driver("copying sampled tokens to the host", e))?;
    Ok(host)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_distinct_ids_with_output_counts() {
        let mut h = TokenHistory::new(&[5, 1, 5, 99], 10);
        h.accept(1);
        h.accept(7);
        h.accept(7);
        h.accept(12);
        assert_eq!(h.entries(), &[[5, 0], [1, 1], [7, 2]]);
    }

    #[test]
    fn batch_packs_rows() {
        let row = RowSampling {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            penalties: Penalties {
                repetition: 1.2,
                ..Penalties::default()
            },
            num_logprobs: Some(3),
            uniform: 0.3125,
        };
        let greedy = RowSampling::greedy();
        assert!(!greedy.penalties.is_enabled());

        let history = TokenHistory::new(&[3, 4], 100);
        let mut batch = SampleBatch::new();
        batch.push(&greedy, None, &[]).unwrap();
        batch.push(&row, Some(&history), &[2, 9]).unwrap();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.params.len(), 2 * PARAM_WORDS);
        let r1 = &batch.params[PARAM_WORDS..];
        assert_eq!(f32::from_bits(r1[0]), 0.7);
        assert_eq!(r1[1], 40);
        assert_eq!(r1[7], 3);
        assert_eq!(
            f64::from_bits(u64::from(r1[8]) | (u64::from(r1[9]) << 32)),
            row.uniform
        );
        assert_eq!(&r1[10..14], &[0, 2, 0, 2]);
        assert_eq!(batch.history, [3, 0, 4, 0]);
        assert_eq!(batch.suppressed, [2, 9]);
        assert_eq!((batch.num_logprob_rows, batch.max_top), (1, 3));
        assert_eq!(batch.params[7], LOGPROBS_OFF);

        // Penalties without a history, and too many logprobs, are errors.
        assert!(batch.push(&row, None, &[]).is_err());
        let many = RowSampling {
            num_logprobs: Some(MAX_TOP_LOGPROBS + 1),
            ..greedy
        };
        assert!(batch.push(&many, None, &[]).is_err());
        assert_eq!(batch.num_rows(), 2);
        let most = RowSampling {
            num_logprobs: Some(MAX_TOP_LOGPROBS),
            ..greedy
        };
        batch.push(&most, None, &[]).unwrap();
        assert_eq!((batch.num_rows(), batch.max_top), (3, MAX_TOP_LOGPROBS));
        batch.clear();
        assert_eq!(batch.num_rows(), 0);
    }
}
