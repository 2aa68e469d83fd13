//! Engine serving behaviour on a tiny fixture model: the bounded queue (`max_queue_size`),
//! per-request timings (`report_timings`), request priority, queue timeouts and bad words.
#![allow(clippy::unwrap_used)]

mod common;
mod engine_common;

use std::time::Duration;

use common::*;
use engine_common::*;
use triton_ferrum::engine::{
    Engine, EngineOptions, EngineSetup, FaultInjection, Recovery, RequestOutcome, RequestTimings,
    is_final,
};
use triton_ferrum::ops::linear::WeightFormat;
use triton_ferrum::request::{
    FinishReason, GenerateRequest, ModelInfo, RequestError, RequestSpec, TokenEvent,
};

/// `max_queue_size`: with `max_num_seqs` 2 and a queue of 3, a burst of 4 × `max_num_seqs`
/// requests gets exactly 3 busy refusals (UNAVAILABLE, naming the bound) while the slow engine
/// holds the first 5; every admitted request completes, and once they have, the places are free
/// again.
#[test]
fn a_full_queue_refuses_at_once_as_busy_and_frees_its_places() {
    let mut opts = triton_ferrum::engine::EngineOptions::new(model_dir());
    opts.batching.max_num_seqs = 2;
    opts.batching.max_queue_size = Some(3);
    opts.kv.block_size = 4;
    opts.kv.max_tokens = Some(256);
    opts.max_model_len = Some(64);
    // 30 tokens of at least 5 ms each: nothing ends while the burst is submitted.
    let e = slow_engine(&opts, Duration::from_millis(5));
    let handle = e.handle();
    let results: Vec<_> = (0..8)
        .map(|i| submit(&handle, greedy(prompt(4, i), 30, None)))
        .collect();
    let (admitted, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!((admitted.len(), refused.len()), (5, 3));
    for r in refused {
        let err = r.err().unwrap();
        assert!(matches!(err, RequestError::Unavailable(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("busy") && msg.contains("max_queue_size (3)"),
            "{msg}"
        );
    }
    for s in admitted {
        let c = collect_stream(s.unwrap());
        assert_eq!((c.output_ids.len(), c.num_final_events), (30, 1));
    }
    // Every place is back: a second burst is admitted the same way.
    let again: Vec<_> = (0..5)
        .map(|i| submit(&handle, greedy(prompt(4, i), 2, None)))
        .collect();
    assert!(again.iter().all(Result::is_ok));
    for s in again {
        assert_eq!(collect_stream(s.unwrap()).output_ids.len(), 2);
    }
}

// ---- per-request timings (EngineOptions::report_timings) ---------------------------------------

/// An engine reporting timings, one request at a time, prompts chunked by a budget of 16 tokens;
/// each step takes at least `step_time`, and with `on_device` a step's tokens are delivered
/// while the next step runs.
fn timed_engine(step_time: Duration, on_device: bool) -> Engine {
    let mut opts = overlap_options();
    opts.batching.max_num_seqs = 1;
    opts.batching.max_num_batched_tokens = 16;
    opts.kv.max_tokens = Some(256);
    opts.max_model_len = Some(128);
    let (cpu, info, scheduler) = cpu_executor(&opts);
    Engine::start_with(
        Box::new(TestExecutor {
            step_time,
            ..TestExecutor::new(cpu, on_device)
        }),
        info,
        EngineSetup {
            scheduler,
            recovery: Recovery::FailClosed,
            faults: FaultInjection::default(),
            report_timings: true,
        },
    )
    .unwrap()
}

fn next_timings(rx: &crossbeam_channel::Receiver<RequestTimings>) -> RequestTimings {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("no timings within 60 s")
}

/// The parts of a completed request's timings fit together: queue <= first token <= end, and
/// the first token plus the intervals between tokens is the whole latency (the last token and
/// the final event go out in the same delivery).
fn check_timings(t: &RequestTimings, num_prompt_tokens: usize, num_generated: usize) {
    assert_eq!(t.outcome, RequestOutcome::Completed, "{t:?}");
    assert_eq!(t.num_prompt_tokens, num_prompt_tokens, "{t:?}");
    assert_eq!(t.num_generated_tokens, num_generated, "{t:?}");
    assert_eq!(t.inter_token_latencies.len(), num_generated - 1, "{t:?}");
    let queue = t.queue_time.unwrap();
    let ttft = t.time_to_first_token.unwrap();
    assert!(queue <= ttft && ttft <= t.e2e_latency, "{t:?}");
    let decode: f64 = t.inter_token_latencies.iter().map(|&s| s as f64).sum();
    let whole = ttft.as_secs_f64() + decode;
    assert!(
        (whole - t.e2e_latency.as_secs_f64()).abs() < 1e-3,
        "ttft + intervals = {whole} s, e2e = {:?}: {t:?}",
        t.e2e_latency
    );
}

#[test]
fn every_request_reports_consistent_timings_once() {
    for on_device in [false, true] {
        let step = Duration::from_millis(2);
        let e = timed_engine(step, on_device);
        let (handle, rx) = (e.handle(), e.request_timings().unwrap());
        // A: a 40-token prompt, prefilled in three chunks of at most 16 tokens. B arrives with
        // it but waits: one request runs at a time.
        let a = submit(&handle, greedy(prompt(40, 1), 12, None)).unwrap();
        let b = submit(&handle, greedy(prompt(5, 2), 7, None)).unwrap();
        let (a_id, b_id) = (a.seq_id, b.seq_id);
        let (ca, cb) = (collect_stream(a), collect_stream(b));
        assert_eq!((ca.output_ids.len(), cb.output_ids.len()), (12, 7));
        let (ta, tb) = (next_timings(&rx), next_timings(&rx));
        assert_eq!(
            (ta.seq_id, tb.seq_id),
            (a_id, b_id),
            "in the order they ended"
        );
        check_timings(&ta, 40, 12);
        check_timings(&tb, 5, 7);
        // A's queue time ends at its first chunk, two steps before its first token; every
        // interval spans at least one step.
        let (queue, ttft) = (ta.queue_time.unwrap(), ta.time_to_first_token.unwrap());
        assert!(queue + 2 * step <= ttft, "on_device {on_device}: {ta:?}");
        assert!(
            ta.inter_token_latencies
                .iter()
                .all(|&s| s >= 0.9 * step.as_secs_f32())
        );
        // B was scheduled only once A had finished: it queued for (about) A's whole latency.
        assert!(
            tb.queue_time.unwrap() + Duration::from_millis(1) >= ta.e2e_latency,
            "on_device {on_device}: B queued {:?}, A took {:?}",
            tb.queue_time,
            ta.e2e_latency
        );
        assert!(rx.try_recv().is_err(), "one timings per request");
    }
}

#[test]
fn aborted_requests_report_what_they_got() {
    let e = timed_engine(Duration::from_millis(5), false);
    let (handle, rx) = (e.handle(), e.request_timings().unwrap());
    // A runs (100 tokens of at least 5 ms); B waits behind it and is aborted before it is ever
    // scheduled.
    let mut a = submit(&handle, greedy(prompt(6, 3), 100, None)).unwrap();
    let b = submit(&handle, greedy(prompt(4, 4), 5, None)).unwrap();
    let mut seen = 0;
    while seen < 3 {
        if let Some(TokenEvent::Token { .. }) = a.recv() {
            seen += 1;
        }
    }
    handle.abort(b.seq_id);
    let tb = next_timings(&rx);
    assert_eq!((tb.seq_id, tb.outcome), (b.seq_id, RequestOutcome::Aborted));
    assert_eq!((tb.queue_time, tb.time_to_first_token), (None, None));
    assert_eq!((tb.num_prompt_tokens, tb.num_generated_tokens), (4, 0));
    // A, aborted mid-generation, reports its first token and the intervals it delivered.
    handle.abort(a.seq_id);
    let delivered = seen + collect_stream(a).output_ids.len();
    assert!(delivered < 100);
    let ta = next_timings(&rx);
    assert_eq!(ta.outcome, RequestOutcome::Aborted);
    assert_eq!(ta.num_generated_tokens, delivered, "{ta:?}");
    assert_eq!(ta.inter_token_latencies.len(), delivered - 1);
    assert!(ta.time_to_first_token.unwrap() <= ta.e2e_latency);
    assert!(rx.try_recv().is_err());
}

#[test]
fn report_timings_is_an_engine_option_and_off_by_default() {
    let tweak = |on: bool| {
        move |o: &mut EngineOptions| {
            o.report_timings = on;
            o.kv.max_tokens = Some(256);
            o.max_model_len = Some(64);
        }
    };
    let off = TestEngine::start(&model_dir(), Some(WeightFormat::F32), tweak(false));
    assert!(off.engine.request_timings().is_none());
    assert!(!EngineOptions::new(model_dir()).report_timings);
    let on = TestEngine::start(&model_dir(), Some(WeightFormat::F32), tweak(true));
    let rx = on.engine.request_timings().unwrap();
    let c = collect(&on.handle(), greedy(prompt(5, 5), 3, None));
    assert_eq!(c.output_ids.len(), 3);
    check_timings(&next_timings(&rx), 5, 3);
}

/// Options of a slow engine with one seat and `max_queue_size` places behind it.
fn one_seat_options(max_queue_size: Option<usize>) -> triton_ferrum::engine::EngineOptions {
    let mut opts = triton_ferrum::engine::EngineOptions::new(model_dir());
    opts.batching.max_num_seqs = 1;
    opts.batching.max_queue_size = max_queue_size;
    opts.kv.block_size = 4;
    opts.kv.max_tokens = Some(256);
    opts.max_model_len = Some(128);
    opts
}

/// `greedy` at a priority level.
fn at_priority(mut spec: RequestSpec, priority: i64) -> RequestSpec {
    spec.queue.priority = priority;
    spec
}

/// Under saturation (one seat, held by a long request), requests of priority 5 finish before
/// every request of priority 0 submitted before them, each level in arrival order; priority -2
/// comes last.
#[test]
fn higher_priority_requests_finish_first_under_saturation() {
    let e = slow_engine(&one_seat_options(None), Duration::from_millis(5));
    let handle = e.handle();
    let (tx, rx) = crossbeam_channel::unbounded();
    let submit_at = |salt: u32, max_tokens: usize, priority: i64| {
        let spec = at_priority(greedy(prompt(4, salt), max_tokens, None), priority);
        let req = GenerateRequest::new(spec, handle.info()).unwrap();
        handle.submit_to(req, tx.clone()).unwrap().0
    };
    // 20 steps of at least 5 ms: the others all arrive while it runs (its first token is out, so
    // it holds the seat; before its first step it would compete with them by priority).
    let blocker = submit_at(0, 20, 0);
    while !matches!(rx.recv().unwrap(), (id, TokenEvent::Token { .. }) if id == blocker) {}
    let levels = [0, 5, -2, 0, 5, 0, 5];
    let ids: Vec<_> = levels
        .iter()
        .enumerate()
        .map(|(i, &p)| submit_at(1 + i as u32, 2, p))
        .collect();
    let mut finish_order = Vec::new();
    while finish_order.len() < 1 + ids.len() {
        let (id, ev) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        if is_final(&ev) {
            assert!(
                matches!(
                    ev,
                    TokenEvent::Token {
                        finish: Some(FinishReason::Length),
                        ..
                    }
                ),
                "{id}: {ev:?}"
            );
            finish_order.push(id);
        }
    }
    // Arrival index of each level: 5 at 1, 4, 6; 0 at 0, 3, 5; -2 at 2.
    let expected: Vec<_> = std::iter::once(blocker)
        .chain([1, 4, 6, 0, 3, 5, 2].map(|i| ids[i]))
        .collect();
    assert_eq!(finish_order, expected);
}

/// `spec` with its own queue timeout.
fn with_queue_timeout(mut spec: RequestSpec, timeout: Duration) -> RequestSpec {
    spec.queue.queue_timeout = Some(timeout);
    spec
}

/// The queue timeout: while one slow request holds the only seat, a request waiting past the
/// model's bound (30 ms) or its own (10 ms) ends with one `Unavailable` naming the bound and how
/// long it waited; one with a longer bound of its own waits and completes, and so does the
/// running request, which has been in the engine far longer than 30 ms. The places of the
/// timed-out requests are free at once (`max_queue_size`).
#[test]
fn a_request_waiting_past_its_queue_timeout_gets_one_unavailable_naming_the_bound() {
    let mut opts = one_seat_options(Some(3));
    opts.batching.queue_timeout = Some(Duration::from_millis(30));
    let e = slow_engine(&opts, Duration::from_millis(5));
    let handle = e.handle();
    let hour = Duration::from_secs(3600);
    // 100 steps of at least 5 ms: everything below happens while it runs.
    let mut blocker = submit(&handle, greedy(prompt(4, 0), 100, None)).unwrap();
    assert!(matches!(blocker.recv(), Some(TokenEvent::Started { .. })));
    let model_bound = submit(&handle, greedy(prompt(4, 1), 2, None)).unwrap();
    let own_bound = submit(
        &handle,
        with_queue_timeout(greedy(prompt(4, 2), 2, None), Duration::from_millis(10)),
    )
    .unwrap();
    let patient = submit(
        &handle,
        with_queue_timeout(greedy(prompt(4, 3), 2, None), hour),
    )
    .unwrap();
    for (stream, bound, whose) in [
        (model_bound, 30_000, "model's"),
        (own_bound, 10_000, "request's"),
    ] {
        let events: Vec<TokenEvent> = stream.collect();
        let [TokenEvent::Started { .. }, TokenEvent::Unavailable(msg)] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert!(
            msg.contains(&format!("the {whose} queue_timeout_microseconds ({bound})"))
                && msg.contains("without being scheduled"),
            "{msg}"
        );
        let waited_ms: f64 = msg
            .split("waited ")
            .nth(1)
            .and_then(|rest| rest.split(" ms").next())
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_else(|| panic!("no wait in {msg}"));
        assert!(waited_ms >= bound as f64 / 1000.0, "{msg}");
    }
    let stats = handle.stats().unwrap();
    assert_eq!(stats.num_queue_timeouts, 2, "{stats:?}");
    assert_eq!((stats.num_running, stats.num_waiting), (1, 1), "{stats:?}");
    // Two places are free again: two more are admitted, a third is busy.
    let more: Vec<_> = (4..6)
        .map(|i| {
            submit(
                &handle,
                with_queue_timeout(greedy(prompt(4, i), 2, None), hour),
            )
            .unwrap()
        })
        .collect();
    let busy = submit(&handle, greedy(prompt(4, 6), 2, None))
        .err()
        .unwrap();
    assert!(busy.to_string().contains("busy"), "{busy}");
    let blocker = collect_stream(blocker);
    assert_eq!(
        (blocker.output_ids.len(), blocker.num_final_events),
        (100, 1)
    );
    for s in std::iter::once(patient).chain(more) {
        let c = collect_stream(s);
        assert_eq!((c.output_ids.len(), c.num_final_events), (2, 1));
    }
    assert_eq!(handle.stats().unwrap().num_queue_timeouts, 2);
}

/// `bad_words` on the CPU engine: a one-id word never appears; a two-id word [a, b] lets `a`
/// through but never `b` right after it; the greedy output without them has both.
#[test]
fn bad_words_are_never_generated_and_a_longer_word_only_when_complete() {
    let e = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |_| {});
    let handle = e.handle();
    let with_bad_words = |words: Vec<Vec<u32>>| {
        let mut spec = greedy(prompt(6, 9), 16, None);
        spec.sampling.bad_words = words;
        collect(&handle, spec).output_ids
    };
    let free = with_bad_words(vec![]);
    assert_eq!(free.len(), 16);
    let single = free[3];
    let out = with_bad_words(vec![vec![single]]);
    assert_eq!(
        out[..3],
        free[..3],
        "nothing changes before the banned token"
    );
    assert!(!out.contains(&single), "{single} in {out:?}");
    let (a, b) = (free[0], free[1]);
    let out = with_bad_words(vec![vec![a, b]]);
    assert_eq!(out[0], a, "the word's first id alone is allowed");
    assert_ne!(out[1], b);
    assert!(
        !out.windows(2).any(|w| w == [a, b]),
        "[{a}, {b}] completed in {out:?}"
    );
    // An id outside the vocabulary is refused, naming the field.
    let mut spec = greedy(prompt(6, 9), 4, None);
    spec.sampling.bad_words = vec![vec![1, 1 << 30]];
    let err = GenerateRequest::new(spec, handle.info()).unwrap_err();
    assert!(err.to_string().contains("bad_words"), "{err}");
    // An engine whose sampler cannot ban words (the GPU's) refuses them when the request is
    // built, naming the field; the CPU engine's can.
    assert!(handle.info().bans_words);
    let no_bans = ModelInfo {
        bans_words: false,
        ..handle.info().clone()
    };
    let mut spec = greedy(prompt(6, 9), 4, None);
    spec.sampling.bad_words = vec![vec![7]];
    let err = GenerateRequest::new(spec, &no_bans).unwrap_err();
    assert!(
        matches!(
            err,
            RequestError::InvalidValue {
                field: "bad_words",
                ..
            }
        ),
        "{err}"
    );
}
