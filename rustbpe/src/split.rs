//! Splitting text into chunks with the split pattern.
//!
//! BPE never merges across chunk boundaries, so the trainer first cuts every text into chunks
//! (words, numbers, punctuation runs, white space runs). The GPT-4 pattern family
//!
//! ```text
//! '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,K}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+
//! ```
//!
//! needs a backtracking engine (possessive quantifiers, a look-ahead), and fancy-regex spends
//! most of a trainer's time running it. `Splitter::new` recognises that family and uses a
//! hand-written state machine that returns exactly the same chunks (the tests compare the two
//! on millions of random characters); any other pattern runs on fancy-regex.

use crate::classes::{class_ranges, CharClasses, LETTER, NUMBER, SPACE};

/// The split pattern of the GPT-4 tokenizer (`cl100k_base`): numbers in groups of up to 3 digits.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// nanochat's split pattern: GPT-4's with numbers in groups of up to 2 digits, which spends
/// fewer tokens of a small vocabulary on numbers.
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The GPT-4 pattern with numbers grouped by up to `k` digits.
pub fn gpt4_like_pattern(k: usize) -> String {
    format!(
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{{L}}\p{{N}}]?+\p{{L}}+|\p{{N}}{{1,{k}}}| ?[^\s\p{{L}}\p{{N}}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
    )
}

/// A split pattern, compiled.
pub enum Splitter {
    /// The GPT-4 pattern family, hand-written.
    Fast(FastSplitter),
    /// Any other pattern, on fancy-regex.
    Regex(fancy_regex::Regex),
}

impl Splitter {
    /// Compile `pattern`; a pattern fancy-regex rejects gives an error that says why.
    pub fn new(pattern: &str) -> Result<Self, String> {
        for k in 1..=9 {
            if pattern == gpt4_like_pattern(k) {
                return Ok(Splitter::Fast(FastSplitter::new(k)));
            }
        }
        Self::regex(pattern)
    }

    /// Compile `pattern` with fancy-regex even if the fast splitter could run it (tests, benchmarks).
    pub fn regex(pattern: &str) -> Result<Self, String> {
        fancy_regex::Regex::new(pattern)
            .map(Splitter::Regex)
            .map_err(|e| e.to_string())
    }

    /// Call `f` with each chunk of `text`, in order. Empty matches are skipped. The only error is a
    /// regex runtime failure (fancy-regex's backtrack limit), which the fast splitter never has.
    #[inline]
    pub fn for_each_chunk<'t>(
        &self,
        text: &'t str,
        mut f: impl FnMut(&'t str),
    ) -> Result<(), String> {
        match self {
            Splitter::Fast(fast) => {
                fast.for_each_chunk(text, f);
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("the split pattern failed on a text: {e}"))?;
                    if !m.as_str().is_empty() {
                        f(m.as_str());
                    }
                }
                Ok(())
            }
        }
    }

    /// All chunks of `text` (convenience for tests and encoding).
    pub fn chunks<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, String> {
        let mut out = Vec::new();
        self.for_each_chunk(text, |c| out.push(c))?;
        Ok(out)
    }
}

/// Code points that `(?i:...)` matches for the letters of the contractions 's 'd 'm 't 'll 've 're.
/// Unicode case folding adds more than the ASCII pair: `(?i:s)` also matches U+017F (ſ).
struct Contractions {
    sdmt: Vec<(u32, u32)>,
    l: Vec<(u32, u32)>,
    v: Vec<(u32, u32)>,
    r: Vec<(u32, u32)>,
    e: Vec<(u32, u32)>,
}

fn in_ranges(ranges: &[(u32, u32)], cp: u32) -> bool {
    ranges.iter().any(|&(lo, hi)| lo <= cp && cp <= hi)
}

impl Contractions {
    fn get() -> &'static Contractions {
        static C: std::sync::OnceLock<Contractions> = std::sync::OnceLock::new();
        C.get_or_init(|| Contractions {
            sdmt: class_ranges("(?i:[sdmt])"),
            l: class_ranges("(?i:l)"),
            v: class_ranges("(?i:v)"),
            r: class_ranges("(?i:r)"),
            e: class_ranges("(?i:e)"),
        })
    }
}

/// The hand-written splitter for the GPT-4 pattern family.
pub struct FastSplitter {
    max_digits: usize,
    classes: &'static CharClasses,
    contractions: &'static Contractions,
}

/// Decode the UTF-8 character at byte `i` of valid UTF-8 `s`: (code point, byte length).
#[inline(always)]
fn decode(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        let cp = ((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F);
        (cp, 3)
    } else {
        let cp = ((b0 & 0x07) << 18)
            | ((s[i + 1] as u32 & 0x3F) << 12)
            | ((s[i + 2] as u32 & 0x3F) << 6)
            | (s[i + 3] as u32 & 0x3F);
        (cp, 4)
    }
}

impl FastSplitter {
    pub fn new(max_digits: usize) -> Self {
        FastSplitter {
            max_digits,
            classes: CharClasses::get(),
            contractions: Contractions::get(),
        }
    }

    /// (class flags, code point, byte length) of the character at byte `i`.
    #[inline(always)]
    fn class_at(&self, s: &[u8], i: usize) -> (u8, u32, usize) {
        let b = s[i];
        if b < 0x80 {
            return (self.classes.of_ascii(b), b as u32, 1);
        }
        let (cp, len) = decode(s, i);
        (self.classes.of(cp), cp, len)
    }

    /// End of the run of characters whose flags intersect `mask` (or, with `mask == 0`, of
    /// "other" characters, whose flags are empty) starting at byte `i`.
    #[inline(always)]
    fn run_end(&self, s: &[u8], mut i: usize, mask: u8) -> usize {
        while i < s.len() {
            let (f, _, len) = self.class_at(s, i);
            let hit = if mask == 0 { f == 0 } else { f & mask != 0 };
            if !hit {
                break;
            }
            i += len;
        }
        i
    }

    /// End of a run of letters starting at `i` (ASCII fast path first).
    #[inline(always)]
    fn letters_end(&self, s: &[u8], mut i: usize) -> usize {
        while i < s.len() && s[i].is_ascii_alphabetic() {
            i += 1;
        }
        if i < s.len() && s[i] >= 0x80 {
            i = self.run_end(s, i, LETTER);
        }
        i
    }

    /// End of `[\r\n]*` starting at `i`.
    #[inline(always)]
    fn newlines_end(s: &[u8], mut i: usize) -> usize {
        while i < s.len() && (s[i] == b'\r' || s[i] == b'\n') {
            i += 1;
        }
        i
    }

    /// The end of the chunk that starts at byte `i` (< s.len()); the alternatives of the pattern
    /// are tried in order, as the backtracking engine does.
    #[inline(always)]
    fn chunk_end(&self, s: &[u8], i: usize) -> usize {
        let n = s.len();
        let (f, c, len) = self.class_at(s, i);
        let j = i + len;
        // 1. '(?i:[sdmt]|ll|ve|re)
        if c == '\'' as u32 && j < n {
            let ct = self.contractions;
            let (_, c2, l2) = self.class_at(s, j);
            if in_ranges(&ct.sdmt, c2) {
                return j + l2;
            }
            if j + l2 < n {
                let (_, c3, l3) = self.class_at(s, j + l2);
                if (in_ranges(&ct.l, c2) && in_ranges(&ct.l, c3))
                    || (in_ranges(&ct.v, c2) && in_ranges(&ct.e, c3))
                    || (in_ranges(&ct.r, c2) && in_ranges(&ct.e, c3))
                {
                    return j + l2 + l3;
                }
            }
        }
        // 2. [^\r\n\p{L}\p{N}]?+\p{L}+
        if f & LETTER != 0 {
            return self.letters_end(s, j);
        }
        // 3. \p{N}{1,K}
        if f & NUMBER != 0 {
            let mut end = j;
            for _ in 1..self.max_digits {
                if end >= n {
                    break;
                }
                let (f2, _, l2) = self.class_at(s, end);
                if f2 & NUMBER == 0 {
                    break;
                }
                end += l2;
            }
            return end;
        }
        // c is white space or "other" here.
        let is_newline = c == '\r' as u32 || c == '\n' as u32;
        // The class and length of the next character (none at the end of the text).
        let (f2, _, l2) = if j < n {
            self.class_at(s, j)
        } else {
            (SPACE, 0, 0)
        };
        if !is_newline && j < n && f2 & LETTER != 0 {
            return self.letters_end(s, j + l2);
        }
        // 4. ' ?[^\s\p{L}\p{N}]++[\r\n]*'
        if f == 0 {
            let end = self.run_end(s, j, 0);
            return Self::newlines_end(s, end);
        }
        if c == ' ' as u32 && j < n && f2 == 0 {
            let end = self.run_end(s, j + l2, 0);
            return Self::newlines_end(s, end);
        }
        // c is white space: 5. \s*[\r\n]   6. \s+(?!\S)   7. \s+
        let mut k = i;
        let mut last_newline_end = None;
        let mut last_char_start = i;
        let mut n_chars = 0usize;
        while k < n {
            let (fk, ck, lk) = self.class_at(s, k);
            if fk & SPACE == 0 {
                break;
            }
            if ck == '\r' as u32 || ck == '\n' as u32 {
                last_newline_end = Some(k + lk);
            }
            last_char_start = k;
            n_chars += 1;
            k += lk;
        }
        if let Some(end) = last_newline_end {
            return end;
        }
        if k == n || n_chars == 1 {
            return k;
        }
        last_char_start
    }

    /// Call `f` with each chunk of `text`.
    #[inline]
    pub fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) {
        let s = text.as_bytes();
        let mut i = 0;
        while i < s.len() {
            let end = self.chunk_end(s, i);
            // SAFETY: chunk boundaries fall on character boundaries of valid UTF-8.
            f(unsafe { text.get_unchecked(i..end) });
            i = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regex_chunks<'t>(re: &fancy_regex::Regex, text: &'t str) -> Vec<&'t str> {
        re.find_iter(text).map(|m| m.unwrap().as_str()).collect()
    }

    fn fast_chunks(k: usize, text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        FastSplitter::new(k).for_each_chunk(text, |c| out.push(c));
        out
    }

    /// A tiny deterministic PRNG (xorshift64*), so the tests need no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545F4914F6CDD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Characters that exercise every branch of the pattern: contraction letters in both cases
    /// (and U+017F, which folds to s), letters and numbers from many scripts, every kind of white
    /// space, punctuation, symbols, combining marks, controls and astral characters.
    const ALPHABET: &str = "'''sSdDmMtTlLvVeErRſKkxyz aAbc  \t\n\r\r\n\x0b\x0c\u{85}\u{a0}\u{1680}\u{2000}\u{200a}\u{2028}\u{2029}\u{202f}\u{205f}\u{3000}0123456789٣۴߂०১௫½¾²³ⅫⅯ〇𝟙𝟘!?.,;:-_()[]{}\"#$%&*+/<=>@\\^`|~¡¿«»–—…€£¥©®°±×÷\u{200b}\u{200d}\u{feff}\u{301}\u{308}\u{0}\u{1}\u{7f}éÉßçñøžŁıİǅʰжЖЯωΩάא١日本語中文한국어ひらがなカタカナ😀👍🏽👨‍👩‍👧\u{1F1FA}\u{1F1F8}𐍈𝔘\u{10FFFF}\u{E000}";

    fn random_text(rng: &mut Rng, alphabet: &[char], max_len: usize) -> String {
        let len = rng.below(max_len + 1);
        (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect()
    }

    #[test]
    fn known_splits() {
        let text = "Hello world's 12345 don'T  \n\n  foo!!!\n bar   baz\t";
        let got = fast_chunks(3, text);
        assert_eq!(
            got,
            vec![
                "Hello", " world", "'s", " ", "123", "45", " don", "'T", "  \n\n", " ", " foo",
                "!!!\n", " bar", "  ", " baz", "\t"
            ]
        );
        assert_eq!(fast_chunks(2, "12345"), vec!["12", "34", "5"]);
        // A space before the apostrophe takes it into a punctuation chunk.
        assert_eq!(
            fast_chunks(3, "'ſ 'LL\n'Ve"),
            vec!["'ſ", " '", "LL", "\n", "'Ve"]
        );
    }

    #[test]
    fn pattern_constants_are_the_family() {
        assert_eq!(gpt4_like_pattern(3), GPT4_PATTERN);
        assert_eq!(gpt4_like_pattern(2), DEFAULT_PATTERN);
        assert!(matches!(
            Splitter::new(GPT4_PATTERN).unwrap(),
            Splitter::Fast(_)
        ));
        assert!(matches!(
            Splitter::new(DEFAULT_PATTERN).unwrap(),
            Splitter::Fast(_)
        ));
        assert!(matches!(
            Splitter::new(r"\w+|\s+").unwrap(),
            Splitter::Regex(_)
        ));
        let err = Splitter::new("(unclosed").err().unwrap();
        assert!(!err.is_empty());
    }

    /// The fast splitter equals fancy-regex on many random strings, for several digit groupings.
    #[test]
    fn fast_equals_regex_on_random_text() {
        let alphabet: Vec<char> = ALPHABET.chars().collect();
        let mut rng = Rng(0x9E3779B97F4A7C15);
        for k in [1, 2, 3, 4] {
            let re = fancy_regex::Regex::new(&gpt4_like_pattern(k)).unwrap();
            for _ in 0..20_000 {
                let text = random_text(&mut rng, &alphabet, 40);
                assert_eq!(
                    fast_chunks(k, &text),
                    regex_chunks(&re, &text),
                    "k={k} text={text:?}"
                );
            }
        }
    }

    /// Strings of code points drawn from the whole Unicode range (ASCII half the time).
    #[test]
    fn fast_equals_regex_on_random_code_points() {
        let re = fancy_regex::Regex::new(GPT4_PATTERN).unwrap();
        let mut rng = Rng(7);
        for _ in 0..20_000 {
            let len = rng.below(30);
            let text: String = (0..len)
                .filter_map(|_| {
                    let cp = if rng.below(2) == 0 {
                        rng.below(128)
                    } else {
                        rng.below(0x11_0000)
                    };
                    char::from_u32(cp as u32)
                })
                .collect();
            assert_eq!(
                fast_chunks(3, &text),
                regex_chunks(&re, &text),
                "text={text:?}"
            );
        }
    }

    /// Small alphabets make the rarer situations (long white space runs ending in newlines,
    /// contractions next to letters, digit runs) frequent.
    #[test]
    fn fast_equals_regex_on_small_alphabets() {
        let re = fancy_regex::Regex::new(GPT4_PATTERN).unwrap();
        let mut rng = Rng(42);
        for alphabet in [
            "' sStTlLeEvVrRx",
            " \n\r\ta!",
            " \u{a0}\u{3000}\n1a.",
            "'1 a\n",
            "ſ'S s\r\n",
            "12٣½ x",
        ] {
            let alphabet: Vec<char> = alphabet.chars().collect();
            for _ in 0..20_000 {
                let text = random_text(&mut rng, &alphabet, 24);
                let mut got = Vec::new();
                FastSplitter::new(3).for_each_chunk(&text, |c| got.push(c));
                assert_eq!(got, regex_chunks(&re, &text), "text={text:?}");
            }
        }
    }

    /// Every code point, each in several contexts (after a space, an apostrophe, a letter, a digit,
    /// before a newline), agrees with fancy-regex.
    #[test]
    fn fast_equals_regex_on_every_code_point() {
        let re = fancy_regex::Regex::new(GPT4_PATTERN).unwrap();
        let all: Vec<char> = (0..0x11_0000u32).filter_map(char::from_u32).collect();
        for block in all.chunks(4096) {
            let mut text = String::new();
            for &c in block {
                for ctx in [" ", "'", "a", "1", "\n", "!", "  "] {
                    text.push_str(ctx);
                    text.push(c);
                }
            }
            assert_eq!(fast_chunks(3, &text), regex_chunks(&re, &text));
        }
    }
}
