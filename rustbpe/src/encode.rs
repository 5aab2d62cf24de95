//! Encoding text with learned merges.
//!
//! Each chunk of the split pattern starts as its bytes; the adjacent pair with the lowest merge
//! id is merged (every occurrence, left to right), and again, until no adjacent pair is a merge.
//! That replays training's merges in order, so a training word encodes to exactly the tokens the
//! trainer ended with.

use hashbrown::HashMap;
use rayon::prelude::*;
use rustc_hash::FxBuildHasher;

use crate::split::Splitter;

pub struct Encoder {
    splitter: Splitter,
    /// (left, right) -> the token the merge makes
    ranks: HashMap<(u32, u32), u32, FxBuildHasher>,
}

impl Encoder {
    pub fn new(pattern: &str, merges: &[(u32, u32)]) -> Result<Self, String> {
        let splitter = Splitter::new(pattern)?;
        let ranks = merges
            .iter()
            .enumerate()
            .map(|(i, &p)| (p, 256 + i as u32))
            .collect();
        Ok(Encoder { splitter, ranks })
    }

    fn encode_chunk(&self, chunk: &[u8], out: &mut Vec<u32>) {
        if chunk.len() == 1 {
            out.push(chunk[0] as u32);
            return;
        }
        let mut ids: Vec<u32> = chunk.iter().map(|&b| b as u32).collect();
        while ids.len() >= 2 {
            let best = ids
                .windows(2)
                .filter_map(|p| self.ranks.get(&(p[0], p[1])).map(|&z| (z, p[0], p[1])))
                .min();
            let Some((z, a, b)) = best else { break };
            let (mut r, mut w) = (0, 0);
            while r < ids.len() {
                if r + 1 < ids.len() && ids[r] == a && ids[r + 1] == b {
                    ids[w] = z;
                    r += 2;
                } else {
                    ids[w] = ids[r];
                    r += 1;
                }
                w += 1;
            }
            ids.truncate(w);
        }
        out.extend_from_slice(&ids);
    }

    /// The token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.splitter
            .for_each_chunk(text, |chunk| self.encode_chunk(chunk.as_bytes(), &mut out))?;
        Ok(out)
    }

    /// Encode many texts in parallel.
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, String> {
        texts.par_iter().map(|t| self.encode(t)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::GPT4_PATTERN;
    use crate::train::token_bytes;
    use crate::train_from_texts;

    #[test]
    fn bytes_without_merges() {
        let enc = Encoder::new(GPT4_PATTERN, &[]).unwrap();
        assert_eq!(enc.encode("hé").unwrap(), vec![104, 0xC3, 0xA9]);
        assert!(enc.encode("").unwrap().is_empty());
    }

    #[test]
    fn applies_merges_in_order() {
        // 256 = "b"+"c", 257 = "a"+"b": "abc" keeps 256 because (a, bc) is not a merge.
        let enc = Encoder::new(GPT4_PATTERN, &[(98, 99), (97, 98)]).unwrap();
        assert_eq!(enc.encode("abc").unwrap(), vec![97, 256]);
        assert_eq!(enc.encode("abd").unwrap(), vec![257, 100]);
        let enc = Encoder::new(GPT4_PATTERN, &[(97, 97), (256, 256)]).unwrap();
        assert_eq!(enc.encode("aaaaa").unwrap(), vec![257, 97]);
    }

    /// Encoding equals applying every merge, in training order, to each chunk's bytes.
    #[test]
    fn encode_equals_applying_the_merges_in_order() {
        let texts: Vec<String> = (0..300)
            .map(|i| {
                format!(
                    "{} won't {}x  \n\t{}",
                    "ab".repeat(i % 7),
                    i * i,
                    "ß€😀".repeat(i % 3)
                )
            })
            .collect();
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let merges = train_from_texts(&refs, 500, GPT4_PATTERN).unwrap();
        let enc = Encoder::new(GPT4_PATTERN, &merges).unwrap();
        let splitter = Splitter::new(GPT4_PATTERN).unwrap();
        for text in refs
            .iter()
            .copied()
            .chain(["abababab won't 12345", "zzz ßß"])
        {
            let mut want = Vec::new();
            for chunk in splitter.chunks(text).unwrap() {
                let mut ids: Vec<u32> = chunk.bytes().map(u32::from).collect();
                for (i, &(a, b)) in merges.iter().enumerate() {
                    let mut out = Vec::with_capacity(ids.len());
                    let mut r = 0;
                    while r < ids.len() {
                        if r + 1 < ids.len() && ids[r] == a && ids[r + 1] == b {
                            out.push(256 + i as u32);
                            r += 2;
                        } else {
                            out.push(ids[r]);
                            r += 1;
                        }
                    }
                    ids = out;
                }
                want.extend(ids);
            }
            assert_eq!(enc.encode(text).unwrap(), want, "{text:?}");
        }
    }

    /// Encoding the training texts replays the merges: the tokens decode to the text, and
    /// every text encodes to at most as many tokens as it has bytes.
    #[test]
    fn encode_round_trips_after_training() {
        let texts: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "The quick brown fox {i} jumps over the lazy dog's back. Ça va? 日本語 {}\n",
                    i * 37
                )
            })
            .collect();
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let merges = train_from_texts(&refs, 400, GPT4_PATTERN).unwrap();
        let enc = Encoder::new(GPT4_PATTERN, &merges).unwrap();
        let vocab = token_bytes(&merges);
        let batch = enc.encode_batch(&texts).unwrap();
        for (t, ids) in texts.iter().zip(&batch) {
            assert_eq!(&enc.encode(t).unwrap(), ids);
            let decoded: Vec<u8> = ids
                .iter()
                .flat_map(|&i| vocab[i as usize].clone())
                .collect();
            assert_eq!(decoded, t.as_bytes());
            assert!(
                ids.len() < t.len() / 2,
                "merges should compress the training text"
            );
        }
    }
}
