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
//!
//! With prefix caching on (`with_prefix_caching`), full computed blocks are registered in a
//! `PrefixCache` (`register_computed`) and a new sequence starts from the longest registered
//! prefix of its tokens (`match_prefix`), sharing those blocks. Shared blocks are always full
//! and computed, so no sequence ever writes into a block another one reads. Blocks only the
//! cache still references are evictable: `num_free_blocks` counts them and `allocate_slots`
//! reclaims them (least recently released first) before it reports failure.

use std::collections::HashMap;

use super::KvCacheError;
use super::block_pool::{BlockId, BlockPool};
use super::prefix_cache::{PrefixCache, ROOT};
use crate::request::SeqId;

/// Per-sequence block tables over one `BlockPool`, plus the prefix cache when it is on: hands
/// out blocks (`allocate_slots`), maps token positions to cache slots (`slot`) and frees a
/// sequence's blocks (`free`). Owned by the scheduler; pure CPU.
#[derive(Debug, Clone)]
pub struct KvCacheManager {
    pool: BlockPool,
    /// Token positions per block.
    block_size: usize,
    /// Blocks of each sequence in position order; a sequence without blocks has no entry.
    tables: HashMap<SeqId, Vec<BlockId>>,
    /// Present when prefix caching is on.
    prefix: Option<PrefixState>,
}

#[derive(Debug, Clone)]
struct PrefixState {
    cache: PrefixCache,
    /// Per sequence: how many leading blocks of its table are registered (or were found
    /// registered), and the content id of the last of them.
    progress: HashMap<SeqId, Registered>,
}

#[derive(Debug, Clone, Copy)]
struct Registered {
    num_blocks: usize,
    last_content_id: u64,
}

impl KvCacheManager {
    /// A manager over `num_blocks` blocks of `block_size` token slots each, all free, prefix
    /// caching off. Fails when `block_size` is 0 or `num_blocks` does not fit a u32 block id.
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
            prefix: None,
        })
    }

    /// Turns prefix caching on (`enable_kv_cache_reuse`) or off; call before any allocation.
    pub fn with_prefix_caching(mut self, enable: bool) -> Self {
        self.prefix = enable.then(|| PrefixState {
            cache: PrefixCache::new(),
            progress: HashMap::new(),
        });
        self
    }

    /// Whether prefix caching is on (`with_prefix_caching(true)`).
    pub fn prefix_caching(&self) -> bool {
        self.prefix.is_some()
    }

    /// Blocks registered for reuse (in use or evictable); 0 when prefix caching is off.
    pub fn num_cached_blocks(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.cache.num_cached())
    }

    /// Registered blocks no sequence references (counted as free).
    pub fn num_evictable_blocks(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.cache.num_evictable())
    }

    /// Token positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool (the cache's capacity is `num_blocks() * block_size()` tokens).
    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    /// Blocks a sequence can get: free in the pool plus evictable cached ones.
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free() + self.num_evictable_blocks()
    }

    /// Blocks held by sequences (`num_blocks() - num_free_blocks()`).
    pub fn num_used_blocks(&self) -> usize {
        self.num_blocks() - self.num_free_blocks()
    }

    /// Blocks needed to hold `num_tokens` token positions: `ceil(num_tokens / block_size)`.
    pub fn num_blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Grows `seq_id`'s table so it covers positions `0 .. num_total_tokens`. Returns false, with
    /// nothing changed, when too few blocks are free (evictable cached blocks count as free and
    /// are reclaimed, oldest release first, only when the pool alone is short). Never shrinks a
    /// table.
    pub fn allocate_slots(&mut self, seq_id: SeqId, num_total_tokens: usize) -> bool {
        let num_needed = self.num_blocks_for(num_total_tokens);
        let num_held = self.tables.get(&seq_id).map_or(0, Vec::len);
        if num_needed <= num_held {
            return true;
        }
        let num_new = num_needed - num_held;
        if num_new > self.num_free_blocks() {
            return false;
        }
        while self.pool.num_free() < num_new {
            let Some(p) = &mut self.prefix else { break };
            let Some(block) = p.cache.evict_oldest() else {
                break;
            };
            // The cache's own reference: the block goes back to the pool's free list.
            let dropped = self.pool.free(&[block]);
            debug_assert!(dropped.is_ok(), "{block}: {dropped:?}");
        }
        match self.pool.allocate(num_new) {
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
        if let Some(p) = &mut self.prefix {
            p.progress.remove(&seq_id);
            // Registered blocks left with only the cache's reference become evictable, last
            // block first: a prefix's tail is then evicted before its head (a head is useful
            // without its tail, never the reverse).
            for &b in table.iter().rev() {
                if p.cache.contains_block(b) && self.pool.ref_count(b) == Some(1) {
                    p.cache.mark_evictable(b);
                }
            }
        }
        table.len()
    }

    /// Prefix caching: gives `seq_id`, which holds no blocks yet, the longest run of registered
    /// blocks that `tokens` starts with, shared, and returns the number of tokens they cover (a
    /// multiple of block_size, at most `tokens.len() - 1`: the last token is always computed,
    /// since its logits are needed). 0 when caching is off, nothing matches, or the sequence
    /// already holds blocks. Undo with `free`.
    pub fn match_prefix(&mut self, seq_id: SeqId, tokens: &[u32]) -> usize {
        let Some(p) = &mut self.prefix else {
            return 0;
        };
        if self.tables.contains_key(&seq_id) || tokens.is_empty() {
            return 0;
        }
        let max_blocks = (tokens.len() - 1) / self.block_size;
        let mut blocks = Vec::new();
        let mut parent = ROOT;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let Some((block, content_id)) = p.cache.lookup(parent, chunk) else {
                break;
            };
            blocks.push(block);
            parent = content_id;
        }
        if blocks.is_empty() {
            return 0;
        }
        // Registered blocks are never free in the pool (the cache holds a reference).
        if self.pool.share(&blocks).is_err() {
            debug_assert!(false, "{seq_id}: registered blocks not allocated");
            return 0;
        }
        for &b in &blocks {
            p.cache.unmark_evictable(b);
        }
        let num_blocks = blocks.len();
        p.progress.insert(
            seq_id,
            Registered {
                num_blocks,
                last_content_id: parent,
            },
        );
        self.tables.insert(seq_id, blocks);
        num_blocks * self.block_size
    }

    /// Prefix caching: registers every full block of `seq_id` whose positions are all computed
    /// (`num_computed` of `tokens`) and not registered yet. When the same content is already
    /// registered (another sequence computed the same prefix in the same steps), the sequence
    /// switches to the registered block and its own copy is freed: one copy stays, shared, and
    /// the chain continues through it. Call only between steps (the swapped block's K/V are
    /// final, nothing writes it again). No-op when caching is off.
    pub fn register_computed(&mut self, seq_id: SeqId, tokens: &[u32], num_computed: usize) {
        let Some(p) = &mut self.prefix else {
            return;
        };
        let Some(table) = self.tables.get_mut(&seq_id) else {
            return;
        };
        let bs = self.block_size;
        let reg = p.progress.entry(seq_id).or_insert(Registered {
            num_blocks: 0,
            last_content_id: ROOT,
        });
        let num_full = num_computed.min(tokens.len()) / bs;
        while reg.num_blocks < num_full.min(table.len()) {
            let i = reg.num_blocks;
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let own = table[i];
            let content_id = match p.cache.lookup(reg.last_content_id, chunk) {
                Some((registered, content_id)) if registered != own => {
                    // Take a reference on the registered copy before dropping ours.
                    if self.pool.share(&[registered]).is_err() {
                        debug_assert!(false, "{registered} registered but not allocated");
                        return;
                    }
                    p.cache.unmark_evictable(registered);
                    let dropped = self.pool.free(&[own]);
                    debug_assert!(dropped.is_ok(), "{seq_id}: {own}: {dropped:?}");
                    table[i] = registered;
                    content_id
                }
                Some((_, content_id)) => content_id,
                None => {
                    if self.pool.share(&[own]).is_err() {
                        debug_assert!(false, "{seq_id}: {own} in a table but not allocated");
                        return;
                    }
                    p.cache.insert(reg.last_content_id, chunk, own)
                }
            };
            reg.last_content_id = content_id;
            reg.num_blocks += 1;
        }
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

    /// The underlying pool, for statistics and invariant checks.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Checks the pool and that every block's ref count equals the number of times tables list
    /// it plus one if the prefix cache registered it; that only registered blocks are listed by
    /// more than one table; that the evictable blocks are exactly the registered ones no table
    /// lists; and free + used == total.
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
        let mut cached = vec![false; self.pool.num_blocks()];
        if let Some(p) = &self.prefix {
            p.cache.check_invariants()?;
            for b in p.cache.blocks() {
                let Some(c) = cached.get_mut(b.idx()) else {
                    return Err(format!("prefix cache holds {b}, out of range"));
                };
                *c = true;
            }
            for b in p.cache.evictable_blocks() {
                if num_refs[b.idx()] != 0 {
                    return Err(format!("{b} is evictable but in a block table"));
                }
            }
        }
        let mut num_used = 0;
        for (b_idx, &n) in num_refs.iter().enumerate() {
            let b = BlockId(b_idx as u32);
            let rc = self.pool.ref_count(b).unwrap_or(0);
            let want = n + u32::from(cached[b_idx]);
            if rc != want {
                return Err(format!(
                    "block{b_idx}: ref count {rc}, but listed {n} times in block tables{}",
                    if cached[b_idx] { " and cached" } else { "" }
                ));
            }
            if n > 1 && !cached[b_idx] {
                return Err(format!(
                    "block{b_idx} is owned by {n} sequences but not a cached (shareable) block"
                ));
            }
            if cached[b_idx] && n == 0 {
                let evictable = self
                    .prefix
                    .as_ref()
                    .is_some_and(|p| p.cache.is_evictable(b));
                if !evictable {
                    return Err(format!(
                        "block{b_idx} is cached, unreferenced, not evictable"
                    ));
                }
            }
            num_used += usize::from(rc > 0);
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

    /// Starts `seq` from its cached prefix, allocates `tokens.len()` slots, marks them all
    /// computed and registers them.
    fn compute(kv: &mut KvCacheManager, seq: SeqId, tokens: &[u32]) {
        kv.match_prefix(seq, tokens);
        assert!(kv.allocate_slots(seq, tokens.len()));
        kv.register_computed(seq, tokens, tokens.len());
        kv.check_invariants().unwrap();
    }

    #[test]
    fn prefix_caching_shares_full_computed_blocks_and_leaves_the_last_token() {
        let mut kv = KvCacheManager::new(16, 4)
            .unwrap()
            .with_prefix_caching(true);
        let a: Vec<u32> = (0..10).collect(); // blocks [0..4) [4..8) and a partial [8..10)
        compute(&mut kv, SeqId(1), &a);
        assert_eq!(kv.num_cached_blocks(), 2, "only full blocks are registered");
        // Same first 9 tokens: 2 blocks shared; the 3rd block is partial in `a`.
        let b: Vec<u32> = (0..9).chain([99, 98]).collect();
        assert_eq!(kv.match_prefix(SeqId(2), &b), 8);
        assert_eq!(kv.block_table(SeqId(2)), &kv.block_table(SeqId(1))[..2]);
        assert!(kv.allocate_slots(SeqId(2), b.len()));
        assert_ne!(kv.block_table(SeqId(2))[2], kv.block_table(SeqId(1))[2]);
        kv.check_invariants().unwrap();
        // Exactly 8 tokens: the last must be computed, so only the first block is reused.
        assert_eq!(kv.match_prefix(SeqId(3), &a[..8]), 4);
        // A different first block matches nothing, even with equal later blocks.
        let c: Vec<u32> = [50, 1, 2, 3].into_iter().chain(4..10).collect();
        assert_eq!(kv.match_prefix(SeqId(4), &c), 0);
        assert!(kv.block_table(SeqId(4)).is_empty());
        // A sequence that already holds blocks is not matched again.
        assert_eq!(kv.match_prefix(SeqId(2), &b), 0);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn freed_cached_blocks_count_as_free_and_are_reused_or_evicted_tail_first() {
        let mut kv = KvCacheManager::new(4, 2).unwrap().with_prefix_caching(true);
        let a = [1, 2, 3, 4, 5, 6, 7];
        compute(&mut kv, SeqId(1), &a); // 4 blocks, 3 full ones registered
        assert_eq!(kv.num_free_blocks(), 0);
        assert_eq!(kv.free(SeqId(1)), 4);
        assert_eq!(kv.num_cached_blocks(), 3);
        assert_eq!(kv.num_evictable_blocks(), 3);
        assert_eq!(kv.num_free_blocks(), 4, "evictable blocks count as free");
        assert_eq!(kv.num_used_blocks(), 0);
        kv.check_invariants().unwrap();
        // The same prompt again: 3 blocks back from the cache (6 tokens), 1 new.
        assert_eq!(kv.match_prefix(SeqId(2), &a), 6);
        assert_eq!(kv.num_evictable_blocks(), 0);
        assert!(kv.allocate_slots(SeqId(2), a.len()));
        kv.check_invariants().unwrap();
        kv.free(SeqId(2));
        // Another prompt needing 3 blocks: the pool has 1 free, so 2 cached blocks are evicted,
        // the tail ones first ([5, 6], then [3, 4]); the head [1, 2] survives.
        assert!(kv.allocate_slots(SeqId(3), 6));
        assert_eq!(kv.num_cached_blocks(), 1);
        kv.check_invariants().unwrap();
        kv.free(SeqId(3));
        assert_eq!(kv.match_prefix(SeqId(4), &a), 2);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn allocation_fails_unchanged_when_free_plus_evictable_is_short() {
        let mut kv = KvCacheManager::new(3, 2).unwrap().with_prefix_caching(true);
        compute(&mut kv, SeqId(1), &[1, 2, 3]); // 2 blocks, 1 registered
        kv.free(SeqId(1));
        assert!(kv.allocate_slots(SeqId(2), 2)); // 1 block: from the pool, cache untouched
        assert_eq!(kv.num_cached_blocks(), 1);
        assert!(
            !kv.allocate_slots(SeqId(3), 6),
            "needs 3, 2 free (1 evictable)"
        );
        assert_eq!(
            kv.num_cached_blocks(),
            1,
            "a failed allocation evicts nothing"
        );
        kv.check_invariants().unwrap();
    }

    #[test]
    fn concurrent_equal_prefixes_end_up_sharing_one_copy() {
        let mut kv = KvCacheManager::new(8, 2).unwrap().with_prefix_caching(true);
        let t = [1, 2, 3, 4, 5];
        // Both admitted before either registered: both compute their own copies (3 blocks each).
        assert!(kv.allocate_slots(SeqId(1), 5));
        assert!(kv.allocate_slots(SeqId(2), 5));
        assert_eq!(kv.num_free_blocks(), 2);
        kv.register_computed(SeqId(1), &t, 5);
        kv.register_computed(SeqId(2), &t, 5);
        assert_eq!(kv.num_cached_blocks(), 2);
        // The second switched to the registered copies and freed its own two full blocks.
        assert_eq!(kv.block_table(SeqId(2))[..2], kv.block_table(SeqId(1))[..2]);
        assert_ne!(kv.block_table(SeqId(2))[2], kv.block_table(SeqId(1))[2]);
        assert_eq!(kv.num_free_blocks(), 4);
        kv.check_invariants().unwrap();
        // Registration is incremental: nothing new for fewer computed tokens.
        kv.register_computed(SeqId(1), &t, 3);
        assert_eq!(kv.num_cached_blocks(), 2);
        // The first finishing leaves the copy in use by the second, not evictable.
        kv.free(SeqId(1));
        assert_eq!(kv.num_evictable_blocks(), 0);
        kv.check_invariants().unwrap();
        kv.free(SeqId(2));
        assert_eq!(kv.num_free_blocks(), 8);
        assert_eq!(kv.match_prefix(SeqId(3), &t), 4);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn prefix_caching_off_matches_and_registers_nothing() {
        let mut kv = KvCacheManager::new(4, 2).unwrap();
        assert!(!kv.prefix_caching());
        assert!(kv.allocate_slots(SeqId(1), 4));
        kv.register_computed(SeqId(1), &[1, 2, 3, 4], 4);
        kv.free(SeqId(1));
        assert_eq!(kv.match_prefix(SeqId(2), &[1, 2, 3, 4, 5]), 0);
        assert_eq!(kv.num_cached_blocks(), 0);
        assert_eq!(kv.num_free_blocks(), 4);
        kv.check_invariants().unwrap();
    }

    #[test]
    fn zero_block_size_is_rejected() {
        let err = KvCacheManager::new(4, 0).unwrap_err();
        assert!(err.to_string().contains("block_size"), "{err}");
    }
}
