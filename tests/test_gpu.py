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


# ---------------------------------------------------------------------------------- memory per GPU

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from nanochat_lib import bench  # noqa: E402
from nanochat_lib.core import load_profile  # noqa: E402

SMALL = GPTConfig.from_depth(2, 4096, 256, aspect_ratio=64, head_dim=64)
linux = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures /proc/self (Linux)")


@linux
@pytest.mark.parametrize("config,batch,seq,dtype", [(SMALL, 8, 256, "float32"), (SMALL, 8, 256, "bfloat16"),
                                                    (dataclasses.replace(SMALL, window=64), 8, 256, "bfloat16"),
                                                    (GPTConfig.from_depth(3, 8192, 512, head_dim=64), 4, 512, "float32")])
@pytest.mark.slow
def test_eager_estimate_matches_measured_peak_within_15_percent(config, batch, seq, dtype):
    est = bench.memory_estimate(config, batch, seq, getattr(torch, dtype), compiled=False)["above_state"]
    got = bench.measure_step_memory(config, batch, seq, dtype)
    assert abs(est / got - 1) < 0.15, (est / 2**20, got / 2**20)


@pytest.mark.slow
def test_trace_extrapolates_in_depth_and_compiled_saves_less():
    deep = dataclasses.replace(SMALL, n_layer=3)
    for compiled in (False, True):
        full = (bench.trace_compiled if compiled else bench.trace_eager)(deep, 4, 128, torch.bfloat16)
        ext = bench.trace_step(deep, 4, 128, torch.bfloat16, compiled)
        for k in full: assert ext[k] == pytest.approx(full[k], rel=0.01), (compiled, k)
    assert bench.trace_compiled(SMALL, 4, 128, torch.bfloat16)["saved"] < bench.trace_eager(SMALL, 4, 128, torch.bfloat16)["saved"]
    # the compiled graph keeps the logits in bf16, not fp32 copies of them
    c = bench.trace_compiled(dataclasses.replace(SMALL, n_layer=1, vocab_size=65536), 4, 128, torch.bfloat16)
    assert c["saved"] < 2 * 4 * 128 * 65536 * 2


def test_optimizer_state_is_sharded_as_the_distributed_optimizers_shard_it():
    d20 = GPTConfig.from_depth(20, 65536)
    one, eight = bench.optimizer_bytes(d20, 1), bench.optimizer_bytes(d20, 8)
    emb = 65536 * 1280
    assert one["adamw"] == 8 * 2 * emb and eight["adamw"] == one["adamw"] // 8     # rows split evenly
    assert one["muon"] == 4 * 20 * 12 * 1280**2
    # 80 square (c_q, c_k, c_v, c_proj) and 20 + 20 MLP matrices: rank 0 owns ceil(n / 8) of each shape
    assert eight["muon"] == 4 * (10 * 1280**2 + 3 * 4 * 1280**2 + 3 * 4 * 1280**2)
    odd = bench.optimizer_bytes(dataclasses.replace(d20, vocab_size=65537), 8)
    assert odd["adamw"] == 8 * 2 * 65537 * 1280                                     # rows don't split: all of them


@pytest.mark.parametrize("name", ["gpu1", "d26", "d32"])
def test_every_gpu_profile_fits_an_80gb_gpu_with_headroom(name):
    r = bench.memory_for_profile(load_profile(name))
    assert r["gpu"] and r["compiled"] and r["dtype"] == "bfloat16"
    assert r["peak"] <= bench.gpu_budget(80) == pytest.approx(79 * 0.95 * 2**30)
    assert r["peak"] == r["params"] + r["adamw"] + r["muon"] + r["above_state"]
    assert "fits a 80 GB GPU" in bench.memory_line(r)


@pytest.mark.slow
def test_memory_command_speedrun_fits_and_batch_32_does_not(capsys):
    bench.main(["memory", "--profile", "speedrun"])
    out = capsys.readouterr().out
    for line in ("parameters", "gradients", "Muon momentum", "AdamW moments", "saved activations",
                 "of which the logits", "peak", "fits a 80 GB GPU", "sharded over 8 ranks"):
        assert line in out, line
    with pytest.raises(SystemExit) as e: bench.main(["memory", "--profile", "speedrun", "--set", "device_batch_size=32"])
    assert e.value.code == 1 and "DOES NOT FIT" in capsys.readouterr().out
    bench.main(["memory", "--profile", "speedrun", "--set", "device_batch_size=32", "--gpu-memory-gb", "141"])  # an H200


def test_dry_run_prints_the_memory_per_gpu(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import run_all
    assert run_all.main(["--profile", "speedrun", "--dry-run"]) == 0
    mem = [l for l in capsys.readouterr().out.splitlines() if l.startswith("memory:")]
    assert len(mem) == 1 and "GiB peak per GPU (bfloat16, compiled, device batch 16 x 2048): fits a 80 GB GPU" in mem[0]


# ---------------------------------------------------------------------------------- bench train, gpu-smoke

def test_bench_train_measures_the_trainers_configuration():
    r = bench.bench_train("tiny", steps=1, overrides={"depth": 1, "max_seq_len": 64, "device_batch_size": 2,
                                                       "total_batch_size": 256})
    assert (r["dtype"], r["compiled"], r["grad_accum"]) == ("float32", False, 2)       # what pretrain runs on a CPU
    assert "measured as the trainer runs it: float32 (no autocast), eager" in bench.train_table(r)
    assert bench.trainer_mode(load_profile("speedrun"), "cpu") == (torch.float32, False)
    assert bench.trainer_mode(load_profile("tiny", {"compile": True}), "cpu") == (torch.float32, True)


@pytest.mark.slow
def test_gpu_smoke_cpu_rows(capsys):
    rows = bench.gpu_smoke("cpu", only="abcde", log=lambda s: None)
    got = {r["row"]: r for r in rows}
    assert {k: r["status"] for k, r in got.items()} == {"a": "PASS", "b": "SKIP", "c": "SKIP", "d": "PASS", "e": "PASS"}
    assert "largest loss difference 0.00e+00 (tolerance 0)" in got["a"]["detail"]          # exact on a CPU
    assert "identical across eager, compile" in got["d"]["detail"]
    assert "gloo, world 1" in got["e"]["detail"] and "weights equal, optimizer equal, RNG and loader state restored" in got["e"]["detail"]
    table = bench.smoke_table(rows, "cpu")
    assert table.count("\n| ") == 6 and "all rows passed" in table


def test_gpu_smoke_fails_loudly(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "smoke_dist", lambda *a: (_ for _ in ()).throw(RuntimeError("NCCL went away")))
    out = tmp_path / "smoke.md"
    with pytest.raises(SystemExit) as e: bench.main(["gpu-smoke", "--device", "cpu", "--only", "e", "--out", str(out)])
    assert e.value.code == 1
    text = out.read_text()
    assert "| e | process group of one: bpb, CORE, checkpoint | FAIL |" in text and "RuntimeError: NCCL went away" in text
    assert "FAILED rows: e" in text
