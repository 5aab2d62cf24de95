import os, subprocess, sys
from pathlib import Path
import pytest, torch
from nanochat_lib import core
from nanochat_lib.core import (LaunchError, cache_dir, get_device, list_setting, load_profile, parse_overrides,
                               profile_names, run_dir, torchrun, torchrun_command)

INI = """
[DEFAULT]
device = auto
nproc_per_node = 1
ratio = 20.5
flag = false
sources = a,b
empty =

[small]
device = cpu

[big]
nproc_per_node = 8
flag = True
"""


@pytest.fixture
def ini(tmp_path):
    p = tmp_path / "settings.ini"
    p.write_text(INI)
    return p


def test_profile_values_are_typed_and_inherit_defaults(ini):
    small, big = load_profile("small", path=ini), load_profile("big", path=ini)
    assert small == dict(device="cpu", nproc_per_node=1, ratio=20.5, flag=False, sources="a,b", empty="", profile="small")
    assert big["nproc_per_node"] == 8 and big["flag"] is True and big["device"] == "auto"
    assert profile_names(ini) == ["small", "big"]


def test_overrides_are_parsed_like_settings(ini):
    cfg = load_profile("small", {"nproc_per_node": "4", "flag": "true", "device": "cuda"}, path=ini)
    assert (cfg["nproc_per_node"], cfg["flag"], cfg["device"]) == (4, True, "cuda")
    assert load_profile("small", ["ratio=1e-3"], path=ini)["ratio"] == 1e-3


def test_unknown_profile_and_key_list_the_valid_ones(ini):
    with pytest.raises(KeyError, match="unknown profile 'huge'; valid profiles: small, big"):
        load_profile("huge", path=ini)
    with pytest.raises(KeyError, match=r"unknown setting 'nproc'; valid keys: .*nproc_per_node"):
        load_profile("small", {"nproc": 2}, path=ini)
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["nproc_per_node"])


def test_repo_profiles_exist_and_parse():
    names = profile_names()
    assert {"tiny", "gpu1", "speedrun", "d26", "d32"} <= set(names)
    for n in names:
        cfg = load_profile(n)
        assert isinstance(cfg["nproc_per_node"], int) and isinstance(cfg["tok_vocab_size"], int)
        assert cfg["tok_vocab_size"] > 256 + 9
    assert load_profile("speedrun")["tok_vocab_size"] == 65536 and load_profile("speedrun")["nproc_per_node"] == 8
    assert load_profile("tiny")["device"] == "cpu" and load_profile("tiny")["corpus"] == "offline"


def test_list_setting():
    assert list_setting(" wiki, django ,,") == ["wiki", "django"]
    assert list_setting("") == [] and list_setting(None) == [] and list_setting(["a"]) == ["a"]


def test_cache_and_run_dirs_follow_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("NANOCHAT_RUNS", str(tmp_path / "r"))
    assert cache_dir("a", "b") == tmp_path / "c" / "a" / "b" and (tmp_path / "c" / "a" / "b").is_dir()
    assert run_dir("x") == tmp_path / "r" / "x" and (tmp_path / "r" / "x").is_dir()
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="bad run name"):
            run_dir(bad)


def test_device_selection():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match="use auto, cuda, mps or cpu"):
        get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--set device=cpu"):
            get_device("cuda")
    assert core.compute_dtype("cpu") == torch.float32


def test_torchrun_command_single_and_multi_node():
    cmd = torchrun_command("pretrain", ["--depth", 4], {"nproc_per_node": 2, "nnodes": 1})
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and "--standalone" in cmd
    assert cmd[-5:] == ["-m", "nanochat_lib.pretrain", "--", "--depth", "4"]
    multi = torchrun_command("nanochat_lib.sft", [], dict(nproc_per_node=8, nnodes=2, node_rank=1,
                                                          rdzv_endpoint="node0:29500", rdzv_backend="c10d"))
    assert {"--nnodes=2", "--node_rank=1", "--rdzv_endpoint=node0:29500", "--rdzv_backend=c10d"} <= set(multi)
    assert "--standalone" not in multi and multi[-2:] == ["nanochat_lib.sft", "--"]
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command("x", [], {"nnodes": 2})


def test_torchrun_launches_two_gloo_ranks(tmp_path, capsys):
    log = tmp_path / "log.txt"
    out = torchrun("core", [], {"nproc_per_node": 2}, log_path=log, env={"NANOCHAT_DEVICE": "cpu"})
    assert "world_size=2 sum_of_ranks=1" in out
    assert "world_size=2 sum_of_ranks=1" in capsys.readouterr().out  # streamed into the caller's output
    assert "sum_of_ranks=1" in log.read_text()


def test_torchrun_failure_raises_with_log_tail(tmp_path):
    with pytest.raises(LaunchError) as e:
        torchrun("no_such_module_xyz", [], {"nproc_per_node": 1}, log_path=tmp_path / "log.txt")
    assert "exited with code" in str(e.value) and "No module named" in str(e.value)
    assert str(tmp_path / "log.txt") in str(e.value)


def test_dist_setup_without_torchrun_is_a_world_of_one(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"): monkeypatch.delenv(k, raising=False)
    info = core.dist_setup("cpu")
    assert (info.rank, info.world_size, info.is_master, info.distributed) == (0, 1, True, False)
    core.dist_teardown()


def test_trainer_options_reach_the_module_not_torchrun(tmp_path):
    "torchrun would take `--run` for its own `--run-path`: everything after the module must reach the module."
    out = torchrun("core", ["--run", "x", "--nproc_per_node", "3"], {"nproc_per_node": 1}, env={"NANOCHAT_DEVICE": "cpu"})
    assert "world_size=1 sum_of_ranks=0" in out


def test_every_setting_is_explained_and_used():
    "Each key of settings.ini's [DEFAULT] sits under a comment, and some code or notebook reads it."
    import configparser, re
    root = Path(__file__).resolve().parents[1]
    lines = (root / "settings.ini").read_text().splitlines()
    start, end = lines.index("[DEFAULT]"), next(i for i, l in enumerate(lines) if l.startswith("[tiny]"))
    code = "\n".join(p.read_text() for p in [*(root / "nanochat_lib").glob("*.py"), root / "run_all.py"]
                     if p.name != "_modidx.py")
    code += "\n".join(p.read_text() for p in (root / "notebooks").glob("*.ipynb"))
    prev_comment = False
    for line in lines[start + 1:end]:
        if line.startswith("#"): prev_comment = True; continue
        if not line.strip(): prev_comment = False; continue
        key = line.split("=")[0].strip()
        # a key belongs to the comment above it, or to a group of keys right under one comment
        assert prev_comment, f"settings.ini: {key} has no comment above it"
        # read as cfg["key"] (in notebooks the quotes are JSON-escaped) or passed by name
        assert re.search(rf"""["']{re.escape(key)}\\?["']""", code), f"settings.ini: no code reads {key}"
    cp = configparser.ConfigParser(); cp.read(root / "settings.ini")
    for section in cp.sections():                          # profiles only set keys that DEFAULT explains
        extra = set(cp[section]) - set(cp.defaults())
        assert not extra, f"[{section}] sets keys missing from [DEFAULT]: {sorted(extra)}"


def test_stage_command_line_resume_modes(monkeypatch):
    "Without a flag the `resume` setting decides (auto); --resume requires a checkpoint, --fresh starts over."
    seen = {}
    train = lambda cfg, rdir, resume, stop_at: seen.update(mode=resume, stop_at=stop_at, timeout=cfg["dist_timeout_minutes"])
    monkeypatch.setattr(core, "run_dir", lambda name: name)
    core.run_stage(train, "t", "d", ["--run", "x"])
    assert seen == dict(mode="auto", stop_at=None, timeout=30)
    core.run_stage(train, "t", "d", ["--run", "x", "--resume", "--stop-at", "3"])
    assert seen["mode"] == "require" and seen["stop_at"] == 3
    core.run_stage(train, "t", "d", ["--run", "x", "--fresh"])
    assert seen["mode"] == "fresh"
    core.run_stage(train, "t", "d", ["--run", "x", "--set", "resume=fresh"])
    assert seen["mode"] == "fresh"
    with pytest.raises(SystemExit):
        core.run_stage(train, "t", "d", ["--run", "x", "--fresh", "--resume"])


def test_process_group_timeout_is_the_setting(monkeypatch):
    from datetime import timedelta
    got = {}
    monkeypatch.setenv("RANK", "0"); monkeypatch.setenv("LOCAL_RANK", "0"); monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, timeout, **kw: got.update(backend=backend, timeout=timeout))
    core.training_process(load_profile("tiny", {"dist_timeout_minutes": 45}))
    assert got == dict(backend="gloo", timeout=timedelta(minutes=45))
