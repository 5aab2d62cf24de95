"Muon, the sharded optimizers and the schedules of notebooks/03b_optim.ipynb."
import math
import pytest, torch
from nanochat_lib.core import load_profile, torchrun
from nanochat_lib.model import GPTConfig, build_model
from nanochat_lib import optim
from nanochat_lib.optim import (Muon, DistMuon, DistAdamW, lr_multiplier, make_optimizers, muon_momentum,
                                newton_schulz, ns_polynomial, param_groups, set_lr_multiplier, set_muon_momentum)

RATES = dict(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0)


def conditioned(rows, cols, cond=100.0, seed=0):
    "A random matrix with singular values log-spaced from 1 down to 1/cond, and its SVD factors."
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g))
    W, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g))
    k = min(rows, cols)
    S = torch.logspace(0, -math.log10(cond), k)
    return U[:, :k] @ torch.diag(S) @ W[:, :k].T, U[:, :k], W[:, :k]


# Tolerance: five quintic Newton–Schulz steps put every singular value of an input with condition
# number <= 100 into about [0.68, 1.21]; we assert the looser [0.5, 1.5].
@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256), (96, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_output_is_close_to_orthogonal(shape, dtype):
    G, U, W = conditioned(*shape)
    O = newton_schulz(G, dtype=dtype)
    assert O.dtype == torch.float32 and O.shape == G.shape
    sv = torch.linalg.svdvals(O)
    assert sv.min() > 0.5 and sv.max() < 1.5, (sv.min(), sv.max())
    # it keeps the singular vectors: Uᵀ O W is (nearly) diagonal, with the values of the scalar map
    core = U.T @ O @ W
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < (0.05 if dtype == torch.bfloat16 else 1e-3)
    if dtype == torch.float32:
        S = torch.linalg.svdvals(G)
        torch.testing.assert_close(torch.diagonal(core), ns_polynomial(S / S.norm(), 5), rtol=1e-3, atol=1e-3)


def test_newton_schulz_batches_and_rejects_vectors():
    Gs = torch.stack([conditioned(32, 48, seed=s)[0] for s in range(3)])
    torch.testing.assert_close(newton_schulz(Gs), torch.stack([newton_schulz(g) for g in Gs]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs a matrix"):
        newton_schulz(torch.ones(5))


def test_muon_step_is_scaled_orthogonalised_nesterov_momentum():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(128, 32))
    start = W.detach().clone()
    opt = Muon([W], lr=0.1, momentum=0.9)
    g1, g2 = torch.randn(128, 32), torch.randn(128, 32)
    W.grad = g1.clone(); opt.step()
    W.grad = g2.clone(); opt.step()
    buf1 = 0.1 * g1                               # buf ← m·buf + (1−m)·g, from zero
    buf2 = 0.9 * buf1 + 0.1 * g2
    step1 = newton_schulz(0.1 * g1 + 0.9 * buf1)  # Nesterov: (1−m)·g + m·buf
    step2 = newton_schulz(0.1 * g2 + 0.9 * buf2)
    scale = math.sqrt(128 / 32)
    torch.testing.assert_close(W.detach(), start - 0.1 * scale * (step1 + step2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[W]["momentum_buffer"], buf2)


def test_muon_step_size_does_not_depend_on_gradient_scale():
    G = conditioned(64, 64, seed=1)[0]
    ends = []
    for factor in (1e-2, 1.0, 1e2):
        W = torch.nn.Parameter(torch.zeros(64, 64))
        W.grad = G * factor
        Muon([W], lr=0.05).step()
        ends.append(W.detach())
    # equal up to the eps added to the Frobenius norm (steps are ~5e-3 per entry here)
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-3, atol=2e-5)
    torch.testing.assert_close(ends[2], ends[1], rtol=1e-3, atol=2e-5)
    with pytest.raises(ValueError, match="2-D matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_lr_multiplier_shape():
    n = 100
    lrm = [lr_multiplier(s, n, warmup_ratio=0.1, warmdown_ratio=0.3, final_lr_frac=0.05) for s in range(n + 1)]
    assert lrm[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])          # linear warmup
    assert lrm[10:71] == [1.0] * 61                                               # flat until the warmdown
    down = lrm[70:]
    assert all(a > b for a, b in zip(down, down[1:]))                             # strictly falling
    assert down[-1] == pytest.approx(0.05) and lrm[85] == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_multiplier(150, n, warmdown_ratio=0.3, final_lr_frac=0.05) == pytest.approx(0.05)   # clamped
    orig = [lr_multiplier(s, 10) for s in range(11)]                              # no warmup, 20% warmdown to 0
    assert orig[:9] == [1.0] * 9 and orig[9] == pytest.approx(0.5) and orig[10] == 0.0
    with pytest.raises(ValueError, match="warmup_ratio \\+ warmdown_ratio <= 1"):
        lr_multiplier(0, 10, 0.6, 0.6)


def test_muon_momentum_ramp():
    assert muon_momentum(0) == 0.85 and muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(150) == pytest.approx(0.90) and muon_momentum(10_000) == pytest.approx(0.95)
    assert muon_momentum(50, ramp_steps=100, start=0.5, end=0.9) == pytest.approx(0.7)


def test_schedule_helpers_set_groups_without_compounding():
    model = build_model(GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    opts = make_optimizers(model, RATES)
    base = [g["initial_lr"] for o in opts for g in o.param_groups]
    set_lr_multiplier(opts, 0.5)
    set_lr_multiplier(opts, 0.5)
    assert [g["lr"] for o in opts for g in o.param_groups] == pytest.approx([0.5 * b for b in base])
    set_muon_momentum(opts, 0.9)
    assert opts[1].param_groups[0]["momentum"] == 0.9 and "momentum" not in opts[0].param_groups[0]


def test_make_optimizers_checks_coverage_and_process_group(monkeypatch):
    model = build_model(GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    with pytest.raises(RuntimeError, match="need a process group"):
        make_optimizers(model, RATES, distributed=True)
    with pytest.raises(ValueError, match="fraction must be positive"):
        make_optimizers(model, RATES, lr_frac=0.0)
    full = optim.param_groups
    def partial(*a, **kw):
        groups = full(*a, **kw)
        groups["muon"][0]["params"] = groups["muon"][0]["params"][1:]
        return groups
    monkeypatch.setattr(optim, "param_groups", partial)
    with pytest.raises(ValueError, match=r"missing \['blocks.0.attn.c_q.weight'\]"):
        make_optimizers(model, RATES)


def test_lr_frac_scales_every_rate_of_the_profile():
    model = build_model(GPTConfig(sequence_len=8, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    full, half = make_optimizers(model, RATES), make_optimizers(model, RATES, lr_frac=0.5)
    assert [g["lr"] for o in half for g in o.param_groups] == pytest.approx([g["lr"] / 2 for o in full for g in o.param_groups])


def test_param_groups_cover_every_parameter_once_with_scaled_lrs():
    model = build_model(GPTConfig(sequence_len=24, vocab_size=96, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    groups = param_groups(model, 0.02, 0.2, 0.004, 0.0)
    scale = (64 / 768) ** -0.5
    adamw, muon = groups["adamw"], groups["muon"]
    assert [g["name"] for g in adamw] == ["embedding", "unembedding"]
    assert math.isclose(adamw[0]["lr"], 0.2 * scale) and math.isclose(adamw[1]["lr"], 0.004 * scale)
    assert adamw[0]["betas"] == (0.8, 0.95) and adamw[0]["eps"] == 1e-10 and adamw[0]["weight_decay"] == 0.0
    assert muon[0]["lr"] == 0.02 and muon[0]["momentum"] == 0.95
    ids = [id(p) for g in adamw + muon for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert all(p.dim() == 2 for g in muon for p in g["params"])
    opts = make_optimizers(model, dict(matrix_lr=0.01, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0))
    assert isinstance(opts[0], torch.optim.AdamW) and isinstance(opts[1], Muon)
    assert opts[1].param_groups[0]["lr"] == 0.01


@pytest.mark.slow
def test_distributed_optimizers_equal_single_process_on_averaged_gradients():
    "2 gloo ranks under torchrun: DistAdamW + DistMuon vs AdamW + Muon on the mean gradient (rtol 1e-5, atol 1e-6)."
    out = torchrun("optim", ["--steps", 3], load_profile("tiny", {"nproc_per_node": 2}))
    lines = [l for l in out.splitlines() if l.startswith("dist_check ok")]
    assert len(lines) == 2, out          # rows split evenly (sharded AdamW) and not (all-reduce fallback)
    assert "vocab=32" in lines[0] and "vocab=33" in lines[1]
