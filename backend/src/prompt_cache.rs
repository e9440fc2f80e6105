//! Prompts already run, kept for the next generation of the same prompt: the keys and values of
//! every layer and the last position's logits, for one prompt (token ids) under one intervention.
//! A "regenerate with a new seed", or another visitor trying the same example, starts decoding at
//! once instead of running the prompt again. The server's batch keeps one per model
//! ([`crate::batch::Batcher`]); least recently used entries go first, within a byte budget.
//!
//! An entry is a copy of what the prompt's own run left in the cache, so a generation that starts
//! from it is the one that would have run (the prompt runs once per distinct intervention either
//! way; see [`crate::engine::Engine::start_generation`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use crate::error::Result;
use crate::model::{Cache, Intervention};

/// One prompt under one intervention: its token ids, and each clamp's layer, neuron and value
/// (as bits: the value the clamp was given, exactly).
type Key = (Vec<u32>, Vec<(usize, usize, u32)>);

fn key(ids: &[u32], iv: &Intervention) -> Key {
    (ids.to_vec(), iv.clamps.iter().map(|c| (c.layer, c.neuron, c.value.to_bits())).collect())
}

/// What a prompt's run leaves: per layer the keys and values of its one row
/// (`[1, kv_heads, len, head_dim]`), and the logits of its last position (`[1, vocab]`).
pub struct Entry {
    pub(crate) kvs: Vec<Option<(Tensor, Tensor)>>,
    pub(crate) logits: Tensor,
    bytes: usize,
}

impl Entry {
    /// Row `row` of `cache` and `logits` (copies, so the live cache may go on writing in place).
    pub(crate) fn of_row(cache: &Cache, logits: &Tensor, row: usize) -> Result<Self> {
        let kvs = cache.row_copy(row)?;
        let logits = logits.narrow(0, row, 1)?.copy()?;
        let bytes = kvs.iter().flatten().map(|(k, v)| crate::model::common::tensor_bytes(k) + crate::model::common::tensor_bytes(v)).sum::<usize>()
            + crate::model::common::tensor_bytes(&logits);
        Ok(Self { kvs, logits, bytes })
    }
}

pub struct PromptCache {
    lru: Mutex<(lru::LruCache<Key, Arc<Entry>>, usize)>,
    max_bytes: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// The default budget: 64 MB (SmolLM2-135M keeps 46 KB a prompt token in f32).
pub const DEFAULT_BYTES: usize = 64 << 20;

impl PromptCache {
    pub fn new(max_bytes: usize) -> Self {
        Self { lru: Mutex::new((lru::LruCache::unbounded(), 0)), max_bytes, hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    /// The entries of `ids` under each of `ivs`, if every one is kept (counted as hits), else
    /// `None` (one miss): the prompt then runs for all of them.
    pub fn get_all(&self, ids: &[u32], ivs: &[Intervention]) -> Option<Vec<Arc<Entry>>> {
        let mut g = self.lru.lock().unwrap_or_else(|e| e.into_inner());
        let found: Option<Vec<_>> = ivs.iter().map(|iv| g.0.get(&key(ids, iv)).cloned()).collect();
        match &found {
            Some(f) => self.hits.fetch_add(f.len() as u64, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        found
    }

    /// Keep `entry` for `ids` under `iv`, dropping the least recently used entries to stay within
    /// the budget (an entry larger than the whole budget is not kept).
    pub fn put(&self, ids: &[u32], iv: &Intervention, entry: Entry) {
        if entry.bytes > self.max_bytes {
            return;
        }
        let mut g = self.lru.lock().unwrap_or_else(|e| e.into_inner());
        let (lru, bytes) = &mut *g;
        *bytes += entry.bytes;
        if let Some(old) = lru.put(key(ids, iv), Arc::new(entry)) {
            *bytes -= old.bytes;
        }
        while *bytes > self.max_bytes {
            match lru.pop_lru() {
                Some((_, old)) => *bytes -= old.bytes,
                None => break,
            }
        }
    }

    /// Bytes kept now.
    pub fn bytes(&self) -> usize {
        self.lru.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Interventions found (hits) and prompts run for want of one (misses), so far.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }
}
