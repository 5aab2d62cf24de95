"""The Rust BPE trainer (`nanochat_rustbpe`, built from rustbpe/) against the pure-Python reference
trainer, PyPI `rustbpe` and tiktoken."""
import random

import pytest
import rustbpe
import tiktoken
from hypothesis import given, settings, strategies as st

import nanochat_rustbpe as nrb
from nanochat_lib.tokenizer import train_bpe_python

PATTERNS = {"default": nrb.DEFAULT_PATTERN, "gpt4": nrb.GPT4_PATTERN}


def _words(rng, alphabet, n, lo=1, hi=9):
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def _corpus(kind: str, seed: int = 0) -> list:
    "A few dozen small documents of one kind of text, made from a seeded generator."
    rng = random.Random(f"{kind}-{seed}")
    if kind == "ascii":
        vocab = _words(rng, "etaoinshrdlucmfwyp", 60) + ["the", "of", "and", "don't", "it's", "we'll", "THE"]
        pieces = lambda: rng.choice(vocab) + rng.choice([" ", " ", " ", ", ", ". ", "\n", "! ", "? "])
    elif kind == "accented":
        vocab = ["café", "naïve", "über", "Straße", "garçon", "Ελλάδα", "привет", "tiếng", "Việt", "ﬁn", "Ǆemal", "ſtraße"]
        pieces = lambda: rng.choice(vocab) + rng.choice([" ", " ", "'s ", "’ ", ", "])
    elif kind == "cjk":
        vocab = ["日本語", "中文", "한국어", "ひらがな", "カタカナ", "漢字", "東京", "서울", "北京"]
        pieces = lambda: rng.choice(vocab) + rng.choice(["", "、", "。", " ", "\n"])
    elif kind == "emoji":
        vocab = ["😀", "👍🏽", "👨‍👩‍👧", "🇺🇸", "❤️", "🔥🔥", "✨", "smile", "🙂x"]
        pieces = lambda: rng.choice(vocab) + rng.choice(["", " ", "\n", "!"])
    elif kind == "digits":
        pieces = lambda: rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 12))), "٣٤٥", "½", "Ⅻ", "2024-01-31", "3.14159",
                                     "+1 (555) 0100"]) + rng.choice([" ", ",", "\n", "x"])
    elif kind == "whitespace":
        pieces = lambda: rng.choice(["a", "bb", "if", "x = 1", "\t", "    ", "  \n", "\r\n", "\n\n\n", " \u00a0", "\u3000", "\u2028"]) \
            + rng.choice(["", " ", "  ", "\t", "\n"])
    elif kind == "mixed":
        return [d for k in ("ascii", "accented", "cjk", "emoji", "digits", "whitespace") for d in _corpus(k, seed)[:12]]
    else:
        raise ValueError(kind)
    return ["".join(pieces() for _ in range(rng.randint(5, 40))) for _ in range(40)]


KINDS = ("ascii", "accented", "cjk", "emoji", "digits", "whitespace", "mixed")


def train_ours(texts, vocab_size, pattern=None, **kw):
    tok = nrb.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=pattern, **kw)
    return tok


def pypi_ranks(texts, vocab_size, pattern):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
    return tok.get_mergeable_ranks()


# ---- merges ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_merges_equal_python_reference(kind, pattern):
    texts = _corpus(kind)
    for vocab_size in (256, 270, 400, 700):
        want = train_bpe_python(texts, vocab_size, PATTERNS[pattern])
        got = train_ours(texts, vocab_size, PATTERNS[pattern]).get_merges()
        assert got == [tuple(m) for m in want], f"{kind} vocab {vocab_size}"


@pytest.mark.parametrize("kind", KINDS)
def test_mergeable_ranks_equal_pypi_rustbpe(kind):
    texts = _corpus(kind, seed=1)
    for pattern in PATTERNS.values():
        for vocab_size in (300, 1000):
            assert train_ours(texts, vocab_size, pattern).get_mergeable_ranks() == pypi_ranks(texts, vocab_size, pattern)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="ab' \n\t1٣éß中😀\u00a0.,!ſS\r", max_size=30), min_size=1, max_size=8))
def test_merges_equal_python_reference_on_random_text(texts):
    if not "".join(texts):
        return  # an empty corpus is an error, tested below
    for pattern in PATTERNS.values():
        want = [tuple(m) for m in train_bpe_python(texts, 300, pattern)]
        assert train_ours(texts, 300, pattern).get_merges() == want


def test_other_patterns_run_on_fancy_regex():
    texts = _corpus("mixed")
    pattern = r" ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"
    tok = train_ours(texts, 500, pattern)
    assert tok.get_pattern() == pattern
    assert tok.get_merges() == [tuple(m) for m in train_bpe_python(texts, 500, pattern)]


def test_ties_go_to_the_smaller_pair():
    # every pair occurs twice: (a, b) = (97, 98) is the smallest, then (98, 99) ...
    tok = train_ours(["abcd", "abcd"], 259)
    assert tok.get_merges() == [(97, 98), (99, 100), (256, 257)]


def test_training_stops_early_when_no_pair_is_left():
    tok = train_ours(["ab ab ab", "x"], 100_000)
    merges = tok.get_merges()
    assert merges == [(97, 98), (32, 256)]   # "ab", then " ab"
    ranks = tok.get_mergeable_ranks()
    assert len(ranks) == 256 + len(merges)
    assert ranks[256:] == [(b"ab", 256), (b" ab", 257)]
    assert ranks[:256] == [(bytes([i]), i) for i in range(256)]


def test_buffer_size_does_not_change_merges():
    texts = _corpus("mixed", seed=3)
    want = train_ours(texts, 600).get_merges()
    for buffer_size in (1, 3, 64, 10_000):
        assert train_ours(texts, 600, buffer_size=buffer_size).get_merges() == want


def test_default_pattern_and_constants():
    assert nrb.GPT4_PATTERN.count(r"\p{N}{1,3}") == 1
    assert nrb.DEFAULT_PATTERN == nrb.GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}{1,2}")
    assert nrb.Tokenizer().get_pattern() == nrb.DEFAULT_PATTERN
    tok = train_ours(["12345 12345"], 300)
    assert tok.get_pattern() == nrb.DEFAULT_PATTERN
    assert (ord("1"), ord("2")) in tok.get_merges()
    tok = train_ours(["12345 12345"], 300, pattern=nrb.GPT4_PATTERN)
    assert tok.get_pattern() == nrb.GPT4_PATTERN


def test_both_rust_trainers_import_in_one_process():
    assert nrb.Tokenizer is not rustbpe.Tokenizer
    assert nrb.__name__ == "nanochat_rustbpe" and rustbpe.__name__ == "rustbpe"


# ---- encoding -------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", PATTERNS)
def test_encode_equals_tiktoken(pattern):
    pat = PATTERNS[pattern]
    tok = train_ours(_corpus("mixed"), 1000, pat)
    enc = tiktoken.Encoding(name="t", pat_str=pat, mergeable_ranks=dict(tok.get_mergeable_ranks()), special_tokens={})
    held_out = [d for k in KINDS for d in _corpus(k, seed=7)[:5]] + ["", " ", "\n\n", "don't stop 1234567 😀👍🏽 日本", "a" * 500]
    for text in held_out:
        assert tok.encode(text) == enc.encode_ordinary(text), repr(text)
    assert tok.batch_encode(held_out) == enc.encode_ordinary_batch(held_out)
    assert tok.batch_encode([]) == []


def test_encode_untrained_is_bytes():
    tok = nrb.Tokenizer()
    assert tok.encode("hé!") == list("hé!".encode())
    assert tok.get_merges() == [] and len(tok.get_mergeable_ranks()) == 256


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_size", [255, 0, -1])
def test_vocab_size_below_256(vocab_size):
    with pytest.raises(ValueError, match=f"vocab_size must be at least 256.*got {vocab_size}"):
        train_ours(["hello"], vocab_size)


def test_invalid_pattern():
    with pytest.raises(ValueError, match=r'invalid split pattern "\(unclosed": .*parenthesis'):
        train_ours(["hello"], 300, pattern="(unclosed")


@pytest.mark.parametrize("bad, name", [(3, "int"), (b"bytes", "bytes"), (None, "NoneType")])
def test_item_not_str(bad, name):
    with pytest.raises(TypeError, match=f"item 2 of the iterator is {name}"):
        train_ours(["a", "b", bad, "c"], 300)


def test_not_iterable():
    with pytest.raises(TypeError, match="iterable of str, got int"):
        nrb.Tokenizer().train_from_iterator(5, 300)


@pytest.mark.parametrize("texts", [[], [""], ["", ""]])
def test_empty_corpus(texts):
    with pytest.raises(ValueError, match="corpus is empty"):
        train_ours(texts, 300)


def test_bad_buffer_size():
    with pytest.raises(ValueError, match="buffer_size"):
        train_ours(["abc"], 300, buffer_size=0)


def test_iterator_exception_propagates():
    class Boom(Exception):
        pass

    def gen():
        yield "hello world"
        raise Boom("from the iterator")

    with pytest.raises(Boom, match="from the iterator"):
        train_ours(gen(), 300)


def test_failed_training_keeps_the_previous_state():
    tok = train_ours(["ab ab ab"], 258)
    before = tok.get_merges()
    with pytest.raises(TypeError):
        tok.train_from_iterator(iter(["x", 1]), 300)
    assert tok.get_merges() == before and tok.get_pattern() == nrb.DEFAULT_PATTERN
