"""`python -m nanochat_lib.bench infer`: what it measures and reports (never how fast: timings are not tested)."""
import pytest
import torch

from nanochat_lib.bench import bench_infer, build_parser, copy_bandwidth, infer_table, main
from nanochat_lib.core import load_profile
from nanochat_lib.pretrain import make_plan


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bench_infer_measures_every_method_and_the_bound():
    r = bench_infer("tiny", {"device": "cpu"}, batch=2, prompt_len=4, new_tokens=3, naive_tokens=2, static_mode="eager")
    assert set(r["rates"]) == {"cache@1", "cache@2", "naive@1", "naive@2", "eager@1", "eager@2"}
    assert all(v > 0 for v in r["rates"].values())
    config = make_plan(load_profile("tiny"), int(load_profile("tiny")["tok_vocab_size"]), world_size=1)["config"]
    # weights read per step: everything but the input embedding (one row per token), fp32 on a CPU
    assert r["weight_bytes"] == 4 * (r["params"] - config.vocab_size * config.n_embd)
    assert r["bound"]["1"] == pytest.approx(r["bandwidth"] / r["weight_bytes"]) and r["bound"]["2"] == 2 * r["bound"]["1"]
    table = infer_table(r)
    for row in ("KV cache", "static step (eager)", "naive recompute", "memory-bandwidth bound", "of the bound", "x naive"):
        assert row in table


def test_copy_bandwidth_is_positive():
    assert copy_bandwidth("cpu", nbytes=1 << 20, repeats=2) > 0


def test_infer_command_line(capsys):
    main(["infer", "--batch", "2", "--prompt-len", "4", "--tokens", "3", "--set", "device=cpu"])
    out = capsys.readouterr().out
    assert "batch 2 tok/s" in out and "KV cache" in out and "memory-bandwidth bound" in out and "static" not in out
    a = build_parser().parse_args(["infer", "--compile", "--graph", "--profile", "speedrun"])
    assert a.compile and a.graph and a.profile == "speedrun" and a.batch == 8
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA device"):
            main(["infer", "--graph", "--batch", "2", "--prompt-len", "4", "--tokens", "3", "--set", "device=cpu"])
    with pytest.raises(SystemExit, match="positive"): main(["infer", "--tokens", "0"])
