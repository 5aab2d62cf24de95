//! nanochat-rustbpe: a byte-pair-encoding tokenizer trainer for the nanochat course.
//!
//! Training runs in three stages:
//!
//! 1. [`split`]: texts are cut into chunks by the split pattern (a hand-written splitter for the
//!    GPT-4 pattern family, fancy-regex for any other pattern);
//! 2. [`count`]: the distinct chunks are counted in parallel;
//! 3. [`train`]: merges are learned from the distinct chunks with incremental pair counts and a
//!    lazily refreshed max-heap.
//!
//! [`encode`] applies the merges to new text. The Python module `nanochat_rustbpe` (feature
//! `python`, see `python.rs`) wraps all of it.

pub mod classes;
pub mod count;
pub mod encode;
pub mod split;
pub mod train;

#[cfg(feature = "python")]
mod python;

pub use count::ChunkCounter;
pub use encode::Encoder;
pub use split::{Splitter, DEFAULT_PATTERN, GPT4_PATTERN};
pub use train::{token_bytes, train, Words};

use std::fmt;

/// Largest vocabulary accepted: token ids are `u32` and word indices are too.
pub const MAX_VOCAB_SIZE: u64 = 1 << 31;

/// Why training could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BpeError {
    /// vocab_size below 256 (or absurdly large).
    BadVocabSize(i128),
    /// The split pattern does not compile.
    BadPattern { pattern: String, reason: String },
    /// There was no text at all.
    EmptyCorpus,
    /// Splitting failed at run time (fancy-regex's backtrack limit) or a table overflowed.
    Failed(String),
}

impl fmt::Display for BpeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BpeError::BadVocabSize(v) if *v < 256 => write!(
                f,
                "vocab_size must be at least 256 (the 256 byte tokens come first), got {v}"
            ),
            BpeError::BadVocabSize(v) => {
                write!(f, "vocab_size must be at most {MAX_VOCAB_SIZE}, got {v}")
            }
            BpeError::BadPattern { pattern, reason } => {
                write!(f, "invalid split pattern {pattern:?}: {reason}")
            }
            BpeError::EmptyCorpus => write!(
                f,
                "the training corpus is empty: the iterator yielded no text (0 characters); \
                 pass an iterator of non-empty strings"
            ),
            BpeError::Failed(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for BpeError {}

/// Number of merges for `vocab_size`, or why it is not a valid size.
pub fn merges_for_vocab_size(vocab_size: i128) -> Result<usize, BpeError> {
    if vocab_size < 256 || vocab_size > MAX_VOCAB_SIZE as i128 {
        return Err(BpeError::BadVocabSize(vocab_size));
    }
    Ok(vocab_size as usize - 256)
}

/// Compile a split pattern, with an error that names it.
pub fn compile_pattern(pattern: &str) -> Result<Splitter, BpeError> {
    Splitter::new(pattern).map_err(|reason| BpeError::BadPattern {
        pattern: pattern.to_string(),
        reason,
    })
}

/// Train on in-memory texts: the merges, in order (merge `i` makes token `256 + i`).
pub fn train_from_texts(
    texts: &[&str],
    vocab_size: usize,
    pattern: &str,
) -> Result<Vec<(u32, u32)>, BpeError> {
    let n_merges = merges_for_vocab_size(vocab_size as i128)?;
    let mut counter = ChunkCounter::new(compile_pattern(pattern)?);
    counter.add_texts(texts).map_err(BpeError::Failed)?;
    if counter.total_bytes == 0 {
        return Err(BpeError::EmptyCorpus);
    }
    Ok(train(counter.into_words(), n_merges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors() {
        assert_eq!(
            train_from_texts(&["abc"], 255, GPT4_PATTERN),
            Err(BpeError::BadVocabSize(255))
        );
        assert_eq!(
            train_from_texts(&[], 300, GPT4_PATTERN),
            Err(BpeError::EmptyCorpus)
        );
        assert_eq!(
            train_from_texts(&["", ""], 300, GPT4_PATTERN),
            Err(BpeError::EmptyCorpus)
        );
        let err = train_from_texts(&["abc"], 300, "(").unwrap_err();
        assert!(matches!(err, BpeError::BadPattern { .. }));
        assert!(
            err.to_string().starts_with("invalid split pattern \"(\""),
            "{err}"
        );
        assert!(BpeError::BadVocabSize(7)
            .to_string()
            .contains("at least 256"));
    }

    #[test]
    fn vocab_256_means_no_merges() {
        assert!(train_from_texts(&["hello hello"], 256, GPT4_PATTERN)
            .unwrap()
            .is_empty());
    }

    /// The fast splitter and fancy-regex give the same merges.
    #[test]
    fn fast_and_regex_splitters_train_the_same() {
        let texts: Vec<String> = (0..300)
            .map(|i| {
                format!(
                    "Item {i}: naïve café — it's {}!\n\n  indent\tand 12345678 émoji 😀😀\r\n",
                    i * 7919
                )
            })
            .collect();
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        for pattern in [GPT4_PATTERN, DEFAULT_PATTERN] {
            let fast = train_from_texts(&refs, 600, pattern).unwrap();
            let mut counter = ChunkCounter::new(Splitter::regex(pattern).unwrap());
            counter.add_texts(&refs).unwrap();
            let slow = train(counter.into_words(), 600 - 256);
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn other_patterns_use_fancy_regex() {
        let merges = train_from_texts(&["aaa bbb aaa bbb"], 260, r"\w+|\s+").unwrap();
        assert_eq!(merges[0], (97, 97));
    }
}
