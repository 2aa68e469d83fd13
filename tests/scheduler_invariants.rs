//! Seeded randomized test of the scheduler and KV cache: random arrivals (prompts up to the
//! model length, longer than the step budget), random max_tokens, aborts of waiting, running and
//! just-scheduled sequences, a tiny KV cache so preemption is frequent, and a fake model that
//! samples random tokens (sometimes none) and finishes sequences at their cap or at a random
//! "EOS". After every step the scheduler's own invariant check runs, and this test checks the
//! plan against an independent mirror of every sequence's tokens and computed prefix, and
//! simulates the KV cache's contents: each computed slot records which prefix it holds (a hash
//! of the tokens up to its position), and every position a chunk attends to but does not compute
//! must hold its own sequence's prefix. With prefix caching on, prompts often share prefixes, so
//! shared blocks and reuse after eviction and preemption are checked the same way. Requests
//! carry random priorities: admission follows (priority, arrival) order and the preemption
//! victims are the running sequences last in that order.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};

use triton_ferrum::request::SeqId;
use triton_ferrum::scheduler::{
    BatchingOptions, SchedulePlan, Scheduler, SchedulerConfig, SchedulerPolicy,
};

/// The highest priority level a random request gets.
const TOP_PRIORITY: i64 = 7;

/// SplitMix64: small, seeded, good enough for test traffic.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo ..= hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// True with probability `percent / 100`.
    fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// What the test knows about a live sequence, independently of the scheduler.
struct Mirror {
    tokens: Vec<u32>,
    num_prompt_tokens: usize,
    /// min(prompt + max_tokens, max_model_len).
    cap: usize,
    /// Expected `start_pos` of the next chunk (0 after a preemption).
    num_computed: usize,
    arrival_step: usize,
    /// Higher is served first; arrival order within a level is the id order.
    priority: i64,
    /// Admitted and not preempted since (as the plans say).
    running: bool,
}

impl Mirror {
    /// The order of service the scheduler must follow: higher priority, then earlier arrival.
    fn key(&self, seq_id: SeqId) -> (std::cmp::Reverse<i64>, SeqId) {
        (std::cmp::Reverse(self.priority), seq_id)
    }
}

#[derive(Debug, Default)]
struct Stats {
    num_added: usize,
    num_rejected: usize,
    num_aborted: usize,
    num_aborted_after_schedule: usize,
    num_finished_at_cap: usize,
    num_finished_at_model_len: usize,
    num_finished_eos: usize,
    num_preemptions: usize,
    num_recomputes_with_generated: usize,
    num_partial_prefill_chunks: usize,
    num_missing_samples: usize,
    num_near_full_budget_steps: usize,
    /// Longest life of a request of the top priority level (FIFO among themselves, ahead of
    /// everyone else).
    max_age_steps: usize,
    /// Longest life of any request (lower levels wait while higher ones keep arriving).
    max_age_steps_any_level: usize,
    /// Tokens a chunk started past because the prefix cache held them.
    num_reused_tokens: usize,
    num_admissions_with_reuse: usize,
    /// Preempted sequences with generated tokens that resumed from cached blocks (their own).
    num_recomputes_from_cache: usize,
    /// Preemptions that spared a newer running sequence of a higher priority (the victim is the
    /// lowest level, not the newest).
    num_preemptions_below_others: usize,
    /// Admissions of a sequence that arrived after one still waiting (a higher level first).
    num_admissions_ahead: usize,
}

struct Harness {
    cfg: SchedulerConfig,
    sched: Scheduler,
    live: BTreeMap<SeqId, Mirror>,
    rng: Rng,
    next_id: u64,
    step_idx: usize,
    stats: Stats,
    /// Simulated cache: slot -> prefix hash of the token whose K/V it holds.
    kv_contents: HashMap<usize, u64>,
    /// Prompt prefixes new requests often start with (prefix caching runs).
    shared_prefixes: Vec<Vec<u32>>,
}

/// Hash of tokens[..=pos] for every pos (FNV-1a over the ids, chained).
fn prefix_hashes(tokens: &[u32]) -> Vec<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    tokens
        .iter()
        .map(|&t| {
            for b in t.to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            h
        })
        .collect()
}

impl Harness {
    fn new(cfg: SchedulerConfig, seed: u64) -> Self {
        let sched = Scheduler::new(cfg.clone()).unwrap();
        let mut rng = Rng(seed);
        let shared_prefixes = (0..4)
            .map(|_| {
                let len = rng.range(1, cfg.max_model_len / 2);
                (0..len).map(|_| rng.next_u64() as u32 % 50_000).collect()
            })
            .collect();
        Harness {
            cfg,
            sched,
            live: BTreeMap::new(),
            rng,
            next_id: 1,
            step_idx: 0,
            stats: Stats::default(),
            kv_contents: HashMap::new(),
            shared_prefixes,
        }
    }

    fn random_live_id(&mut self) -> Option<SeqId> {
        if self.live.is_empty() {
            return None;
        }
        let idx = self.rng.range(0, self.live.len() - 1);
        self.live.keys().nth(idx).copied()
    }

    fn arrive(&mut self) {
        let max_prompt = self.cfg.max_model_len - 1;
        let num_prompt_tokens = match self.rng.range(0, 9) {
            0..=5 => self.rng.range(1, 8),
            6..=8 => self.rng.range(
                1,
                (2 * self.cfg.batching.max_num_batched_tokens).min(max_prompt),
            ),
            _ => self.rng.range(max_prompt / 2, max_prompt),
        };
        let max_tokens = if self.rng.chance(10) {
            self.rng.range(50, 500)
        } else {
            self.rng.range(1, 30)
        };
        let seq_id = SeqId(self.next_id);
        self.next_id += 1;
        let mut prompt: Vec<u32> = Vec::with_capacity(num_prompt_tokens);
        if self.cfg.batching.enable_prefix_caching && self.rng.chance(60) {
            let idx = self.rng.range(0, self.shared_prefixes.len() - 1);
            let shared = &self.shared_prefixes[idx];
            prompt.extend(&shared[..shared.len().min(num_prompt_tokens)]);
        } else if self.cfg.batching.enable_prefix_caching && self.rng.chance(50) {
            // Blocks drawn from two patterns: the same block content after different prefixes
            // (a cache keyed by block content alone would serve another prefix's K/V).
            let bs = self.cfg.block_size;
            while prompt.len() + bs <= num_prompt_tokens {
                let pattern = self.rng.range(0, 1) as u32;
                prompt.extend((0..bs as u32).map(|i| 60_000 + pattern * 100 + i));
            }
        }
        while prompt.len() < num_prompt_tokens {
            prompt.push(self.rng.next_u64() as u32 % 50_000);
        }
        // Mostly the default level, some above and below it.
        let priority = match self.rng.range(0, 9) {
            0..=5 => 0,
            6 | 7 => 1,
            8 => -1,
            _ => TOP_PRIORITY,
        };
        self.sched
            .add_with_priority(seq_id, prompt.clone(), max_tokens, priority)
            .unwrap();
        let cap = (num_prompt_tokens + max_tokens).min(self.cfg.max_model_len);
        self.live.insert(
            seq_id,
            Mirror {
                tokens: prompt,
                num_prompt_tokens,
                cap,
                num_computed: 0,
                arrival_step: self.step_idx,
                priority,
                running: false,
            },
        );
        self.stats.num_added += 1;
    }

    fn try_impossible_add(&mut self) {
        let num_waiting = self.sched.num_waiting();
        let too_long = vec![
            1u32;
            self.rng
                .range(self.cfg.max_model_len, self.cfg.max_model_len + 10)
        ];
        let err = self
            .sched
            .add(SeqId(u64::MAX), too_long, 5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_model_len"), "{err}");
        assert!(self.sched.add(SeqId(u64::MAX), vec![], 5).is_err());
        if let Some(seq_id) = self.random_live_id() {
            assert!(
                self.sched.add(seq_id, vec![1], 5).is_err(),
                "duplicate id accepted"
            );
        }
        assert_eq!(
            self.sched.num_waiting(),
            num_waiting,
            "a rejected add changed the queue"
        );
        self.stats.num_rejected += 1;
    }

    fn abort(&mut self, seq_id: SeqId) {
        assert!(self.sched.remove(seq_id));
        assert!(
            self.sched.kv().block_table(seq_id).is_empty(),
            "{seq_id}: blocks kept after remove"
        );
        assert!(!self.sched.remove(seq_id));
        self.live.remove(&seq_id);
    }

    /// One engine step. `chaos` enables arrivals, aborts and missing samples.
    fn step(&mut self, chaos: bool) -> SchedulePlan {
        if chaos {
            if self.live.len() < 4 * self.cfg.batching.max_num_seqs && self.rng.chance(35) {
                self.arrive();
            }
            if self.rng.chance(3) {
                self.try_impossible_add();
            }
            if self.rng.chance(4)
                && let Some(seq_id) = self.random_live_id()
            {
                self.abort(seq_id);
                self.stats.num_aborted += 1;
            }
        }
        let had_work = self.sched.has_work();
        assert_eq!(
            had_work,
            !self.live.is_empty(),
            "has_work disagrees with the live set"
        );

        let plan = self.sched.schedule();
        self.check("after schedule");
        self.check_plan(&plan, had_work);
        self.check_order(&plan);

        // The fake model: a random token per sampled entry, occasionally none.
        let mut sampled = Vec::new();
        for s in &plan.seqs {
            let mirror = self.live.get_mut(&s.seq_id).unwrap();
            mirror.num_computed = s.end_pos();
            if s.sample {
                if chaos && self.rng.chance(2) {
                    mirror.num_computed -= 1; // the scheduler must recompute and resample it
                    self.stats.num_missing_samples += 1;
                } else {
                    let token_id = self.rng.next_u64() as u32 % 50_000;
                    sampled.push((s.seq_id, token_id));
                    mirror.tokens.push(token_id);
                }
            }
        }
        // A sequence aborted between schedule and update: its results must be ignored.
        if chaos && self.rng.chance(3) && !plan.seqs.is_empty() {
            let idx = self.rng.range(0, plan.seqs.len() - 1);
            self.abort(plan.seqs[idx].seq_id);
            self.stats.num_aborted_after_schedule += 1;
        }
        let lens_before: Vec<(SeqId, usize)> = self
            .live
            .keys()
            .map(|&id| (id, self.sched.tokens(id).unwrap().len()))
            .collect();
        self.sched.update(&plan, &sampled);
        self.check("after update");
        for (seq_id, len_before) in lens_before {
            assert!(
                self.sched.tokens(seq_id).unwrap().len() >= len_before,
                "{seq_id}: tokens shrank"
            );
        }
        self.compare_mirrors();
        self.finish_sequences(chaos);
        self.check("after removes");
        self.step_idx += 1;
        plan
    }

    fn check(&self, when: &str) {
        if let Err(e) = self.sched.check_invariants() {
            panic!("step {} {when}: {e}", self.step_idx);
        }
        let kv = self.sched.kv();
        // Distinct blocks: with prefix caching, sequences share cached ones.
        let num_used = self
            .live
            .keys()
            .flat_map(|&id| kv.block_table(id).iter().copied())
            .collect::<HashSet<_>>()
            .len();
        assert_eq!(
            num_used + kv.num_free_blocks(),
            self.cfg.num_blocks,
            "step {}: block accounting",
            self.step_idx
        );
        assert!(self.sched.num_running() <= self.cfg.batching.max_num_seqs);
    }

    fn check_plan(&mut self, plan: &SchedulePlan, had_work: bool) {
        let step = self.step_idx;
        assert_eq!(
            plan.num_batched_tokens,
            plan.seqs.iter().map(|s| s.token_ids.len()).sum::<usize>()
        );
        assert!(
            plan.num_batched_tokens <= self.cfg.batching.max_num_batched_tokens,
            "step {step}: budget exceeded"
        );
        assert!(
            plan.seqs.len() <= self.cfg.batching.max_num_seqs,
            "step {step}: too many sequences"
        );
        assert!(
            !had_work || !plan.is_empty(),
            "step {step}: work pending but nothing scheduled"
        );
        if 4 * plan.num_batched_tokens >= 3 * self.cfg.batching.max_num_batched_tokens {
            self.stats.num_near_full_budget_steps += 1;
        }

        for &seq_id in &plan.preempted {
            let mirror = self.live.get_mut(&seq_id).unwrap();
            mirror.num_computed = 0;
            assert!(
                self.sched.kv().block_table(seq_id).is_empty(),
                "{seq_id}: preempted but holds blocks"
            );
            self.stats.num_preemptions += 1;
        }
        let mut seen_ids = HashSet::new();
        // Blocks a chunk writes: no other scheduled sequence may list them.
        let mut written_blocks = HashMap::new();
        let mut listed_blocks: HashMap<_, usize> = HashMap::new();
        let block_size = self.cfg.block_size;
        for s in &plan.seqs {
            let seq_id = s.seq_id;
            assert!(
                seen_ids.insert(seq_id),
                "step {step}: {seq_id} scheduled twice"
            );
            assert!(
                !plan.preempted.contains(&seq_id),
                "step {step}: {seq_id} preempted and scheduled"
            );
            let mirror = &self.live[&seq_id];
            assert!(!s.token_ids.is_empty());
            if self.cfg.batching.enable_prefix_caching
                && mirror.num_computed == 0
                && s.start_pos > 0
            {
                // Admitted from the prefix cache: whole blocks, never the last token.
                assert_eq!(s.start_pos % block_size, 0, "step {step}: {seq_id} reuse");
                assert!(
                    s.start_pos < mirror.tokens.len(),
                    "step {step}: {seq_id} reuse"
                );
                self.stats.num_reused_tokens += s.start_pos;
                self.stats.num_admissions_with_reuse += 1;
                if mirror.tokens.len() > mirror.num_prompt_tokens {
                    self.stats.num_recomputes_from_cache += 1;
                }
            } else {
                assert_eq!(
                    s.start_pos, mirror.num_computed,
                    "step {step}: {seq_id} start_pos"
                );
            }
            let end = s.end_pos();
            assert!(
                end <= mirror.tokens.len(),
                "step {step}: {seq_id} computes unknown tokens"
            );
            assert_eq!(
                s.token_ids,
                mirror.tokens[s.start_pos..end],
                "step {step}: {seq_id} token ids"
            );
            assert_eq!(
                s.sample,
                end == mirror.tokens.len(),
                "step {step}: {seq_id} sample flag"
            );
            assert!(
                mirror.tokens.len() < mirror.cap,
                "step {step}: {seq_id} scheduled at its cap"
            );
            assert!(
                s.block_table.len() * block_size >= end,
                "step {step}: {seq_id} table too short"
            );
            assert_eq!(
                s.block_table,
                self.sched.kv().block_table(seq_id),
                "step {step}: {seq_id} stale table"
            );
            for (i, b) in s.block_table.iter().enumerate() {
                assert!(b.idx() < self.cfg.num_blocks);
                *listed_blocks.entry(*b).or_default() += 1;
                if (i + 1) * block_size > s.start_pos && i * block_size < end {
                    written_blocks.insert(*b, seq_id);
                }
            }
            let hashes = prefix_hashes(&mirror.tokens);
            for (pos, hash) in hashes.iter().enumerate().take(end) {
                let slot = self.sched.kv().slot(seq_id, pos).unwrap();
                assert_eq!(
                    slot,
                    s.block_table[pos / block_size].idx() * block_size + pos % block_size
                );
                if pos < s.start_pos {
                    assert_eq!(
                        self.kv_contents.get(&slot),
                        Some(hash),
                        "step {step}: {seq_id} attends to position {pos} (slot {slot}) \
                         holding another prefix"
                    );
                }
            }
            for (pos, &hash) in hashes.iter().enumerate().take(end).skip(s.start_pos) {
                let slot = self.sched.kv().slot(seq_id, pos).unwrap();
                self.kv_contents.insert(slot, hash);
            }
            if s.start_pos == 0
                && mirror.tokens.len() > mirror.num_prompt_tokens
                && end > mirror.num_prompt_tokens
            {
                self.stats.num_recomputes_with_generated += 1;
            }
            if !s.sample {
                self.stats.num_partial_prefill_chunks += 1;
            }
            if !self.cfg.batching.enable_chunked_prefill {
                assert!(
                    s.sample,
                    "step {step}: {seq_id} chunked while chunked prefill is off"
                );
            }
        }
        for (b, writer) in &written_blocks {
            assert_eq!(
                listed_blocks[b], 1,
                "step {step}: {writer} writes {b}, which another sequence lists"
            );
        }
        if !self.cfg.batching.enable_prefix_caching {
            assert!(
                listed_blocks.values().all(|&n| n == 1),
                "step {step}: a block in two block tables without prefix caching"
            );
        }
    }

    /// Admissions follow (priority, arrival) order: everything admitted in this step comes
    /// before everything still waiting; each preempted sequence comes after every sequence still
    /// running. Then updates the mirrors' running flags.
    fn check_order(&mut self, plan: &SchedulePlan) {
        let step = self.step_idx;
        for &seq_id in &plan.preempted {
            self.live.get_mut(&seq_id).unwrap().running = false;
        }
        let admitted: Vec<SeqId> = plan
            .seqs
            .iter()
            .map(|s| s.seq_id)
            .filter(|id| !self.live[id].running)
            .collect();
        for s in &plan.seqs {
            self.live.get_mut(&s.seq_id).unwrap().running = true;
        }
        let key = |id: &SeqId| self.live[id].key(*id);
        let last_admitted = admitted.iter().map(key).max();
        let first_waiting = self
            .live
            .iter()
            .filter(|(_, m)| !m.running)
            .map(|(id, _)| key(id))
            .min();
        if let (Some(a), Some(w)) = (last_admitted, first_waiting) {
            assert!(a < w, "step {step}: admitted {a:?} while {w:?} waits");
        }
        let first_waiting_id = self
            .live
            .iter()
            .find(|(_, m)| !m.running)
            .map(|(id, _)| *id);
        if let Some(w) = first_waiting_id {
            self.stats.num_admissions_ahead += admitted.iter().filter(|&&id| id > w).count();
        }
        let last_running = self
            .live
            .iter()
            .filter(|(_, m)| m.running)
            .map(|(id, _)| key(id))
            .max();
        for p in &plan.preempted {
            if let Some(r) = last_running {
                assert!(key(p) > r, "step {step}: preempted {p} while {r:?} runs");
            }
            self.stats.num_preemptions_below_others += usize::from(
                self.live
                    .iter()
                    .any(|(id, m)| m.running && m.priority > self.live[p].priority && id > p),
            );
        }
    }

    fn compare_mirrors(&self) {
        for (&seq_id, mirror) in &self.live {
            assert_eq!(
                self.sched.tokens(seq_id).unwrap(),
                mirror.tokens.as_slice(),
                "{seq_id}: tokens"
            );
            let at_cap = mirror.tokens.len() >= mirror.cap;
            assert_eq!(self.sched.reached_cap(seq_id), at_cap, "{seq_id}: cap");
            assert_eq!(
                self.sched.num_computed_tokens(seq_id),
                Some(mirror.num_computed),
                "{seq_id}"
            );
        }
    }

    /// The engine's part: remove sequences at their cap, and some at a random "EOS".
    fn finish_sequences(&mut self, chaos: bool) {
        let ids: Vec<SeqId> = self.live.keys().copied().collect();
        for seq_id in ids {
            let mirror = &self.live[&seq_id];
            let age = self.step_idx - mirror.arrival_step;
            self.stats.max_age_steps_any_level = self.stats.max_age_steps_any_level.max(age);
            if mirror.priority == TOP_PRIORITY {
                self.stats.max_age_steps = self.stats.max_age_steps.max(age);
            }
            let at_cap = mirror.tokens.len() >= mirror.cap;
            let has_generated = mirror.tokens.len() > mirror.num_prompt_tokens;
            if at_cap {
                if mirror.cap == self.cfg.max_model_len {
                    self.stats.num_finished_at_model_len += 1;
                }
                self.stats.num_finished_at_cap += 1;
                self.abort(seq_id);
            } else if chaos && has_generated && self.rng.chance(2) {
                self.stats.num_finished_eos += 1;
                self.abort(seq_id);
            }
        }
    }

    /// Runs `num_steps` random steps, then drains without new arrivals.
    fn run(mut self, num_steps: usize, max_drain_steps: usize) -> Stats {
        for _ in 0..num_steps {
            self.step(true);
        }
        let mut num_drain_steps = 0;
        while self.sched.has_work() {
            assert!(
                num_drain_steps < max_drain_steps,
                "not drained after {max_drain_steps} steps"
            );
            self.step(false);
            num_drain_steps += 1;
        }
        assert!(
            self.live.is_empty(),
            "unfinished requests: {:?}",
            self.live.keys().collect::<Vec<_>>()
        );
        assert_eq!(self.sched.kv().num_free_blocks(), self.cfg.num_blocks);
        assert_eq!(
            (
                self.sched.num_running(),
                self.sched.num_waiting(),
                self.sched.num_capped()
            ),
            (0, 0, 0)
        );
        assert!(self.sched.schedule().is_empty());
        assert_eq!(
            self.stats.num_preemptions as u64,
            self.sched.num_preemptions()
        );
        self.stats
    }
}

/// What every randomized run must have exercised, whatever the admission policy.
fn assert_traffic(stats: &Stats, chunked: bool) {
    println!("{stats:#?}");
    assert!(stats.num_added > 1000, "too few requests");
    assert!(stats.num_finished_at_cap > 300);
    assert!(stats.num_finished_eos > 50);
    assert!(stats.num_aborted > 100 && stats.num_aborted_after_schedule > 50);
    assert!(
        stats.num_admissions_ahead > 50,
        "priorities never reordered admissions"
    );
    if chunked {
        assert!(
            stats.num_partial_prefill_chunks > 100,
            "chunked prefill not exercised"
        );
    }
    // In-order admission and growth: nobody of the top level waits long (lower levels wait
    // behind higher ones, and all drain once arrivals stop: `Harness::run`).
    assert!(
        stats.max_age_steps < 3000,
        "a request lived {} steps",
        stats.max_age_steps
    );
}

/// `assert_traffic` plus what a tiny cache under MaxUtilization must have exercised.
fn assert_busy(stats: &Stats, chunked: bool) {
    assert_traffic(stats, chunked);
    assert!(stats.num_preemptions > 50, "preemption was not exercised");
    assert!(
        stats.num_preemptions_below_others > 5,
        "no preemption spared a newer sequence of a higher priority"
    );
    assert!(
        stats.num_recomputes_with_generated > 20,
        "recompute of generated tokens not exercised"
    );
    assert!(
        stats.num_finished_at_model_len > 5,
        "max_model_len cap not exercised"
    );
    assert!(stats.num_missing_samples > 20);
    assert!(
        stats.num_near_full_budget_steps > 100,
        "the token budget was never the limit"
    );
}

/// 8 sequences, a 32-token budget (chunked prefill) and 24 blocks of 4 tokens.
fn chunked_config(policy: SchedulerPolicy, enable_prefix_caching: bool) -> SchedulerConfig {
    SchedulerConfig {
        batching: BatchingOptions {
            max_num_seqs: 8,
            max_num_batched_tokens: 32,
            enable_chunked_prefill: true,
            policy,
            enable_prefix_caching,
            max_queue_size: None,
            queue_timeout: None,
        },
        block_size: 4,
        num_blocks: 24,
        max_model_len: 96,
    }
}

#[test]
fn randomized_invariants_with_chunked_prefill() {
    let cfg = chunked_config(SchedulerPolicy::MaxUtilization, false);
    let stats = Harness::new(cfg, 0x5EED_0001).run(12_000, 20_000);
    assert_busy(&stats, true);
}

#[test]
fn randomized_invariants_without_chunked_prefill() {
    let cfg = SchedulerConfig {
        batching: BatchingOptions {
            max_num_seqs: 6,
            max_num_batched_tokens: 64,
            enable_chunked_prefill: false,
            policy: SchedulerPolicy::MaxUtilization,
            enable_prefix_caching: false,
            max_queue_size: None,
            queue_timeout: None,
        },
        block_size: 8,
        num_blocks: 10,
        max_model_len: 64,
    };
    let stats = Harness::new(cfg, 0x5EED_0002).run(12_000, 20_000);
    assert_busy(&stats, false);
}

#[test]
fn randomized_invariants_under_guaranteed_no_evict_never_preempt() {
    let cfg = chunked_config(SchedulerPolicy::GuaranteedNoEvict, false);
    let stats = Harness::new(cfg, 0x5EED_0003).run(12_000, 20_000);
    assert_traffic(&stats, true);
    assert_eq!(stats.num_preemptions, 0, "a started sequence was preempted");
}

#[test]
fn randomized_invariants_with_prefix_caching() {
    let cfg = chunked_config(SchedulerPolicy::MaxUtilization, true);
    let stats = Harness::new(cfg, 0x5EED_0004).run(12_000, 20_000);
    assert_busy(&stats, true);
    assert!(
        stats.num_admissions_with_reuse > 500 && stats.num_reused_tokens > 5000,
        "prefix reuse not exercised"
    );
    assert!(
        stats.num_recomputes_from_cache > 20,
        "preempted sequences never resumed from their cached blocks"
    );
}

#[test]
fn randomized_invariants_with_prefix_caching_without_chunking_under_no_evict() {
    for (policy, chunked, seed) in [
        (SchedulerPolicy::MaxUtilization, false, 0x5EED_0005),
        (SchedulerPolicy::GuaranteedNoEvict, true, 0x5EED_0006),
    ] {
        let cfg = SchedulerConfig {
            batching: BatchingOptions {
                max_num_seqs: 6,
                max_num_batched_tokens: if chunked { 16 } else { 64 },
                enable_chunked_prefill: chunked,
                policy,
                enable_prefix_caching: true,
                max_queue_size: None,
                queue_timeout: None,
            },
            block_size: 8,
            num_blocks: 12,
            max_model_len: 64,
        };
        let stats = Harness::new(cfg, seed).run(12_000, 20_000);
        assert_traffic(&stats, chunked);
        // The no-evict run holds fewer sequences at once, so fewer cached prefixes survive.
        assert!(stats.num_admissions_with_reuse > 50, "{policy:?}");
        if policy == SchedulerPolicy::GuaranteedNoEvict {
            assert_eq!(stats.num_preemptions, 0, "a started sequence was preempted");
        }
    }
}
