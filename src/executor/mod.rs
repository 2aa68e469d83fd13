//! Executors run a `SchedulePlan` on a device and return the logits of the sequences that
//! sample. The CPU executor is the reference; the CUDA executor (`cuda`) implements the same
//! trait on one GPU, and also samples there (`execute_and_sample`), so that only token ids and
//! requested logprobs cross back to the host.

use crate::cuda::sampling::SampleBatch;
use crate::sampling::Sampled;
use crate::scheduler::SchedulePlan;

pub mod batch;
pub mod cpu;
pub mod cuda;
pub mod dump;

/// Logits of the sampling sequences of one step, in plan order: `[num_rows, vocab_size]`.
pub struct Logits {
    /// Columns of each row (the model's vocabulary size).
    pub vocab_size: usize,
    /// `[num_rows, vocab_size]`, row-major, raw (unprocessed) logits.
    pub data: Vec<f32>,
}

impl Logits {
    /// Row `idx` (the plan's idx-th sampling sequence), for in-place sampling. Panics past the last
    /// row.
    pub fn row_mut(&mut self, idx: usize) -> &mut [f32] {
        &mut self.data[idx * self.vocab_size..(idx + 1) * self.vocab_size]
    }
}

/// Runs scheduled steps on one device: owns the weights and the KV cache arrays and turns a
/// `SchedulePlan` into logits (or sampled tokens). The engine thread owns it; implementations
/// never see requests, only plans.
pub trait Executor: Send {
    /// Device description for logs, e.g. "cpu (2 threads)".
    fn describe(&self) -> String;
    /// KV cache blocks the executor allocated (what the scheduler may hand out).
    fn num_kv_blocks(&self) -> usize;
    /// Tokens per KV cache block.
    fn block_size(&self) -> usize;
    /// Columns of the logits (`Logits::vocab_size`).
    fn vocab_size(&self) -> usize;
    /// Runs one step. Every scheduled chunk's k/v is written to the cache at its block table's
    /// slots; logits come back for the sequences with `sample == true`, in plan order.
    fn execute(&mut self, plan: &SchedulePlan) -> crate::Result<Logits>;

    /// Whether this executor samples on its device (`execute_and_sample`); the engine then keeps
    /// each request's RNG and token history and passes one row per sampling sequence each step.
    /// The CPU executor returns logits and the engine samples on the host.
    fn samples_on_device(&self) -> bool {
        false
    }

    /// Runs one step like `execute` and samples one token per sampling sequence on the device
    /// (`rows`: one row per sampling sequence, plan order); only the ids and the logprobs asked
    /// for come back, in plan order.
    fn execute_and_sample(
        &mut self,
        plan: &SchedulePlan,
        rows: &SampleBatch,
    ) -> crate::Result<Vec<Sampled>> {
        let _ = (plan, rows);
        Err(crate::Error::Device(format!(
            "{} does not sample on its device",
            self.describe()
        )))
    }

    /// `execute_and_sample` with host work overlapped: `overlap` runs once, on the calling
    /// thread, while the device works on the step (after everything is launched, before the host
    /// waits for the ids). This default runs it first, then the step.
    ///
    /// `overlap` may free KV blocks of sequences in this step (a request stopped by a string or
    /// whose client left), and the next plan may give them to another sequence: an
    /// implementation must order this step's cache writes before any later step's (the CUDA
    /// executor runs every step on one stream).
    fn execute_and_sample_overlapped(
        &mut self,
        plan: &SchedulePlan,
        rows: &SampleBatch,
        overlap: &mut dyn FnMut(),
    ) -> crate::Result<Vec<Sampled>> {
        overlap();
        self.execute_and_sample(plan, rows)
    }
}
