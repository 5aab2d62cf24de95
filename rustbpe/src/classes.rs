//! Unicode character classes for the hand-written splitter.
//!
//! The GPT-4 split pattern asks three questions of every character: is it a letter (`\p{L}`),
//! a number (`\p{N}`), white space (`\s`)? To answer exactly as the regex engine does, the
//! tables are built from the engine's own parser (`regex-syntax`, the crate fancy-regex
//! delegates to), not from a second copy of the Unicode database that could disagree.

use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};

/// Flag bits of a character's class; a character with none of them is "other" (punctuation,
/// symbols, controls that are not white space, ...).
pub const LETTER: u8 = 1;
pub const NUMBER: u8 = 2;
pub const SPACE: u8 = 4;

const BLOCK: usize = 256;
const N_CODEPOINTS: usize = 0x11_0000;

/// A two-level lookup table from code point to class flags (~100 KB, built once).
pub struct CharClasses {
    ascii: [u8; 128],
    /// block id of each 256-code-point block
    index: Vec<u16>,
    /// the distinct blocks, `BLOCK` flags each
    blocks: Vec<u8>,
}

/// The code point ranges of a regex character class such as `\p{L}` or `(?i:s)`.
pub fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::Parser::new()
        .parse(pattern)
        .unwrap_or_else(|e| unreachable!("built-in class {pattern} must parse: {e}"));
    match hir.kind() {
        HirKind::Class(Class::Unicode(cls)) => cls
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        HirKind::Literal(lit) => {
            // A single character without case variants parses to a literal.
            let c = std::str::from_utf8(&lit.0)
                .ok()
                .and_then(|s| s.chars().next());
            c.map(|c| vec![(c as u32, c as u32)]).unwrap_or_default()
        }
        other => unreachable!("{pattern} is not a character class: {other:?}"),
    }
}

impl CharClasses {
    fn build() -> Self {
        let mut flags = vec![0u8; N_CODEPOINTS];
        for (pattern, bit) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in class_ranges(pattern) {
                for f in &mut flags[lo as usize..=hi as usize] {
                    *f |= bit;
                }
            }
        }
        let mut ascii = [0u8; 128];
        ascii.copy_from_slice(&flags[..128]);
        let mut seen: std::collections::HashMap<&[u8], u16> = std::collections::HashMap::new();
        let mut blocks = Vec::new();
        let mut index = Vec::with_capacity(N_CODEPOINTS / BLOCK);
        for block in flags.chunks(BLOCK) {
            let next_id = seen.len() as u16;
            let id = *seen.entry(block).or_insert_with(|| {
                blocks.extend_from_slice(block);
                next_id
            });
            index.push(id);
        }
        CharClasses {
            ascii,
            index,
            blocks,
        }
    }

    /// The shared table, built on first use.
    pub fn get() -> &'static CharClasses {
        static TABLE: OnceLock<CharClasses> = OnceLock::new();
        TABLE.get_or_init(CharClasses::build)
    }

    /// Class flags of code point `cp` (must be below 0x110000).
    #[inline(always)]
    pub fn of(&self, cp: u32) -> u8 {
        if cp < 128 {
            return self.ascii[cp as usize];
        }
        let block = self.index[(cp as usize) >> 8] as usize;
        self.blocks[block * BLOCK + (cp as usize & (BLOCK - 1))]
    }

    /// Class flags of an ASCII byte.
    #[inline(always)]
    pub fn of_ascii(&self, b: u8) -> u8 {
        self.ascii[(b & 0x7f) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_classes() {
        let t = CharClasses::get();
        assert_eq!(t.of('a' as u32), LETTER);
        assert_eq!(t.of('Z' as u32), LETTER);
        assert_eq!(t.of('7' as u32), NUMBER);
        for c in [' ', '\t', '\n', '\r', '\x0b', '\x0c'] {
            assert_eq!(t.of(c as u32), SPACE, "{c:?}");
        }
        for c in ['!', '\'', '_', '\0', '\x7f'] {
            assert_eq!(t.of(c as u32), 0, "{c:?}");
        }
    }

    #[test]
    fn unicode_classes() {
        let t = CharClasses::get();
        for c in ['é', 'ß', 'ж', '中', 'ſ', 'ǅ', 'ʰ'] {
            assert_eq!(t.of(c as u32), LETTER, "{c:?}");
        }
        for c in ['٣', '½', 'Ⅻ', '²', '𝟙'] {
            assert_eq!(t.of(c as u32), NUMBER, "{c:?}");
        }
        for c in ['\u{85}', '\u{a0}', '\u{2003}', '\u{2028}', '\u{3000}'] {
            assert_eq!(t.of(c as u32), SPACE, "{c:?}");
        }
        for c in ['😀', '€', '\u{200b}', '\u{301}', '\u{10ffff}'] {
            assert_eq!(t.of(c as u32), 0, "{c:?}");
        }
    }

    /// Every code point agrees with fancy-regex matching the single-class patterns.
    #[test]
    fn all_code_points_agree_with_fancy_regex() {
        let t = CharClasses::get();
        let letter = fancy_regex::Regex::new(r"^\p{L}$").unwrap();
        let number = fancy_regex::Regex::new(r"^\p{N}$").unwrap();
        let space = fancy_regex::Regex::new(r"^\s$").unwrap();
        let mut buf = [0u8; 4];
        for c in (0..N_CODEPOINTS as u32).filter_map(char::from_u32) {
            let s = c.encode_utf8(&mut buf);
            let bit =
                |re: &fancy_regex::Regex, flag: u8| if re.is_match(s).unwrap() { flag } else { 0 };
            let want = bit(&letter, LETTER) | bit(&number, NUMBER) | bit(&space, SPACE);
            assert_eq!(t.of(c as u32), want, "U+{:04X}", c as u32);
        }
    }
}
