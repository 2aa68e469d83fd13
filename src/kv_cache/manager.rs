//! `KvCacheManager`: per-sequence block tables over one `BlockPool`. It maps a sequence's token
//! positions to physical cache slots and grows tables on demand; the scheduler sees only
//! success or failure of `allocate_slots`. It never decides who gets evicted (that is the
//! scheduler's policy) and never touches device memory.
//!
//! Slot arithmetic (block_size = 4, block_table = [7, 2, 5]):
//!
//! ```text
//! position p:     0  1  2  3 | 4  5  6  7 | 8  9
//! p / block_size: 0          | 1          | 2
//! block:          7          | 2          | 5
//! slot:          28 29 30 31 | 8  9 10 11 |20 21
//!
//! slot(p) = block_table[p / block_size] * block_size + p % block_size
//! ```
//!
//! The device K/V arrays are `[num_blocks * block_size, num_kv_heads, head_dim]` per layer, so a
//! slot indexes their first dimension.

use std::collections::HashMap;

use super::KvCacheError;
use super::block_pool::{BlockId, BlockPool};
use crate::request::SeqId;

#[derive(Debug, Clone)]
pub struct KvCacheManager {
    pool: BlockPool,
    /// Token positions per block.
    block_size: usize,
    /// Blocks of each sequence in position order; a sequence without blocks has no entry.
    tables: HashMap<SeqId, Vec<BlockId>>,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self, KvCacheError> {
        if block_size == 0 {
            return Err(KvCacheError::InvalidConfig {
                field: "block_size",
                value: block_size,
                bound: "must be >= 1".into(),
            });
        }
        Ok(KvCacheManager {
            pool: BlockPool::new(num_blocks)?,
            block_size,
            tables: HashMap::new(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Blocks needed to hold `num_tokens` token positions: `ceil(num_tokens / block_size)`.
    pub fn num_blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Grows `seq_id`'s table so it covers positions `0 .. num_total_tokens`. Returns false, with
    /// nothing changed, when the pool has too few free blocks. Never shrinks a table.
    pub fn allocate_slots(&mut self, seq_id: SeqId, num_total_tokens: usize) -> bool {
        let num_needed = self.num_blocks_for(num_total_tokens);
        let num_held = self.tables.get(&seq_id).map_or(0, Vec::len);
        if num_needed <= num_held {
            return true;
        }
        match self.pool.allocate(num_needed - num_held) {
            Some(new_blocks) => {
                self.tables.entry(seq_id).or_default().extend(new_blocks);
                true
            }
            None => false,
        }
    }

    /// Releases every block of `seq_id`. Returns the number of blocks released (0 if it held
    /// none or is unknown).
    pub fn free(&mut self, seq_id: SeqId) -> usize {
        let Some(table) = self.tables.remove(&seq_id) else {
            return 0;
        };
        // Each table entry is one reference this manager took from the pool and is dropped
        // exactly once here, so the pool cannot report a double free; if that invariant were
        // ever broken the pool stays unchanged and `check_invariants` reports the mismatch.
        let freed = self.pool.free(&table);
        debug_assert!(freed.is_ok(), "{seq_id}: {freed:?}");
        table.len()
    }

    /// The blocks of `seq_id` in position order (empty if it holds none).
    pub fn block_table(&self, seq_id: SeqId) -> &[BlockId] {
        self.tables.get(&seq_id).map_or(&[], Vec::as_slice)
    }

    /// Physical cache slot of token position `pos` of `seq_id` (see the module diagram), or None
    /// when the sequence's table does not cover `pos`.
    pub fn slot(&self, seq_id: SeqId, pos: usize) -> Option<usize> {
        let block = self.block_table(seq_id).get(pos / self.block_size)?;
        Some(block.idx() * self.block_size + pos % self.block_size)
    }

    /// Sequences currently holding blocks, with their tables (unordered).
    pub fn tables(&self) -> impl Iterator<Item = (SeqId, &[BlockId])> {
        self.tables
            .iter()
            .map(|(&seq_id, t)| (seq_id, t.as_slice()))
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Checks the pool and that every block's ref count equals the number of times tables list
    /// it (no sharing is done yet, so that is at most once), and free + used == total.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants()?;
        let mut num_refs = vec![0u32; self.pool.num_blocks()];
        for (seq_id, table) in self.tables() {
            if table.is_empty() {
                return Err(format!("{seq_id} has an empty block table entry"));
            }
            for b in table {
                let Some(n) = num_refs.get_mut(b.idx()) else {
                    return Err(format!("{seq_id} holds {b}, out of range"));
                };
                *n += 1;
            }
        }
        let mut num_used = 0;
        for (b_idx, &n) in num_refs.iter().enumerate() {
            let rc = self.pool.ref_count(BlockId(b_idx as u32)).unwrap_or(0);
            if rc != n {
                return Err(format!(
                    "block{b_idx}: ref count {rc}, but listed {n} times in block tables"
                ));
            }
            if n > 1 {
                return Err(format!(
                    "block{b_idx} is owned by {n} sequences (no sharing is enabled)"
                ));
            }
            num_used += usize::from(n > 0);
        }
        if num_used + self.pool.num_free() != self.pool.num_blocks() {
            return Err(format!(
                "used {num_used} + free {} != total {} blocks",
                self.pool.num_free(),
                self.pool.num_blocks()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn slot_arithmetic_matches_the_diagram() {
        let mut kv = KvCacheManager::new(8, 4).unwrap();
        let seq = SeqId(1);
        // Give the sequence non-contiguous blocks: another sequence takes all 8 (0..8 in order),
        // then releases 7, 2 and 5, which the free list hands out in that order.
        let other = SeqId(2);
        assert!(kv.allocate_slots(other, 32));
        kv.pool.free(&[BlockId(7), BlockId(2), BlockId(5)]).unwrap();
        kv.tables
            .get_mut(&other)
            .unwrap()
            .retain(|b| ![7, 2, 5].contains(&b.0));
        assert!(kv.allocate_slots(seq, 10));
        assert_eq!(kv.block_table(seq), &[BlockId(7), BlockId(2), BlockId(5)]);
        let slots: Vec<usize> = (0..10).map(|p| kv.slot(seq, p).unwrap()).collect();
        assert_eq!(slots, vec![28, 29, 30, 31, 8, 9, 10, 11, 20, 21]);
        // Position 12 needs a 4th block, which the sequence does not have.
        assert_eq!(kv.slot(seq, 12), None);
        assert_eq!(kv.slot(SeqId(99), 0), None);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn tables_grow_by_ceil_and_never_shrink() {
        let mut kv = KvCacheManager::new(10, 16).unwrap();
        let seq = SeqId(3);
        assert!(kv.allocate_slots(seq, 0));
        assert!(kv.block_table(seq).is_empty());
        assert!(kv.allocate_slots(seq, 1));
        assert_eq!(kv.block_table(seq).len(), 1);
        assert!(kv.allocate_slots(seq, 16));
        assert_eq!(kv.block_table(seq).len(), 1);
        assert!(kv.allocate_slots(seq, 17));
        assert_eq!(kv.block_table(seq).len(), 2);
        let first_two = kv.block_table(seq).to_vec();
        assert!(kv.allocate_slots(seq, 5));
        assert_eq!(
            kv.block_table(seq),
            first_two.as_slice(),
            "smaller request keeps the table"
        );
        assert!(kv.allocate_slots(seq, 33));
        assert_eq!(
            &kv.block_table(seq)[..2],
            first_two.as_slice(),
            "growth appends"
        );
        assert_eq!(kv.num_free_blocks(), 7);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn failed_growth_changes_nothing() {
        let mut kv = KvCacheManager::new(4, 2).unwrap();
        assert!(kv.allocate_slots(SeqId(1), 5)); // 3 blocks
        let before = kv.block_table(SeqId(1)).to_vec();
        assert!(!kv.allocate_slots(SeqId(1), 9)); // needs 5 > 4 total
        assert_eq!(kv.block_table(SeqId(1)), before.as_slice());
        assert!(!kv.allocate_slots(SeqId(2), 3)); // needs 2, 1 free
        assert!(kv.block_table(SeqId(2)).is_empty());
        assert_eq!(
            kv.tables().count(),
            1,
            "no empty entry for a failed new sequence"
        );
        assert_eq!(kv.num_free_blocks(), 1);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn free_releases_all_blocks_of_one_sequence() {
        let mut kv = KvCacheManager::new(6, 4).unwrap();
        assert!(kv.allocate_slots(SeqId(1), 9));
        assert!(kv.allocate_slots(SeqId(2), 8));
        assert_eq!(kv.num_free_blocks(), 1);
        assert_eq!(kv.free(SeqId(1)), 3);
        assert_eq!(kv.num_free_blocks(), 4);
        assert!(kv.block_table(SeqId(1)).is_empty());
        assert_eq!(kv.block_table(SeqId(2)).len(), 2);
        assert_eq!(kv.free(SeqId(1)), 0, "second free is a no-op");
        assert_eq!(kv.free(SeqId(42)), 0);
        kv.check_invariants().unwrap();
        assert!(kv.allocate_slots(SeqId(1), 16));
        assert_eq!(kv.num_free_blocks(), 0);
    }

    #[test]
    fn invariant_check_detects_a_block_in_two_tables() {
        let mut kv = KvCacheManager::new(4, 4).unwrap();
        assert!(kv.allocate_slots(SeqId(1), 4));
        let stolen = kv.block_table(SeqId(1)).to_vec();
        kv.tables.insert(SeqId(2), stolen);
        let err = kv.check_invariants().unwrap_err();
        assert!(err.contains("listed 2 times"), "{err}");
    }

    #[test]
    fn zero_block_size_is_rejected() {
        let err = KvCacheManager::new(4, 0).unwrap_err();
        assert!(err.to_string().contains("block_size"), "{err}");
    }
}
