//! `PrefixCache`: the index of KV blocks kept for reuse (tensorrtllm_backend's
//! `enable_kv_cache_reuse`, vLLM's automatic prefix caching). A full block whose K/V are
//! computed is registered under its content; a later sequence whose tokens start with the same
//! blocks shares them (`KvCacheManager::match_prefix`) instead of recomputing them.
//!
//! Identity: block i of a sequence is keyed by (content id of block i - 1, its `block_size`
//! tokens), the first block by (0, tokens). Every registered block gets a fresh content id,
//! never reused, so a key names its whole prefix exactly: keys compare token ids, not hashes
//! (no collision can serve another prompt's K/V), and when a parent is evicted its children
//! become unreachable and age out like any other evictable block.
//!
//! Ownership (kept by `KvCacheManager`): the cache holds one pool reference on each block it
//! registered. A registered block that no sequence references is *evictable*: it counts as free
//! and is reclaimed, least recently released first, when the pool runs out.
//!
//! This type only indexes; it never touches the pool.

use std::collections::{BTreeMap, HashMap};

use super::block_pool::BlockId;

/// Content id of "no parent" (the first block of a sequence).
pub const ROOT: u64 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockKey {
    parent: u64,
    tokens: Box<[u32]>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    block: BlockId,
    content_id: u64,
}

/// The index of registered (full, computed) KV blocks by exact token prefix, plus the
/// least-recently-released order of the evictable ones. `Default` is `new` (a derived default
/// would start content ids at `ROOT`, the id that means "no parent").
#[derive(Debug, Clone)]
pub struct PrefixCache {
    /// Entries by parent content id, then by tokens: a lookup borrows its tokens (no key is
    /// built per probe). Most parents have one child; an empty inner map is removed.
    entries: HashMap<u64, HashMap<Box<[u32]>, Entry>>,
    /// The key each registered block is stored under.
    keys: HashMap<BlockId, BlockKey>,
    /// Evictable blocks by release tick (oldest first) and the tick of each.
    evictable: BTreeMap<u64, BlockId>,
    released_at: HashMap<BlockId, u64>,
    next_content_id: u64,
    next_tick: u64,
}

impl Default for PrefixCache {
    fn default() -> Self {
        PrefixCache::new()
    }
}

impl PrefixCache {
    /// An empty cache whose first content id is `ROOT + 1`.
    pub fn new() -> Self {
        PrefixCache {
            entries: HashMap::new(),
            keys: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: HashMap::new(),
            next_content_id: ROOT + 1,
            next_tick: 0,
        }
    }

    /// The registered block holding `tokens` after the block with content id `parent`, and its
    /// own content id.
    pub fn lookup(&self, parent: u64, tokens: &[u32]) -> Option<(BlockId, u64)> {
        let e = self.entries.get(&parent)?.get(tokens)?;
        Some((e.block, e.content_id))
    }

    /// Registers `block` as holding `tokens` after `parent`; returns its content id. The caller
    /// checked with `lookup` that the key is new and that `block` is not registered yet.
    pub fn insert(&mut self, parent: u64, tokens: &[u32], block: BlockId) -> u64 {
        let content_id = self.next_content_id;
        self.next_content_id += 1;
        let key = BlockKey {
            parent,
            tokens: tokens.into(),
        };
        self.entries
            .entry(parent)
            .or_default()
            .insert(key.tokens.clone(), Entry { block, content_id });
        self.keys.insert(block, key);
        content_id
    }

    /// Whether `block` is registered (evictable or in use).
    pub fn contains_block(&self, block: BlockId) -> bool {
        self.keys.contains_key(&block)
    }

    /// Registered blocks, evictable or in use.
    pub fn num_cached(&self) -> usize {
        self.keys.len()
    }

    /// Registered blocks no sequence references (they count as free in the manager).
    pub fn num_evictable(&self) -> usize {
        self.evictable.len()
    }

    /// Whether `block` is registered and no sequence references it.
    pub fn is_evictable(&self, block: BlockId) -> bool {
        self.released_at.contains_key(&block)
    }

    /// No sequence references `block` any more: it becomes the most recently released evictable
    /// block.
    pub fn mark_evictable(&mut self, block: BlockId) {
        self.unmark_evictable(block);
        let tick = self.next_tick;
        self.next_tick += 1;
        self.evictable.insert(tick, block);
        self.released_at.insert(block, tick);
    }

    /// A sequence shares `block` again: it is not evictable while referenced.
    pub fn unmark_evictable(&mut self, block: BlockId) {
        if let Some(tick) = self.released_at.remove(&block) {
            self.evictable.remove(&tick);
        }
    }

    /// Forgets the least recently released evictable block and returns it (the caller drops
    /// the cache's pool reference, which frees it).
    pub fn evict_oldest(&mut self) -> Option<BlockId> {
        let (_, block) = self.evictable.pop_first()?;
        self.released_at.remove(&block);
        if let Some(key) = self.keys.remove(&block)
            && let Some(children) = self.entries.get_mut(&key.parent)
        {
            children.remove(&key.tokens);
            if children.is_empty() {
                self.entries.remove(&key.parent);
            }
        }
        Some(block)
    }

    /// Registered blocks (for invariant checks).
    pub fn blocks(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.keys.keys().copied()
    }

    /// Evictable blocks, oldest release first.
    pub fn evictable_blocks(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.evictable.values().copied()
    }

    /// The index's own consistency: entries and keys mirror each other, content ids are unique,
    /// every evictable block is registered and listed once.
    pub fn check_invariants(&self) -> Result<(), String> {
        let num_entries: usize = self.entries.values().map(HashMap::len).sum();
        if num_entries != self.keys.len() {
            return Err(format!(
                "prefix cache: {num_entries} entries but {} registered blocks",
                self.keys.len()
            ));
        }
        if self.entries.values().any(HashMap::is_empty) {
            return Err("prefix cache: a parent without children is still indexed".into());
        }
        let mut ids = std::collections::HashSet::new();
        let entries = self.entries.iter().flat_map(|(&parent, children)| {
            children.iter().map(move |(tokens, e)| (parent, tokens, e))
        });
        for (parent, tokens, e) in entries {
            let stored = self.keys.get(&e.block);
            if stored.is_none_or(|k| k.parent != parent || k.tokens != *tokens) {
                return Err(format!(
                    "prefix cache: {} is not stored under its key",
                    e.block
                ));
            }
            if e.content_id == ROOT || !ids.insert(e.content_id) {
                return Err(format!(
                    "prefix cache: content id {} reused or root",
                    e.content_id
                ));
            }
        }
        if self.evictable.len() != self.released_at.len() {
            return Err("prefix cache: evictable list and ticks disagree".into());
        }
        for (tick, block) in &self.evictable {
            if self.released_at.get(block) != Some(tick) || !self.keys.contains_key(block) {
                return Err(format!("prefix cache: evictable {block} is not registered"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_through_content_ids() {
        let mut c = PrefixCache::new();
        let a = c.insert(ROOT, &[1, 2], BlockId(3));
        let b = c.insert(a, &[3, 4], BlockId(5));
        assert_eq!(c.lookup(ROOT, &[1, 2]), Some((BlockId(3), a)));
        assert_eq!(c.lookup(a, &[3, 4]), Some((BlockId(5), b)));
        // Same tokens after another parent, or as a first block: not the same prefix.
        assert_eq!(c.lookup(ROOT, &[3, 4]), None);
        assert_eq!(c.lookup(b, &[3, 4]), None);
        assert_ne!(a, b);
        c.check_invariants().unwrap();
    }

    #[test]
    fn evicts_least_recently_released_first_and_forgets_the_key() {
        let mut c = PrefixCache::new();
        let ids: Vec<u64> = (0..3).map(|i| c.insert(ROOT, &[i], BlockId(i))).collect();
        c.mark_evictable(BlockId(2));
        c.mark_evictable(BlockId(0));
        c.mark_evictable(BlockId(1));
        // Shared again, then released again: now the newest.
        c.unmark_evictable(BlockId(2));
        assert!(!c.is_evictable(BlockId(2)));
        c.mark_evictable(BlockId(2));
        assert_eq!(c.num_evictable(), 3);
        assert_eq!(c.evict_oldest(), Some(BlockId(0)));
        assert_eq!(c.lookup(ROOT, &[0]), None);
        assert_eq!(c.lookup(ROOT, &[1]), Some((BlockId(1), ids[1])));
        assert_eq!(c.evict_oldest(), Some(BlockId(1)));
        assert_eq!(c.evict_oldest(), Some(BlockId(2)));
        assert_eq!(c.evict_oldest(), None);
        assert_eq!(c.num_cached(), 0);
        c.check_invariants().unwrap();
    }

    #[test]
    fn a_reinserted_block_gets_a_new_content_id() {
        let mut c = PrefixCache::new();
        let first = c.insert(ROOT, &[7], BlockId(0));
        let child = c.insert(first, &[8], BlockId(1));
        c.mark_evictable(BlockId(0));
        assert_eq!(c.evict_oldest(), Some(BlockId(0)));
        // The same physical block, new content: the old child is not reachable from it.
        let second = c.insert(ROOT, &[9], BlockId(0));
        assert_ne!(first, second);
        assert_eq!(c.lookup(second, &[8]), None);
        assert_eq!(c.lookup(first, &[8]), Some((BlockId(1), child)));
        c.check_invariants().unwrap();
    }
}
