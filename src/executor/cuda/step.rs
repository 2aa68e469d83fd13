//! Running one packed step: upload, then the forward pass eagerly, or a decode step's CUDA
//! graph (captured per batch-size bucket after its first eager run, then replayed).

use super::CudaExecutor;
use super::forward::CudaStep;
use super::pack::StepLayout;
use super::profile::Profile;
use super::weights::LayerKv;
use super::workspace::Workspace;
use crate::cuda::{DeviceGraph, FloatElem};
use crate::executor::dump::Dumper;
use crate::model::decoder::Act;

/// Decode batch sizes that get a CUDA graph of their own: powers of two up to `max_num_seqs`,
/// then `max_num_seqs` itself. A decode step of n sequences replays the smallest bucket >= n,
/// its padding rows inert (no cache write, empty context, logits discarded).
pub fn graph_buckets(max_num_seqs: usize) -> Vec<usize> {
    let mut buckets: Vec<usize> = std::iter::successors(Some(1usize), |&b| b.checked_mul(2))
        .take_while(|&b| b < max_num_seqs)
        .collect();
    if max_num_seqs > 0 {
        buckets.push(max_num_seqs);
    }
    buckets
}

impl<T: FloatElem> CudaExecutor<T> {
    /// Runs one packed step on the device: replays the bucket's graph (capturing it after an
    /// eager run the first time), or runs eagerly. Logits are left in `ws.logits`.
    pub(super) fn launch(
        &mut self,
        ws: &mut Workspace<T>,
        layout: &StepLayout,
    ) -> crate::Result<()> {
        ws.packed.set_len(layout.num_words)?;
        self.dev.copy_to_device(&self.host, &mut ws.packed)?;
        let mut kv = std::mem::take(&mut self.kv);
        let result = (|| -> crate::Result<()> {
            if let Some(b) = layout.bucket {
                if let Some(Some(graph)) = self.graphs.get(&b) {
                    graph.launch()?;
                    // Buffer lengths as the graph left them (host-side state).
                    return self.set_lens_only(ws, layout);
                }
                self.run_step(ws, &mut kv, layout, &mut None, None)?;
                if !self.graphs.contains_key(&b) {
                    let graph = self.capture(ws, &mut kv, layout);
                    if let Err(e) = &graph {
                        eprintln!(
                            "ferrum: CUDA graph capture for decode batch {b} failed, running it eagerly: {e}"
                        );
                    }
                    self.graphs.insert(b, graph.ok());
                }
                return Ok(());
            }
            let mut profile = self.profile.take();
            if let Some(p) = &mut profile {
                p.marks.clear();
                p.start = Some(self.dev.timing_event()?);
            }
            let mut dumper = self.dumper.take();
            let r = self.run_step(ws, &mut kv, layout, &mut profile, dumper.as_mut());
            if let Some(d) = &mut dumper {
                d.next_step();
            }
            self.dumper = dumper;
            if let Some(p) = &mut profile
                && r.is_err()
            {
                p.marks.clear();
                p.start = None;
            }
            self.profile = profile;
            r
        })();
        self.kv = kv;
        result
    }

    pub(super) fn set_lens_only(
        &self,
        ws: &mut Workspace<T>,
        layout: &StepLayout,
    ) -> crate::Result<()> {
        ws.acts[Act::Logits.idx()].set_len(layout.num_rows * self.decoder.spec.vocab_size)?;
        Ok(())
    }

    /// Captures `run_step` for a decode bucket into a graph (recorded, not run).
    pub(super) fn capture(
        &self,
        ws: &mut Workspace<T>,
        kv: &mut [LayerKv<T>],
        layout: &StepLayout,
    ) -> crate::Result<DeviceGraph> {
        self.dev.begin_capture()?;
        let recorded = self.run_step(ws, kv, layout, &mut None, None);
        let graph = self.dev.end_capture();
        recorded?;
        Ok(graph?)
    }

    /// Scatters the uploaded inputs and runs the forward pass over the step: logits
    /// [num_rows, vocab] stay in the workspace. Device work only (no host copy, no sync, no
    /// allocation), so a decode step can be captured as a graph; a `dumper` (eager steps only)
    /// downloads each tapped buffer.
    pub(super) fn run_step(
        &self,
        ws: &mut Workspace<T>,
        kv: &mut [LayerKv<T>],
        layout: &StepLayout,
        profile: &mut Option<Profile>,
        dumper: Option<&mut Dumper>,
    ) -> crate::Result<()> {
        self.scatter_inputs(ws, layout)?;
        self.mark(profile, "inputs")?;
        let mut step = CudaStep {
            ex: self,
            ws,
            kv,
            layout,
            profile,
            dumper,
        };
        self.decoder.forward(&mut step, layout.num_rows)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn graph_buckets_are_powers_of_two_then_max_num_seqs() {
        assert_eq!(graph_buckets(1), vec![1]);
        assert_eq!(graph_buckets(8), vec![1, 2, 4, 8]);
        assert_eq!(graph_buckets(48), vec![1, 2, 4, 8, 16, 32, 48]);
        assert_eq!(graph_buckets(0), Vec::<usize>::new());
    }
}
