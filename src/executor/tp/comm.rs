//! The collectives tensor-parallel ranks run between their ops: the `Communicator` trait, and
//! `LocalComm`, its implementation for ranks that are threads of one process (the CPU engine's
//! ranks). An NCCL communicator (one per GPU, device buffers) and one for ranks in other
//! processes (host buffers over a socket or MPI) are each one more implementation of the trait;
//! the forward pass only ever calls it (docs/parallelism.md).
//!
//! `LocalComm` is deterministic: every rank hands in its buffer, the last one to arrive combines
//! them in rank order 0, 1, .., N-1 (sum or concatenation), and every rank copies out the same
//! result, so the numbers depend neither on thread timing nor on which rank reads them. A rank
//! that fails or panics `abort`s the group: peers waiting in a collective return an error instead
//! of waiting forever, and so does every later collective.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A collective that could not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    /// The group was aborted (a rank failed); the message says which and why.
    #[error("the tensor-parallel group was aborted: {0}")]
    Aborted(String),
    /// Ranks entered one collective with buffers of different lengths (a bug, never data).
    #[error("tensor-parallel {op}: rank {rank} sent {len} elements, rank 0 sent {len0}")]
    SizeMismatch {
        /// `all_reduce` or `all_gather`.
        op: &'static str,
        /// The rank whose buffer differs.
        rank: usize,
        /// Its length.
        len: usize,
        /// Rank 0's length.
        len0: usize,
    },
    /// An output buffer of the wrong length was passed.
    #[error("tensor-parallel {op}: output of {len} elements, expected {expected}")]
    BadOutput {
        /// The collective.
        op: &'static str,
        /// Length given.
        len: usize,
        /// `world_size * input length`.
        expected: usize,
    },
}

/// The collectives one rank of a tensor-parallel group takes part in. Every rank of the group
/// must make the same calls in the same order with buffers of the same length (the one forward
/// pass guarantees it). `Buf` is the buffer the ranks hold: `[f32]` host memory for CPU ranks
/// and for host transports; an NCCL implementation's is a device buffer.
pub trait Communicator: Send {
    /// What a collective reads and writes.
    type Buf: ?Sized;
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// `buf` = the sum over ranks of `buf`, the same on every rank.
    fn all_reduce_sum(&mut self, buf: &mut Self::Buf) -> Result<(), CommError>;
    /// `out` = every rank's `part`, concatenated in rank order (`world_size` x `part`'s length).
    fn all_gather(&mut self, part: &Self::Buf, out: &mut Self::Buf) -> Result<(), CommError>;
    /// Makes every collective of the group, current and later, fail with `reason` (a rank
    /// failed and will not take part any more).
    fn abort(&self, reason: &str);
}

/// A communicator over host f32 buffers (what a CPU rank's forward pass holds).
pub type HostComm = dyn Communicator<Buf = [f32]>;

/// One rank of a group of threads in this process.
pub struct LocalComm {
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
}

struct Shared {
    round: Mutex<Round>,
    done: Condvar,
}

/// The collective being assembled; `generation` counts completed ones.
struct Round {
    generation: u64,
    inputs: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// The last completed collective's result: stays until every rank has copied it, because the
    /// next one cannot complete before they all arrive.
    result: Arc<Result<Vec<f32>, CommError>>,
    aborted: Option<String>,
}

/// The `world_size` communicators of one in-process group, rank 0 first.
pub fn local_group(world_size: usize) -> Vec<LocalComm> {
    let shared = Arc::new(Shared {
        round: Mutex::new(Round {
            generation: 0,
            inputs: vec![None; world_size],
            arrived: 0,
            result: Arc::new(Ok(vec![])),
            aborted: None,
        }),
        done: Condvar::new(),
    });
    (0..world_size)
        .map(|rank| LocalComm {
            rank,
            world_size,
            shared: shared.clone(),
        })
        .collect()
}

/// Controls a local group from outside it (the executor): abort it when a rank cannot be
/// reached, reset it after a failed step.
pub struct LocalGroupControl {
    shared: Arc<Shared>,
}

impl LocalGroupControl {
    /// Makes every current and later collective of the group fail with `reason`.
    pub fn abort(&self, reason: &str) {
        abort_shared(&self.shared, reason);
    }

    /// Clears an abort and any half-assembled collective, so the group runs again. Only when
    /// no rank is inside a collective: after every rank has answered the failed step.
    pub fn reset(&self) {
        let mut round = self
            .shared
            .round
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        round.aborted = None;
        round.arrived = 0;
        round.inputs.iter_mut().for_each(|i| *i = None);
    }
}

fn abort_shared(shared: &Shared, reason: &str) {
    let mut round = shared
        .round
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if round.aborted.is_none() {
        round.aborted = Some(reason.to_string());
    }
    shared.done.notify_all();
}

impl LocalComm {
    /// A handle that aborts or resets this communicator's group.
    pub fn control(&self) -> LocalGroupControl {
        LocalGroupControl {
            shared: self.shared.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A rank that panicked while holding the lock left a consistent Round (no step of the
        // update can panic), so the poison carries no information: go on.
        self.shared
            .round
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands `input` in and returns the combination of every rank's input, in rank order.
    fn collective(
        &self,
        op: &'static str,
        input: &[f32],
        combine: fn(&[Vec<f32>]) -> Vec<f32>,
    ) -> Result<Arc<Result<Vec<f32>, CommError>>, CommError> {
        let mut round = self.lock();
        if let Some(reason) = &round.aborted {
            return Err(CommError::Aborted(reason.clone()));
        }
        round.inputs[self.rank] = Some(input.to_vec());
        round.arrived += 1;
        let generation = round.generation;
        if round.arrived == self.world_size {
            let inputs: Vec<Vec<f32>> = round
                .inputs
                .iter_mut()
                .map(|i| i.take().unwrap_or_default())
                .collect();
            let len0 = inputs[0].len();
            let result = match inputs.iter().position(|i| i.len() != len0) {
                Some(rank) => Err(CommError::SizeMismatch {
                    op,
                    rank,
                    len: inputs[rank].len(),
                    len0,
                }),
                None => Ok(combine(&inputs)),
            };
            round.result = Arc::new(result);
            round.arrived = 0;
            round.generation += 1;
            self.shared.done.notify_all();
            return Ok(round.result.clone());
        }
        while round.generation == generation && round.aborted.is_none() {
            round = self
                .shared
                .done
                .wait(round)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        match (&round.aborted, round.generation == generation) {
            (Some(reason), true) => Err(CommError::Aborted(reason.clone())),
            _ => Ok(round.result.clone()),
        }
    }
}

fn sum_in_rank_order(inputs: &[Vec<f32>]) -> Vec<f32> {
    let mut out = inputs[0].clone();
    for other in &inputs[1..] {
        for (o, v) in out.iter_mut().zip(other) {
            *o += v;
        }
    }
    out
}

fn concat_in_rank_order(inputs: &[Vec<f32>]) -> Vec<f32> {
    inputs.concat()
}

impl Communicator for LocalComm {
    type Buf = [f32];

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        let result = self.collective("all_reduce", buf, sum_in_rank_order)?;
        let sum = result.as_ref().as_ref().map_err(Clone::clone)?;
        buf.copy_from_slice(sum);
        Ok(())
    }

    fn all_gather(&mut self, part: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        let expected = part.len() * self.world_size;
        if out.len() != expected {
            let err = CommError::BadOutput {
                op: "all_gather",
                len: out.len(),
                expected,
            };
            self.abort(&format!("rank {}: {err}", self.rank));
            return Err(err);
        }
        let result = self.collective("all_gather", part, concat_in_rank_order)?;
        let all = result.as_ref().as_ref().map_err(Clone::clone)?;
        out.copy_from_slice(all);
        Ok(())
    }

    fn abort(&self, reason: &str) {
        abort_shared(&self.shared, reason);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Runs `f(comm)` on one thread per rank and returns each rank's result, rank 0 first.
    fn on_ranks<T: Send + 'static>(
        world_size: usize,
        f: impl Fn(&mut LocalComm) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let threads: Vec<_> = local_group(world_size)
            .into_iter()
            .map(|mut c| std::thread::spawn(move || f(&mut c)))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_in_rank_order_identically_on_every_rank() {
        // Values whose f32 sum depends on the order: 1e8 + 1 - 1e8 + .. is not associative.
        let results = on_ranks(4, |c| {
            let vals = [1e8f32, 1.0, -1e8, 0.5];
            let mut out = Vec::new();
            for step in 0..200 {
                let mut buf = vec![vals[c.rank()] * (1 + step % 3) as f32, c.rank() as f32];
                c.all_reduce_sum(&mut buf).unwrap();
                out.push(buf);
            }
            out
        });
        for step in 0..200 {
            let k = (1 + step % 3) as f32;
            // The fixed order: ((r0 + r1) + r2) + r3.
            let want = [((1e8f32 * k + k) + -1e8 * k) + 0.5 * k, 6.0];
            for r in &results {
                assert_eq!(r[step], want, "step {step}");
            }
        }
    }

    #[test]
    fn all_gather_concatenates_in_rank_order() {
        let results = on_ranks(3, |c| {
            let part = vec![c.rank() as f32; 2];
            let mut out = vec![0.0; 6];
            c.all_gather(&part, &mut out).unwrap();
            out
        });
        for r in results {
            assert_eq!(r, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        }
    }

    #[test]
    fn a_failed_rank_unblocks_its_peers_with_an_error() {
        let results = on_ranks(3, |c| {
            if c.rank() == 2 {
                c.abort("rank 2: out of memory");
                return Err(CommError::Aborted("aborted here".into()));
            }
            let mut buf = vec![1.0];
            c.all_reduce_sum(&mut buf)
        });
        for r in &results[..2] {
            assert_eq!(
                r.as_ref().unwrap_err().to_string(),
                "the tensor-parallel group was aborted: rank 2: out of memory"
            );
        }
        // The group aborted from outside (the executor) fails a collective already waiting.
        let group = local_group(2);
        let control = group[0].control();
        let mut ranks = group.into_iter();
        let (mut r0, mut r1) = (ranks.next().unwrap(), ranks.next().unwrap());
        let t = std::thread::spawn(move || {
            let res = r0.all_reduce_sum(&mut [1.0]);
            (r0, res)
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        control.abort("rank 1 is unreachable");
        let (mut r0, res) = t.join().unwrap();
        assert_eq!(
            res.unwrap_err(),
            CommError::Aborted("rank 1 is unreachable".into())
        );
        // Reset (no rank inside a collective), the group sums again.
        control.reset();
        let t = std::thread::spawn(move || {
            let mut buf = [1.0];
            r0.all_reduce_sum(&mut buf).map(|()| buf)
        });
        let mut buf = [2.0];
        r1.all_reduce_sum(&mut buf).unwrap();
        assert_eq!((buf, t.join().unwrap().unwrap()), ([3.0], [3.0]));
        // Buffers of different lengths are an error on every rank, not a wrong sum.
        let results = on_ranks(2, |c| {
            let mut buf = vec![1.0; 1 + c.rank()];
            c.all_reduce_sum(&mut buf)
        });
        for r in results {
            assert!(matches!(
                r,
                Err(CommError::SizeMismatch {
                    rank: 1,
                    len: 2,
                    len0: 1,
                    ..
                })
            ));
        }
    }

    #[test]
    fn one_rank_is_the_identity() {
        let mut c = local_group(1).pop().unwrap();
        let mut buf = vec![1.5, -2.0];
        c.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf, [1.5, -2.0]);
    }
}
