"The stage scaffold: tolerant metric log, resume modes and plans, saves by steps and minutes, exact resume of a toy trainer."
import json, time
import pytest, torch
from nanochat_lib.checkpoint import latest_checkpoint, list_checkpoints, read_meta, save_checkpoint
from nanochat_lib.core import DistInfo, load_profile
from nanochat_lib.model import GPTConfig, build_model
from nanochat_lib.optim import make_optimizers
from nanochat_lib.optim import lr_multiplier, set_lr_multiplier
from nanochat_lib.stage import (Prefetcher, Stage, StageLog, every, grad_norm, group_names, plan_differences, read_jsonl,
                                resume_mode, resume_point, snapshot, update_norms)

CONFIG = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)


class CountingLoader:
    "Batch k is random tokens from seed k: a loader whose whole position is one number."
    def __init__(self): self.k = 0
    def __next__(self):
        g = torch.Generator().manual_seed(self.k); self.k += 1
        ids = torch.randint(0, 64, (4, 17), generator=g)
        return ids[:, :-1], ids[:, 1:]
    def state_dict(self): return dict(k=self.k)
    def load_state_dict(self, s): self.k = s["k"]


def toy_train(rdir, resume="auto", stop_at=None, steps=6, **cfg_kw):
    cfg = load_profile("tiny", {**dict(save_every=0, save_every_minutes=0, keep_checkpoints=2), **cfg_kw})
    torch.manual_seed(0)
    model = build_model(CONFIG)
    opts = make_optimizers(model, dict(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0))
    stage = Stage(cfg, rdir, "toy", DistInfo(), model, opts, plan=dict(config=vars(CONFIG), steps=steps), steps=steps,
                  resume=resume, stop_at=stop_at, state=dict(tokens=0))
    extras = stage.start()
    loader = CountingLoader()
    if extras: loader.load_state_dict(extras["loader"])
    batches = Prefetcher(loader)
    for step in stage:
        if stage.last or every(step, 2): stage.log.write(step=step, val=float(step))
        stage.save_when_due(rank_state=dict(loader=batches.state))
        if stage.stopping: break
        with stage.timing():
            x, y = batches.batch
            loss = model(x, y); loss.backward(); batches.advance()
            set_lr_multiplier(opts, lr_multiplier(step, steps, warmdown_ratio=0.5))
            for o in opts: o.step()
            model.zero_grad(set_to_none=True)
        stage.state["tokens"] += x.numel()
        stage.end_step(loss=stage.smooth(loss.item()), raw=loss.item())
    return stage.finish(dict(steps=steps, tokens=stage.state["tokens"]))


def records(rdir): return read_jsonl(rdir / "metrics" / "toy_train.jsonl")


def test_read_jsonl_drops_a_torn_last_line_only(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(p)] == [1, 2]
    p.write_text('{"step": 1}\n{"step": 2}\n3\n')                 # a last line that parses but is no record: torn too
    assert len(read_jsonl(p)) == 2
    p.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_stage_log_keeps_what_came_before_the_checkpoint(tmp_path):
    p = tmp_path / "m.jsonl"
    log = StageLog(p)
    for s in range(4): log.write(step=s, val=1.0); log.write(step=s + 1, loss=2.0)
    with open(p, "a") as f: f.write('{"step": 5, "lo')                          # killed mid-write
    StageLog(p, resume_step=2)                                                   # the resume a torn line used to crash
    assert [(r["step"], "loss" in r) for r in read_jsonl(p)] == [(0, False), (1, True), (1, False), (2, True)]
    StageLog(p)                                                                  # a fresh start empties it
    assert read_jsonl(p) == []
    seen = []
    class Tracked(StageLog):                                                     # the one place records pass
        def write(self, **rec): seen.append(rec); super().write(**rec)
    Tracked(p).write(step=1, loss=3.0)
    assert seen == [dict(step=1, loss=3.0)]


def test_resume_modes_and_plans(tmp_path, capsys):
    assert [resume_mode(m) for m in (True, False, None, "auto", "fresh", "require")] == \
           ["require", "fresh", "fresh", "auto", "fresh", "require"]
    with pytest.raises(ValueError, match="resume must be one of"):
        resume_mode("sometimes")
    d = tmp_path / "ckpt"
    assert resume_point(d, {}, "auto") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resume_point(d, {}, "require")
    save_checkpoint(d, 3, build_model(CONFIG), meta=dict(plan=dict(steps=8, batch=(4, 16))))
    assert resume_point(d, dict(steps=8, batch=[4, 16]), "auto").name == "step_000003"   # tuples and lists agree
    assert resume_point(d, dict(steps=8, batch=[4, 16]), "fresh") is None
    assert resume_point(d, dict(steps=9, batch=[4, 16]), "auto") is None
    assert "another plan (steps: 8 -> 9)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="steps: 8 -> 9"):
        resume_point(d, dict(steps=9, batch=[4, 16]), "require")
    assert plan_differences(None, dict(a=1)) == ["plan: none recorded (an older checkpoint)"]


def test_an_interrupted_run_resumes_exactly_by_itself(tmp_path):
    straight = toy_train(tmp_path / "a")
    toy_train(tmp_path / "b", stop_at=3)
    assert read_meta(latest_checkpoint(tmp_path / "b" / "checkpoints" / "toy"))["step"] == 3
    resumed = toy_train(tmp_path / "b")                                          # no flag: the default auto
    assert resumed["resumed_from"] == 3 and straight["resumed_from"] is None
    drop_time = lambda recs: [{k: v for k, v in r.items() if k != "elapsed"} for r in recs]
    assert drop_time(records(tmp_path / "b")) == drop_time(records(tmp_path / "a"))   # every record, evals included
    assert [r.get("raw") for r in records(tmp_path / "b")] == [r.get("raw") for r in records(tmp_path / "a")]
    assert resumed["tokens"] == straight["tokens"] == 6 * 64
    summary = json.loads((tmp_path / "b" / "metrics" / "toy_train_summary.json").read_text())
    assert summary["phase"] == "toy" and summary["resumed_from"] == 3


def test_a_finished_stage_relaunched_rewrites_nothing_and_another_plan_starts_over(tmp_path):
    toy_train(tmp_path)
    final = latest_checkpoint(tmp_path / "checkpoints" / "toy")
    stamp = (final / "model.pt").stat().st_mtime_ns
    again = toy_train(tmp_path)
    assert again["resumed_from"] == 6 and (final / "model.pt").stat().st_mtime_ns == stamp
    assert toy_train(tmp_path, resume="fresh")["resumed_from"] is None
    other = toy_train(tmp_path, steps=4)
    assert other["resumed_from"] is None and read_meta(latest_checkpoint(tmp_path / "checkpoints" / "toy"))["step"] == 4
    with pytest.raises(ValueError, match="another plan"):
        toy_train(tmp_path, resume="require", steps=5)


def test_periodic_saves_by_steps_and_minutes_are_pruned(tmp_path):
    toy_train(tmp_path / "steps", save_every=2, keep_checkpoints=2)
    assert [d.name for d in list_checkpoints(tmp_path / "steps" / "checkpoints" / "toy")] == ["step_000004", "step_000006"]
    toy_train(tmp_path / "minutes", save_every_minutes=1e-9, keep_checkpoints=3)    # due at every step
    assert [d.name for d in list_checkpoints(tmp_path / "minutes" / "checkpoints" / "toy")] == \
           ["step_000004", "step_000005", "step_000006"]
    toy_train(tmp_path / "none", save_every_minutes=60)                             # not due in a second: only the end
    assert [d.name for d in list_checkpoints(tmp_path / "none" / "checkpoints" / "toy")] == ["step_000006"]


def test_a_stage_must_be_started_and_its_body_must_advance(tmp_path):
    cfg = load_profile("tiny")
    model = build_model(CONFIG)
    stage = Stage(cfg, tmp_path, "toy", DistInfo(), model, [], plan={}, steps=2)
    with pytest.raises(RuntimeError, match="start"):
        next(iter(stage))
    stage.start()
    it = iter(stage)
    next(it)
    with pytest.raises(RuntimeError, match="end_step"):
        next(it)


def test_prefetcher_saves_the_position_before_the_batch_in_hand():
    a = Prefetcher(CountingLoader()); a.advance()
    b = Prefetcher(CountingLoader()); b.load_state_dict(a.state)
    assert a.state == dict(k=1) and torch.equal(a.batch[0], b.batch[0])


def test_gradient_and_update_norms():
    torch.manual_seed(0)
    model = build_model(CONFIG)
    opts = make_optimizers(model, dict(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0))
    x, y = next(CountingLoader())
    model(x, y).backward()
    want = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    torch.testing.assert_close(grad_norm(model), want)
    names = group_names(opts, model)
    assert "AdamW wte.weight" in names and "AdamW lm_head.weight" in names and any(n.startswith("Muon 6 x") for n in names)
    before = snapshot(opts)
    assert set(update_norms(opts, before, model).values()) == {0.0}
    for o in opts: o.step()
    moved = update_norms(opts, before, model)
    assert all(v > 0 for v in moved.values()) and list(moved) == names
