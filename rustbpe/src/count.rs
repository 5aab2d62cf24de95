//! Counting the distinct chunks of a corpus, in parallel.
//!
//! BPE training only needs each distinct chunk and how often it occurs, so the corpus is reduced
//! to a table `chunk -> count` as it streams in. Each batch of texts is split across threads;
//! every thread counts its chunks as borrowed byte slices (no allocation per occurrence) in a
//! table of its own, sharded by hash. The shards are then folded into the global table in
//! parallel, one shard per task, and only chunks never seen before are copied (into the
//! shard's byte arena).

use std::hash::Hasher;

use hashbrown::HashTable;
use rayon::prelude::*;
use rustc_hash::FxHasher;

use crate::split::Splitter;
use crate::train::Words;

const N_SHARDS: usize = 64;

#[inline(always)]
pub(crate) fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = FxHasher::default();
    h.write(b);
    h.finish()
}

/// The shard of a hash. Bits 32..38: hashbrown indexes buckets with the low bits and tags them
/// with the top 7, so the shard must take neither.
#[inline(always)]
fn shard_of(hash: u64) -> usize {
    ((hash >> 32) as usize) & (N_SHARDS - 1)
}

/// A chunk counted by one thread, borrowed from the batch of texts.
struct LocalEntry<'t> {
    key: &'t [u8],
    hash: u64,
    count: u64,
}

type LocalTables<'t> = Vec<HashTable<LocalEntry<'t>>>;

/// A distinct chunk in the global table: its bytes live in the shard's arena.
struct Entry {
    offset: u32,
    len: u32,
    count: u64,
}

#[derive(Default)]
struct Shard {
    table: HashTable<Entry>,
    arena: Vec<u8>,
}

impl Shard {
    fn add(&mut self, key: &[u8], hash: u64, count: u64) -> Result<(), String> {
        let Shard { table, arena } = self;
        let bytes = |e: &Entry| &arena[e.offset as usize..(e.offset + e.len) as usize];
        if let Some(e) = table.find_mut(hash, |e| bytes(e) == key) {
            e.count += count;
            return Ok(());
        }
        let offset = arena.len();
        if offset + key.len() > u32::MAX as usize {
            return Err("too many distinct chunks: a shard of the chunk table passed 4 GiB".into());
        }
        arena.extend_from_slice(key);
        let arena = &*arena;
        let entry = Entry {
            offset: offset as u32,
            len: key.len() as u32,
            count,
        };
        table.insert_unique(hash, entry, |e| {
            hash_bytes(&arena[e.offset as usize..(e.offset + e.len) as usize])
        });
        Ok(())
    }
}

/// Streams texts in and keeps the count of every distinct chunk.
pub struct ChunkCounter {
    splitter: Splitter,
    shards: Vec<Shard>,
    /// Bytes of text seen so far.
    pub total_bytes: u64,
    /// Texts seen so far.
    pub total_texts: u64,
}

/// Cut `texts` into at most `parts` contiguous runs of about equal byte length.
fn balanced_parts<'a, 't>(texts: &'a [&'t str], parts: usize) -> Vec<&'a [&'t str]> {
    let total: usize = texts.iter().map(|t| t.len()).sum();
    let target = total / parts.max(1) + 1;
    let mut out = Vec::with_capacity(parts);
    let (mut start, mut acc) = (0, 0);
    for (i, t) in texts.iter().enumerate() {
        acc += t.len();
        if acc >= target {
            out.push(&texts[start..=i]);
            start = i + 1;
            acc = 0;
        }
    }
    if start < texts.len() {
        out.push(&texts[start..]);
    }
    out
}

fn count_part<'t>(splitter: &Splitter, texts: &[&'t str]) -> Result<LocalTables<'t>, String> {
    let mut tables: LocalTables<'t> = (0..N_SHARDS).map(|_| HashTable::new()).collect();
    for text in texts {
        splitter.for_each_chunk(text, |chunk| {
            let key = chunk.as_bytes();
            let hash = hash_bytes(key);
            let table = &mut tables[shard_of(hash)];
            match table.find_mut(hash, |e| e.hash == hash && e.key == key) {
                Some(e) => e.count += 1,
                None => {
                    table.insert_unique(
                        hash,
                        LocalEntry {
                            key,
                            hash,
                            count: 1,
                        },
                        |e| e.hash,
                    );
                }
            }
        })?;
    }
    Ok(tables)
}

impl ChunkCounter {
    pub fn new(splitter: Splitter) -> Self {
        ChunkCounter {
            splitter,
            shards: (0..N_SHARDS).map(|_| Shard::default()).collect(),
            total_bytes: 0,
            total_texts: 0,
        }
    }

    /// Split and count a batch of texts (in parallel on rayon's pool).
    pub fn add_texts(&mut self, texts: &[&str]) -> Result<(), String> {
        self.total_texts += texts.len() as u64;
        self.total_bytes += texts.iter().map(|t| t.len() as u64).sum::<u64>();
        let parts = balanced_parts(texts, rayon::current_num_threads());
        let splitter = &self.splitter;
        let locals: Vec<LocalTables> = parts
            .par_iter()
            .map(|part| count_part(splitter, part))
            .collect::<Result<_, _>>()?;
        self.shards
            .par_iter_mut()
            .enumerate()
            .try_for_each(|(s, shard)| {
                for local in &locals {
                    for e in local[s].iter() {
                        shard.add(e.key, e.hash, e.count)?;
                    }
                }
                Ok::<(), String>(())
            })
    }

    /// Number of distinct chunks so far.
    pub fn n_distinct(&self) -> usize {
        self.shards.iter().map(|s| s.table.len()).sum()
    }

    /// The distinct chunks and their counts (for tests), in no particular order.
    pub fn counts(&self) -> Vec<(Vec<u8>, u64)> {
        let mut out = Vec::with_capacity(self.n_distinct());
        for shard in &self.shards {
            for e in shard.table.iter() {
                let b = &shard.arena[e.offset as usize..(e.offset + e.len) as usize];
                out.push((b.to_vec(), e.count));
            }
        }
        out
    }

    /// Turn the table into training words, freeing it shard by shard. Chunks of one byte are
    /// left out: they hold no pair, so they never change a merge.
    pub fn into_words(mut self) -> Words {
        let n: usize = self
            .shards
            .iter()
            .map(|s| s.table.iter().filter(|e| e.len >= 2).count())
            .sum();
        let n_syms: usize = self
            .shards
            .iter()
            .map(|s| {
                s.table
                    .iter()
                    .filter(|e| e.len >= 2)
                    .map(|e| e.len as usize)
                    .sum::<usize>()
            })
            .sum();
        let mut words = Words::with_capacity(n, n_syms);
        for shard in self.shards.drain(..) {
            for e in shard.table.iter().filter(|e| e.len >= 2) {
                let b = &shard.arena[e.offset as usize..(e.offset + e.len) as usize];
                words.push(b.iter().map(|&x| x as u32), e.count);
            }
        }
        words
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::GPT4_PATTERN;
    use std::collections::HashMap;

    #[test]
    fn counts_match_a_simple_count() {
        let texts: Vec<String> = (0..500)
            .map(|i| format!("doc {i}: hello world, hello {}!\n", i % 7))
            .collect();
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let mut counter = ChunkCounter::new(Splitter::new(GPT4_PATTERN).unwrap());
        for batch in refs.chunks(37) {
            counter.add_texts(batch).unwrap();
        }
        let re = fancy_regex::Regex::new(GPT4_PATTERN).unwrap();
        let mut want: HashMap<Vec<u8>, u64> = HashMap::new();
        for t in &texts {
            for m in re.find_iter(t) {
                *want
                    .entry(m.unwrap().as_str().as_bytes().to_vec())
                    .or_default() += 1;
            }
        }
        let got: HashMap<Vec<u8>, u64> = counter.counts().into_iter().collect();
        assert_eq!(got, want);
        assert_eq!(counter.total_texts, 500);
    }

    #[test]
    fn balanced_parts_cover_everything() {
        let texts = ["a", "bbbb", "", "cc", "dddddd", "e"];
        for parts in 1..8 {
            let p = balanced_parts(&texts, parts);
            assert!(p.len() <= parts);
            assert_eq!(p.concat(), texts);
        }
        assert!(balanced_parts(&[], 4).is_empty());
    }
}
