"Tests for nanochat_lib.tokenizer: trainers, tiktoken export, special tokens, chat rendering, saving, references."
import base64, hashlib, io, json, random, tarfile, zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from nanochat_lib import fetch, tokenizer as T
from nanochat_lib.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe_python

# ---------------------------------------------------------------------------------------------------
# Corpora made in code: each stresses a different part of the split pattern and of UTF-8.

def _corpus(kind: str, seed: int = 0) -> list:
    rng = random.Random(seed)
    words = "the of and to in is was for on that with as by at from it this be are or an".split()
    pick = lambda pool, n: " ".join(rng.choice(pool) for _ in range(n))
    if kind == "ascii":
        return [pick(words, 40).capitalize() + ". It's what we'd do, isn't it?" for _ in range(30)]
    if kind == "accented":
        pool = "café naïve über straße garçon déjà vu façade jalapeño Ångström smörgåsbord crème brûlée".split()
        return [pick(pool, 30) for _ in range(30)]
    if kind == "cjk":
        pool = list("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后")
        return ["".join(rng.choice(pool) for _ in range(80)) + "。東京と한국어 텍스트" for _ in range(20)]
    if kind == "emoji":
        pool = ["😀", "👍🏽", "👨‍👩‍👧", "🇩🇪", "❤️", "🔥", "ok", " ", "🚀🚀"]
        return ["".join(rng.choice(pool) for _ in range(60)) for _ in range(20)]
    if kind == "digits":
        return [" ".join(str(rng.randrange(10 ** rng.randint(1, 9))) for _ in range(40)) + " 3.14159 1e-9 $1,234" for _ in range(20)]
    if kind == "whitespace":
        pool = ["  ", "\t", "\n", "\r\n", "    ", "\n\n\n", " x", "y ", "if:", "\t\treturn", "  # c"]
        return ["".join(rng.choice(pool) for _ in range(80)) for _ in range(20)]
    if kind == "mixed":
        return [t for k in ("ascii", "accented", "cjk", "emoji", "digits", "whitespace") for t in _corpus(k, seed + 1)[:6]]
    raise ValueError(kind)

KINDS = ["ascii", "accented", "cjk", "emoji", "digits", "whitespace", "mixed"]

def _rust_available() -> bool:
    try: T.rust_bpe(); return True
    except ImportError: return False

needs_rust = pytest.mark.skipif(not _rust_available(), reason="no Rust BPE trainer (nanochat_rustbpe or rustbpe) installed")

@pytest.fixture(scope="module")
def tok():
    "A small tokenizer trained on all the corpora."
    if _rust_available(): return Tokenizer.train(_corpus("mixed") + _corpus("ascii"), 600)
    return Tokenizer.from_merges(train_bpe_python(_corpus("mixed") + _corpus("ascii"), 600 - 9))

# ---------------------------------------------------------------------------------------------------
# The pure-Python trainer

def test_python_trainer_toy():
    a, b = ord("a"), ord("b")
    assert train_bpe_python("aaaa", 258) == [(a, a), (256, 256)]
    assert train_bpe_python(["ba", "ab"], 257) == [(a, b)]                    # tie -> smaller pair
    assert train_bpe_python(["ab", "ca"], 257) == [(a, b)]                    # tie broken on the first id
    assert train_bpe_python(["ac", "ab"], 257) == [(a, b)]                    # ... then on the second
    assert train_bpe_python("ab cd", 10_000) == [(32, ord("c")), (a, b), (256, ord("d"))]   # stops early
    assert train_bpe_python([], 300) == [] and train_bpe_python("x", 256) == []

def test_python_trainer_respects_chunks():
    merges = train_bpe_python(["a b " * 50], 300)
    vocab = T.ranks_from_merges(merges)
    assert all(not (t.endswith(b" ") and t.strip()) for t in vocab)             # no token spans "a " + "b"
    assert T.split_chunks("1234567") == ["12", "34", "56", "7"]
    assert T.split_chunks("1234567", T.GPT4_SPLIT_PATTERN) == ["123", "456", "7"]

def test_python_trainer_matches_recount_from_scratch():
    "The incremental pair counts give the same merges as naively recounting everything each step."
    texts = _corpus("mixed")
    words = T.count_chunks(texts)
    naive = []
    for new_id in range(256, 256 + 80):
        stats = T.Counter()
        for w, n in words.items(): T.count_pairs(w, stats, n)
        if not stats: break
        pair = T.best_pair(stats)
        naive.append(pair)
        words = {T.merge_pair(w, pair, new_id): n for w, n in words.items()}
    assert train_bpe_python(texts, 256 + 80) == naive

def test_ranks_merges_round_trip():
    merges = train_bpe_python(_corpus("mixed"), 400)
    ranks = T.ranks_from_merges(merges)
    assert len(ranks) == 256 + len(merges) and T.merges_from_ranks(ranks) == merges
    with pytest.raises(ValueError, match="not defined before"): T.ranks_from_merges([(300, 1)])

# ---------------------------------------------------------------------------------------------------
# The Rust trainer against the Python reference

@needs_rust
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab_size", [260, 330, 700])
def test_rust_merges_equal_python(kind, vocab_size):
    texts = _corpus(kind)
    rt = T.train_bpe_rust(texts, vocab_size)
    assert T.rust_merges(rt) == train_bpe_python(texts, vocab_size)
    assert dict(rt.get_mergeable_ranks()) == T.ranks_from_merges(train_bpe_python(texts, vocab_size))

@needs_rust
def test_rust_merges_equal_python_gpt4_pattern():
    texts = _corpus("digits") + _corpus("ascii")
    rt = T.train_bpe_rust(texts, 500, pattern=T.GPT4_SPLIT_PATTERN)
    assert rt.get_pattern() == T.GPT4_SPLIT_PATTERN
    assert T.rust_merges(rt) == train_bpe_python(texts, 500, pattern=T.GPT4_SPLIT_PATTERN)

@needs_rust
def test_course_extension_constants():
    mod = T.rust_bpe()
    if mod.__name__ != "nanochat_rustbpe": pytest.skip("course extension not built; PyPI rustbpe stands in")
    assert mod.DEFAULT_PATTERN == T.SPLIT_PATTERN and mod.GPT4_PATTERN == T.GPT4_SPLIT_PATTERN

@needs_rust
def test_tiktoken_equals_rust_encoder(tok):
    texts = [t for k in KINDS for t in _corpus(k, seed=7)] + ["", " ", "\n", "Hello   world\n\n  x", "a" * 1000]
    assert tok.encode_batch(texts) == tok.rust.batch_encode(texts)
    assert [tok.encode(t) for t in texts[:20]] == [tok.rust.encode(t) for t in texts[:20]]

# ---------------------------------------------------------------------------------------------------
# Tokenizer basics

def test_special_token_ids(tok):
    n = tok.vocab_size
    assert n == 600 and len(tok.mergeable_ranks) == n - 9
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(n - 9, n))
    assert tok.bos_id == n - 9 and SPECIAL_TOKENS[0] == "<|bos|>" and len(SPECIAL_TOKENS) == 9
    assert tok.special_tokens == {s: n - 9 + i for i, s in enumerate(SPECIAL_TOKENS)}

def test_encode_prepend_append_batch(tok):
    ids = tok.encode("hello")
    assert tok.encode("hello", prepend="<|bos|>", append=tok.encode_special("<|user_end|>")) == \
        [tok.bos_id] + ids + [tok.encode_special("<|user_end|>")]
    assert tok.encode(["hello", "x"], prepend="<|bos|>") == [[tok.bos_id] + ids, [tok.bos_id] + tok.encode("x")]
    assert tok.encode_batch(["hello", "x"], num_threads=2) == [ids, tok.encode("x")]
    assert tok.bos_id not in tok.encode("<|bos|>")                          # special text in data is plain text
    assert tok.decode([tok.bos_id]) == "<|bos|>"

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_round_trip_random_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=50), max_size=8))
def test_round_trip_batch(tok, texts):
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts

@needs_rust
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=100))
def test_tiktoken_equals_rust_random(tok, text):
    assert tok.encode(text) == tok.rust.encode(text)

def test_generator_input_and_pickle(tok):
    import pickle
    texts = ["hello world", "x y z"]
    assert tok.encode_batch(t for t in texts) == tok.encode_batch(texts)
    tok2 = pickle.loads(pickle.dumps(tok))                          # worker processes get a copy
    assert tok2.encode_batch(texts) == tok.encode_batch(texts) and tok2.rust is None

def test_token_bytes_are_raw_lengths():
    hangul = "한".encode()                                        # 3 bytes: ED 95 9C
    tok = Tokenizer.from_merges([(hangul[0], hangul[1]), (256, hangul[2])])
    tb = tok.token_bytes
    assert tb.dtype == torch.int32 and tb.shape == (256 + 2 + 9,)
    assert tb[256] == 2 and tb[257] == 3                           # an incomplete UTF-8 sequence keeps its true length
    assert tok.decode([256]) == "\ufffd"                           # (a lossy decode would have said 3)
    assert tb[:256].tolist() == [1] * 256 and tb[-9:].tolist() == [0] * 9
    assert tok.encode("한") == [257]

def test_from_ranks_validation():
    ranks = T.ranks_from_merges([])
    with pytest.raises(ValueError, match="each exactly once"): Tokenizer({**ranks, b"ab": 300})
    with pytest.raises(ValueError, match="single-byte"): Tokenizer({bytes([i]): i for i in range(255)} | {b"ab": 255})
    with pytest.raises(ValueError, match="reuse ids"): Tokenizer(ranks, special_tokens={"<|bos|>": 3})
    with pytest.raises(ValueError, match="bos token"): Tokenizer(ranks, special_tokens={"<|eot|>": 256})
    with pytest.raises(ValueError, match="invalid split pattern"): Tokenizer(ranks, pattern="(")
    t = Tokenizer(ranks, special_tokens={"<|endoftext|>": 256}, bos="<|endoftext|>", name="ref")
    assert t.bos_id == 256 and t.vocab_size == 257

def test_bad_inputs(tok):
    with pytest.raises(KeyError, match="no special token"): tok.encode_special("<|nope|>")
    with pytest.raises(KeyError, match="no special token"): tok.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError, match="special-token name or an id"): tok.encode("x", append=10**6)
    with pytest.raises(TypeError, match="str or a list"): tok.encode(b"bytes")
    with pytest.raises(TypeError, match="item 1"): tok.encode_batch(["ok", 3])
    with pytest.raises(ValueError, match="at least 256"): train_bpe_python("x", 10)
    with pytest.raises(ValueError, match="invalid split pattern"): train_bpe_python("x", 300, pattern="[")
    with pytest.raises(ValueError, match="at least 265"): Tokenizer.train(["x"], 264)

# ---------------------------------------------------------------------------------------------------
# Conversations

def _render(tok, messages, **kw):
    return tok.render_conversation({"messages": messages}, **kw)

def _segments(tok, ids, mask):
    "Decoded runs of equal mask value: [(mask, text), ...]."
    out = []
    for i, m in zip(ids, mask):
        if out and out[-1][0] == m: out[-1][1].append(i)
        else: out.append((m, [i]))
    return [(m, tok.decode(run)) for m, run in out]

def test_render_user_and_text(tok):
    ids, mask = _render(tok, [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}])
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    assert _segments(tok, ids, mask) == [(0, "<|bos|><|user_start|>Hi there<|user_end|><|assistant_start|>"),
                                         (1, "Hello!<|assistant_end|>")]

def test_render_python_and_output_parts(tok):
    parts = [{"type": "text", "text": "Computing. "}, {"type": "python", "text": "6*7"},
             {"type": "python_output", "text": "42"}, {"type": "text", "text": "It is 42."}]
    ids, mask = _render(tok, [{"role": "user", "content": "6*7?"}, {"role": "assistant", "content": parts}])
    assert _segments(tok, ids, mask) == [
        (0, "<|bos|><|user_start|>6*7?<|user_end|><|assistant_start|>"),
        (1, "Computing. <|python_start|>6*7<|python_end|>"),
        (0, "<|output_start|>42<|output_end|>"),
        (1, "It is 42.<|assistant_end|>")]

def test_render_system_merge_and_multi_turn(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    conv = {"messages": msgs}
    ids, mask = tok.render_conversation(conv)
    assert tok.decode(ids) == ("<|bos|><|user_start|>Be brief.\n\nQ1<|user_end|><|assistant_start|>A1<|assistant_end|>"
                               "<|user_start|>Q2<|user_end|><|assistant_start|>A2<|assistant_end|>")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "A1<|assistant_end|>A2<|assistant_end|>"
    assert msgs[1]["content"] == "Q1" and len(msgs) == 5                  # the input is not modified
    prompt = tok.render_for_completion(conv)
    assert tok.decode(prompt).endswith("<|user_start|>Q2<|user_end|><|assistant_start|>") and "A2" not in tok.decode(prompt)
    assert tok.render_for_completion({"messages": msgs[:4]}) == prompt     # ending in a user turn works too
    assert len(msgs) == 5

def test_render_truncation(tok):
    msgs = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok " * 300}]
    full_ids, full_mask = _render(tok, msgs, max_tokens=10**6)
    ids, mask = _render(tok, msgs, max_tokens=64)
    assert len(full_ids) > 64 and ids == full_ids[:64] and mask == full_mask[:64]

@pytest.mark.parametrize("messages, match", [
    ([], "at least one message"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
    ([{"role": "assistant", "content": "a"}], "message 0 has role 'assistant'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "assistant", "content": "c"}], "message 3 has role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message may be a system"),
    ([{"role": "system", "content": "s"}], "message 1 must be a user"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1 has role 'bot'"),
    ([{"role": "user"}], "message 0 must be a dict with 'role' and 'content'"),
    ([{"role": "user", "content": ["a"]}], "message 0 \\(user\\) must have str content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "message 1, part 0: unknown part type 'image'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
      {"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "python"}]}], "message 2, part 1 \\(python\\)"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}], "message 1 \\(assistant\\) content"),
])
def test_render_errors(tok, messages, match):
    with pytest.raises(ValueError, match=match): tok.render_conversation({"messages": messages})

def test_visualize(tok):
    ids, mask = _render(tok, [{"role": "user", "content": "a<b>\nc"}, {"role": "assistant", "content": "d"}])
    ansi = tok.visualize(ids, mask)
    assert "\x1b[30;42m" in ansi and "\x1b[30;47m" in ansi and "<|assistant_end|>" in ansi
    page = tok.visualize(ids, mask, fmt="html", with_ids=True)
    assert page.startswith("<pre") and "&lt;" in page and "&gt;" in page and "<b" not in page and f"[{tok.bos_id}]" in page
    assert page.count("<span") == len(ids)
    assert "\x1b[" in tok.visualize(ids)                                   # no mask: alternating shades only
    with pytest.raises(ValueError, match="mask has"): tok.visualize(ids, mask[:-1])
    with pytest.raises(ValueError, match="fmt must be"): tok.visualize(ids, mask, fmt="latex")

# ---------------------------------------------------------------------------------------------------
# Saving and loading

def test_save_load_round_trip(tok, tmp_path):
    d = tok.save(tmp_path / "tok")
    assert sorted(p.name for p in d.iterdir()) == [T.RANKS_FILE, T.CONFIG_FILE]
    config = json.loads((d / T.CONFIG_FILE).read_text())
    assert config["version"] == T.TOKENIZER_FORMAT_VERSION and config["pattern"] == tok.pattern
    tok2 = Tokenizer.load(d)
    texts = [t for k in KINDS for t in _corpus(k, seed=3)]
    assert tok2.encode_batch(texts) == tok.encode_batch(texts)
    assert torch.equal(tok2.token_bytes, tok.token_bytes)
    assert tok2.special_tokens == tok.special_tokens and tok2.vocab_size == tok.vocab_size
    assert tok2.mergeable_ranks == tok.mergeable_ranks and tok2.pattern == tok.pattern
    assert not any(p.name.endswith(".pkl") for p in d.iterdir())

def _edit_config(d, **changes):
    p = d / T.CONFIG_FILE
    config = json.loads(p.read_text()); config.update(changes); p.write_text(json.dumps(config))

def test_load_refuses_bad_files(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"): Tokenizer.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"): Tokenizer.load(tmp_path / "empty")

    d = tok.save(tmp_path / "a")
    ranks = (d / T.RANKS_FILE).read_bytes()
    (d / T.RANKS_FILE).write_bytes(ranks.replace(b" 300\n", b" 301\n", 1))
    with pytest.raises(ValueError, match="does not match the sha256"): Tokenizer.load(d)
    (d / T.RANKS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="ranks.tiktoken is missing"): Tokenizer.load(d)

    d = tok.save(tmp_path / "b")
    _edit_config(d, version=99)
    with pytest.raises(ValueError, match="format version 99"): Tokenizer.load(d)
    _edit_config(d, version=T.TOKENIZER_FORMAT_VERSION, format="something-else")
    with pytest.raises(ValueError, match="is not a nanochat-tokenizer file"): Tokenizer.load(d)
    (d / T.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"): Tokenizer.load(d)

    d = tok.save(tmp_path / "c")                       # ranks with a gap, checksum updated: caught by validation
    lines = (d / T.RANKS_FILE).read_text().splitlines(keepends=True)
    gap = "".join(lines[:-2] + [lines[-1]])
    (d / T.RANKS_FILE).write_text(gap)
    _edit_config(d, ranks_sha256=hashlib.sha256(gap.encode()).hexdigest())
    with pytest.raises(ValueError, match="each exactly once"): Tokenizer.load(d)

    d = tok.save(tmp_path / "d")                       # a garbled line
    bad = "not-base64!! x\n" + (d / T.RANKS_FILE).read_text()
    (d / T.RANKS_FILE).write_text(bad)
    _edit_config(d, ranks_sha256=hashlib.sha256(bad.encode()).hexdigest())
    with pytest.raises(ValueError, match="line 1: expected 'base64-token rank'"): Tokenizer.load(d)

def _one_line_error(d, field):
    "Tokenizer.load(d) fails with a one-line ValueError naming tokenizer.json and `field`."
    with pytest.raises(ValueError) as e: Tokenizer.load(d)
    msg = str(e.value)
    assert "\n" not in msg and str(d / T.CONFIG_FILE) in msg and field in msg, msg
    return msg

BAD_FIELDS = [
    ("non-string pattern", dict(pattern=42), "pattern"),
    ("empty pattern", dict(pattern=""), "pattern"),
    ("pattern that does not compile", dict(pattern="(unclosed"), "pattern"),
    ("pattern that drops text", dict(pattern=r"\w+"), "pattern"),
    ("pattern that backtracks", dict(pattern=r"(a|a)*\1c|\s+|[^\s]+"), "pattern"),
    ("pattern that backtracks (lookahead)", dict(pattern=r"(?:(a)|a)*?\1?(?=b)|\s+|\S+"), "pattern"),
    ("huge special id", dict(special_tokens={s: 10**12 + i for i, s in enumerate(SPECIAL_TOKENS)}), "special_tokens"),
    ("astronomic special id", dict(special_tokens={"<|bos|>": 10**400}), "special_tokens"),
    ("string special id", dict(special_tokens={"<|bos|>": "591"}), "special_tokens"),
    ("float special id", dict(special_tokens={"<|bos|>": 591.0}), "special_tokens"),
    ("bool special id", dict(special_tokens={"<|bos|>": True}), "special_tokens"),
    ("negative special id", dict(special_tokens={"<|bos|>": -1}), "special_tokens"),
    ("special tokens not an object", dict(special_tokens=["<|bos|>"]), "special_tokens"),
    ("empty special name", dict(special_tokens={"": 591}), "special_tokens"),
    ("bos not a special token", dict(bos="<|nope|>"), "bos"),
    ("bos not a string", dict(bos=["<|bos|>"]), "bos"),
    ("vocab_size a string", dict(vocab_size="600"), "vocab_size"),
    ("vocab_size wrong", dict(vocab_size=601), "vocab_size"),
    ("n_ranks wrong", dict(n_ranks=590), "n_ranks"),
    ("sha256 not hex", dict(ranks_sha256=5), "ranks_sha256"),
    ("name not a string", dict(name={"a": 1}), "name"),
]

@pytest.mark.parametrize("name,changes,field", BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_load_names_the_file_and_field_of_a_bad_config(tok, tmp_path, name, changes, field):
    d = tok.save(tmp_path / "t")
    config = json.loads((d / T.CONFIG_FILE).read_text())
    if "special_tokens" in changes and len(changes["special_tokens"]) == 1 and isinstance(changes["special_tokens"], dict):
        changes = dict(special_tokens={**config["special_tokens"], **changes["special_tokens"]})  # one bad entry
    _edit_config(d, **changes)
    _one_line_error(d, field)

def test_load_refuses_duplicate_and_colliding_special_ids(tok, tmp_path):
    d = tok.save(tmp_path / "t")
    specials = json.loads((d / T.CONFIG_FILE).read_text())["special_tokens"]
    n = len(tok.mergeable_ranks)
    _edit_config(d, special_tokens={**specials, "<|user_start|>": specials["<|bos|>"]})
    assert "used twice" in _one_line_error(d, "special_tokens")
    _edit_config(d, special_tokens={**specials, "<|bos|>": 100})                     # a learned token's id
    assert "collides with the" in _one_line_error(d, "special_tokens")
    _edit_config(d, special_tokens={**specials, "<|bos|>": n + 50})                  # a gap
    assert f"must be {n}..{n + len(specials) - 1}" in _one_line_error(d, "special_tokens")

def test_load_refuses_files_that_are_not_utf8_json(tok, tmp_path):
    d = tok.save(tmp_path / "t")
    p = d / T.CONFIG_FILE
    p.write_bytes(p.read_bytes().replace(b'"nanochat-tokenizer"', b'"nanochat-\xff\xfetokenizer"'))
    with pytest.raises(ValueError, match="is not UTF-8 text") as e: Tokenizer.load(d)
    assert str(p) in str(e.value)
    p.write_text("[" * 100000 + "]" * 100000)                                     # deep enough to recurse
    with pytest.raises(ValueError, match="not valid JSON|is not a nanochat-tokenizer file"): Tokenizer.load(d)
    for missing in ("pattern", "special_tokens", "bos", "vocab_size", "ranks_sha256"):
        d2 = tok.save(tmp_path / missing)
        config = json.loads((d2 / T.CONFIG_FILE).read_text()); del config[missing]
        (d2 / T.CONFIG_FILE).write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"lacks the keys \\['{missing}'\\]"): Tokenizer.load(d2)
    d3 = tok.save(tmp_path / "v")
    _edit_config(d3, version=True)                                                # True == 1, but it is no version
    with pytest.raises(ValueError, match="format version True"): Tokenizer.load(d3)

def test_a_backtracking_pattern_is_refused_quietly(tok, tmp_path, capfd):
    d = tok.save(tmp_path / "t")
    _edit_config(d, pattern=r"(a|a)*\1c|\s+|[^\s]+")
    assert "backtracks" in _one_line_error(d, "pattern")
    assert "panicked" not in capfd.readouterr().err                              # tiktoken's panic stays off stderr
    enc = tok.enc                                                                 # the Python-regex stage alone
    with pytest.raises(ValueError, match="took over 0.2 s"):
        T.check_pattern(enc, r"(?:a|a)*\d|[\s\S]", probe="a" * 40, timeout_s=0.2)
    assert T.check_pattern(enc, tok.pattern) is None

# ---------------------------------------------------------------------------------------------------
# Reference encodings (no downloads: pip_fetch serves archives built here)

def _fixture_ranks() -> bytes:
    ranks = T.ranks_from_merges(train_bpe_python(_corpus("ascii"), 300))
    return T.ranks_text(ranks).encode()

@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    "pip_fetch replaced by a function that serves a wheel / sdist made here, holding a small rank file."
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path / "cache"))
    T.reference_encoding.cache_clear()
    data = _fixture_ranks()
    whl = tmp_path / "litellm-1.80.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("litellm/__init__.py", "")
        z.writestr(T.REFERENCE_SOURCES["cl100k_base"]["member"], data)
    sdist = tmp_path / "openai_whisper-20250625.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("openai_whisper-20250625/whisper/assets/gpt2.tiktoken"); info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    calls = []
    def pip_fetch(name, version, sha256, *, sdist=False):
        calls.append((name, version, sha256, sdist))
        return {"litellm": whl, "openai-whisper": sdist_path}[name]
    sdist_path = sdist
    monkeypatch.setattr(fetch, "pip_fetch", pip_fetch)
    yield dict(data=data, sha=hashlib.sha256(data).hexdigest(), calls=calls)
    T.reference_encoding.cache_clear()

def _fake_recipe(monkeypatch, recipe, sha, specials):
    "Stand in for one of tiktoken's recipes, keeping its shape: it asks the loader for a URL with an expected hash."
    from tiktoken_ext import openai_public
    def fake():
        return dict(name=recipe, pat_str=openai_public.r50k_pat_str, special_tokens=specials,
                    mergeable_ranks=openai_public.load_tiktoken_bpe(f"https://example.invalid/{recipe}.tiktoken",
                                                                    expected_hash=sha))
    monkeypatch.setattr(openai_public, recipe, fake)

def test_reference_encoding_from_registry_fixture(fake_registry, monkeypatch):
    _fake_recipe(monkeypatch, "r50k_base", fake_registry["sha"], {"<|endoftext|>": 300})
    _fake_recipe(monkeypatch, "cl100k_base", fake_registry["sha"], {"<|endoftext|>": 300, "<|fim_prefix|>": 301})
    gpt2 = T.reference_encoding("gpt2")
    assert gpt2.name == "gpt2" and gpt2.n_vocab == 301
    assert gpt2.decode(gpt2.encode_ordinary("the of and")) == "the of and"
    gpt4 = T.reference_encoding("cl100k_base")
    assert gpt4.n_vocab == 302 and T.reference_encoding("gpt2") is gpt2
    src = {k: fetch.PACKAGES[v["package"]] for k, v in T.REFERENCE_SOURCES.items()}
    assert fake_registry["calls"] == [("openai-whisper", src["gpt2"]["version"], src["gpt2"]["sha256"], True),
                                      ("litellm", src["cl100k_base"]["version"], src["cl100k_base"]["sha256"], False)]
    T.reference_encoding.cache_clear()
    T.reference_encoding("gpt2")                                          # the extracted file is reused
    assert len(fake_registry["calls"]) == 2
    assert (T.cache_dir("tokenizers") / "gpt2.tiktoken").read_bytes() == fake_registry["data"]

def test_reference_encoding_checks_tiktoken_hash(fake_registry):
    "With tiktoken's real recipe the fixture's sha256 is wrong: refused, and the bad file leaves the cache."
    with pytest.raises(ValueError, match="is not tiktoken's expected 223921b7"):
        T.reference_encoding("cl100k_base")
    assert not (T.cache_dir("tokenizers") / "cl100k_base.tiktoken").exists()
    with pytest.raises(ValueError, match="unknown reference encoding"): T.reference_encoding("gpt5")

def test_recipes_come_from_tiktoken():
    "Pattern, specials and expected hashes are tiktoken's own (captured without any download)."
    seen = []
    def loader(url, expected_hash=None):
        seen.append((url, expected_hash)); return T.ranks_from_merges([])
    spec = T._recipe("cl100k_base", loader)
    assert seen[0][0].endswith("cl100k_base.tiktoken") and seen[0][1].startswith("223921b7")
    assert spec["special_tokens"]["<|endoftext|>"] == 100257 and r"\p{N}{1,3}" in spec["pat_str"]
    T._recipe("r50k_base", loader)
    assert seen[1][1].startswith("306cd27f")
    from tiktoken_ext import openai_public
    assert openai_public.load_tiktoken_bpe is not loader                 # tiktoken's loader is restored

# ---------------------------------------------------------------------------------------------------
# Compression table

def test_compression_table(tok):
    rows = T.compression_table({"ascii": "the of and " * 50, "korean": "한국어"}, {"ours": tok, "bytes": _Bytes()})
    assert [r["text"] for r in rows] == ["ascii", "korean"]
    assert rows[1]["bytes"] == 9 and rows[1]["tokens"]["bytes"] == 9 and rows[1]["bytes_per_token"]["bytes"] == 1.0
    assert rows[0]["bytes_per_token"]["ours"] > 2
    md = T.compression_markdown(rows)
    assert md.splitlines()[0] == "| Text | Bytes | ours tokens | ours bytes/token | bytes tokens | bytes bytes/token |"
    assert len(md.splitlines()) == 4 and "**" in md

class _Bytes:
    "An Encoding-like that spends one token per byte."
    def encode_ordinary(self, text): return list(text.encode())


def test_out_of_turn_is_the_one_role_rule():
    "One role-order rule serves the tokenizer and the server: an optional system message, then user/assistant in turn."
    from nanochat_lib.tokenizer import out_of_turn
    assert out_of_turn(["user"]) is None and out_of_turn(["system", "user", "assistant", "user"]) is None
    assert out_of_turn(["assistant"]) == (0, "user")
    assert out_of_turn(["system", "assistant"]) == (1, "user")
    assert out_of_turn(["user", "assistant", "assistant"]) == (2, "user")
    assert out_of_turn(["user", "system"]) == (1, "assistant")
