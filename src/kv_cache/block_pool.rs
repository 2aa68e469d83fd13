//! `BlockPool`: the physical KV-cache blocks as plain numbers. It owns the free list and one
//! reference count per block; a block returns to the free list only when its count drops to 0
//! (so a block can later be shared by several sequences, e.g. for prefix caching).
//! It knows nothing about sequences, tokens or device memory, and never panics on a bad id: a
//! double free or an out-of-range id is an error and leaves the pool unchanged.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use super::KvCacheError;

/// Index of one physical KV-cache block: block `b` holds token slots
/// `b * block_size .. (b + 1) * block_size` of the device's K/V arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The block's index as a `usize` (for slot arithmetic and indexing).
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block{}", self.0)
    }
}

/// Free list plus reference counts over `num_blocks` blocks.
#[derive(Debug, Clone)]
pub struct BlockPool {
    /// `ref_counts[b]`: how many owners block `b` has; 0 means it is on the free list.
    ref_counts: Vec<u32>,
    /// Blocks with ref count 0. Allocation takes from the front, freeing appends at the back, so
    /// the most recently freed blocks are reused last (room for prefix-cache hits later).
    free_list: VecDeque<BlockId>,
}

impl BlockPool {
    /// A pool with every block free. `num_blocks` must fit a `u32` block id.
    pub fn new(num_blocks: usize) -> Result<Self, KvCacheError> {
        let max_blocks = u32::MAX as usize;
        if num_blocks > max_blocks {
            return Err(KvCacheError::InvalidConfig {
                field: "num_blocks",
                value: num_blocks,
                bound: format!("must be <= {max_blocks} (block ids are u32)"),
            });
        }
        let free_list = (0..num_blocks).map(|b| BlockId(b as u32)).collect();
        Ok(BlockPool {
            ref_counts: vec![0; num_blocks],
            free_list,
        })
    }

    /// Blocks in the pool, free or not (fixed at construction).
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks on the free list (ref count 0).
    pub fn num_free(&self) -> usize {
        self.free_list.len()
    }

    /// Number of blocks with at least one owner (`num_blocks() - num_free()`).
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Reference count of `block_id`, or None when it is out of range.
    pub fn ref_count(&self, block_id: BlockId) -> Option<u32> {
        self.ref_counts.get(block_id.idx()).copied()
    }

    /// Takes `num_blocks` free blocks, each with ref count 1. All or nothing: returns None (and
    /// changes nothing) when fewer are free.
    pub fn allocate(&mut self, num_blocks: usize) -> Option<Vec<BlockId>> {
        if num_blocks > self.free_list.len() {
            return None;
        }
        let blocks: Vec<BlockId> = self.free_list.drain(..num_blocks).collect();
        for b in &blocks {
            self.ref_counts[b.idx()] = 1;
        }
        Some(blocks)
    }

    /// Adds one owner to each block (sharing). Every block must currently be in use; on error
    /// nothing changes.
    pub fn share(&mut self, block_ids: &[BlockId]) -> Result<(), KvCacheError> {
        for &b in block_ids {
            match self.ref_counts.get(b.idx()) {
                None => return Err(self.out_of_range(b)),
                Some(0) => return Err(KvCacheError::NotAllocated { block_id: b }),
                Some(_) => {}
            }
        }
        for b in block_ids {
            self.ref_counts[b.idx()] += 1;
        }
        Ok(())
    }

    /// Drops one owner of each listed block (a block listed twice loses two owners); blocks
    /// reaching 0 go back to the free list. Validated first, so a double free or a bad id is an
    /// error that leaves the pool unchanged.
    pub fn free(&mut self, block_ids: &[BlockId]) -> Result<(), KvCacheError> {
        let mut num_drops: HashMap<BlockId, u32> = HashMap::with_capacity(block_ids.len());
        for &b in block_ids {
            let ref_count = self.ref_count(b).ok_or_else(|| self.out_of_range(b))?;
            let drops = num_drops.entry(b).or_insert(0);
            *drops += 1;
            if *drops > ref_count {
                return Err(KvCacheError::DoubleFree {
                    block_id: b,
                    ref_count,
                });
            }
        }
        for &b in block_ids {
            let rc = &mut self.ref_counts[b.idx()];
            *rc -= 1;
            if *rc == 0 {
                self.free_list.push_back(b);
            }
        }
        Ok(())
    }

    /// Checks that the free list holds exactly the blocks with ref count 0, each once.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut on_free_list = vec![false; self.num_blocks()];
        for &b in &self.free_list {
            let Some(seen) = on_free_list.get_mut(b.idx()) else {
                return Err(format!(
                    "free list holds {b}, out of range ({} blocks)",
                    self.num_blocks()
                ));
            };
            if *seen {
                return Err(format!("{b} is on the free list twice"));
            }
            *seen = true;
        }
        for (b_idx, (&rc, &free)) in self.ref_counts.iter().zip(&on_free_list).enumerate() {
            if (rc == 0) != free {
                return Err(format!(
                    "block{b_idx}: ref count {rc} but on free list: {free}"
                ));
            }
        }
        Ok(())
    }

    fn out_of_range(&self, block_id: BlockId) -> KvCacheError {
        KvCacheError::BlockOutOfRange {
            block_id,
            num_blocks: self.num_blocks(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut pool = BlockPool::new(4).unwrap();
        let a = pool.allocate(3).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(pool.num_free(), 1);
        assert!(pool.allocate(2).is_none());
        assert_eq!(
            pool.num_free(),
            1,
            "a failed allocation must not take blocks"
        );
        let b = pool.allocate(1).unwrap();
        assert!(!a.contains(&b[0]));
        assert_eq!(pool.num_free(), 0);
        assert_eq!(pool.allocate(0).unwrap(), Vec::<BlockId>::new());
        pool.check_invariants().unwrap();
    }

    #[test]
    fn free_returns_blocks_and_they_are_reused() {
        let mut pool = BlockPool::new(2).unwrap();
        let a = pool.allocate(2).unwrap();
        pool.free(&a).unwrap();
        assert_eq!(pool.num_free(), 2);
        assert_eq!(pool.num_used(), 0);
        let again = pool.allocate(2).unwrap();
        let mut sorted = again.clone();
        sorted.sort();
        assert_eq!(sorted, vec![BlockId(0), BlockId(1)]);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn double_free_is_an_error_and_changes_nothing() {
        let mut pool = BlockPool::new(3).unwrap();
        let a = pool.allocate(2).unwrap();
        pool.free(&a[..1]).unwrap();
        let err = pool.free(&a).unwrap_err();
        assert!(
            matches!(err, KvCacheError::DoubleFree { block_id, ref_count: 0 } if block_id == a[0])
        );
        assert_eq!(
            pool.ref_count(a[1]),
            Some(1),
            "the valid block in the failed call stays owned"
        );
        assert_eq!(pool.num_free(), 2);
        // The same block twice in one call while it has a single owner.
        let err = pool.free(&[a[1], a[1]]).unwrap_err();
        assert!(matches!(err, KvCacheError::DoubleFree { ref_count: 1, .. }));
        assert_eq!(pool.ref_count(a[1]), Some(1));
        pool.check_invariants().unwrap();
    }

    #[test]
    fn bad_ids_are_errors() {
        let mut pool = BlockPool::new(2).unwrap();
        let err = pool.free(&[BlockId(7)]).unwrap_err();
        assert!(err.to_string().contains("block7"), "{err}");
        assert!(matches!(
            err,
            KvCacheError::BlockOutOfRange { num_blocks: 2, .. }
        ));
        assert!(matches!(
            pool.share(&[BlockId(0)]),
            Err(KvCacheError::NotAllocated { .. })
        ));
        assert!(pool.share(&[BlockId(9)]).is_err());
        assert_eq!(pool.ref_count(BlockId(2)), None);
    }

    #[test]
    fn shared_block_is_freed_only_at_ref_zero() {
        let mut pool = BlockPool::new(2).unwrap();
        let a = pool.allocate(1).unwrap();
        pool.share(&a).unwrap();
        pool.share(&a).unwrap();
        assert_eq!(pool.ref_count(a[0]), Some(3));
        pool.free(&a).unwrap();
        pool.free(&a).unwrap();
        assert_eq!(pool.num_free(), 1, "still owned once");
        pool.check_invariants().unwrap();
        pool.free(&a).unwrap();
        assert_eq!(pool.num_free(), 2);
        assert!(pool.free(&a).is_err());
        pool.check_invariants().unwrap();
    }
}
