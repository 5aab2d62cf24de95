"The pretraining loop on a tiny corpus made in code: resume equivalence, metrics, checkpoints."
import json, random
import pytest, torch
from nanochat_lib.core import load_profile
from nanochat_lib.corpus import shard_name, write_shard
from nanochat_lib.pretrain import make_plan, pretrain, train_args, matmul_flops, peak_flops
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
