"Loading a run's model for chat and serving: checked weights, one-line errors naming the file."
import json
import pytest
import torch
from chatkit import make_run, one_thread  # noqa: F401  (one torch thread for the tiny models)
from nanochat_lib import cli
from nanochat_lib.checkpoint import CheckpointError, read_meta, save_checkpoint
from nanochat_lib.model import GPTConfig, build_model
from nanochat_lib.model_io import checkpoint_dir, config_from_meta, load_model


@pytest.fixture
def run(tmp_path):
    "A run with sft checkpoints at steps 0 and 5 (different weights)."
    rdir = make_run(tmp_path / "r", phase="sft")
    m, _, meta = load_model(rdir, "sft")
    torch.manual_seed(5)
    m5 = build_model(m.config)
    save_checkpoint(rdir / "checkpoints" / "sft", 5, m5, meta=dict(phase="sft", model_config=vars(m5.config)))
    return rdir, m5


def flip(path, n):
    data = bytearray(path.read_bytes())
    at = len(data) // 2
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


def test_load_model_gives_the_saved_weights(run):
    rdir, m5 = run
    model, tok, meta = load_model(rdir, "sft")
    assert meta["step"] == 5 and not model.training
    assert all(torch.equal(a, b) for a, b in zip(m5.state_dict().values(), model.state_dict().values()))
    assert load_model(rdir, "sft", step=0)[2]["step"] == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_model_is_a_one_line_error_naming_the_file(run, damage, capsys):
    rdir, _ = run
    weights = rdir / "checkpoints" / "sft" / "step_000005" / "model.pt"
    assert weights.stat().st_size > 8192
    if damage == "flip": flip(weights, 4096)
    elif damage == "truncate": weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    else: weights.unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(rdir, "sft")                  # chat and serving never fall back to an older step by themselves
    msg = str(e.value)
    assert "\n" not in msg and str(weights) in msg and "--step 0" in msg
    assert {"flip": "corrupt", "truncate": "truncated", "delete": "is missing"}[damage] in msg
    # the CLI prints it as one line and exits non-zero
    with pytest.raises(SystemExit) as e:
        cli.main(["chat", "--run", str(rdir), "-i", "sft", "-p", "hi", "--set", "device=cpu"])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {msg}\n"
    # an earlier intact step still loads when asked for
    assert load_model(rdir, "sft", step=0)[2]["step"] == 0


def test_no_intact_step_says_which_notebook_writes_one(tmp_path):
    rdir = make_run(tmp_path / "r", phase="mid")
    weights = checkpoint_dir(rdir, "mid") / "model.pt"
    flip(weights, 4096)
    with pytest.raises(CheckpointError, match=r"model.pt is corrupt.*run notebook 05_midtraining again"):
        load_model(rdir, "mid")


def test_bad_model_config_in_meta_is_a_checkpoint_error(run):
    rdir, _ = run
    d = checkpoint_dir(rdir, "sft")
    meta = read_meta(d)
    meta["model_config"]["n_lahyer"] = 3
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"meta.json: model_config does not fit GPTConfig"):
        load_model(rdir, "sft")
    with pytest.raises(CheckpointError, match="has no model_config"):
        config_from_meta({"step": 1})
    assert config_from_meta({"model_config": vars(GPTConfig(n_layer=1))}).n_layer == 1
