"Experiment tracking (nanochat_lib.tracker): off by default and import-free, rank 0 only, and real W&B runs in offline mode."
import json
import subprocess
import sys

import pytest

from nanochat_lib.core import load_profile
from nanochat_lib.tracker import (NullTracker, flat_metrics, make_tracker, offline_runs, read_offline_run,
                                  report_summary, tracker_kind)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
NEEDS_WANDB = "wandb is missing: `make setup` installs it (the dev extra pulls in the tracking extra)"


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    "W&B in offline mode writing under a temporary WANDB_DIR; its background service is stopped afterwards."
    wandb = pytest.importorskip("wandb", reason=NEEDS_WANDB)
    d = tmp_path / "wandb_dir"
    d.mkdir()
    for k, v in dict(WANDB_MODE="offline", WANDB_DIR=str(d), WANDB_CONSOLE="off", WANDB_SILENT="true").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RANK", raising=False)
    yield d
    wandb.teardown()


def finished_runs(root) -> list:
    "The offline runs under `root`, read after W&B's service has stopped (it writes the run files asynchronously)."
    import wandb
    wandb.teardown()
    return offline_runs(root)


def test_default_profile_has_tracking_off_and_imports_nothing():
    code = ("import sys; from nanochat_lib.core import load_profile; from nanochat_lib.tracker import make_tracker\n"
            "t = make_tracker(load_profile('tiny'), 'r', 'base'); t.log({'step': 1, 'loss': 2.0}); t.summary({'a': 1}); t.finish()\n"
            "print(type(t).__name__, 'wandb' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["NullTracker", "False"]


def test_setting_values_and_a_clear_error():
    assert tracker_kind(load_profile("tiny")) == "none"
    assert tracker_kind(load_profile("tiny", {"tracker": "wandb"})) == "wandb"
    for off in (None, "", "none", "off", "None", False):
        assert tracker_kind({"tracker": off}) == "none"
    with pytest.raises(ValueError, match=r"tracker = 'mlflow' is not a tracker.*--set tracker=wandb"):
        tracker_kind({"tracker": "mlflow"})


def test_only_rank0_tracks(monkeypatch):
    cfg = {"tracker": "wandb"}
    monkeypatch.setitem(sys.modules, "wandb", None)          # any attempt to import wandb would raise
    monkeypatch.setenv("RANK", "3")
    assert isinstance(make_tracker(cfg, "r", "base"), NullTracker)
    assert isinstance(make_tracker(cfg, "r", "base", enabled=False), NullTracker)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[tracking\]'"):
        make_tracker(cfg, "r", "base")


def test_flat_metrics_and_report_summary():
    rec = {"step": 2, "pass_at_k": [0.25, 0.5], "eval": {"bpb": 1.5}, "ended": True, "phase": "train", "x": None}
    assert flat_metrics(rec) == {"step": 2, "pass_at_k/1": 0.25, "pass_at_k/2": 0.5, "eval/bpb": 1.5, "ended": 1}
    stages = [{"stage": "base", "column": "BASE", "summary": {"CORE (offline, 14 tasks)": 0.1}},
              {"stage": "sft", "column": "SFT", "summary": {"GSM8K": 0.05}}, {"stage": "tokenizer", "metrics": {"v": 1}}]
    assert report_summary(stages) == {"CORE (offline, 14 tasks)/BASE": 0.1, "GSM8K/SFT": 0.05}


def test_wandb_offline_run_holds_profile_metrics_and_summary(wandb_offline):
    cfg = load_profile("tiny", {"tracker": "wandb"})
    records = [{"step": s, "loss": 8.0 / s, "lr_mult": 1.0, "pass_at_k": [0.1 * s, 0.2 * s]} for s in range(1, 6)]
    with make_tracker(cfg, "t1", "base") as t:
        for r in records: t.log(r)
        t.log({"val_bpb": 1.25}, step=5)                      # a second record at the same step joins that row
        t.summary({"final_loss": 1.6, "note": "tiny"})
    files = finished_runs(wandb_offline)
    assert len(files) == 1 and files[0].parent.name.startswith("offline-run-")
    run = read_offline_run(files[0])
    assert run["name"] == "t1-base"
    assert run["config"]["profile"] == "tiny" and run["config"]["depth"] == cfg["depth"]
    assert run["config"]["stage"] == "base" and run["config"]["tracker"] == "wandb"
    hist = run["history"]
    assert [h["_step"] for h in hist] == [1, 2, 3, 4, 5]
    assert [h["loss"] for h in hist] == pytest.approx([8.0 / s for s in range(1, 6)])
    assert hist[2]["pass_at_k/2"] == pytest.approx(0.6) and hist[-1]["val_bpb"] == 1.25
    assert run["summary"]["final_loss"] == 1.6 and run["summary"]["note"] == "tiny"


def test_run_files_default_to_the_run_folder(wandb_offline, runs_tmp, monkeypatch):
    monkeypatch.delenv("WANDB_DIR")
    with make_tracker(load_profile("tiny", {"tracker": "wandb"}), "t2", "sft") as t:
        t.log({"step": 1, "loss": 0.5})
    files = finished_runs(runs_tmp / "t2" / "wandb")
    assert len(files) == 1 and read_offline_run(files[0])["history"][0]["loss"] == 0.5


def test_stage_log_mirrors_records_and_summary_to_its_tracker(tmp_path):
    "Every trainer's records and summary pass through StageLog, which hands them to the tracker (rank 0 only)."
    from nanochat_lib.stage import StageLog
    class Recorder:
        def __init__(self): self.logged, self.summaries, self.finished = [], [], 0
        def log(self, rec, step=None): self.logged.append((step, rec))
        def summary(self, d): self.summaries.append(d)
        def finish(self): self.finished += 1
    t = Recorder()
    log = StageLog(tmp_path/"m.jsonl", True, None, t)
    log.write(step=1, loss=2.5); log.write(step=2, val_bpb=1.25)
    log.finish({"val_bpb": 1.25}, tmp_path/"s.json")
    assert t.logged == [(1, {"step": 1, "loss": 2.5}), (2, {"step": 2, "val_bpb": 1.25})]
    assert t.summaries == [{"val_bpb": 1.25}] and t.finished == 1
    off = Recorder()
    StageLog(tmp_path/"n.jsonl", False, None, off).write(step=1, loss=1.0)    # not rank 0: nothing leaves
    assert off.logged == []
