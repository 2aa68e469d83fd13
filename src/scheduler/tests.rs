#![allow(clippy::unwrap_used)]

use super::*;
use crate::kv_cache::BlockId;

fn cfg(
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    block_size: usize,
    num_blocks: usize,
) -> SchedulerConfig {
    SchedulerConfig {
        batching: BatchingOptions {
            max_num_seqs,
            max_num_batched_tokens,
            enable_chunked_prefill: true,
            policy: SchedulerPolicy::MaxUtilization,
            enable_prefix_caching: false,
            max_queue_size: None,
            queue_timeout: None,
        },
        block_size,
        num_blocks,
        max_model_len: num_blocks * block_size,
    }
}

fn prompt(seq: u64, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| seq as u32 * 1000 + i).collect()
}

/// Schedules, checks invariants, samples `token_id` for every sampled entry and updates.
fn step(s: &mut Scheduler, token_id: u32) -> SchedulePlan {
    let plan = s.schedule();
    s.check_invariants().unwrap();
    let sampled: Vec<(SeqId, u32)> = plan
        .seqs
        .iter()
        .filter(|q| q.sample)
        .map(|q| (q.seq_id, token_id))
        .collect();
    s.update(&plan, &sampled);
    s.check_invariants().unwrap();
    plan
}

fn summary(plan: &SchedulePlan) -> Vec<(u64, usize, usize, bool)> {
    plan.seqs
        .iter()
        .map(|q| (q.seq_id.0, q.start_pos, q.token_ids.len(), q.sample))
        .collect()
}

#[test]
fn chunked_prefill_splits_a_long_prompt_and_mixes_with_decodes() {
    let mut s = Scheduler::new(cfg(4, 8, 4, 64)).unwrap();
    s.add(SeqId(1), prompt(1, 3), 100).unwrap();
    assert_eq!(summary(&step(&mut s, 500)), vec![(1, 0, 3, true)]);

    s.add(SeqId(2), prompt(2, 20), 100).unwrap();
    let plan = step(&mut s, 501);
    // The decode of seq1 comes first, then seq2's first chunk fills the rest of the budget.
    assert_eq!(summary(&plan), vec![(1, 3, 1, true), (2, 0, 7, false)]);
    assert_eq!(plan.seqs[0].token_ids, vec![500]);
    assert_eq!(plan.seqs[1].token_ids, prompt(2, 20)[..7].to_vec());
    assert_eq!(plan.num_batched_tokens, 8);
    assert_eq!(
        plan.seqs[1].block_table.len(),
        2,
        "7 positions need 2 blocks of 4"
    );

    let plan = step(&mut s, 502);
    assert_eq!(summary(&plan), vec![(1, 4, 1, true), (2, 7, 7, false)]);
    assert_eq!(plan.seqs[1].token_ids, prompt(2, 20)[7..14].to_vec());
    let plan = step(&mut s, 503);
    assert_eq!(summary(&plan), vec![(1, 5, 1, true), (2, 14, 6, true)]);
    assert_eq!(plan.num_batched_tokens, 7);
    assert_eq!(plan.seqs[1].block_table.len(), 5);
    // Both now decode.
    let plan = step(&mut s, 504);
    assert_eq!(summary(&plan), vec![(1, 6, 1, true), (2, 20, 1, true)]);
    assert_eq!(plan.seqs[1].token_ids, vec![503]);
    assert_eq!(s.tokens(SeqId(1)).unwrap()[3..], [500, 501, 502, 503, 504]);
}

#[test]
fn a_long_prompt_continues_while_a_newer_one_joins() {
    // seq1's prompt is longer than the budget; seq2 joins with the budget seq1's last chunk
    // leaves, then continues its prefill after seq1's decodes. A one-token chunk that is still
    // inside the prompt (seq2 at position 9) is a prefill chunk, not a decode.
    let mut s = Scheduler::new(cfg(4, 6, 4, 64)).unwrap();
    s.add(SeqId(1), prompt(1, 8), 100).unwrap();
    s.add(SeqId(2), prompt(2, 10), 100).unwrap();
    assert_eq!(summary(&step(&mut s, 7)), vec![(1, 0, 6, false)]);
    assert_eq!(
        summary(&step(&mut s, 7)),
        vec![(1, 6, 2, true), (2, 0, 4, false)]
    );
    assert_eq!(
        summary(&step(&mut s, 7)),
        vec![(1, 8, 1, true), (2, 4, 5, false)]
    );
    assert_eq!(
        summary(&step(&mut s, 7)),
        vec![(1, 9, 1, true), (2, 9, 1, true)]
    );
}

#[test]
fn max_num_seqs_and_token_budget_are_respected() {
    let mut s = Scheduler::new(cfg(2, 16, 4, 64)).unwrap();
    for id in 1..=3 {
        s.add(SeqId(id), prompt(id, 2), 100).unwrap();
    }
    let plan = step(&mut s, 9);
    assert_eq!(summary(&plan), vec![(1, 0, 2, true), (2, 0, 2, true)]);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    let plan = step(&mut s, 9);
    assert_eq!(plan.seqs.len(), 2, "seq3 waits for a free seat");
    assert!(s.remove(SeqId(1)));
    let plan = step(&mut s, 9);
    assert_eq!(summary(&plan), vec![(2, 3, 1, true), (3, 0, 2, true)]);

    // Budget: a prompt longer than what is left is chunked to exactly the budget.
    let mut s = Scheduler::new(cfg(8, 10, 4, 64)).unwrap();
    for id in 1..=3 {
        s.add(SeqId(id), prompt(id, 4), 100).unwrap();
    }
    let plan = step(&mut s, 9);
    assert_eq!(
        summary(&plan),
        vec![(1, 0, 4, true), (2, 0, 4, true), (3, 0, 2, false)]
    );
    assert_eq!(plan.num_batched_tokens, 10);
}

#[test]
fn without_chunked_prefill_a_prompt_waits_for_enough_budget() {
    let config = SchedulerConfig {
        batching: BatchingOptions {
            max_num_seqs: 4,
            max_num_batched_tokens: 16,
            enable_chunked_prefill: false,
            policy: SchedulerPolicy::MaxUtilization,
            enable_prefix_caching: false,
            max_queue_size: None,
            queue_timeout: None,
        },
        block_size: 4,
        num_blocks: 16,
        max_model_len: 16,
    };
    let mut s = Scheduler::new(config).unwrap();
    s.add(SeqId(1), prompt(1, 10), 5).unwrap();
    s.add(SeqId(2), prompt(2, 10), 5).unwrap();
    s.add(SeqId(3), prompt(3, 2), 5).unwrap();
    // seq2 does not fit the 6 tokens left and is not chunked; FIFO keeps seq3 behind it.
    assert_eq!(summary(&step(&mut s, 1)), vec![(1, 0, 10, true)]);
    assert_eq!(
        summary(&step(&mut s, 1)),
        vec![(1, 10, 1, true), (2, 0, 10, true), (3, 0, 2, true)]
    );
}

#[test]
fn preemption_picks_the_newest_and_the_victim_recomputes_its_generated_tokens() {
    // 4 blocks of 4 slots. Three 4-token prompts take 3 blocks; each decode needs a new block.
    let mut s = Scheduler::new(cfg(4, 16, 4, 4)).unwrap();
    for id in 1..=3 {
        s.add(SeqId(id), prompt(id, 4), 3).unwrap();
    }
    let plan = step(&mut s, 70);
    assert_eq!(plan.seqs.len(), 3);
    assert_eq!(s.kv().num_free_blocks(), 1);

    // seq4 arrives; it must queue behind seq3 once seq3 is preempted.
    s.add(SeqId(4), prompt(4, 4), 1).unwrap();
    // seq1 takes the last free block; seq2 needs one, so the newest (seq3) is preempted, and
    // nothing is admitted in a step that preempted.
    let plan = step(&mut s, 71);
    assert_eq!(plan.preempted, vec![SeqId(3)]);
    assert_eq!(summary(&plan), vec![(1, 4, 1, true), (2, 4, 1, true)]);
    assert_eq!(s.num_computed_tokens(SeqId(3)), Some(0));
    assert_eq!(
        s.tokens(SeqId(3)).unwrap().len(),
        5,
        "generated tokens are kept"
    );
    assert_eq!(s.kv().block_table(SeqId(3)), &[] as &[BlockId]);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 2));

    // No blocks for seq3's 5 tokens (2 blocks) while seq1 and seq2 hold all 4.
    let plan = step(&mut s, 72);
    assert_eq!(summary(&plan), vec![(1, 5, 1, true), (2, 5, 1, true)]);
    assert!(plan.preempted.is_empty());
    // seq1 and seq2 reached prompt + max_tokens: they leave the running list and free their
    // blocks at once, while still waiting for the engine's remove.
    assert!(s.reached_cap(SeqId(1)) && s.reached_cap(SeqId(2)));
    assert_eq!(
        (s.num_running(), s.num_waiting(), s.num_capped()),
        (0, 2, 2)
    );
    assert_eq!(s.kv().num_free_blocks(), 4);
    assert!(s.remove(SeqId(1)) && s.remove(SeqId(2)));

    // seq3, at the front of the queue, recomputes prompt + its generated token from position 0;
    // seq4 comes after it.
    let plan = step(&mut s, 73);
    assert_eq!(summary(&plan), vec![(3, 0, 5, true), (4, 0, 4, true)]);
    assert!(s.reached_cap(SeqId(4)) && s.remove(SeqId(4)));
    let mut expected = prompt(3, 4);
    expected.push(70);
    assert_eq!(plan.seqs[0].token_ids, expected);
    assert_eq!(plan.seqs[0].block_table.len(), 2);
    let plan = step(&mut s, 74);
    assert_eq!(summary(&plan), vec![(3, 5, 1, true)]);
    assert!(s.reached_cap(SeqId(3)));
    assert_eq!(s.tokens(SeqId(3)).unwrap()[4..], [70, 73, 74]);
    assert!(!s.has_work());
    assert!(s.remove(SeqId(3)));
    assert_eq!(s.kv().num_free_blocks(), 4);
    assert_eq!(s.num_preemptions(), 1);
}

#[test]
fn a_sequence_that_is_itself_the_newest_is_preempted() {
    let mut s = Scheduler::new(cfg(4, 16, 4, 4)).unwrap();
    s.add(SeqId(1), prompt(1, 11), 10).unwrap(); // 3 blocks; its decode at position 11 fits
    s.add(SeqId(2), prompt(2, 4), 10).unwrap(); // 1 block; its decode at position 4 needs one
    assert_eq!(step(&mut s, 5).seqs.len(), 2);
    assert_eq!(s.kv().num_free_blocks(), 0);
    let plan = step(&mut s, 6);
    assert_eq!(plan.preempted, vec![SeqId(2)]);
    assert_eq!(summary(&plan), vec![(1, 11, 1, true)]);
    assert_eq!(s.kv().num_free_blocks(), 1);
    // seq1 now grows into a 4th block; seq2 waits until seq1 is removed.
    let plan = step(&mut s, 7);
    assert_eq!(summary(&plan), vec![(1, 12, 1, true)]);
    assert!(s.remove(SeqId(1)));
    let plan = step(&mut s, 8);
    assert_eq!(summary(&plan), vec![(2, 0, 5, true)]);
    assert_eq!(plan.seqs[0].token_ids[4], 5);
}

#[test]
fn remove_frees_blocks_at_once_in_any_state() {
    let mut s = Scheduler::new(cfg(4, 8, 4, 16)).unwrap();
    s.add(SeqId(1), prompt(1, 20), 10).unwrap();
    s.add(SeqId(2), prompt(2, 3), 10).unwrap();
    let plan = s.schedule();
    assert_eq!(summary(&plan), vec![(1, 0, 8, false)]);
    assert_eq!(s.kv().num_free_blocks(), 14);
    assert!(s.remove(SeqId(1)), "running");
    assert_eq!(s.kv().num_free_blocks(), 16);
    assert!(s.remove(SeqId(2)), "waiting");
    assert!(!s.remove(SeqId(2)), "already removed");
    assert!(!s.remove(SeqId(9)), "unknown");
    // A stale plan for removed sequences is ignored.
    s.update(&plan, &[(SeqId(1), 3)]);
    s.check_invariants().unwrap();
    assert!(!s.has_work());
    assert_eq!((s.num_running(), s.num_waiting()), (0, 0));
    assert!(s.schedule().is_empty());
    // The id can be reused afterwards; the stale plan does not apply to the new sequence.
    s.add(SeqId(1), prompt(1, 4), 2).unwrap();
    s.update(&plan, &[(SeqId(1), 3)]);
    assert_eq!(s.num_computed_tokens(SeqId(1)), Some(0));
    s.check_invariants().unwrap();
}

#[test]
fn add_rejects_impossible_requests_naming_the_bound() {
    let mut s = Scheduler::new(cfg(4, 8, 4, 16)).unwrap(); // max_model_len 64
    let err = s.add(SeqId(1), prompt(1, 64), 1).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("seq1") && msg.contains("64") && msg.contains("max_model_len (64)"),
        "{msg}"
    );
    assert!(matches!(
        s.add(SeqId(1), vec![], 1),
        Err(ScheduleError::EmptyPrompt { .. })
    ));
    let msg = s.add(SeqId(1), prompt(1, 3), 0).unwrap_err().to_string();
    assert!(msg.contains("max_tokens") && msg.contains(">= 1"), "{msg}");
    s.add(SeqId(1), prompt(1, 63), 1).unwrap();
    assert!(matches!(
        s.add(SeqId(1), prompt(1, 3), 1),
        Err(ScheduleError::DuplicateSeqId { .. })
    ));
    assert_eq!(s.num_waiting(), 1);
    let msg = Scheduler::new(SchedulerConfig {
        num_blocks: 3,
        max_model_len: 64,
        ..cfg(4, 8, 4, 16)
    })
    .unwrap_err()
    .to_string();
    assert!(msg.contains("num_blocks") && msg.contains(">= 16"), "{msg}");
}

#[test]
fn token_caps_stop_scheduling() {
    // max_tokens cap.
    let mut s = Scheduler::new(cfg(4, 8, 4, 16)).unwrap();
    s.add(SeqId(1), prompt(1, 3), 2).unwrap();
    assert!(step(&mut s, 1).seqs[0].sample);
    assert!(!s.reached_cap(SeqId(1)));
    step(&mut s, 2);
    assert!(s.reached_cap(SeqId(1)));
    assert_eq!(s.tokens(SeqId(1)).unwrap().len(), 5);
    assert!(s.schedule().is_empty());
    assert!(!s.has_work());
    // max_model_len cap (64 here) wins over a large max_tokens.
    assert_eq!(
        s.kv().num_free_blocks(),
        16,
        "a capped sequence holds no blocks"
    );
    assert_eq!((s.num_running(), s.num_capped()), (0, 1));
    assert!(s.remove(SeqId(1)));
    s.add(SeqId(2), prompt(2, 62), 1000).unwrap();
    for _ in 0..20 {
        step(&mut s, 3);
    }
    assert_eq!(s.tokens(SeqId(2)).unwrap().len(), 64);
    assert!(s.reached_cap(SeqId(2)));
    assert!(s.schedule().is_empty());
}

#[test]
fn a_missing_sampled_token_is_sampled_again_next_step() {
    let mut s = Scheduler::new(cfg(4, 8, 4, 16)).unwrap();
    s.add(SeqId(1), prompt(1, 3), 5).unwrap();
    let plan = s.schedule();
    s.update(&plan, &[]);
    s.check_invariants().unwrap();
    assert_eq!(s.num_computed_tokens(SeqId(1)), Some(2));
    let plan = s.schedule();
    assert_eq!(summary(&plan), vec![(1, 2, 1, true)]);
    // Tokens for sequences that were not sampled are ignored; the first of duplicates counts.
    s.update(&plan, &[(SeqId(1), 40), (SeqId(1), 41), (SeqId(7), 1)]);
    assert_eq!(s.tokens(SeqId(1)).unwrap()[3..], [40]);
}

#[test]
fn stale_plans_are_ignored() {
    let mut s = Scheduler::new(cfg(4, 8, 4, 16)).unwrap();
    s.add(SeqId(1), prompt(1, 12), 5).unwrap();
    let plan1 = step(&mut s, 1); // chunk 0..8
    let plan2 = step(&mut s, 2); // chunk 8..12, sampled
    assert_eq!(summary(&plan2), vec![(1, 8, 4, true)]);
    let tokens = s.tokens(SeqId(1)).unwrap().to_vec();
    for stale in [&plan1, &plan2] {
        s.update(stale, &[(SeqId(1), 9)]);
        s.check_invariants().unwrap();
        assert_eq!(s.num_computed_tokens(SeqId(1)), Some(12));
        assert_eq!(s.tokens(SeqId(1)).unwrap(), tokens.as_slice());
    }
}

#[test]
fn guaranteed_no_evict_admits_only_what_can_finish_and_never_preempts() {
    // The preemption scenario above, under GuaranteedNoEvict: 4 blocks of 4 slots, three
    // 4-token prompts with max_tokens 3 (7 tokens = 2 blocks each at the worst).
    let mut config = cfg(4, 16, 4, 4);
    config.batching.policy = SchedulerPolicy::GuaranteedNoEvict;
    let mut s = Scheduler::new(config).unwrap();
    for id in 1..=3 {
        s.add(SeqId(id), prompt(id, 4), 3).unwrap();
    }
    // Only two fit their worst case (2 + 2 blocks); seq3 waits although its prompt would fit.
    let plan = step(&mut s, 70);
    assert_eq!(summary(&plan), vec![(1, 0, 4, true), (2, 0, 4, true)]);
    assert_eq!(s.kv().num_free_blocks(), 2);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    // Both grow into their second block without preempting anyone, to the end.
    for token in 71..=72 {
        let plan = step(&mut s, token);
        assert!(plan.preempted.is_empty());
        assert_eq!(summary(&plan).len(), 2);
    }
    assert!(s.reached_cap(SeqId(1)) && s.reached_cap(SeqId(2)));
    assert!(s.remove(SeqId(1)) && s.remove(SeqId(2)));
    // Then seq3 runs alone to its cap.
    let plan = step(&mut s, 73);
    assert_eq!(summary(&plan), vec![(3, 0, 4, true)]);
    while s.has_work() {
        assert!(step(&mut s, 74).preempted.is_empty());
    }
    assert!(s.reached_cap(SeqId(3)) && s.remove(SeqId(3)));
    assert_eq!(s.num_preemptions(), 0);
    assert_eq!(s.kv().num_free_blocks(), 4);
}

#[test]
fn guaranteed_no_evict_counts_what_running_sequences_may_still_claim() {
    // 8 blocks of 4. seq1: 4-token prompt, max_tokens 12 -> 16 tokens = 4 blocks at the worst.
    // In step 2 seq1's decode takes its 2nd block (6 free, 2 still promised to seq1: 4
    // unpromised); seq2 (4 + 12 tokens, 4 blocks at the worst) is admitted and takes them all;
    // seq3 (1 block at the worst) finds none unpromised and waits.
    let mut config = cfg(4, 32, 4, 8);
    config.batching.policy = SchedulerPolicy::GuaranteedNoEvict;
    let mut s = Scheduler::new(config).unwrap();
    s.add(SeqId(1), prompt(1, 4), 12).unwrap();
    assert_eq!(summary(&step(&mut s, 1)), vec![(1, 0, 4, true)]);
    s.add(SeqId(2), prompt(2, 4), 12).unwrap();
    s.add(SeqId(3), prompt(3, 1), 1).unwrap();
    let plan = step(&mut s, 2);
    assert_eq!(summary(&plan), vec![(1, 4, 1, true), (2, 0, 4, true)]);
    assert_eq!(s.num_waiting(), 1, "seq3 waits: every block is promised");
    // Under MaxUtilization the same arrivals admit seq3 at once.
    let mut m = Scheduler::new(cfg(4, 32, 4, 8)).unwrap();
    m.add(SeqId(1), prompt(1, 4), 12).unwrap();
    step(&mut m, 1);
    m.add(SeqId(2), prompt(2, 4), 12).unwrap();
    m.add(SeqId(3), prompt(3, 1), 1).unwrap();
    assert_eq!(step(&mut m, 2).seqs.len(), 3);
}

#[test]
fn scheduler_policy_names_are_tensorrtllm_backends() {
    for (name, policy) in [
        ("max_utilization", SchedulerPolicy::MaxUtilization),
        ("Guaranteed_No_Evict", SchedulerPolicy::GuaranteedNoEvict),
    ] {
        assert_eq!(SchedulerPolicy::parse(name), Some(policy));
        assert_eq!(SchedulerPolicy::parse(policy.name()), Some(policy));
    }
    assert_eq!(SchedulerPolicy::parse("fcfs"), None);
    assert_eq!(SchedulerPolicy::default(), SchedulerPolicy::MaxUtilization);
}

#[test]
fn prefix_caching_starts_after_the_cached_prefix_and_counts_reused_tokens() {
    let mut config = cfg(4, 64, 4, 32);
    config.batching.enable_prefix_caching = true;
    let mut s = Scheduler::new(config).unwrap();
    let system = prompt(9, 12); // 3 blocks
    let with = |q: u32| [system.clone(), vec![q, q + 1]].concat();
    s.add(SeqId(1), with(500), 2).unwrap();
    assert_eq!(summary(&step(&mut s, 7)), vec![(1, 0, 14, true)]);
    // seq1's 3 system blocks are registered once computed: seq2 starts at position 12.
    s.add(SeqId(2), with(600), 2).unwrap();
    let plan = step(&mut s, 8);
    assert_eq!(summary(&plan), vec![(1, 14, 1, true), (2, 12, 2, true)]);
    assert_eq!(plan.seqs[1].block_table[..3], plan.seqs[0].block_table[..3]);
    assert_eq!(s.num_reused_tokens(), 12);
    assert_eq!(s.num_admitted_tokens(), 14 + 14);
    // A prompt that is exactly the cached blocks: its last token is computed again.
    s.add(SeqId(3), system.clone(), 1).unwrap();
    // (seq1 reached its cap last step; seq2 decodes.)
    assert_eq!(
        summary(&step(&mut s, 9)),
        vec![(2, 14, 1, true), (3, 8, 4, true)]
    );
}

#[test]
fn guaranteed_no_evict_charges_a_sequence_only_for_blocks_beyond_its_cached_prefix() {
    // 20 blocks of 4. Requests: a 32-token shared prefix (8 blocks) + 4 own tokens, 4 outputs
    // = 40 tokens = 10 blocks, 2 of them beyond the prefix. Once the prefix is cached, 6 fit
    // (8 shared + 6 x 2 = 20); charging each its full 10 blocks would admit only 1.
    let mut config = SchedulerConfig {
        max_model_len: 64,
        ..cfg(8, 64, 4, 20)
    };
    config.batching.enable_prefix_caching = true;
    config.batching.policy = SchedulerPolicy::GuaranteedNoEvict;
    let mut s = Scheduler::new(config).unwrap();
    let shared = prompt(7, 32);
    let request = |i: u32| [shared.clone(), vec![900 + i; 4]].concat();
    s.add(SeqId(100), request(100), 4).unwrap();
    while s.has_work() {
        let plan = step(&mut s, 1);
        if s.reached_cap(SeqId(100)) {
            s.remove(SeqId(100));
        }
        assert!(plan.preempted.is_empty());
    }
    for i in 0..6 {
        s.add(SeqId(i), request(i as u32), 4).unwrap();
    }
    let plan = step(&mut s, 1);
    assert_eq!(plan.seqs.len(), 6, "{:?}", summary(&plan));
    assert!(plan.seqs.iter().all(|q| q.start_pos == 32));
    // They run to their cap without preemption.
    while s.has_work() {
        assert!(step(&mut s, 1).preempted.is_empty());
        for i in 0..6 {
            if s.reached_cap(SeqId(i)) {
                s.remove(SeqId(i));
            }
        }
    }
}

mod priority;
