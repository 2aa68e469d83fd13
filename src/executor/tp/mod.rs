//! Tensor-parallel ranks behind one executor. The engine thread keeps the scheduler, the KV
//! cache manager (one block table for every rank) and the samplers; each step it packs the plan
//! once and hands the same `StepBatch` to every rank through the `RankWorker` interface, then
//! samples rank 0's logits (gathered over the ranks, so they cover the whole vocabulary).
//!
//! `RankWorker` is the seam for ranks elsewhere: `ThreadRank` runs a `CpuRank` on a thread of
//! this process with a `LocalComm`; a rank in another process or on another node is one more
//! implementation that sends the batch over its transport and receives the reply, its
//! collectives going over NCCL or the network (docs/parallelism.md). Nothing above this module
//! knows where a rank runs.
//!
//! Failure: a rank whose step fails aborts the group's communicator, so no peer waits forever
//! in a collective; the step fails (the engine fails its requests, as with one rank) and, once
//! every rank has answered, the communicator is reset for the next step. A rank that is gone
//! (its thread ended) breaks the group: every later step fails with the reason. A rank that
//! panics hands its panic to the engine thread, which recovers as from any panicking step (the
//! executor is rebuilt).

pub mod comm;

use std::any::Any;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use comm::{HostComm, LocalGroupControl, local_group};

use crate::executor::batch::{ExecutorError, StepBatch};
use crate::executor::cpu::CpuRank;
use crate::executor::dump::Dumper;
use crate::model::DecoderSpec;
use crate::model::tp::{RankLayout, TpRank};
use crate::model::weights::DecoderWeights;

/// What a rank answers for a step.
pub enum RankReply {
    /// The step ran: the logits `[sampling rows, vocab]` (every rank has them; rank 0's are
    /// used), or the error that failed it.
    Done(crate::Result<Vec<f32>>),
    /// The step panicked on the rank: the payload, re-raised on the engine thread.
    Panicked(Box<dyn Any + Send>),
    /// The rank is gone (its thread or process ended): the group can run no more steps.
    Gone(crate::Error),
}

/// One rank as the executor drives it: start a step, then wait for its end. Every rank gets
/// every step, in order.
pub trait RankWorker: Send {
    /// This rank's index.
    fn rank(&self) -> usize;
    /// Hands the rank a step to run (returns without waiting).
    fn start(&mut self, batch: Arc<StepBatch>) -> crate::Result<()>;
    /// Waits for the step started last.
    fn finish(&mut self) -> RankReply;
}

/// A rank on a thread of this process.
pub struct ThreadRank {
    rank: usize,
    steps: Option<Sender<Arc<StepBatch>>>,
    replies: Receiver<RankReply>,
    /// To hand the rank its dumper before the first step.
    dumpers: Sender<Dumper>,
    thread: Option<JoinHandle<()>>,
}

impl ThreadRank {
    /// Starts `rank` on a thread named `ferrum-rank-N`.
    pub fn spawn(mut rank: CpuRank, idx: usize) -> crate::Result<Self> {
        let (steps, step_rx) = channel::<Arc<StepBatch>>();
        let (reply_tx, replies) = channel();
        let (dumpers, dumper_rx) = channel::<Dumper>();
        let thread = std::thread::Builder::new()
            .name(format!("ferrum-rank-{idx}"))
            .spawn(move || {
                while let Ok(batch) = step_rx.recv() {
                    if let Ok(d) = dumper_rx.try_recv() {
                        rank.set_dumper(d);
                    }
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        rank.forward(&batch)
                    }));
                    let reply = match run {
                        Ok(Ok(logits)) => RankReply::Done(Ok(logits)),
                        Ok(Err(e)) => {
                            rank.abort(&format!("rank {idx} failed: {e}"));
                            RankReply::Done(Err(e))
                        }
                        Err(payload) => {
                            rank.abort(&format!("rank {idx} panicked"));
                            RankReply::Panicked(payload)
                        }
                    };
                    if reply_tx.send(reply).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| {
                ExecutorError::Device(format!("cannot start tensor-parallel rank {idx}: {e}"))
            })?;
        Ok(ThreadRank {
            rank: idx,
            steps: Some(steps),
            replies,
            dumpers,
            thread: Some(thread),
        })
    }

    fn gone(&self) -> crate::Error {
        ExecutorError::Device(format!(
            "tensor-parallel rank {} has stopped (its thread ended)",
            self.rank
        ))
        .into()
    }
}

impl RankWorker for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn start(&mut self, batch: Arc<StepBatch>) -> crate::Result<()> {
        match &self.steps {
            Some(tx) => tx.send(batch).map_err(|_| self.gone()),
            None => Err(self.gone()),
        }
    }

    fn finish(&mut self) -> RankReply {
        self.replies
            .recv()
            .unwrap_or_else(|_| RankReply::Gone(self.gone()))
    }
}

impl Drop for ThreadRank {
    fn drop(&mut self) {
        // Closing the step channel ends the thread's loop (no step is in flight: `step` waits
        // for every rank's reply).
        self.steps = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The ranks of one tensor-parallel executor, rank 0 first.
pub struct RankGroup {
    workers: Vec<Box<dyn RankWorker>>,
    threads_per_rank: usize,
    /// Aborts the group's collectives when a rank cannot be given a step (so the ranks that
    /// were given it do not wait for it forever); resets them after a failed step.
    control: Option<LocalGroupControl>,
    /// Hands rank 0's thread a dumper (taken before its next step).
    rank0_dumper: Option<Sender<Dumper>>,
    /// Why the group can run no more steps (a rank failed and aborted the communicator).
    broken: Option<String>,
}

impl RankGroup {
    /// Starts one thread per rank of `weights` (rank r's share at index r), each with
    /// `threads` pool threads, joined by an in-process communicator.
    pub fn start_local(
        spec: &DecoderSpec,
        weights: Vec<DecoderWeights>,
        num_blocks: usize,
        block_size: usize,
        threads: usize,
    ) -> crate::Result<Self> {
        let world_size = weights.len();
        let comms = local_group(world_size);
        let control = comms.first().map(|c| c.control());
        let mut workers: Vec<Box<dyn RankWorker>> = Vec::with_capacity(world_size);
        let mut rank0_dumper = None;
        for (idx, (w, c)) in weights.into_iter().zip(comms).enumerate() {
            let layout = RankLayout::new(
                spec,
                TpRank {
                    rank: idx,
                    world_size,
                },
            )
            .map_err(crate::model::ModelError::TensorParallel)?;
            let comm: Box<HostComm> = Box::new(c);
            let rank = CpuRank::new(spec, layout, w, num_blocks, block_size, threads, Some(comm))?;
            let worker = ThreadRank::spawn(rank, idx)?;
            if idx == 0 {
                rank0_dumper = Some(worker.dumpers.clone());
            }
            workers.push(Box::new(worker));
        }
        Ok(RankGroup {
            workers,
            threads_per_rank: threads,
            control,
            rank0_dumper,
            broken: None,
        })
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.workers.len()
    }

    /// Pool threads of each rank.
    pub fn threads_per_rank(&self) -> usize {
        self.threads_per_rank
    }

    /// Gives rank 0 a dumper for the intermediates of every later step.
    pub fn set_dumper(&mut self, dumper: Dumper) -> crate::Result<()> {
        match &self.rank0_dumper {
            Some(tx) => tx.send(dumper).map_err(|_| {
                ExecutorError::Device("tensor-parallel rank 0 has stopped".into()).into()
            }),
            None => {
                Err(ExecutorError::Device("the tensor-parallel group has no ranks".into()).into())
            }
        }
    }

    /// Runs `batch` on every rank and returns rank 0's logits `[sampling rows, vocab]`.
    pub fn step(&mut self, batch: StepBatch) -> crate::Result<Vec<f32>> {
        if let Some(reason) = &self.broken {
            return Err(ExecutorError::Device(format!(
                "the tensor-parallel group cannot run steps any more: {reason}"
            ))
            .into());
        }
        let batch = Arc::new(batch);
        let mut started = 0;
        let mut first_err: Option<crate::Error> = None;
        for w in &mut self.workers {
            match w.start(batch.clone()) {
                Ok(()) => started += 1,
                Err(e) => {
                    if let Some(c) = &self.control {
                        c.abort(&e.to_string());
                    }
                    // A rank that cannot take a step is gone for good.
                    self.broken = Some(e.to_string());
                    first_err = Some(e);
                    break;
                }
            }
        }
        let mut logits = None;
        let mut panic = None;
        for w in &mut self.workers[..started] {
            match w.finish() {
                RankReply::Done(Ok(l)) => {
                    if logits.is_none() {
                        logits = Some(l);
                    }
                }
                RankReply::Done(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                RankReply::Panicked(p) => {
                    panic.get_or_insert(p);
                }
                RankReply::Gone(e) => {
                    self.broken = Some(e.to_string());
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
        if let Some(e) = first_err {
            // Every rank has answered, so none is inside a collective: the group can run the
            // next step (the failed step's requests are failed by the engine, as on one rank).
            if self.broken.is_none()
                && let Some(c) = &self.control
            {
                c.reset();
            }
            return Err(e);
        }
        logits.ok_or_else(|| {
            ExecutorError::Device("the tensor-parallel group has no ranks".into()).into()
        })
    }
}
