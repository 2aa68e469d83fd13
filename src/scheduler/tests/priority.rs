//! Priority order: higher levels first, FIFO within a level, the lowest level preempted first,
//! and a preempted sequence back at its own place.

use super::*;

/// Admits the head of the queue one step at a time (one seat; each request ends at its first
/// token) and returns the admission order.
fn admission_order(s: &mut Scheduler) -> Vec<u64> {
    let mut order = Vec::new();
    while s.has_work() {
        let plan = step(s, 9);
        for q in &plan.seqs {
            order.push(q.seq_id.0);
            assert!(s.reached_cap(q.seq_id) && s.remove(q.seq_id));
        }
    }
    order
}

#[test]
fn higher_priority_is_admitted_first_and_fifo_within_a_level() {
    let mut s = Scheduler::new(cfg(1, 16, 4, 64)).unwrap();
    for (id, priority) in [(1, 0), (2, 0), (3, 5), (4, 1), (5, 5), (6, -3), (7, 0)] {
        s.add_with_priority(SeqId(id), prompt(id, 3), 1, priority)
            .unwrap();
    }
    assert!(s.is_new(SeqId(6)));
    assert_eq!(admission_order(&mut s), vec![3, 5, 4, 1, 2, 7, 6]);

    // `add` is priority 0: plain FIFO among equals.
    let mut s = Scheduler::new(cfg(1, 16, 4, 64)).unwrap();
    for id in 1..=4 {
        s.add(SeqId(id), prompt(id, 3), 1).unwrap();
    }
    assert_eq!(admission_order(&mut s), vec![1, 2, 3, 4]);
}

#[test]
fn the_preemption_victim_is_the_lowest_priority_not_the_newest() {
    // 4 blocks of 4 slots; three 4-token prompts take 3 blocks, each decode needs a new one.
    let mut s = Scheduler::new(cfg(4, 16, 4, 4)).unwrap();
    s.add(SeqId(1), prompt(1, 4), 10).unwrap();
    s.add(SeqId(2), prompt(2, 4), 10).unwrap();
    s.add_with_priority(SeqId(3), prompt(3, 4), 10, 5).unwrap();
    assert_eq!(
        summary(&step(&mut s, 1)),
        vec![(3, 0, 4, true), (1, 0, 4, true), (2, 0, 4, true)],
        "the newest, of the higher level, is served first"
    );
    // seq3 takes the last free block; seq1 needs one: seq2 (lowest level, latest arrival) is
    // preempted, not seq3 (the newest).
    let plan = step(&mut s, 2);
    assert_eq!(plan.preempted, vec![SeqId(2)]);
    assert_eq!(summary(&plan), vec![(3, 4, 1, true), (1, 4, 1, true)]);
    assert!(!s.is_new(SeqId(2)), "a preempted sequence is not new");
}

#[test]
fn a_preempted_sequence_keeps_its_place_among_its_level() {
    let mut s = Scheduler::new(cfg(4, 16, 4, 4)).unwrap();
    for id in 1..=3 {
        s.add(SeqId(id), prompt(id, 4), 3).unwrap();
    }
    assert_eq!(step(&mut s, 1).seqs.len(), 3);
    // Arrivals while they run: seq4 at seq3's level, seq5 above it.
    s.add(SeqId(4), prompt(4, 4), 1).unwrap();
    s.add_with_priority(SeqId(5), prompt(5, 4), 1, 1).unwrap();
    assert!(s.is_new(SeqId(4)) && s.is_new(SeqId(5)));
    let plan = step(&mut s, 2);
    assert_eq!(plan.preempted, vec![SeqId(3)]);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 3));
    assert!(s.remove(SeqId(1)) && s.remove(SeqId(2)));
    // seq5 (higher level) first; seq3 keeps its arrival place ahead of seq4 within level 0.
    let plan = step(&mut s, 3);
    assert_eq!(
        summary(&plan),
        vec![(5, 0, 4, true), (3, 0, 5, true), (4, 0, 4, true)]
    );
    assert!(!s.is_new(SeqId(3)) && !s.is_new(SeqId(5)));
}
