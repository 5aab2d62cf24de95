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
