//! Executors run a `SchedulePlan` on a device and return the logits of the sequences that
//! sample. The CPU executor is the reference; the CUDA executor (`cuda`) implements the same
//! trait on one GPU.

use crate::scheduler::SchedulePlan;

pub mod cpu;
pub mod cuda;

/// Logits of the sampling sequences of one step, in plan order: `[num_rows, vocab_size]`.
pub struct Logits {
    pub vocab_size: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn row_mut(&mut self, idx: usize) -> &mut [f32] {
        &mut self.data[idx * self.vocab_size..(idx + 1) * self.vocab_size]
    }
}

pub trait Executor: Send {
    /// Device description for logs, e.g. "cpu (2 threads)".
    fn describe(&self) -> String;
    fn num_kv_blocks(&self) -> usize;
    fn block_size(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Runs one step. Every scheduled chunk's k/v is written to the cache at its block table's
    /// slots; logits come back for the sequences with `sample == true`, in plan order.
    fn execute(&mut self, plan: &SchedulePlan) -> crate::Result<Logits>;
}
