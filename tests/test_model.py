"The GPT of notebooks/03_model.ipynb: counts, shapes, attention semantics, init, and that it learns."
import dataclasses, math
import pytest, torch
import torch.nn.functional as F
from nanochat_lib.model import (GPT, GPTConfig, attention_flops_per_token, build_model, flops_per_token,
                                param_count_formula, sliding_window_mask, training_plan)
from nanochat_lib.optim import make_optimizers

V, T = 96, 24


def tiny(**kw) -> GPTConfig:
    base = dict(sequence_len=T, vocab_size=V, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw})


def perturbed(config: GPTConfig, seed: int = 0) -> GPT:
    "A model whose zero-initialised projections are made nonzero, so every path carries signal."
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p) * 0.1)
    return model


def tokens(B=2, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- counts -------------------------------------------------------------------------------------

def test_d20_parameter_and_flop_counts():
    d20 = GPTConfig.from_depth(20, vocab_size=65536, sequence_len=2048)
    assert (d20.n_embd, d20.n_head, d20.head_dim, d20.n_kv_head) == (1280, 10, 128, 10)
    with torch.device("meta"):
        model = GPT(d20)
    assert model.num_params() == param_count_formula(d20) == 560_988_160
    assert model.num_params(exclude_embedding=True) == 560_988_160 - 65536 * 1280
    assert model.estimate_flops_per_token() == flops_per_token(d20) == 3_491_758_080


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2), dict(n_kv_head=1), dict(window=8), dict(n_layer=3, n_embd=48)])
def test_formula_matches_counted_parameters_and_flops(kw):
    config = tiny(**kw)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() == param_count_formula(config)
    assert model.estimate_flops_per_token() == flops_per_token(config)
    context = min(T, config.window or T)
    assert attention_flops_per_token(config) == 12 * config.n_layer * config.n_head * config.head_dim * context


def test_from_depth_rounds_width_to_whole_heads():
    c = GPTConfig.from_depth(3, 4096, 256, head_dim=128)
    assert (c.n_embd, c.n_head, c.head_dim) == (256, 2, 128)       # 192 rounds up
    c = GPTConfig.from_depth(4, 4096, 256, head_dim=64, n_kv_head=2)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.sequence_len) == (256, 4, 2, 256)
    with pytest.raises(ValueError, match="must divide n_head"):
        GPTConfig.from_depth(4, 4096, head_dim=64, n_kv_head=3)
    with pytest.raises(ValueError, match="must be even"):
        GPTConfig(n_embd=30, n_head=2, n_kv_head=2)


def test_training_plan_d20_and_batch_layout():
    plan = training_plan(20, 65536, 2048, world_size=8, device_batch_size=32, total_batch_size=524_288)
    assert plan["num_params"] == 560_988_160 and plan["target_tokens"] == 20 * 560_988_160
    assert (plan["num_iterations"], plan["grad_accum_steps"]) == (21_400, 1)
    assert plan["total_flops"] == plan["flops_per_token"] * 21_400 * 524_288
    assert math.isclose(plan["total_flops"], 3.918e19, rel_tol=1e-3)
    assert training_plan(20, 65536, 2048, world_size=1, total_batch_size=524_288)["grad_accum_steps"] == 8
    with pytest.raises(ValueError, match=r"not a multiple of device_batch_size × seq_len × world_size = 32 × 2048 × 3"):
        training_plan(20, 65536, 2048, world_size=3, total_batch_size=524_288)
    small = training_plan(2, 512, 64, device_batch_size=4, head_dim=32)       # no accumulation by default
    assert small["total_batch_size"] == 256 and small["grad_accum_steps"] == 1
    assert small["num_iterations"] == small["target_tokens"] // 256
    assert training_plan(2, 512, 64, device_batch_size=4, head_dim=32, num_iterations=7)["num_iterations"] == 7


# ---- forward ------------------------------------------------------------------------------------

def test_shapes_and_loss_reductions():
    model = perturbed(tiny())
    idx = tokens()
    targets = idx.roll(-1, 1)
    targets[0, :5] = -1
    assert model(idx).shape == (2, T, V)
    loss = model(idx, targets)
    per_token = model(idx, targets, loss_reduction="none")
    assert loss.shape == () and per_token.shape == (2, T)
    assert torch.all(per_token[0, :5] == 0)
    torch.testing.assert_close(per_token.sum() / (targets != -1).sum(), loss)
    with pytest.raises(ValueError, match="longer than the rotary tables"):
        model(torch.zeros(1, 10 * T + 1, dtype=torch.long))


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=1), dict(window=5)])
def test_changing_future_tokens_leaves_past_logits_unchanged(kw):
    model = perturbed(tiny(**kw))
    a = tokens()
    b = a.clone()
    b[:, 15:] = (b[:, 15:] + 7) % V
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :15], lb[:, :15], rtol=0, atol=1e-6)
    assert (la[:, 15:] - lb[:, 15:]).abs().max() > 1e-3


def _reference_attention(attn, x, n_head, n_kv_head, window=None, base=10000.0):
    "Multi-head attention written out by hand: projections, QK-norm, RoPE, repeated KV heads, masked softmax."
    B, T_, C = x.shape
    D = C // n_head
    def heads(w, h): return (x @ w.T).view(B, T_, h, D).transpose(1, 2)          # (B, h, T, D)
    def norm(t): return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + torch.finfo(t.dtype).eps)
    def rotate(t):
        pos = torch.arange(T_, dtype=torch.float32)[:, None]
        ang = pos * base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)     # (T, D/2)
        t1, t2 = t[..., :D // 2], t[..., D // 2:]
        return torch.cat([t1 * ang.cos() - t2 * ang.sin(), t1 * ang.sin() + t2 * ang.cos()], -1)
    q = rotate(norm(heads(attn.c_q.weight, n_head)))
    k = rotate(norm(heads(attn.c_k.weight, n_kv_head))).repeat_interleave(n_head // n_kv_head, dim=1)
    v = heads(attn.c_v.weight, n_kv_head).repeat_interleave(n_head // n_kv_head, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    i, j = torch.arange(T_)[:, None], torch.arange(T_)[None, :]
    allowed = (j <= i) & ((i - j) < (window or T_))
    y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T_, C) @ attn.c_proj.weight.T


@pytest.mark.parametrize("n_kv_head,window", [(4, None), (2, None), (1, None), (4, 6), (2, 3)])
def test_attention_matches_a_reference_computation(n_kv_head, window):
    model = perturbed(tiny(n_kv_head=n_kv_head, window=window))
    attn = model.blocks[0].attn
    x = torch.randn(2, T, 32)
    mask = sliding_window_mask(T, window) if window else None
    with torch.no_grad():
        got = attn(x, model.cos[:, :T], model.sin[:, :T], mask)
        want = _reference_attention(attn, x, 4, n_kv_head, window)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_gqa_with_all_kv_heads_is_plain_multi_head_attention():
    "n_kv_head = n_head takes SDPA's plain path; it must equal the written-out multi-head attention."
    model = perturbed(tiny(n_kv_head=4))
    attn = model.blocks[1].attn
    x = torch.randn(3, T, 32)
    q, k, v = attn.qkv(x, model.cos[:, :T], model.sin[:, :T])
    assert q.shape == k.shape == v.shape == (3, 4, T, 8)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, model.cos[:, :T], model.sin[:, :T]),
                                   _reference_attention(attn, x, 4, 4), rtol=1e-4, atol=1e-5)


def test_sliding_window_equals_full_attention_when_it_covers_the_sequence():
    full = perturbed(tiny())
    for window, same in ((T, True), (T + 10, True), (T - 1, False), (4, False)):
        windowed = perturbed(tiny(window=window))        # same seed, so the same weights
        idx = tokens()
        with torch.no_grad():
            a, b = full(idx), windowed(idx)
        assert torch.allclose(a, b, atol=1e-6) == same, window
        if not same:   # positions the window still covers entirely are unaffected
            torch.testing.assert_close(a[:, :window], b[:, :window], rtol=0, atol=1e-6)
    m = sliding_window_mask(6, 2)
    assert m.tolist()[3] == [False, False, True, True, False, False]
    assert torch.equal(sliding_window_mask(6, 6), torch.ones(6, 6, dtype=torch.bool).tril())


def test_sliding_window_forgets_tokens_beyond_its_reach():
    model = perturbed(tiny(n_layer=1, window=4))
    a = tokens()
    b = a.clone()
    b[:, 10] = (b[:, 10] + 1) % V
    with torch.no_grad():
        d = (model(a) - model(b)).abs().amax(dim=(0, 2))
    assert d[:10].max() < 1e-6                   # the past
    assert d[10:14].min() > 1e-4                 # positions 10..13 see token 10
    assert d[14:].max() < 1e-6                   # one layer, window 4: position 14 no longer does


def test_softcap_bounds_logits():
    model = perturbed(tiny())
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
        logits = model(tokens())
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0
    uncapped = perturbed(tiny(softcap=None))
    with torch.no_grad():
        uncapped.lm_head.weight.mul_(1000)
        assert uncapped(tokens()).abs().max() > 100


# ---- init -----------------------------------------------------------------------------------------

def test_meta_build_and_init_are_finite_and_deterministic():
    config = tiny()
    torch.manual_seed(3)
    a = build_model(config)
    torch.manual_seed(3)
    b = build_model(config)
    torch.manual_seed(4)
    c = build_model(config)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert set(sa) == {n for n, _ in a.named_parameters()}            # rotary tables are not saved
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["wte.weight"], sc["wte.weight"])
    assert all(torch.isfinite(v).all() for v in sa.values())
    assert not any(p.is_meta for p in a.parameters()) and not a.cos.is_meta
    for block in a.blocks:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    loss = a(tokens(), tokens(seed=1))
    assert torch.isfinite(loss) and abs(loss.item() - math.log(V)) < 0.05
    direct = GPT(config)                       # built without meta also ends initialised
    assert torch.isfinite(direct(tokens())).all() and not direct.blocks[0].mlp.c_proj.weight.any()


# ---- learning -------------------------------------------------------------

def test_a_few_steps_memorise_a_repeated_sequence():
    torch.manual_seed(0)
    model = build_model(tiny())
    seq = torch.randint(0, V, (1, T + 1)).repeat(4, 1)
    x, y = seq[:, :-1], seq[:, 1:]
    opts = make_optimizers(model, dict(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0))
    losses = []
    for _ in range(25):
        loss = model(x, y)
        loss.backward()
        for o in opts: o.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(V)
    assert losses[-1] < 0.1 * losses[0], losses
    assert list(model.generate(seq[0, :6].tolist(), 8, temperature=0.0)) == seq[0, 6:14].tolist()


@pytest.mark.parametrize("softcap", [None, 15.0])
def test_fused_head_loss_equals_plain_loss_and_gradients(softcap):
    from nanochat_lib.model import head_loss
    torch.manual_seed(1)
    x = torch.randn(333, 24, requires_grad=True)
    w = torch.randn(97, 24, requires_grad=True)
    t = torch.randint(0, 97, (333,)); t[::5] = -1
    logits = x @ w.t()
    if softcap: logits = softcap * torch.tanh(logits / softcap)
    ref = torch.nn.functional.cross_entropy(logits, t, ignore_index=-1)
    g_ref = torch.autograd.grad(2.5 * ref, (x, w))
    ours = head_loss(x, w, t, softcap, chunk=50)
    g_ours = torch.autograd.grad(2.5 * ours, (x, w))   # a scaled loss (grad accumulation) scales the gradients
    assert torch.allclose(ours, ref, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_ours, g_ref))


def test_model_training_loss_is_the_same_on_both_paths():
    from nanochat_lib.model import GPT, GPTConfig
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    torch.nn.init.normal_(m.lm_head.weight, std=0.5)
    idx = torch.randint(0, 64, (3, 16)); tgt = torch.randint(0, 64, (3, 16)); tgt[0, :4] = -1
    fused = m(idx, tgt)                                  # grad enabled on CPU: the fused path
    with torch.no_grad(): plain = m(idx, tgt)            # no grad: the plain path
    assert torch.allclose(fused, plain, atol=1e-5)
