//! The engine thread's supervisor: runs the worker, catches a panicking step, answers every
//! request the panic interrupted, and rebuilds the executor (or fails closed); `FaultInjection`
//! makes a step panic on purpose for tests.

use super::*;

/// What the engine does after a step panicked. Either way, the state the panic interrupted is
/// dropped and every request in flight gets an error first.
pub enum Recovery {
    /// Build a new executor (and scheduler) and serve again; requests arriving meanwhile are
    /// refused with `Unavailable`. If the build fails, the engine fails closed.
    Rebuild(BuildExecutor),
    /// Serve no more: every later request is refused with `Unavailable`, saying when and why the
    /// engine failed (the model has to be reloaded).
    FailClosed,
}

/// How an engine is set up, besides its first executor and its model's facts.
pub struct EngineSetup {
    /// Batch limits, block geometry and admission policy; `num_blocks` must be the first
    /// executor's `num_kv_blocks()` (a rebuild takes its new executor's).
    pub scheduler: SchedulerConfig,
    /// What happens after a step panics (`Engine::start` uses `FailClosed`).
    pub recovery: Recovery,
    /// Panics to cause on purpose (tests); `FaultInjection::default()` causes none.
    pub faults: FaultInjection,
    /// Time every request and send its `RequestTimings` on `Engine::request_timings`
    /// (`EngineOptions::report_timings`).
    pub report_timings: bool,
}

/// The environment variable of `FaultInjection::panic_token_id`.
pub const INJECT_PANIC_TOKEN_VAR: &str = "FERRUM_INJECT_PANIC_TOKEN";

/// Faults the engine causes on purpose, to test its failure handling, also through a real
/// tritonserver and the release library: `from_env` reads them once, when the engine starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultInjection {
    /// The engine panics in the step that schedules a prompt containing this token id, where it
    /// would run the executor (`FERRUM_INJECT_PANIC_TOKEN`).
    pub panic_token_id: Option<u32>,
}

impl FaultInjection {
    /// The faults asked for by the environment (none unless `FERRUM_INJECT_PANIC_TOKEN` is set).
    pub fn from_env() -> crate::Result<Self> {
        Self::parse(std::env::var_os(INJECT_PANIC_TOKEN_VAR))
    }

    /// `FERRUM_INJECT_PANIC_TOKEN`'s value: unset or empty is no fault, anything else must be a
    /// token id (a start fails on a typo rather than silently testing nothing).
    pub(super) fn parse(panic_token: Option<OsString>) -> crate::Result<Self> {
        let panic_token_id = match panic_token {
            None => None,
            Some(v) if v.is_empty() => None,
            Some(v) => match v.to_str().map(str::parse::<u32>) {
                Some(Ok(id)) => Some(id),
                _ => {
                    return Err(crate::Error::Engine(format!(
                        "{INJECT_PANIC_TOKEN_VAR} = {v:?} must be a token id (an integer from 0 \
                         to {}) or empty",
                        u32::MAX
                    )));
                }
            },
        };
        Ok(FaultInjection { panic_token_id })
    }
}

/// When and why the engine stopped serving. Displays as `<UTC time>: <reason>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// When the panic was caught (wall clock; displayed in UTC).
    pub at: SystemTime,
    /// E.g. `panic in step: index out of bounds: the len is 3 but the index is 3`.
    pub reason: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", utc(self.at), self.reason)
    }
}

/// Something operators must hear about: the engine reports these on `Engine::incidents` (the
/// Triton backend logs them, a panic or a failed rebuild at error level). Displays as one log
/// line.
#[derive(Debug, Clone, PartialEq)]
pub enum Incident {
    /// A step panicked: `num_failed_requests` requests in flight got an error and the engine's
    /// state was dropped; `rebuilding` says whether a rebuild follows (else it fails closed).
    StepPanicked {
        /// When the panic struck and its message.
        failure: Failure,
        /// Requests answered with `Error`: running, waiting, or with a last token not yet
        /// delivered.
        num_failed_requests: usize,
        /// True with `Recovery::Rebuild`: `Rebuilt` or `RebuildFailed` follows.
        rebuilding: bool,
    },
    /// The engine serves again after a panic; the rebuild took `took`.
    Rebuilt {
        /// Wall time from the start of the rebuild (weights read again) to serving.
        took: Duration,
    },
    /// The rebuild after a panic failed: the engine serves no more.
    RebuildFailed {
        /// The build's error, or its panic message; later requests get `Unavailable` naming it.
        error: String,
    },
}

impl std::fmt::Display for Incident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incident::StepPanicked {
                failure,
                num_failed_requests,
                rebuilding,
            } => {
                write!(
                    f,
                    "engine failed at {failure}; its {num_failed_requests} request(s) in flight \
                     got an error and its state was dropped; "
                )?;
                if *rebuilding {
                    write!(
                        f,
                        "rebuilding the engine (new requests are refused until then)"
                    )
                } else {
                    write!(f, "the engine serves no more: reload the model")
                }
            }
            Incident::Rebuilt { took } => {
                write!(
                    f,
                    "engine rebuilt in {:.1} s: serving again",
                    took.as_secs_f64()
                )
            }
            Incident::RebuildFailed { error } => write!(
                f,
                "rebuilding the engine failed: {error}; the engine serves no more: reload the model"
            ),
        }
    }
}

/// The engine thread's top level: serves with one `Worker` at a time and, when a step panics,
/// answers and drops that worker and recovers (`Recovery`). It keeps what outlives a worker:
/// the counters, the orphaned sinks' channel, the recovery and the incident channel.
pub(super) struct Supervisor {
    pub(super) info: Arc<ModelInfo>,
    /// The configuration of every worker's scheduler (a rebuilt worker's takes `num_blocks` from
    /// its new executor).
    pub(super) scheduler_config: SchedulerConfig,
    pub(super) recovery: Recovery,
    pub(super) faults: FaultInjection,
    pub(super) seed_base: u64,
    /// The counters between workers (a worker owns them while it serves).
    pub(super) stats: EngineStats,
    pub(super) orphans_tx: Sender<Orphan>,
    pub(super) orphans: Receiver<Orphan>,
    pub(super) incidents: Sender<Incident>,
    /// Where finished requests' timings go (`Engine::request_timings`); None: not timed.
    pub(super) timings: Option<Sender<RequestTimings>>,
}

/// How a rebuild ended.
pub(super) enum Rebuilt {
    Serving(Box<Worker>),
    Failed(String),
    ShutDown,
}

impl Supervisor {
    /// A worker serving with `executor`, the counters so far and no request.
    pub(super) fn worker(
        &mut self,
        executor: Box<dyn Executor>,
        scheduler_config: SchedulerConfig,
    ) -> crate::Result<Worker> {
        let scheduler = Scheduler::new(scheduler_config)?;
        Ok(Worker {
            executor,
            scheduler,
            info: self.info.clone(),
            seqs: HashMap::new(),
            stats: std::mem::take(&mut self.stats),
            seed_base: self.seed_base,
            removed: Vec::new(),
            pending: Vec::new(),
            queue_deadlines: BinaryHeap::new(),
            faults: self.faults,
            orphans: self.orphans_tx.clone(),
            timings: self.timings.clone(),
        })
    }

    pub(super) fn run(mut self, mut worker: Worker, commands: Receiver<Command>) {
        loop {
            // A panic anywhere in the worker's loop (intake, schedule, execute, sample, update,
            // delivery) unwinds to here. `AssertUnwindSafe` because the worker is never trusted
            // again: the panic may have left a block table half-updated, a step half-written to
            // the KV cache, a sampler ahead of the scheduler or device state undefined. Its
            // requests are answered and everything else is dropped (`discard`).
            let served = catch_unwind(AssertUnwindSafe(|| worker.serve(&commands)));
            let payload = match served {
                Ok(()) => {
                    // Shut down; every request got its final event (none is left orphaned).
                    self.answer_orphans("the engine shut down before the request finished");
                    return;
                }
                Err(payload) => payload,
            };
            let failure = Failure {
                at: SystemTime::now(),
                reason: format!("panic in step: {}", panic_message(&*payload)),
            };
            // Dropping a panic payload may itself panic (its type is anyone's).
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            let rebuilding = matches!(self.recovery, Recovery::Rebuild(_));
            let message = if rebuilding {
                format!(
                    "engine failed: {}; the engine is restarting, retry the request",
                    failure.reason
                )
            } else {
                format!(
                    "engine failed: {}; the engine serves no more, the model must be reloaded",
                    failure.reason
                )
            };
            let num_failed_requests = self.discard(worker, &message);
            self.report(Incident::StepPanicked {
                failure: failure.clone(),
                num_failed_requests,
                rebuilding,
            });
            match self.recover(&commands, &failure) {
                Some(w) => worker = w,
                None => return,
            }
        }
    }

    /// Sends `message` as the final error of every request in `worker` (running, waiting, or
    /// with an undelivered last token) and of any request whose state the panic dropped while
    /// unwinding, then drops the worker's state. Returns how many requests it answered.
    pub(super) fn discard(&mut self, worker: Worker, message: &str) -> usize {
        let Worker {
            executor,
            scheduler,
            seqs,
            pending,
            mut stats,
            ..
        } = worker;
        stats.num_engine_failures += 1;
        // Requests first, so their clients hear before the executor is torn down (a GPU's can
        // take a while): each dropped sink comes back as an orphan. Dropping what a panic
        // interrupted may panic again, which must not end the engine thread; whatever a second
        // panic leaves undropped is leaked.
        let _ = catch_unwind(AssertUnwindSafe(move || {
            drop(seqs);
            drop(pending);
        }));
        let num_answered = self.answer_orphans(message);
        let reused = catch_unwind(AssertUnwindSafe(move || {
            let reused = scheduler.num_reused_tokens();
            drop(scheduler);
            drop(executor);
            reused
        }));
        stats.num_reused_prompt_tokens += reused.unwrap_or(0);
        self.stats = stats;
        num_answered
    }

    /// Sends `message` as the final error of every orphaned request; returns how many.
    pub(super) fn answer_orphans(&self, message: &str) -> usize {
        let mut num_answered = 0;
        while let Ok((seq_id, mut target)) = self.orphans.try_recv() {
            target.send(seq_id, TokenEvent::Error(message.to_string()));
            num_answered += 1;
        }
        num_answered
    }

    pub(super) fn report(&self, incident: Incident) {
        // Nobody listening (the CLI, most tests) is fine.
        let _ = self.incidents.send(incident);
    }

    /// After a panicked step: rebuilds (with `Recovery::Rebuild`) and returns the new worker;
    /// otherwise, or when the rebuild fails, refuses every request until shutdown. None: shut
    /// down.
    pub(super) fn recover(
        &mut self,
        commands: &Receiver<Command>,
        failure: &Failure,
    ) -> Option<Worker> {
        let refusal = match std::mem::replace(&mut self.recovery, Recovery::FailClosed) {
            Recovery::FailClosed => format!("the engine failed at {failure}; reload the model"),
            Recovery::Rebuild(build) => match self.rebuild(build, commands, failure) {
                Rebuilt::Serving(worker) => return Some(*worker),
                Rebuilt::ShutDown => return None,
                Rebuilt::Failed(error) => {
                    let refusal = format!(
                        "the engine failed at {failure}; rebuilding it failed: {error}; reload \
                         the model"
                    );
                    self.report(Incident::RebuildFailed { error });
                    refusal
                }
            },
        };
        while let Ok(cmd) = commands.recv() {
            if matches!(cmd, Command::Shutdown) {
                break;
            }
            self.refuse(cmd, &refusal);
        }
        None
    }

    /// Builds a new executor on a helper thread (weights are read again, which takes a while)
    /// while this thread keeps answering: submissions are refused at once, stats answered.
    pub(super) fn rebuild(
        &mut self,
        mut build: BuildExecutor,
        commands: &Receiver<Command>,
        failure: &Failure,
    ) -> Rebuilt {
        let refusal =
            format!("the engine is restarting after it failed at {failure}; retry shortly");
        let started = Instant::now();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let builder = std::thread::Builder::new()
            .name("ferrum-rebuild".into())
            .spawn(move || {
                let built = catch_unwind(AssertUnwindSafe(&mut build)).unwrap_or_else(|p| {
                    Err(crate::Error::Engine(format!(
                        "the rebuild panicked: {}",
                        panic_message(&*p)
                    )))
                });
                let _ = done_tx.send((build, built));
            });
        let builder = match builder {
            Ok(b) => b,
            Err(e) => return Rebuilt::Failed(format!("cannot start the rebuild thread: {e}")),
        };
        loop {
            select! {
                recv(commands) -> cmd => match cmd {
                    Ok(Command::Shutdown) | Err(_) => {
                        // What the build holds (device memory) is freed before shutdown returns.
                        let _ = builder.join();
                        return Rebuilt::ShutDown;
                    }
                    Ok(cmd) => self.refuse(cmd, &refusal),
                },
                recv(done) -> built => {
                    let _ = builder.join();
                    let Ok((build, built)) = built else {
                        return Rebuilt::Failed("the rebuild thread ended without a result".into());
                    };
                    let worker = built.and_then(|executor| {
                        let scheduler_config = SchedulerConfig {
                            num_blocks: executor.num_kv_blocks(),
                            ..self.scheduler_config.clone()
                        };
                        self.worker(executor, scheduler_config)
                    });
                    return match worker {
                        Ok(worker) => {
                            self.recovery = Recovery::Rebuild(build);
                            self.report(Incident::Rebuilt { took: started.elapsed() });
                            Rebuilt::Serving(Box::new(worker))
                        }
                        Err(e) => Rebuilt::Failed(e.to_string()),
                    };
                }
            }
        }
    }

    /// Answers a command while no worker serves: a submission is refused at once with
    /// `Unavailable(refusal)`, stats report the counters (and no KV cache), an abort has nothing
    /// to abort.
    pub(super) fn refuse(&self, cmd: Command, refusal: &str) {
        match cmd {
            Command::Submit(mut sub) => {
                sub.events.send(
                    sub.seq_id,
                    TokenEvent::Unavailable(format!("the model is not serving: {refusal}")),
                );
            }
            Command::Stats(tx) => {
                let _ = tx.send(EngineStats {
                    block_size: self.scheduler_config.block_size,
                    max_num_seqs: self.scheduler_config.batching.max_num_seqs,
                    ..self.stats.clone()
                });
            }
            Command::Abort(_) | Command::Shutdown => {}
        }
    }
}

/// The message of a panic payload (`panic!` gives a `&str` or a `String`).
pub(super) fn panic_message(payload: &(dyn Any + Send)) -> String {
    match (
        payload.downcast_ref::<&str>(),
        payload.downcast_ref::<String>(),
    ) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "(a panic payload that is not a message)".into(),
    }
}

/// `t` in UTC, e.g. `2026-12-07 10:11:12 UTC` (for messages; needs no time zone database).
pub(super) fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, secs_of_day) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`): eras of 400
    // years (146097 days), years starting on March 1st so leap days come last.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn utc_gives_civil_dates_across_leap_days_and_centuries() {
        let at = |secs| utc(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(at(1_700_000_000), "2023-11-14 22:13:20 UTC");
        // 2100 is no leap year.
        assert_eq!(at(4_107_542_399), "2100-02-28 23:59:59 UTC");
        assert_eq!(at(4_107_542_400), "2100-03-01 00:00:00 UTC");
    }

    #[test]
    fn the_panic_token_variable_is_a_token_id_or_empty() {
        let parse = |v: Option<&str>| FaultInjection::parse(v.map(OsString::from));
        assert_eq!(parse(None).unwrap().panic_token_id, None);
        assert_eq!(parse(Some("")).unwrap().panic_token_id, None);
        assert_eq!(parse(Some("4242")).unwrap().panic_token_id, Some(4242));
        for bad in ["-1", "abc", "4294967296", " 7"] {
            let e = parse(Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains("FERRUM_INJECT_PANIC_TOKEN") && e.contains(bad),
                "{e}"
            );
        }
    }

    #[test]
    fn panic_messages_come_from_str_and_string_payloads() {
        let message = |f: fn()| panic_message(&*catch_unwind(f).unwrap_err());
        assert_eq!(message(|| panic!("plain")), "plain");
        assert_eq!(message(|| panic!("formatted {}", 7)), "formatted 7");
        assert_eq!(
            message(|| std::panic::panic_any(7u8)),
            "(a panic payload that is not a message)"
        );
    }
}
