//! Per-op device time of eager steps from CUDA events (`FERRUM_CUDA_PROFILE=1`).

/// Per-op device time of eager steps, from CUDA events (`FERRUM_CUDA_PROFILE=1`), kept apart
/// for pure decode steps and steps with prefill, with each step's host wall time beside it.
#[derive(Default)]
pub(super) struct Profile {
    /// Events of the current step: (op, event recorded after it).
    pub(super) marks: Vec<(&'static str, cudarc::driver::CudaEvent)>,
    pub(super) start: Option<cudarc::driver::CudaEvent>,
    /// Host clock at the start of the current step's `execute*` call.
    pub(super) wall_start: Option<std::time::Instant>,
    /// Host clock when the previous step's `execute*` call returned.
    pub(super) last_return: Option<std::time::Instant>,
    /// Kernel modules and GEMM plans when the current step started: a step that compiled a
    /// kernel or planned a GEMM shape pays a one-time cost and is left out of the totals.
    pub(super) setup_at_start: (usize, usize),
    /// Steps left out for that reason.
    pub(super) num_setup_steps: usize,
    pub(super) decode: OpTimes,
    pub(super) prefill: OpTimes,
}

/// The profile's last op of a step: sampling and the copy of its results to the host, timed
/// until the host has them (so wall time, not device time: left out of the device total).
pub(super) const SAMPLE_WALL_OP: &str = "sample + copy back (wall)";

/// Totals of one kind of step.
#[derive(Default)]
pub(super) struct OpTimes {
    /// op -> (total ms, launches)
    pub(super) totals: Vec<(&'static str, f64, usize)>,
    pub(super) num_steps: usize,
    /// Wall time inside `execute*` (host packing + device + sampling + copies).
    pub(super) call_ms: f64,
    /// Wall time between the previous call's return and this call (the engine's host work).
    pub(super) gap_ms: f64,
}

impl OpTimes {
    pub(super) fn add(&mut self, op: &'static str, ms: f64) {
        match self.totals.iter_mut().find(|(o, _, _)| *o == op) {
            Some(t) => {
                t.1 += ms;
                t.2 += 1;
            }
            None => self.totals.push((op, ms, 1)),
        }
    }

    /// A table of per-op time per step, largest first.
    pub(super) fn report(&self, kind: &str) -> String {
        let steps = self.num_steps.max(1) as f64;
        let total: f64 = self
            .totals
            .iter()
            .filter(|t| t.0 != SAMPLE_WALL_OP)
            .map(|t| t.1)
            .sum();
        let mut rows = self.totals.clone();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut s = format!(
            "ferrum cuda profile, {kind} steps: {} steps, {:.3} ms/step of device time, \
             {:.3} ms/step wall in the executor, {:.3} ms/step of engine host work between steps\n",
            self.num_steps,
            total / steps,
            self.call_ms / steps,
            self.gap_ms / steps,
        );
        for (op, ms, n) in rows {
            s.push_str(&format!(
                "  {op:<24} {:>9.3} ms/step {:>6.1}% {:>7.1} launches/step\n",
                ms / steps,
                100.0 * ms / total.max(1e-12),
                n as f64 / steps
            ));
        }
        s
    }
}

impl Profile {
    /// Reads the events of the step just finished (its work must be complete) into the totals;
    /// `setup_now` is (kernel modules, GEMM plans) now, compared with the step's start.
    pub(super) fn collect(
        &mut self,
        with_prefill: bool,
        setup_now: (usize, usize),
    ) -> crate::Result<()> {
        if setup_now != self.setup_at_start {
            // One-time compiles or GEMM planning ran inside this step: not representative.
            self.marks.clear();
            self.start = None;
            self.wall_start = None;
            self.last_return = Some(std::time::Instant::now());
            self.num_setup_steps += 1;
            return Ok(());
        }
        let times = match with_prefill {
            true => &mut self.prefill,
            false => &mut self.decode,
        };
        let mut prev = self.start.take();
        for (op, e) in std::mem::take(&mut self.marks) {
            if let Some(s) = &prev {
                let ms = s.elapsed_ms(&e).map_err(|err| {
                    crate::cuda::CudaError::driver("reading a profile event", err)
                })?;
                times.add(op, ms as f64);
            }
            prev = Some(e);
        }
        let now = std::time::Instant::now();
        if let Some(t) = self.wall_start.take() {
            times.call_ms += (now - t).as_secs_f64() * 1e3;
            if let Some(r) = self.last_return {
                times.gap_ms += (t - r).as_secs_f64() * 1e3;
            }
        }
        self.last_return = Some(now);
        times.num_steps += 1;
        Ok(())
    }

    pub(super) fn report(&self) -> String {
        let mut s = format!(
            "ferrum cuda profile: {} steps left out (they compiled kernels or planned GEMM shapes)\n",
            self.num_setup_steps
        );
        for (kind, t) in [("decode", &self.decode), ("prefill/mixed", &self.prefill)] {
            if t.num_steps > 0 {
                s.push_str(&t.report(kind));
            }
        }
        s
    }
}
