"""GPU readiness proven on the CPU: bf16 residual stream, flex-attention windows, StaticDecoder's output contract."""
import dataclasses

import pytest
import torch

from nanochat_lib.engine import StaticDecoder, random_gpt
from nanochat_lib.model import GPTConfig, build_model, sliding_window_mask, window_block_mask


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CFG = GPTConfig(sequence_len=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


def block_inputs(model, idx, autocast=None):
    "The dtype of the residual stream entering every block (and the loss), under `autocast` (a dtype) or none."
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype)) for b in model.blocks]
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx: loss = model(idx, idx)
    for h in hooks: h.remove()
    return seen, loss


def test_residual_stream_is_bf16_under_autocast_and_fp32_without():
    torch.manual_seed(0)
    m = build_model(CFG)
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    seen, loss = block_inputs(m, idx, torch.bfloat16)
    assert seen == [torch.bfloat16] * CFG.n_layer and loss.dtype == torch.float32
    seen, loss = block_inputs(m, idx)
    assert seen == [torch.float32] * CFG.n_layer
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


def test_fp32_numbers_unchanged_by_the_residual_cast():
    # The cast applies only under autocast: without it the forward is the plain fp32 computation, bit for bit.
    from nanochat_lib.model import rms_norm
    torch.manual_seed(0)
    m = random_gpt(CFG, seed=1)
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad():
        x = rms_norm(m.wte(idx))
        for b in m.blocks: x = b(x, m.cos[:, :16], m.sin[:, :16])
        assert torch.equal(m(idx), m.head(x))


@pytest.mark.parametrize("window,T", [(5, 40), (1, 9), (130, 200)])
def test_flex_window_equals_boolean_mask(window, T):
    # forward only: flex_attention has no CPU backward (the GPU smoke check compares gradients on CUDA)
    cfg = dataclasses.replace(CFG, window=window, sequence_len=max(T, 64))
    m = random_gpt(cfg, seed=2)
    idx = torch.randint(0, cfg.vocab_size, (2, T))
    out = {}
    with torch.no_grad():
        for flex in (True, False):
            m.flex_window = flex
            out[flex] = m(idx)
    torch.testing.assert_close(out[True], out[False], atol=1e-4, rtol=1e-4)


def test_window_mask_choice():
    cfg = dataclasses.replace(CFG, window=8)
    m = random_gpt(cfg)
    assert m.window_mask(64, "cpu").dtype == torch.bool                     # CPU, eager: the boolean mask
    assert torch.equal(m.window_mask(64, "cpu"), sliding_window_mask(64, 8))
    assert m.window_mask(8, "cpu") is None                                   # the window covers everything
    m.flex_window = True
    assert not isinstance(m.window_mask(64, "cpu"), torch.Tensor)            # a BlockMask
    bm = window_block_mask(1024, 128)           # 8 x 8 blocks of 128: the diagonal and the one below it remain
    assert bm.sparsity() == pytest.approx(100 * (1 - 15 / 64))


class FakeGraph:
    "Stands in for a CUDA graph on the CPU: every replay writes the step's logits into one static buffer."
    def __init__(self, sd): self.sd = sd
    def replay(self): self.sd.out.copy_(self.sd._fn(self.sd.idx, self.sd.pos))


def test_static_decoder_returns_logits_no_later_step_overwrites():
    m = random_gpt(CFG, seed=3)
    prompt = torch.tensor([[1, 2, 3, 4]])
    ref = StaticDecoder(m, 1, 12)
    sd = StaticDecoder(m, 1, 12)
    sd.mode = "graph"                               # emulate graph replay: one output buffer rewritten each step
    sd.out = torch.zeros(1, CFG.vocab_size)
    sd.graph = FakeGraph(sd)
    a, b = ref.prefill(prompt), sd.prefill(prompt)
    kept, kept_ref = [], []
    for t in range(5):
        nxt = a.argmax(-1)
        a, b = ref.step(nxt), sd.step(nxt)
        assert b.data_ptr() != sd.out.data_ptr()      # a copy, not the static buffer
        kept.append(b); kept_ref.append(a)
    for x, y in zip(kept, kept_ref): assert torch.equal(x, y)   # earlier results survived the later replays
