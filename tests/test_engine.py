"""The inference engine: KV cache, prefill/decode, sampling, row independence, tool use, UTF-8 streaming.

Hermetic and fast: tiny random GPTs on the CPU, a byte-level tokenizer built in code, and a scripted
stand-in model for the control flow (stops, forced tool output, streaming).
"""
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanochat_lib.engine import (Engine, KVCache, RowState, ScriptedModel, StreamDecoder, cache_attention_mask,
                                 cast_for_inference, forward_cached, random_gpt,
                                 row_seeds, stream_decode)
from nanochat_lib.model import GPTConfig, check_sampling, sample_next_token, top_k_top_p
from nanochat_lib.tokenizer import Tokenizer

TOK = Tokenizer.from_merges([])            # 256 byte tokens + the special tokens: every character is split into bytes
SP = TOK.encode_special
V = TOK.vocab_size

SHAPES = {                                   # several shapes: multi-head, grouped-query, multi-query, sliding window
    "mha": dict(n_layer=2, n_head=2, n_kv_head=2, n_embd=32),
    "gqa": dict(n_layer=3, n_head=4, n_kv_head=2, n_embd=64),
    "mqa": dict(n_layer=2, n_head=4, n_kv_head=1, n_embd=32),
    "window": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, window=5),
    "nocap": dict(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, softcap=None),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny matrices: a second thread only adds synchronisation, which is very slow on a busy machine."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(shape="gqa", seed=0, sequence_len=64, quiet=True):
    "A random GPT; `quiet` zeroes the special tokens' logits so greedy decoding never stops or calls a tool."
    m = random_gpt(GPTConfig(sequence_len=sequence_len, vocab_size=V, **SHAPES[shape]), seed=seed)
    if quiet:
        with torch.no_grad(): m.lm_head.weight[256:] = 0     # logit 0 vs the max of 256 ~N(0,1) logits: never the argmax
    return m


def prompt_ids(n=7, seed=0):
    rng = random.Random(seed)
    return [SP("<|bos|>")] + [rng.randrange(256) for _ in range(n - 1)]


# ---------------------------------------------------------------------------------------------- the cache

def test_cache_layout_and_for_model():
    m = tiny_model("gqa")
    c = KVCache.for_model(m, batch=3, capacity=10)
    assert c.k.shape == c.v.shape == (3, 3, 2, 10, 16) and c.pos == 0 and c.k.dtype == torch.float32
    assert c.batch == 3 and c.capacity == 10 and c.nbytes == 2 * 3 * 3 * 2 * 10 * 16 * 4
    with pytest.raises(ValueError, match="capacity"): KVCache(1, 1, 1, 2, 0)


def test_cache_store_advance_and_growth_keep_contents():
    c = KVCache(n_layer=2, batch=2, n_kv_head=3, head_dim=4, capacity=3)
    ks, vs = torch.randn(2, 2, 3, 7, 4), torch.randn(2, 2, 3, 7, 4)
    for a, b in ((0, 2), (2, 3), (3, 7)):                    # pieces of 2, 1 and 4 positions: grows twice
        for layer in range(2):
            keys, values = c.store(layer, ks[layer, :, :, a:b], vs[layer, :, :, a:b])
            assert torch.equal(keys, ks[layer, :, :, :b]) and torch.equal(values, vs[layer, :, :, :b])
        c.advance(b - a)
    assert c.pos == 7 and c.capacity >= 7
    assert torch.equal(c.k[:, :, :, :7], ks) and torch.equal(c.v[:, :, :, :7], vs)
    with pytest.raises(RuntimeError, match="capacity"): c.advance(c.capacity)
    with pytest.raises(ValueError, match="do not fit"): c.store(0, torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    c.reset()
    assert c.pos == 0


def test_prefill_copies_a_batch1_cache_into_every_row():
    one = KVCache(n_layer=2, batch=1, n_kv_head=1, head_dim=4, capacity=5)
    ks = torch.randn(2, 1, 1, 5, 4)
    for layer in range(2): one.store(layer, ks[layer], ks[layer] + 1)
    one.advance(5)
    rows = KVCache(n_layer=2, batch=4, n_kv_head=1, head_dim=4, capacity=2)   # too short: prefill grows it
    rows.prefill(one)
    assert rows.pos == 5 and rows.capacity >= 5
    for r in range(4):
        assert torch.equal(rows.k[:, r, :, :5], ks[:, 0]) and torch.equal(rows.v[:, r, :, :5], ks[:, 0] + 1)
    with pytest.raises(ValueError, match="batch-1"): rows.prefill(KVCache(2, 3, 1, 4, 5))
    with pytest.raises(ValueError, match="must match"): rows.prefill(KVCache(2, 1, 2, 4, 5))


def test_attention_mask_cases():
    assert cache_attention_mask(0, 6) is None and cache_attention_mask(9, 1) is None
    assert cache_attention_mask(9, 1, window=10) is None
    chunk = cache_attention_mask(4, 3)
    assert chunk.shape == (3, 7) and chunk.tolist()[0] == [True] * 5 + [False] * 2 and chunk[-1].all()
    win = cache_attention_mask(9, 1, window=4)
    assert win.tolist() == [[False] * 6 + [True] * 4]
    pre = cache_attention_mask(0, 5, window=2)            # prefill with a window: causal band of width 2
    assert pre.sum(1).tolist() == [1, 2, 2, 2, 2]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_cached_equals_the_full_forward(shape):
    "Fed in uneven pieces (prefill, single tokens, chunks), from a cache too short, every position's logits match."
    m = tiny_model(shape, quiet=False)
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    c = KVCache.for_model(m, batch=2, capacity=3)
    out, at = [], 0
    for n in (6, 1, 1, 4, 1, 5, 2):
        out.append(forward_cached(m, ids[:, at:at + n], c)); at += n
    with torch.no_grad(): full = m(ids)
    assert torch.allclose(torch.cat(out, 1), full, atol=1e-4), (torch.cat(out, 1) - full).abs().max()
    last = forward_cached(m, ids[:, :3], KVCache.for_model(m, 2, 3), last_only=True)
    assert last.shape == (2, 1, V) and torch.allclose(last[:, 0], full[:, 2], atol=1e-4)


def test_forward_cached_checks_its_input():
    m = tiny_model("mha", sequence_len=4)                      # rotary tables for 40 positions
    with pytest.raises(ValueError, match="rows"): forward_cached(m, torch.zeros(2, 3, dtype=torch.long), KVCache.for_model(m, 1, 3))
    with pytest.raises(ValueError, match="rotary"): forward_cached(m, torch.zeros(1, 41, dtype=torch.long), KVCache.for_model(m, 1, 41))


def test_bf16_cache_path_matches_the_bf16_model():
    m = cast_for_inference(tiny_model("window", quiet=False), torch.bfloat16)
    assert m.wte.weight.dtype == torch.bfloat16 and m.cos.dtype == torch.float32   # the rotary tables stay fp32
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    c = KVCache.for_model(m, 2, 12)
    assert c.k.dtype == torch.bfloat16
    got = torch.cat([forward_cached(m, ids[:, :8], c), forward_cached(m, ids[:, 8:9], c), forward_cached(m, ids[:, 9:], c)], 1)
    with torch.no_grad(): want = m(ids)
    assert torch.allclose(got, want, atol=0.1)


# ---------------------------------------------------------------------------------------------- greedy vs reference

def greedy_rows(engine, prompt, n, max_tokens, **kw):
    cols = [col for col, _ in engine.generate(prompt, num_samples=n, max_tokens=max_tokens, temperature=0, **kw)]
    return [[c[i] for c in cols] for i in range(n)]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_engine_equals_full_recompute(shape):
    m = tiny_model(shape, seed=3)
    prompt = prompt_ids(7, seed=3)
    want = list(m.generate(prompt, 40, temperature=0))
    rows = greedy_rows(Engine(m, TOK, tool=None), prompt, 2, 40)
    assert rows == [want, want]


def test_generation_longer_than_the_preallocated_cache():
    m = tiny_model("window", seed=4)
    prompt = prompt_ids(5, seed=4)
    engine = Engine(m, TOK, tool=None, prealloc_tokens=2)
    made = []                                                  # (capacity when made, cache): prefill, then decode
    new_cache = engine.new_cache
    engine.new_cache = lambda b, cap: made.append((cap, new_cache(b, cap))) or made[-1][1]
    rows = greedy_rows(engine, prompt, 2, 45)
    assert rows[0] == rows[1] == list(m.generate(prompt, 45, temperature=0))
    (_, prefill), (start, decode) = made
    assert start == 5 + 2 and decode.pos == 5 + 44 and decode.capacity >= 49   # grew to hold every fed token


def test_max_tokens_defaults_to_the_rest_of_the_context():
    m = tiny_model("mha", sequence_len=16)
    seqs, _ = Engine(m, TOK, tool=None).generate_batch(prompt_ids(6), temperature=0)
    assert len(seqs[0]) == 16


# ---------------------------------------------------------------------------------------------- sampling

def test_top_k_top_p_filter():
    known = torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = lambda k, p: int(torch.isfinite(top_k_top_p(known, k, p)[0]).sum())
    assert [kept(None, p) for p in (0.4, 0.5, 0.6, 0.8, 0.81, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert [kept(k, None) for k in (1, 2, 3, 10)] == [1, 2, 3, 3]
    assert kept(2, 0.99) == 2
    vals, ids = top_k_top_p(torch.tensor([[1.0, 3.0, 2.0]]), top_k=2)
    assert ids.tolist() == [[1, 2]] and vals.tolist() == [[3.0, 2.0]]


def test_sample_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample_next_token(logits, g, 1.0), minlength=4) / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    freq = torch.bincount(sample_next_token(logits, g, 1.0, top_p=0.7), minlength=4) / 4000   # keeps 0.5 and 0.3
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 0.03
    sharp = torch.bincount(sample_next_token(logits, g, 0.25), minlength=4) / 4000           # 0.5^4 : 0.3^4 : ...
    assert sharp[0] > 0.85
    assert sample_next_token(logits[:2], None, 0).tolist() == [0, 0]


def test_check_sampling_rejects_nonsense():
    check_sampling(0, None, None); check_sampling(0.7, 0, 1.0)
    for kw in (dict(temperature=-1), dict(top_k=-2), dict(top_k=2.5), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(ValueError): check_sampling(**kw)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=5, top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_are_greedy(kw):
    m = tiny_model("gqa", seed=5)
    engine, prompt = Engine(m, TOK, tool=None), prompt_ids(6, seed=5)
    greedy, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=25, temperature=0)
    sampled, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=25, temperature=1.0, seed=3, **kw)
    assert sampled == greedy


def test_sampled_engine_equals_the_reference_sampler_with_the_same_seed():
    "One row with seed s draws from the same generator stream as GPT.generate(seed=s)."
    m = tiny_model("mqa", seed=6)
    engine, prompt = Engine(m, TOK, tool=None), prompt_ids(6, seed=6)
    for kw in (dict(temperature=1.0), dict(temperature=0.8, top_k=20, top_p=0.9)):
        got = [col[0] for col, _ in engine.generate(prompt, max_tokens=30, seed=11, **kw)]
        assert got == list(m.generate(prompt, 30, seed=11, **kw))[:len(got)]
        assert len(got) == 30 or got[-1] in engine.stop_ids             # a sampled stop token ends it early


# ---------------------------------------------------------------------------------------------- rows

def test_row_seeds():
    assert row_seeds(42, 1) == [42] and row_seeds(42, 3) == row_seeds(42, 8)[:3]
    assert not set(row_seeds(42, 5)) & set(row_seeds(43, 5))
    assert row_seeds([1, 2], 2) == [1, 2]
    with pytest.raises(ValueError, match="one per row"): row_seeds([1, 2], 3)
    with pytest.raises(ValueError, match="seed"): row_seeds("x", 1)


def test_rows_sample_independently_first_token_included():
    m = tiny_model("gqa", seed=7, quiet=False)
    engine, prompt = Engine(m, TOK, tool=None), prompt_ids(6, seed=7)
    first, _ = next(engine.generate(prompt, num_samples=16, max_tokens=1, seed=0))
    assert len(set(first)) > 4                 # 16 independent draws from a spread-out distribution
    seqs, _ = engine.generate_batch(prompt, num_samples=6, max_tokens=20, seed=0)
    assert len({tuple(s) for s in seqs}) == 6


def test_a_row_depends_only_on_its_own_seed():
    "Same seed, different neighbours (or none): the same tokens, tool use and stops included."
    m = tiny_model("window", seed=8, quiet=False)          # specials allowed: rows may stop or call the tool
    engine, prompt = Engine(m, TOK), prompt_ids(6, seed=8)
    kw = dict(max_tokens=30, temperature=1.2)
    batch, bmask = engine.generate_batch(prompt, num_samples=3, seed=[101, 202, 303], **kw)
    other, omask = engine.generate_batch(prompt, num_samples=3, seed=[999, 202, 7], **kw)
    alone, amask = engine.generate_batch(prompt, num_samples=1, seed=[202], **kw)
    assert batch[1] == other[1] == alone[0] and bmask[1] == omask[1] == amask[0]
    assert batch[0] != other[0]
    many, _ = engine.generate_batch(prompt, num_samples=4, seed=9, **kw)     # an int seed: rows use row_seeds(9, 4)
    for i, s in enumerate(row_seeds(9, 4)):
        assert engine.generate_batch(prompt, seed=[s], **kw)[0][0] == many[i]


# ---------------------------------------------------------------------------------------------- stops and tools

def scripted(script, **kw):
    return Engine(ScriptedModel(script, V, filler=ord("~")), TOK, **kw)


def enc(text): return TOK.encode(text)


@pytest.mark.parametrize("stop", ["<|assistant_end|>", "<|bos|>"])
def test_rows_stop_at_assistant_end_or_bos(stop):
    prompt = prompt_ids(4)
    engine = scripted(enc("hi") + [SP(stop)] + enc("zz"))
    seqs, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=50)
    assert seqs == [prompt + enc("hi")] * 2 and masks == [[0] * 4 + [1, 1]] * 2
    cols = list(engine.generate(prompt, max_tokens=50))
    assert [c[0][0] for c in cols] == enc("hi") + [SP(stop)]            # the generator stops once every row is done


def test_finished_rows_repeat_their_stop_token_until_all_are_done():
    ae = SP("<|assistant_end|>")
    # The rows share the prompt's prefill, so a scripted model's rows must agree on their first token.
    model = ScriptedModel([enc("xa") + [ae], enc("xbcd") + [ae]], V)
    cols = list(Engine(model, TOK).generate(prompt_ids(3), num_samples=2, max_tokens=50, temperature=0))
    x, a, b, c, d = enc("xabcd")
    assert [c for c, _ in cols] == [[x, x], [a, b], [ae, c], [ae, d], [ae, ae]]
    assert [m for _, m in cols] == [[1, 1], [1, 1], [1, 1], [0, 1], [0, 1]]
    seqs, _ = Engine(model, TOK).generate_batch(prompt_ids(3), num_samples=2, max_tokens=50)
    assert [s[3:] for s in seqs] == [enc("xa"), enc("xbcd")]


def test_max_tokens_caps_a_row_that_never_stops():
    seqs, masks = scripted(enc("abcdef")).generate_batch(prompt_ids(3), max_tokens=4)
    assert seqs[0][3:] == enc("abcd") and masks[0][3:] == [1] * 4


def test_tool_call_output_is_forced_with_mask_0():
    ps, pe, os_, oe, ae = (SP(s) for s in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                            "<|output_end|>", "<|assistant_end|>"))
    # Where the engine must force <|output_start|>5<|output_end|>, the script says "??" then a stop token: if the
    # engine did not force, we would see them (and the row would end early).
    script = enc("x") + [ps] + enc("2+3") + [pe] + enc("??") + [ae] + enc("ok") + [ae]
    plain = enc("x no tool") + [ae]
    model = ScriptedModel([script, plain], V)
    prompt = prompt_ids(4)
    seqs, masks = Engine(model, TOK).generate_batch(prompt, num_samples=2, max_tokens=40, seed=1)
    assert seqs[0][4:] == enc("x") + [ps] + enc("2+3") + [pe, os_] + enc("5") + [oe] + enc("ok")
    assert masks[0][4:] == [1] * 6 + [0, 0, 0] + [1, 1]
    assert seqs[1][4:] == enc("x no tool") and masks[1][4:] == [1] * 9     # the other row is untouched
    # the forced tokens were fed to the model like any other: its cache holds them
    fed_row0 = [ids[0][0] for pos, ids in model.fed[1:]]
    assert fed_row0 == seqs[0][4:]


def test_multi_token_results_and_failed_calls():
    ps, pe, os_, oe, ae = (SP(s) for s in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                            "<|output_end|>", "<|assistant_end|>"))
    script = [ps] + enc("12*37") + [pe] + enc("?????") + [ae]
    seqs, masks = scripted(script).generate_batch(prompt_ids(2), max_tokens=40)
    assert seqs[0][2:] == [ps] + enc("12*37") + [pe, os_] + enc("444") + [oe]
    assert masks[0][2:] == [1] * 7 + [0] * 5
    bad = [ps] + enc("2+") + [pe] + enc("?") + [ae]                         # the calculator refuses: nothing forced
    seqs, masks = scripted(bad).generate_batch(prompt_ids(2), max_tokens=40)
    assert seqs[0][2:] == bad[:-1] and masks[0][2:] == [1] * (len(bad) - 1)
    seqs, masks = scripted(script, tool=None).generate_batch(prompt_ids(2), max_tokens=40)   # tools off
    assert seqs[0][2:] == script[:-1] and set(masks[0][2:]) == {1}


def test_row_state_machine_directly():
    engine = scripted([0])
    row = RowState()
    ps, pe = SP("<|python_start|>"), SP("<|python_end|>")
    out = [engine.next_for_row(row, t) for t in [ps, *enc("6/4"), pe, 0, 0, 0, 0, 0]]
    assert out[:5] == [(t, 1) for t in [ps, *enc("6/4"), pe]]
    assert [t for t, _ in out[5:]] == [SP("<|output_start|>"), *enc("1.5"), SP("<|output_end|>")]
    assert [m for _, m in out[5:]] == [0] * 5 and not row.done


# ---------------------------------------------------------------------------------------------- streaming

MERGED = Tokenizer.from_merges([(ord("a"), 0xF0), (0x9F, 0x98), (0x80, ord(" ")), (0xB8, 0xAD)])
ID = {b: r for b, r in MERGED.mergeable_ranks.items()}


def test_stream_holds_bytes_until_a_character_is_complete():
    ids = [ID[b"a\xf0"], ID[b"\x9f\x98"], ID[b"\x80 "], 0xE4, ID[b"\xb8\xad"], ord("!")]    # "a😀 中!"
    dec = StreamDecoder(MERGED)
    assert [dec.push(i) for i in ids] == ["a", "", "😀 ", "", "中", "!"]
    assert dec.flush() == ""
    assert "".join(stream_decode(MERGED, ids)) == MERGED.decode(ids) == "a😀 中!"


def test_stream_byte_tokens_emoji_and_cjk():
    text = "héllo 😀 中文 🎉 ok"
    pieces = list(stream_decode(TOK, enc(text)))
    assert pieces == list(text)                                # one piece per character, never half of one
    assert "\ufffd" not in "".join(pieces)


def test_stream_broken_bytes_and_special_tokens():
    ps = SP("<|python_start|>")
    ids = enc("中")[:2] + [ps] + enc("é") + [0x80] + enc("😀")[:3]
    pieces = list(stream_decode(TOK, ids))
    assert "".join(pieces) == TOK.decode(ids) == "\ufffd<|python_start|>é\ufffd\ufffd"
    assert "".join(stream_decode(TOK, ids, skip_special=True)) == "\ufffdé\ufffd\ufffd"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, MERGED.vocab_size - 1), max_size=25))
def test_streamed_pieces_always_add_up_to_decode(ids):
    assert "".join(stream_decode(MERGED, ids)) == MERGED.decode(ids)


def test_engine_stream_text():
    text = "Bonjour 😀, 你好!"
    engine = scripted(enc(text) + [SP("<|assistant_end|>")] + enc("never"))
    pieces = list(engine.stream_text(prompt_ids(3), max_tokens=60))
    assert pieces == list(text)
    assert "".join(scripted(enc("中文")).stream_text(prompt_ids(3), max_tokens=4)) == "中\ufffd"   # cut off mid-character


# ---------------------------------------------------------------------------------------------- precision and errors

def test_engine_keeps_fp32_on_cpu_and_casts_once():
    m = tiny_model("mha")
    Engine(m, TOK)
    assert m.wte.weight.dtype == torch.float32
    cast_for_inference(m, torch.bfloat16)
    engine = Engine(m, TOK)                                    # a bf16 model on a CPU comes back to fp32
    assert all(p.dtype == torch.float32 for p in m.parameters()) and engine.dtype == torch.float32
    assert not engine.autocast
    cast_for_inference(m, torch.bfloat16)
    Engine(m, TOK, cast_weights=False)                         # left alone
    assert m.wte.weight.dtype == torch.bfloat16


def test_engine_rejects_bad_requests():
    m = tiny_model("mha", sequence_len=8)
    engine = Engine(m, TOK)
    bad = [((), {}), ("hello", {}), ([1, V], {}), ([1, 2.5], {}), ([1], dict(num_samples=0)),
           ([1], dict(temperature=-1)), ([1], dict(top_p=0)), ([1], dict(max_tokens=0)),
           ([1] * 8, {}), ([1], dict(max_tokens=80)), ([1], dict(num_samples=2, seed=[1]))]
    for prompt, kw in bad:
        with pytest.raises(ValueError):
            next(engine.generate(prompt, **kw))
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(random_gpt(GPTConfig(sequence_len=8, vocab_size=100, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)), TOK)
    with pytest.raises(ValueError, match="prealloc"): Engine(m, TOK, prealloc_tokens=0)
    assert next(engine.generate(torch.tensor([1, 2]), max_tokens=1, temperature=0))[1] == [1]   # a tensor prompt is fine


# ---------------------------------------------------------------------------------- fixed shapes (CUDA graphs)

from nanochat_lib.engine import StaticDecoder  # noqa: E402


def static_greedy(model, prompt, n, batch=1, prompt_rows=1):
    sd = StaticDecoder(model, batch=batch, capacity=len(prompt) + n)
    logits = sd.prefill(torch.tensor([prompt] * prompt_rows))
    out = []
    for _ in range(n):
        nxt = logits.argmax(-1)
        out.append(nxt.tolist())
        logits = sd.step(nxt)
    return out, sd


@pytest.mark.parametrize("shape", list(SHAPES))
def test_static_decoder_equals_full_recompute(shape):
    m, prompt = tiny_model(shape, seed=1), prompt_ids(6, seed=2)
    cols, sd = static_greedy(m, prompt, 20, batch=3)
    ref = list(m.generate(prompt, 20, temperature=0))
    assert [c[0] for c in cols] == ref and all(c == [c[0]] * 3 for c in cols)   # every row copied from the prefill
    assert sd.cache.pos == len(prompt) + 20 and int(sd.pos) == sd.cache.pos
    with pytest.raises(RuntimeError, match="full"): sd.step(torch.zeros(3, dtype=torch.long))


def test_static_decoder_logits_match_forward_cached_and_rows_stay_apart():
    m = tiny_model("gqa", seed=4)
    prompts = [prompt_ids(5, seed=s) for s in (1, 2)]                  # two different rows, prefilled together
    sd = StaticDecoder(m, batch=2, capacity=12)
    c = KVCache.for_model(m, 2, 12)
    a, b = sd.prefill(torch.tensor(prompts)), forward_cached(m, torch.tensor(prompts), c, last_only=True)[:, -1]
    for step in range(6):
        assert torch.allclose(a, b, atol=1e-4), step
        nxt = torch.tensor([step + 3, 200 - step])
        a, b = sd.step(nxt), forward_cached(m, nxt[:, None], c, last_only=True)[:, -1]


def test_static_decoder_checks_its_mode():
    m = tiny_model("mha")
    with pytest.raises(ValueError, match="mode must be"): StaticDecoder(m, 1, 8, mode="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"): StaticDecoder(m, 1, 8, mode="graph")
    with pytest.raises(ValueError, match="leaves no room"): StaticDecoder(m, 1, 4).prefill(torch.tensor([prompt_ids(4)]))
