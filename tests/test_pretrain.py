"The pretraining loop on a tiny corpus made in code: resume equivalence, metrics, checkpoints."
import json, os, random, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from nanochat_lib.core import load_profile
from nanochat_lib.corpus import shard_name, write_shard
from nanochat_lib.pretrain import (device_peak, gpu_peak, make_plan, matmul_flops, model_flops_utilization, peak_flops,
                                   pretrain, train_args)
from nanochat_lib.stage import read_jsonl
from nanochat_lib.tokenizer import Tokenizer
from nanochat_lib.checkpoint import latest_checkpoint, read_meta

WORDS = "the cat sat on a mat while dogs ran past the red house and birds sang in tall green trees".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "." for _ in range(400)]
    shards = root / "shards"; shards.mkdir()
    for i, chunk in enumerate((docs[:300], docs[300:])):
        write_shard(shards / shard_name(i), chunk, row_group_docs=64)
    rdir = root / "run"
    Tokenizer.train(docs, 300).save(rdir / "tokenizer")
    return shards, rdir


def tiny_cfg(**kw):
    small = dict(depth=2, head_dim=64, max_seq_len=32, device_batch_size=4, total_batch_size=256, num_iterations=6,
                 eval_every=3, core_every=-1, sample_every=0, eval_tokens=0, loader_buffer_docs=50, tokenizer_threads=1)
    return load_profile("tiny", {**small, **kw})


def losses(rdir):
    return [json.loads(l) for l in (rdir / "metrics" / "base_train.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_gives_the_losses_of_an_uninterrupted_run(setup):
    shards, rdir = setup
    straight = pretrain(tiny_cfg(), rdir, shard_dir=shards)
    ref = losses(rdir)
    assert straight["steps"] == 6 and straight["grad_accum_steps"] == 2 and straight["tokens"] == 6 * 256
    assert [r["step"] for r in ref if "val_bpb" in r] == [0, 3, 6]
    import shutil; shutil.rmtree(rdir / "checkpoints")
    pretrain(tiny_cfg(), rdir, shard_dir=shards, stop_at=3)
    assert read_meta(latest_checkpoint(rdir / "checkpoints" / "base"))["step"] == 3
    resumed = pretrain(tiny_cfg(), rdir, shard_dir=shards, resume=True)
    again = losses(rdir)
    assert [r.get("loss") for r in again] == [r.get("loss") for r in ref]
    assert [r.get("val_bpb") for r in again] == [r.get("val_bpb") for r in ref]
    assert resumed["val_bpb"] == straight["val_bpb"]
    assert read_meta(latest_checkpoint(rdir / "checkpoints" / "base"))["step"] == 6


@pytest.mark.slow
def test_training_learns_and_reports(setup):
    shards, rdir = setup
    s = pretrain(tiny_cfg(num_iterations=30, eval_every=0, matrix_lr=0.04), rdir, shard_dir=shards)
    recs = losses(rdir)
    tr = [r["loss"] for r in recs if "loss" in r]
    assert tr[-1] < tr[0] - 1.0                         # it learns the toy language
    assert s["val_bpb"] < 2.0                           # 17 words: far below the ~4.5 bits of a uniform guess
    for k in ("tok_per_sec", "mfu", "num_params", "flops_per_token", "total_flops"):
        assert s[k] > 0, k
    summary = json.loads((rdir / "metrics" / "base_train_summary.json").read_text())
    assert summary["steps"] == 30


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, setup):
    shards, rdir = setup
    import shutil; shutil.copytree(rdir / "tokenizer", tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pretrain(tiny_cfg(), tmp_path, shard_dir=shards, resume=True)


def test_plans_of_the_profiles():
    sp = make_plan(load_profile("speedrun"), 65536)
    assert sp["num_params"] == 560_988_160 and sp["num_iterations"] == 21_400 and sp["grad_accum_steps"] == 2
    assert make_plan(load_profile("speedrun"), 65536, world_size=1)["grad_accum_steps"] == 16   # 16 rows per GPU
    with pytest.raises(ValueError, match="not a multiple"):
        make_plan(load_profile("tiny", {"total_batch_size": 1000}), 4096)


def test_train_args_and_flops_helpers():
    assert train_args("tiny", "r", {"depth": 3}, ["--resume"]) == ["--profile", "tiny", "--run", "r", "--set", "depth=3", "--resume"]
    f = matmul_flops("cpu", n=256, seconds=0.1)
    assert f > 1e8 and peak_flops("cpu") > 1e8
    p = device_peak("cpu", seconds=0.1)
    assert p["measured"] and p["source"].startswith("measured: best of repeated")


def test_gpu_peaks_match_whole_words_in_order():
    cases = {"NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
             "NVIDIA H200": "H200", "NVIDIA B200": "B200", "NVIDIA A100-SXM4-80GB": "A100", "NVIDIA A100 80GB PCIe": "A100",
             "NVIDIA A10": "A10", "NVIDIA L4": "L4", "NVIDIA L40S": "L40S", "NVIDIA GeForce RTX 4090": "RTX 4090",
             "NVIDIA GeForce RTX 3090": "RTX 3090", "Tesla V100-SXM2-32GB": "V100 (fp32)"}
    for name, label in cases.items():
        assert gpu_peak(name)[0] == label, name
    assert gpu_peak("NVIDIA L40S")[1] == 362e12 and gpu_peak("NVIDIA L4")[1] == 121e12
    assert gpu_peak("NVIDIA H100 PCIe")[1] < gpu_peak("NVIDIA H100 80GB HBM3")[1]
    for unknown in ("NVIDIA A10G", "NVIDIA GH200 480GB", "AMD Instinct MI300X", ""):
        assert gpu_peak(unknown) is None, unknown


def test_unknown_gpu_reports_no_mfu_and_mfu_never_exceeds_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery Accelerator 9000")
    p = device_peak("cuda")
    assert p["flops"] is None and "peak unknown" in p["source"] and model_flops_utilization(1e12, p) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    p = device_peak("cuda")
    assert p["flops"] == 362e12 and "datasheet" in p["source"] and "L40S" in p["source"]
    assert model_flops_utilization(181e12, p) == pytest.approx(0.5)
    with pytest.warns(UserWarning, match="FLOP count"):
        assert model_flops_utilization(400e12, p) == 1.0              # a datasheet cannot be beaten: clamped, warned
    measured = dict(flops=1e9, measured=True, source="measured: best of repeated bursts")
    with pytest.warns(UserWarning, match="raised"):
        assert model_flops_utilization(2e9, measured) == 1.0          # a timing under load: the peak is raised
    assert measured["flops"] == 2e9 and "raised" in measured["source"]
    assert model_flops_utilization(1e9, measured) == 0.5


def descendants(pid: int) -> list:
    "The ids of a process's children, grandchildren, ... (from /proc)."
    kids = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try: ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError): continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []): out.append(c); todo.append(c)
    return out


TRAINER = """
import os, sys, time
from functools import partial
import nanochat_lib.pretrain as P
from nanochat_lib.core import run_stage
step = P.train_step
def paced(*a, **k):                       # slow enough to be killed between two saves; the numbers are unchanged
    time.sleep(float(os.environ["STEP_SLEEP"]))
    return step(*a, **k)
P.train_step = paced
run_stage(partial(P.pretrain, shard_dir=os.environ["SHARDS"]), "trainer", "tiny pretraining for the kill test")
"""


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_and_matches_an_uninterrupted_run(setup, tmp_path):
    "A trainer under torchrun is killed (-9) after a mid-run checkpoint; the same command, run again, resumes from it."
    shards, rdir = setup
    runs, script = tmp_path / "runs", tmp_path / "trainer.py"
    script.write_text(TRAINER)
    for name in ("killed", "straight"): shutil.copytree(rdir / "tokenizer", runs / name / "tokenizer")
    sets = dict(depth=2, head_dim=64, max_seq_len=32, device_batch_size=4, total_batch_size=256, num_iterations=10,
                eval_every=5, core_every=-1, sample_every=0, eval_tokens=0, loader_buffer_docs=50, tokenizer_threads=1,
                save_every=2, keep_checkpoints=0)
    command = lambda name: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=1",
                            str(script), "--", "--profile", "tiny", "--run", name,
                            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NANOCHAT_RUNS": str(runs), "SHARDS": str(shards), "STEP_SLEEP": "0.5", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    ckpts = runs / "killed" / "checkpoints" / "base"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command("killed"), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and first.poll() is None:
                last = latest_checkpoint(ckpts)
                if last is not None and read_meta(last)["step"] >= 4: break
                time.sleep(0.05)
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
        finally:
            # torchrun starts its worker in a session of its own: kill -9 the worker (the trainer) and torchrun, by id
            for pid in [*descendants(first.pid), first.pid]:
                try: os.kill(pid, signal.SIGKILL)
                except ProcessLookupError: pass
            first.wait()
    saved = read_meta(latest_checkpoint(ckpts))["step"]
    assert 4 <= saved < 10 and not (runs / "killed" / "metrics" / "base_train_summary.json").exists()
    again = subprocess.run(command("killed"), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"at step {saved}" in again.stdout and "resumed from" in again.stdout
    straight = subprocess.run(command("straight"), env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    logs = [read_jsonl(runs / n / "metrics" / "base_train.jsonl") for n in ("killed", "straight")]
    for key in ("loss", "val_bpb", "grad_norm"):
        a, b = ([(r["step"], r[key]) for r in recs if key in r] for recs in logs)
        assert a == b and len(a) > 0, key                         # exact, on a CPU
    summaries = [json.loads((runs / n / "metrics" / "base_train_summary.json").read_text()) for n in ("killed", "straight")]
    assert summaries[0]["resumed_from"] == saved and summaries[1]["resumed_from"] is None
    assert summaries[0]["val_bpb"] == summaries[1]["val_bpb"] and summaries[0]["tokens"] == summaries[1]["tokens"]
