//! The BPE merge loop.
//!
//! Every distinct chunk is a word: a sequence of token ids (bytes at first) with the number of
//! times the chunk occurs. Each step merges the adjacent pair with the highest total count (ties:
//! the smaller pair, first id then second) into a new token. Counting all pairs again after each
//! merge would cost the whole corpus per step; instead the counts are updated where they change:
//!
//! * `stats[pair]` holds the pair's live count and the (sorted) list of words it occurs in;
//! * merging `(a, b) -> z` visits only the words of that list, rewrites each in place and adjusts
//!   the counts of the neighbouring pairs it destroys (`(x, a)`, `(b, y)`) and creates
//!   (`(x, z)`, `(z, y)`);
//! * a max-heap orders the pairs. Counts of existing pairs only fall (new pairs always contain
//!   the new token), so a heap entry can only overestimate: when the popped entry's count is stale
//!   it is pushed back with the live count (lazy invalidation), and when it is live it is the
//!   true maximum.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use hashbrown::HashMap;
use rustc_hash::FxBuildHasher;

/// All words in one flat array: word `i` is `syms[starts[i]..starts[i] + lens[i]]`. Merges
/// shorten words in place.
#[derive(Default, Debug, Clone)]
pub struct Words {
    syms: Vec<u32>,
    starts: Vec<usize>,
    lens: Vec<u32>,
    counts: Vec<u64>,
}

impl Words {
    pub fn with_capacity(words: usize, syms: usize) -> Self {
        Words {
            syms: Vec::with_capacity(syms),
            starts: Vec::with_capacity(words),
            lens: Vec::with_capacity(words),
            counts: Vec::with_capacity(words),
        }
    }

    /// Add a word occurring `count` times.
    pub fn push(&mut self, syms: impl IntoIterator<Item = u32>, count: u64) {
        let start = self.syms.len();
        self.syms.extend(syms);
        self.starts.push(start);
        self.lens.push((self.syms.len() - start) as u32);
        self.counts.push(count);
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The current symbols of word `i`.
    pub fn word(&self, i: usize) -> &[u32] {
        &self.syms[self.starts[i]..self.starts[i] + self.lens[i] as usize]
    }
}

#[inline(always)]
fn pair_key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

#[inline(always)]
fn unpack(key: u64) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

/// A pair's live count and the words it occurs in (sorted, distinct; may include words that
/// have since lost the pair).
#[derive(Default)]
struct PairStat {
    count: u64,
    words: Vec<u32>,
}

type Stats = HashMap<u64, PairStat, FxBuildHasher>;

/// A heap entry: the highest count first, then the smallest pair.
#[derive(PartialEq, Eq)]
struct Candidate {
    count: u64,
    pair: u64,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.count
            .cmp(&other.count)
            .then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Count every adjacent pair of every word and note which words hold it.
fn count_pairs(words: &Words) -> Stats {
    let mut stats = Stats::default();
    for w in 0..words.len() {
        let count = words.counts[w];
        for p in words.word(w).windows(2) {
            let st = stats.entry(pair_key(p[0], p[1])).or_default();
            st.count += count;
            if st.words.last() != Some(&(w as u32)) {
                st.words.push(w as u32);
            }
        }
    }
    stats
}

/// Bookkeeping of one merge step, shared by the words it rewrites.
struct Step<'a> {
    stats: &'a mut Stats,
    merged: u64,
    new_token: u32,
    /// Pairs created in this step, to push on the heap when the step is done.
    created: &'a mut Vec<u64>,
}

impl Step<'_> {
    #[inline(always)]
    fn remove(&mut self, key: u64, count: u64) {
        if key == self.merged {
            return;
        }
        if let Some(st) = self.stats.get_mut(&key) {
            st.count = st.count.saturating_sub(count);
            if st.count == 0 {
                self.stats.remove(&key);
            }
        }
    }

    #[inline(always)]
    fn add(&mut self, key: u64, count: u64, word: u32) {
        let created = &mut *self.created;
        let st = self.stats.entry(key).or_insert_with(|| {
            created.push(key);
            PairStat::default()
        });
        st.count += count;
        if st.words.last() != Some(&word) {
            st.words.push(word);
        }
    }

    /// Merge every `(a, b)` of word `w` (left to right) and update the neighbouring pairs.
    #[inline]
    fn merge_word(&mut self, words: &mut Words, w: u32) {
        let (a, b) = unpack(self.merged);
        let z = self.new_token;
        let start = words.starts[w as usize];
        let len = words.lens[w as usize] as usize;
        let count = words.counts[w as usize];
        let s = &mut words.syms[start..start + len];
        let (mut r, mut out) = (0, 0);
        let mut prev_merged = false;
        while r < len {
            if r + 1 < len && s[r] == a && s[r + 1] == b {
                // Left neighbour x: (x, a) becomes (x, z), unless x is the z just made, whose
                // pair was handled as the right neighbour of the previous merge.
                if r > 0 && !prev_merged {
                    let x = s[r - 1];
                    self.remove(pair_key(x, a), count);
                    self.add(pair_key(x, z), count, w);
                }
                // Right neighbour y: (b, y) becomes (z, y), or (z, z) if y starts the next merge.
                if r + 2 < len {
                    let y = s[r + 2];
                    self.remove(pair_key(b, y), count);
                    let next_merges = y == a && r + 3 < len && s[r + 3] == b;
                    self.add(pair_key(z, if next_merges { z } else { y }), count, w);
                }
                s[out] = z;
                r += 2;
                prev_merged = true;
            } else {
                s[out] = s[r];
                r += 1;
                prev_merged = false;
            }
            out += 1;
        }
        words.lens[w as usize] = out as u32;
    }
}

/// Learn up to `n_merges` merges from `words`; merge `i` makes token `256 + i`. Stops early when
/// no pair is left.
pub fn train(mut words: Words, n_merges: usize) -> Vec<(u32, u32)> {
    let mut merges = Vec::with_capacity(n_merges);
    if n_merges == 0 {
        return merges;
    }
    let mut stats = count_pairs(&words);
    let mut heap: BinaryHeap<Candidate> = stats
        .iter()
        .map(|(&pair, st)| Candidate {
            count: st.count,
            pair,
        })
        .collect();
    let mut created = Vec::new();
    while merges.len() < n_merges {
        let Some(top) = heap.pop() else { break };
        let live = stats.get(&top.pair).map_or(0, |st| st.count);
        if live == 0 {
            continue;
        }
        if live != top.count {
            heap.push(Candidate {
                count: live,
                pair: top.pair,
            });
            continue;
        }
        let Some(PairStat { words: holders, .. }) = stats.remove(&top.pair) else {
            continue;
        };
        let new_token = 256 + merges.len() as u32;
        merges.push(unpack(top.pair));
        let mut step = Step {
            stats: &mut stats,
            merged: top.pair,
            new_token,
            created: &mut created,
        };
        for &w in &holders {
            step.merge_word(&mut words, w);
        }
        for key in created.drain(..) {
            if let Some(st) = stats.get(&key) {
                heap.push(Candidate {
                    count: st.count,
                    pair: key,
                });
            }
        }
    }
    merges
}

/// The byte string of every token: the 256 bytes, then each merge's concatenation.
pub fn token_bytes(merges: &[(u32, u32)]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(a, b) in merges {
        let mut t = out[a as usize].clone();
        t.extend_from_slice(&out[b as usize]);
        out.push(t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words_of(items: &[(&str, u64)]) -> Words {
        let mut w = Words::default();
        for (s, c) in items {
            w.push(s.bytes().map(|b| b as u32), *c);
        }
        w
    }

    /// The textbook trainer: recount every pair after every merge.
    fn naive_train(items: &[(&str, u64)], n_merges: usize) -> Vec<(u32, u32)> {
        let mut words: Vec<(Vec<u32>, u64)> = items
            .iter()
            .map(|(s, c)| (s.bytes().map(|b| b as u32).collect(), *c))
            .collect();
        let mut merges = vec![];
        for i in 0..n_merges {
            let mut counts: std::collections::BTreeMap<(u32, u32), u64> = Default::default();
            for (w, c) in &words {
                for p in w.windows(2) {
                    *counts.entry((p[0], p[1])).or_default() += c;
                }
            }
            // max count, ties to the smallest pair (BTreeMap iterates pairs in ascending order)
            let Some((&best, _)) = counts.iter().rev().max_by(|x, y| x.1.cmp(y.1)) else {
                break;
            };
            let z = 256 + i as u32;
            for (w, _) in words.iter_mut() {
                let mut out = vec![];
                let mut j = 0;
                while j < w.len() {
                    if j + 1 < w.len() && (w[j], w[j + 1]) == best {
                        out.push(z);
                        j += 2;
                    } else {
                        out.push(w[j]);
                        j += 1;
                    }
                }
                *w = out;
            }
            merges.push(best);
        }
        merges
    }

    #[test]
    fn first_merges_of_a_small_corpus() {
        let items = [
            ("hug", 10),
            ("pug", 5),
            ("pun", 12),
            ("bun", 4),
            ("hugs", 5),
        ];
        let merges = train(words_of(&items), 3);
        let u = b'u' as u32;
        // "ug" occurs 20 times, "un" 16 times; then "h"+"ug" 15, ...
        assert_eq!(merges[0], (u, b'g' as u32));
        assert_eq!(merges[1], (u, b'n' as u32));
        assert_eq!(merges[2], (b'h' as u32, 256));
        assert_eq!(merges, naive_train(&items, 3));
    }

    #[test]
    fn ties_go_to_the_smaller_pair() {
        // "ab" and "cd" both occur 3 times, "ba" and "dc" too: (a, b) = (97, 98) wins.
        let items = [("ab", 3), ("cd", 3), ("ba", 3), ("dc", 3)];
        let merges = train(words_of(&items), 4);
        assert_eq!(merges, vec![(97, 98), (98, 97), (99, 100), (100, 99)]);
        // Ties on the first id go to the smaller second id.
        let merges = train(words_of(&[("ac", 2), ("ab", 2)]), 1);
        assert_eq!(merges, vec![(97, 98)]);
    }

    #[test]
    fn stops_early_when_no_pair_is_left() {
        let merges = train(words_of(&[("abc", 1), ("ab", 1)]), 100);
        assert_eq!(merges.len(), 2);
        assert!(train(words_of(&[]), 10).is_empty());
        assert!(train(words_of(&[("abc", 1)]), 0).is_empty());
    }

    #[test]
    fn repeated_symbols_and_overlaps() {
        for items in [
            vec![("aaaa", 1)],
            vec![("aaa", 3), ("aaaaa", 2), ("abab", 1)],
            vec![("abababab", 2), ("babab", 3), ("aabb", 1)],
            vec![("        ", 5), ("  ", 2), (" \n \n", 3)],
        ] {
            assert_eq!(
                train(words_of(&items), 20),
                naive_train(&items, 20),
                "{items:?}"
            );
        }
    }

    /// The incremental trainer equals the textbook one on many random small corpora.
    #[test]
    fn equals_naive_on_random_corpora() {
        let mut state = 12345u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let n_words = 1 + next() % 12;
            let owned: Vec<(String, u64)> = (0..n_words)
                .map(|_| {
                    let len = 1 + next() % 9;
                    let s: String = (0..len)
                        .map(|_| ['a', 'b', 'c', ' '][(next() % 4) as usize])
                        .collect();
                    (s, 1 + next() % 5)
                })
                .collect();
            let items: Vec<(&str, u64)> = owned.iter().map(|(s, c)| (s.as_str(), *c)).collect();
            assert_eq!(
                train(words_of(&items), 30),
                naive_train(&items, 30),
                "{items:?}"
            );
        }
    }

    #[test]
    fn token_bytes_concatenate() {
        let t = token_bytes(&[(104, 105), (256, 33)]);
        assert_eq!(t.len(), 258);
        assert_eq!(t[256], b"hi");
        assert_eq!(t[257], b"hi!");
    }
}
