import os, subprocess, sys
from pathlib import Path
import pytest, torch
from nanochat_lib import core
from nanochat_lib.core import (ConfigError, LaunchError, cache_dir, check_device, check_run_name, cli_errors, get_device,
                               list_setting, load_profile, parse_overrides, profile_names, run_dir, torchrun,
                               torchrun_command)

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


def test_unknown_profile_and_key_name_what_is_valid(ini):
    with pytest.raises(ConfigError, match="^profile: unknown profile 'huge'; valid profiles: small, big$"):
        load_profile("huge", path=ini)
    with pytest.raises(ConfigError, match="^nproc: unknown setting; did you mean nproc_per_node"):
        load_profile("small", {"nproc": 2}, path=ini)
    with pytest.raises(ConfigError, match="^zzz: unknown setting; valid keys are those of settings.ini"):
        load_profile("small", ["zzz=1"], path=ini)
    for bad in (["nproc_per_node"], ["=3"]):
        with pytest.raises(ConfigError, match="^--set: expects key=value"):
            parse_overrides(bad)
    assert issubclass(ConfigError, ValueError)


def test_a_profile_key_missing_from_default_is_refused(tmp_path):
    p = tmp_path / "settings.ini"
    p.write_text(INI + "\n[typo]\nnproc_per_nod = 2\n")
    with pytest.raises(ConfigError, match=r"^nproc_per_nod: \[typo\] sets a key that \[DEFAULT\] does not have"):
        load_profile("typo", path=p)
    assert load_profile("small", path=p)["device"] == "cpu"       # other profiles are unaffected


def test_repo_profiles_exist_and_parse():
    names = profile_names()
    assert {"tiny", "gpu1", "speedrun", "d26", "d32"} <= set(names)
    for n in names:
        cfg = load_profile(n)
        assert isinstance(cfg["nproc_per_node"], int) and isinstance(cfg["tok_vocab_size"], int)
        assert cfg["tok_vocab_size"] > 256 + 9 and isinstance(cfg["mid_epochs"], float)
    assert load_profile("speedrun")["tok_vocab_size"] == 65536 and load_profile("speedrun")["nproc_per_node"] == 8
    assert load_profile("tiny")["device"] == "cpu" and load_profile("tiny")["corpus"] == "offline"


BAD = [  # (override, message): every message names the key first
    ("depth=0", "depth: must be positive, got 0"),
    ("depth=abc", "depth: expected an integer, got 'abc'"),
    ("depth=-3", "depth: must be positive, got -3"),
    ("depth=2.5", "depth: expected an integer, got '2.5'"),
    ("max_seq_len=0", "max_seq_len: must be positive, got 0"),
    ("device=tpu", "device: must be one of auto, cuda, mps, cpu; got 'tpu'"),
    ("num_iterations=-5", "num_iterations: must be 0 or more, got -5"),
    ("tok_vocab_size=10", "tok_vocab_size: must be at least 265 (256 byte tokens + 9 special tokens), got 10"),
    ("mid_epochs=nan", "mid_epochs: expected a number, got 'nan'"),
    ("mid_epochs=1e999", "mid_epochs: expected a finite number, got '1e999'"),
    ("mid_epochs=True", "mid_epochs: expected a number, got 'True'"),
    ("matrix_lr=0", "matrix_lr: must be positive, got 0.0"),
    ("core_every=-2", "core_every: must be at least -1 (-1 = never, 0 = only at the end), got -2"),
    ("warmdown_ratio=1.5", "warmdown_ratio: must be between 0 and 1 (a fraction), got 1.5"),
    ("serve_port=99999", "serve_port: must be between 0 and 65535 (a TCP port), got 99999"),
    ("compile=maybe", "compile: must be one of auto, True, False; got 'maybe'"),
    ("compile=1", "compile: must be one of auto, True, False; got '1'"),
    ("offline_sources=wiki,books", "offline_sources: expected a comma-separated list of wiki, django, pydoc; got 'wiki,books'"),
    ("offline_sources=", "offline_sources: expected a comma-separated list of wiki, django, pydoc; got ''"),
    ("fineweb_shards=1", "fineweb_shards: must be at least 2 (at least one training shard and the validation shard), got 1"),
    ("nnodes=2", "rdzv_endpoint: nnodes=2 needs the host:port of node 0 (--set rdzv_endpoint=...)"),
    ("node_rank=1", "node_rank: must be below nnodes (1), got 1"),
    ("serve_temperature=3.0", "serve_temperature: must not exceed serve_max_temperature (2.0), got 3.0"),
    ("depht=4", "depht: unknown setting; did you mean depth?"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_profile("tiny", [override])
    assert str(e.value) == message and e.value.key == message.split(":")[0]


def test_values_take_the_type_of_their_default():
    cfg = load_profile("tiny", {"depth": "4", "mid_epochs": 2, "total_batch_size": "1e4", "compile": "false",
                                "device": "CPU", "serve_host": "::1", "rdzv_endpoint": "10.0.0.1:29500",
                                "offline_sources": ["wiki", "pydoc"]})
    assert (cfg["depth"], cfg["mid_epochs"], cfg["total_batch_size"], cfg["compile"], cfg["device"]) == (4, 2.0, 10000, False, "cpu")
    assert type(cfg["mid_epochs"]) is float and type(cfg["depth"]) is int
    assert (cfg["serve_host"], cfg["rdzv_endpoint"], cfg["offline_sources"]) == ("::1", "10.0.0.1:29500", "wiki,pydoc")
    assert load_profile("tiny", ["compile=True"])["compile"] is True and load_profile("tiny")["compile"] == "auto"
    assert load_profile("tiny", ["core_every=-1", "num_iterations=0"])["core_every"] == -1


def test_every_profile_validates_and_devices_are_checked_only_when_asked():
    for name in profile_names():
        cfg = load_profile(name)                      # GPU profiles load on a CPU machine: planning needs them
        assert cfg["profile"] == name
    assert check_device(load_profile("tiny")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="^device: 'cuda' was asked for but this machine has no such device"):
            check_device(load_profile("gpu1"))


def test_special_token_count_matches_the_tokenizer():
    from nanochat_lib.tokenizer import SPECIAL_TOKENS
    assert core._N_SPECIAL_TOKENS == len(SPECIAL_TOKENS)
    assert load_profile("tiny", [f"tok_vocab_size={256 + len(SPECIAL_TOKENS)}"])["tok_vocab_size"] == 265


def test_every_choice_and_bound_names_a_setting():
    "A rule for a key settings.ini no longer has would silently check nothing."
    defaults = load_profile("tiny")
    rules = {*core._CHOICES, *core._LIST_CHOICES, *core._POSITIVE, *core._BOUNDS}
    assert rules <= set(defaults), sorted(rules - set(defaults))
    assert all(defaults[k] in core._CHOICES[k] for k in core._CHOICES)


def _cli(fn):
    "(exit status, stderr) of running `fn` under cli_errors."
    import contextlib, io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            with cli_errors(): fn()
        except SystemExit as e: return e.code, err.getvalue()
    return 0, err.getvalue()


def test_cli_errors_prints_one_line_and_exits_2():
    assert _cli(lambda: load_profile("tiny", ["depth=0"])) == (2, "error: depth: must be positive, got 0\n")
    assert _cli(lambda: {}["missing"]) == (2, "error: missing\n")
    assert _cli(lambda: open("/no/such/file")) == (2, "error: [Errno 2] No such file or directory: '/no/such/file'\n")
    assert _cli(lambda: (_ for _ in ()).throw(ValueError("two\nlines"))) == (2, "error: two; lines\n")
    assert _cli(lambda: None) == (0, "")
    with pytest.raises(ZeroDivisionError):                 # a bug keeps its traceback
        _cli(lambda: 1 / 0)

    @cli_errors()
    def main(): raise ConfigError("depth", "must be positive, got 0")
    with pytest.raises(SystemExit) as e: main()
    assert e.value.code == 2


def test_list_setting():
    assert list_setting(" wiki, django ,,") == ["wiki", "django"]
    assert list_setting("") == [] and list_setting(None) == [] and list_setting(["a"]) == ["a"]


def test_cache_and_run_dirs_follow_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("NANOCHAT_RUNS", str(tmp_path / "r"))
    assert cache_dir("a", "b") == tmp_path / "c" / "a" / "b" and (tmp_path / "c" / "a" / "b").is_dir()
    assert run_dir("x") == tmp_path / "r" / "x" and (tmp_path / "r" / "x").is_dir()
    for bad in ("", "../x", "a/b", ".hidden", "..", "a\\b", " x", "x\n", "x" * 300, None):
        with pytest.raises(ConfigError, match="^run_name: bad run name"):
            run_dir(bad)
    assert check_run_name("my-run_2.1") == "my-run_2.1"


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
    cmd = torchrun_command("pretrain", ["--depth", 4], load_profile("tiny", {"nproc_per_node": 2}))
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and "--standalone" in cmd
    assert cmd[-5:] == ["-m", "nanochat_lib.pretrain", "--", "--depth", "4"]
    multi = torchrun_command("nanochat_lib.sft", [], load_profile("tiny", dict(nproc_per_node=8, nnodes=2, node_rank=1,
                                                          rdzv_endpoint="node0:29500", rdzv_backend="c10d")))
    assert {"--nnodes=2", "--node_rank=1", "--rdzv_endpoint=node0:29500", "--rdzv_backend=c10d"} <= set(multi)
    assert "--standalone" not in multi and multi[-2:] == ["nanochat_lib.sft", "--"]
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command("x", [], {**load_profile("tiny"), "nnodes": 2})


def test_torchrun_launches_two_gloo_ranks(tmp_path, capsys):
    log = tmp_path / "log.txt"
    out = torchrun("core", [], load_profile("tiny", {"nproc_per_node": 2}), log_path=log, env={"NANOCHAT_DEVICE": "cpu"})
    assert "world_size=2 sum_of_ranks=1" in out
    assert "world_size=2 sum_of_ranks=1" in capsys.readouterr().out  # streamed into the caller's output
    assert "sum_of_ranks=1" in log.read_text()


def test_torchrun_failure_raises_with_log_tail(tmp_path):
    with pytest.raises(LaunchError) as e:
        torchrun("no_such_module_xyz", [], None, log_path=tmp_path / "log.txt")
    assert "exited with code" in str(e.value) and "No module named" in str(e.value)
    assert str(tmp_path / "log.txt") in str(e.value)


def test_dist_setup_without_torchrun_is_a_world_of_one(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"): monkeypatch.delenv(k, raising=False)
    info = core.dist_setup("cpu")
    assert (info.rank, info.world_size, info.is_master, info.distributed) == (0, 1, True, False)
    core.dist_teardown()


def test_trainer_options_reach_the_module_not_torchrun(tmp_path):
    "torchrun would take `--run` for its own `--run-path`: everything after the module must reach the module."
    out = torchrun("core", ["--run", "x", "--nproc_per_node", "3"], None, env={"NANOCHAT_DEVICE": "cpu"})
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
    from nanochat_lib.chat_protocol import ServeLimits
    by_field = {f"serve_{k}" for k in ServeLimits.__dataclass_fields__}   # ServeLimits.from_cfg reads serve_<field>
    prev_comment = False
    for line in lines[start + 1:end]:
        if line.startswith("#"): prev_comment = True; continue
        if not line.strip(): prev_comment = False; continue
        key = line.split("=")[0].strip()
        # a key belongs to the comment above it, or to a group of keys right under one comment
        assert prev_comment, f"settings.ini: {key} has no comment above it"
        # read as cfg["key"] (in notebooks the quotes are JSON-escaped) or passed by name
        assert key in by_field or re.search(rf"""["']{re.escape(key)}\\?["']""", code), f"settings.ini: no code reads {key}"
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


def test_one_data_switch_with_per_source_overrides():
    sources = ("corpus", "core_bundle", "chat_source", "rl_source")
    tiny = load_profile("tiny")
    assert tiny["data"] == "offline" and all(tiny[k] == "offline" for k in sources)
    online = load_profile("tiny", ["data=online"])
    assert all(online[k] == "online" for k in sources)                       # auto follows data ...
    mixed = load_profile("tiny", ["data=online", "rl_source=offline", "core_bundle=auto"])
    assert [mixed[k] for k in sources] == ["online", "online", "online", "offline"]   # ... unless a source is set
    assert load_profile("gpu1")["rl_source"] == "offline" and load_profile("gpu1")["corpus"] == "online"
    assert all(load_profile(p)[k] in ("offline", "online") for p in profile_names() for k in sources)
    with pytest.raises(ConfigError, match="^data: must be one of offline, online; got 'auto'"):
        load_profile("tiny", ["data=auto"])


@pytest.mark.parametrize("override,new", [("corpus=fineweb-edu", "online"), ("core_bundle=real", "online")])
def test_old_data_words_name_the_new_one(override, new):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_profile("tiny", [override])
    assert e.value.key == key and f"is now called '{new}': set {key} = {new}" in str(e.value)


def test_auto_without_a_data_key_is_a_config_error(tmp_path):
    p = tmp_path / "settings.ini"
    p.write_text("[DEFAULT]\ncorpus = auto\n\n[x]\n")
    with pytest.raises(ConfigError, match="^corpus: auto follows `data`, which \\[DEFAULT\\] lacks"):
        load_profile("x", path=p)
