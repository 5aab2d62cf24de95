import os
import pytest, torch
import torch.multiprocessing as mp
from nanochat_lib.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, read_meta,
                                     save_checkpoint, clean_state_dict)


def make(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return m, [torch.optim.AdamW(m[0].parameters(), lr=1e-2), torch.optim.SGD(m[2].parameters(), lr=0.1, momentum=0.9)]


def steps(m, opts, start, n):
    for s in range(start, start + n):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(s))
        noise = torch.rand(())  # global RNG: restored by the checkpoint
        ((m(x) - x[:, :2]) ** 2).mean().mul(1 + noise).backward()
        for o in opts: o.step(); o.zero_grad()
    return start + n


def test_resume_equals_uninterrupted(tmp_path):
    ref, opts = make()
    torch.manual_seed(7); steps(ref, opts, 0, 8)
    m, opts = make()
    torch.manual_seed(7); k = steps(m, opts, 0, 5)
    save_checkpoint(tmp_path, k, m, opts, meta={"model_config": {"d": 4}}, rank_state={"loader": {"pos": k}})
    m, opts = make(seed=99)
    torch.manual_seed(12345)  # the new process's RNG differs until the checkpoint restores it
    meta, rs = load_checkpoint(latest_checkpoint(tmp_path), m, opts)
    steps(m, opts, rs["loader"]["pos"], 3)
    for a, b in zip(ref.state_dict().values(), m.state_dict().values()):
        assert torch.equal(a, b)
    assert meta["model_config"] == {"d": 4} and meta["step"] == 5 and meta["world_size"] == 1


def test_crash_during_save_keeps_previous_and_prunes(tmp_path):
    m, opts = make()
    for s in (10, 20, 30):
        save_checkpoint(tmp_path, s, m, opts, keep_last=2)
    assert [d.name for d in list_checkpoints(tmp_path)] == ["step_000020", "step_000030"]

    class Boom(torch.optim.SGD):
        def state_dict(self): raise OSError("disk full")
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 40, m, [Boom(m.parameters(), lr=1)])
    assert latest_checkpoint(tmp_path).name == "step_000030"
    (tmp_path / "latest").unlink()  # even without the marker, the newest complete folder is found
    assert latest_checkpoint(tmp_path).name == "step_000030"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_000040.tmp", m)


def test_a_shorter_rerun_keeps_its_own_checkpoints(tmp_path):
    "A second run in the same folder with fewer steps: the first run's later steps are stale, not the new ones."
    m, opts = make()
    for s in (100, 200, 300):
        save_checkpoint(tmp_path, s, m, opts, keep_last=2)
    for s in (10, 20, 30):
        save_checkpoint(tmp_path, s, m, opts, keep_last=2)
    assert [d.name for d in list_checkpoints(tmp_path)] == ["step_000020", "step_000030"]
    assert latest_checkpoint(tmp_path).name == "step_000030"


def test_mismatched_optimizers_and_ranks_are_clear_errors(tmp_path):
    m, opts = make()
    d = save_checkpoint(tmp_path, 1, m, opts)
    with pytest.raises(ValueError, match="2 optimizer states, got 1"):
        load_checkpoint(d, m, opts[:1])
    with pytest.raises(FileNotFoundError, match="same number of processes"):
        load_checkpoint(d, m, opts, rank=3)
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_compiled_prefix_is_stripped():
    m, _ = make()
    class Wrap(torch.nn.Module):
        def __init__(self): super().__init__(); self._orig_mod = m
    assert set(clean_state_dict(Wrap())) == set(m.state_dict())


def _rank_main(rank, world, path, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    m, opts = make()
    with torch.no_grad():
        for p in m.parameters(): p.add_(rank)  # each rank's optimizer sees different params
    steps(m, opts, 0, 2)
    save_checkpoint(path, 2, m, opts, rank_state={"rank": rank}, rank=rank, world_size=world)
    m2, opts2 = make()
    _, rs = load_checkpoint(latest_checkpoint(path), m2, opts2, rank=rank)
    assert rs == {"rank": rank}
    for o, o2 in zip(opts, opts2):
        for s, s2 in zip(o.state.values(), o2.state.values()):
            assert all(torch.equal(s[k], s2[k]) for k in s if torch.is_tensor(s[k]))
    torch.distributed.destroy_process_group()


def test_two_ranks_write_and_read_their_own_shards(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, str(tmp_path), port), nprocs=2, join=True)
    d = latest_checkpoint(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "model.pt", "rank0.pt", "rank1.pt"]
    assert read_meta(d)["world_size"] == 2


def test_weights_only_load_needs_no_optimizers(tmp_path):
    m, opts = make()
    d = save_checkpoint(tmp_path, 5, m, opts, meta={"phase": "base"})
    m2, _ = make(seed=3)
    meta, rs = load_checkpoint(d, m2)
    assert meta["phase"] == "base" and rs == {}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


# ---- integrity, safe loads, other devices, several nodes (issues 12 and 14) ----------------------------

import json, shutil
from pathlib import Path
from nanochat_lib import checkpoint as ck
from nanochat_lib.checkpoint import CheckpointError, checkpoint_problem, load_weights
from nanochat_lib.fetch import sha256_file


def big(seed=0):
    "A model whose model.pt is large enough to flip 4 KB inside it."
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    return m, [torch.optim.AdamW(m.parameters(), lr=1e-2)]


def flip(path, n, at=None):
    data = bytearray(Path(path).read_bytes())
    at = len(data) // 2 if at is None else at
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    Path(path).write_bytes(bytes(data))


def test_meta_map_location_restores_rng_model_optimizer_and_loader(tmp_path):
    "meta stands in for cuda: before the fix, the saved RNG state was mapped to the device and set_rng_state raised."
    m, opts = make()
    steps(m, opts, 0, 3)
    saved_rng, saved_opts = torch.get_rng_state(), [o.state_dict() for o in opts]
    loader = {"position": {"epoch": 0, "shard": 1, "row_group": 2, "doc": 3}, "buffer": [[0, 1, 2]]}
    save_checkpoint(tmp_path, 3, m, opts, rank_state={"loader": loader})
    torch.manual_seed(4321)
    with torch.device("meta"):
        mm = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    mopts = [torch.optim.AdamW(mm[0].parameters(), lr=1.0), torch.optim.SGD(mm[2].parameters(), lr=1.0, momentum=0.9)]
    meta, rs = load_checkpoint(latest_checkpoint(tmp_path), mm, mopts, map_location="meta")
    assert meta["step"] == 3 and rs == {"loader": loader}
    assert torch.equal(torch.get_rng_state(), saved_rng) and torch.get_rng_state().device.type == "cpu"
    assert all(p.device.type == "meta" for p in mm.parameters())
    for o, sd in zip(mopts, saved_opts):
        got = o.state_dict()
        assert got["param_groups"] == sd["param_groups"]           # lr etc. came back
        for k, s in sd["state"].items():
            for name, v in s.items():
                w = got["state"][k][name]
                assert w.shape == v.shape and w.device.type == ("cpu" if name == "step" else "meta")


def test_rank_state_tensors_follow_map_location_but_rng_stays_on_cpu(tmp_path):
    m, opts = make()
    save_checkpoint(tmp_path, 1, m, opts, rank_state={"t": torch.arange(3), "n": [torch.ones(2)]})
    _, rs = load_checkpoint(tmp_path / "step_000001", None, opts, map_location="meta")
    assert rs["t"].device.type == "meta" and rs["n"][0].device.type == "meta"


def test_meta_json_lists_every_file_with_sha256_and_size(tmp_path):
    m, opts = make()
    d = save_checkpoint(tmp_path, 1, m, opts)
    files = read_meta(d)["files"]
    assert set(files) == {"model.pt", "rank0.pt"} == {p.name for p in d.iterdir()} - {"meta.json"}
    for name, info in files.items():
        assert info == {"bytes": (d / name).stat().st_size, "sha256": sha256_file(d / name)}
        import hashlib
        assert info["sha256"] == hashlib.sha256((d / name).read_bytes()).hexdigest()


def test_rank_state_must_be_plain_values(tmp_path):
    np = pytest.importorskip("numpy")
    m, opts = make()

    class Position:
        pass
    with pytest.raises(TypeError, match=r"\['loader'\]\['pos'\] is a .*Position.*weights_only=True"):
        save_checkpoint(tmp_path, 1, m, opts, rank_state={"loader": {"pos": Position()}})
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 2, m, opts, rank_state={"ema": np.float64(0.5), "n": np.int64(3), "s": {1, 2}, "t": (1, "a")})
    _, rs = load_checkpoint(tmp_path / "step_000002", m, opts)
    assert rs == {"ema": 0.5, "n": 3, "s": {1, 2}, "t": (1, "a")} and type(rs["ema"]) is float and type(rs["n"]) is int


class Planted:
    "Unpickling this calls os.system: what a planted rank file would do."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_never_runs(tmp_path, capsys):
    m, opts = make()
    d = save_checkpoint(tmp_path, 1, m, opts)
    marker = tmp_path / "pwned"
    torch.save({"optimizers": [], "rank_state": Planted(marker), "torch_rng": torch.get_rng_state()}, d / "rank0.pt")
    # 1. meta.json not updated: the hash no longer matches, nothing is unpickled
    with pytest.raises(CheckpointError, match=r"rank0\.pt (is corrupt|has [\d,]+ bytes)"):
        load_checkpoint(d, m, opts)
    assert latest_checkpoint(tmp_path) is None and "skipping checkpoint step_000001" in capsys.readouterr().err
    # 2. an attacker who also rewrites meta.json: the hash matches, weights_only refuses the global
    meta = read_meta(d)
    meta["files"]["rank0.pt"] = {"bytes": (d / "rank0.pt").stat().st_size, "sha256": sha256_file(d / "rank0.pt")}
    (d / "meta.json").write_text(json.dumps(meta))
    assert latest_checkpoint(tmp_path) == d
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, m, opts)
    msg = str(e.value)
    assert "rank0.pt" in msg and "GLOBAL" in msg and "system" in msg and "\n" not in msg
    with pytest.raises(CheckpointError):
        load_checkpoint(d)                        # the rank file alone, as a tool might read it
    assert not marker.exists()


def test_4kb_flipped_in_model_is_detected_and_skipped(tmp_path, capsys):
    m, opts = big()
    save_checkpoint(tmp_path, 10, m, opts)
    save_checkpoint(tmp_path, 20, m, opts)
    model_pt = tmp_path / "step_000020" / "model.pt"
    assert model_pt.stat().st_size > 3 * 4096
    flip(model_pt, 4096)
    assert [d.name for d in list_checkpoints(tmp_path)] == ["step_000010", "step_000020"]  # same size: the cheap listing passes
    assert latest_checkpoint(tmp_path).name == "step_000010"                                # the hash does not
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipping checkpoint step_000020" in err[0] and "model.pt is corrupt" in err[0]
    m2, opts2 = big(1)
    for call in (lambda: load_checkpoint(tmp_path / "step_000020", m2, opts2), lambda: load_weights(tmp_path / "step_000020")):
        with pytest.raises(CheckpointError, match="model.pt is corrupt") as e:
            call()
        assert "\n" not in str(e.value)
    meta, _ = load_checkpoint(latest_checkpoint(tmp_path), m2, opts2)
    assert meta["step"] == 10 and all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_truncated_or_missing_files_are_one_line_errors(tmp_path, capsys):
    m, opts = big()
    save_checkpoint(tmp_path, 1, m, opts)
    d = save_checkpoint(tmp_path, 2, m, opts)
    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, m, opts)
    assert str(e.value).count("\n") == 0 and "model.pt" in str(e.value) and "truncated" in str(e.value)
    assert [x.name for x in list_checkpoints(tmp_path)] == ["step_000001"]
    # the half-deleted folder of issue 14: meta.json and rank0.pt, no model.pt
    (d / "model.pt").unlink()
    assert latest_checkpoint(tmp_path).name == "step_000001"
    assert "step_000002/model.pt is missing" in capsys.readouterr().err
    (d / "meta.json").write_text("{ torn")
    assert checkpoint_problem(d).endswith("(damaged, or written by an older version of the course)")
    with pytest.raises(CheckpointError, match="meta.json is not valid JSON"):
        read_meta(d)


def test_meta_json_cannot_point_outside_the_folder(tmp_path):
    m, opts = make()
    d = save_checkpoint(tmp_path, 1, m, opts)
    meta = read_meta(d)
    meta["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    (d / "meta.json").write_text(json.dumps(meta))
    assert "no valid entry for '../../etc/passwd'" in checkpoint_problem(d)
    assert latest_checkpoint(tmp_path, warn=False) is None


class Killed(BaseException):
    "A kill -9 at some point of a save."


def test_a_kill_at_any_point_of_a_resave_never_leaves_latest_on_a_broken_step(tmp_path, monkeypatch):
    "Resume saves the step it resumed from again: kill that save after each file operation in turn."
    m, opts = big()
    want = {k: v.clone() for k, v in m.state_dict().items()}
    real_replace, real_rmtree, real_save = os.replace, shutil.rmtree, torch.save
    outcomes = []
    for k in range(1, 40):
        d = tmp_path / f"try{k}"
        save_checkpoint(d, 1, m, opts)
        save_checkpoint(d, 2, m, opts)
        budget = [k]

        def tick():
            budget[0] -= 1
            if budget[0] <= 0: raise Killed()

        def replace(a, b):
            tick(); real_replace(a, b)

        def rmtree(p, ignore_errors=False):
            files = sorted(Path(p).rglob("*"))
            if files: files[0].unlink() if files[0].is_file() else None   # part of the folder is gone ...
            tick(); real_rmtree(p, ignore_errors=ignore_errors)            # ... before the kill

        def save(obj, f, *a, **kw):
            tick(); real_save(obj, f, *a, **kw)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        monkeypatch.setattr(torch, "save", save)
        try:
            save_checkpoint(d, 2, m, opts)
            done = True
        except Killed:
            done = False
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
            monkeypatch.setattr(shutil, "rmtree", real_rmtree)
            monkeypatch.setattr(torch, "save", real_save)
        found = latest_checkpoint(d, warn=False)
        assert found is not None and ck.step_of(found) == 2, (k, sorted(p.name for p in d.iterdir()))
        m2, opts2 = big(5)
        meta, _ = load_checkpoint(found, m2, opts2)
        assert meta["step"] == 2 and all(torch.equal(want[n], v) for n, v in m2.state_dict().items())
        save_checkpoint(d, 2, m, opts)       # the relaunch saves again and tidies up
        assert sorted(p.name for p in d.iterdir()) == ["latest", "step_000001", "step_000002"]
        outcomes.append(found.name)
        if done: break
    assert done and "step_000002.old" in outcomes   # the window between the two renames was hit


def test_legacy_checkpoint_without_file_list_is_refused(tmp_path, capsys):
    m, opts = make()
    d = save_checkpoint(tmp_path, 1, m, opts)
    meta = read_meta(d)
    del meta["files"]
    (d / "meta.json").write_text(json.dumps(meta))
    assert latest_checkpoint(tmp_path) is None and "older version of the course" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="does not list the checkpoint's files"):
        load_checkpoint(d, m)


def _nodes_main(rank, world, root, port):
    "Two processes, each the first (LOCAL_RANK=0) of its own node."
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    root = Path(root)
    m, opts = make()
    steps(m, opts, 0, 2)
    # 1. shared storage: both nodes see one folder; rank 0 alone finishes it
    save_checkpoint(root / "shared", 2, m, opts, rank_state={"rank": rank}, rank=rank, world_size=world)
    # 2. a disk per node: the same path is a different folder on each node (simulated with one folder per rank)
    own = root / f"node{rank}"
    for s in (1, 2):
        save_checkpoint(own, s, m, opts, rank_state={"rank": rank, "s": s}, rank=rank, world_size=world)
    torch.distributed.barrier()
    m2, opts2 = make(seed=9)
    _, rs = load_checkpoint(latest_checkpoint(own), m2, opts2, rank=rank)
    assert rs == {"rank": rank, "s": 2}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    # 3. node 1's newest copy is damaged: the nodes would resume from different steps, so both refuse
    if rank == 1: flip(own / "step_000002" / "rank1.pt", 64)
    torch.distributed.barrier()
    try:
        load_checkpoint(latest_checkpoint(own, warn=False), m2, opts2, rank=rank)
        raise AssertionError("resumed from different steps")
    except CheckpointError as e:
        assert "different checkpoints" in str(e) and "[2, 1]" in str(e)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_multi_node_checkpoints_with_and_without_shared_storage(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.spawn(_nodes_main, args=(2, str(tmp_path), port), nprocs=2, join=True)
    shared = tmp_path / "shared" / "step_000002"
    assert sorted(p.name for p in shared.iterdir()) == ["meta.json", "model.pt", "rank0.pt", "rank1.pt"]
    assert checkpoint_problem(shared) is None and set(read_meta(shared)["files"]) == {"model.pt", "rank0.pt", "rank1.pt"}
    for r in (0, 1):
        d = tmp_path / f"node{r}" / "step_000001"
        assert sorted(p.name for p in d.iterdir()) == ["meta.json", "model.pt", f"rank{r}.pt"]
        assert checkpoint_problem(d) is None and read_meta(d)["world_size"] == 2
        assert (tmp_path / f"node{r}" / "latest").read_text().strip() == "step_000002"
    with pytest.raises(FileNotFoundError, match=r"holds ranks \[0\] of the 2 that wrote it"):
        load_checkpoint(tmp_path / "node0" / "step_000001", *make(), rank=1)
