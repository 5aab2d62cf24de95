"Tests of the headless driver on small notebooks made in code (the real course runs in test_course.py)."
import json
import nbformat
import pytest
import torch
import run_all
from nanochat_lib import core


def make_nb(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('profile = "tiny"\nrun_name = "dev"\noverrides = {}', metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


COUNT = """
from nanochat_lib.core import run_dir, load_profile
cfg = load_profile(profile, overrides)
p = run_dir(run_name) / "count_{name}.txt"
n = int(p.read_text()) + 1 if p.exists() else 1
p.write_text(str(n))
from nanochat_lib.report import record_stage
record_stage(run_dir(run_name), "{name}", "Stage {name}", {{"vocab": cfg["tok_vocab_size"], "runs": n}})
"""


@pytest.fixture
def nbdir(tmp_path, monkeypatch, runs_tmp):
    d = tmp_path / "nbs"
    d.mkdir()
    make_nb(d / "00_first.ipynb", COUNT.format(name="first"))
    make_nb(d / "01_second.ipynb", COUNT.format(name="second"))
    make_nb(d / "01b_companion.ipynb", COUNT.format(name="companion"))
    make_nb(d / "90_bench.ipynb", "raise RuntimeError('benchmarks are not course stages')")
    make_nb(d / "scratch.ipynb", "raise RuntimeError('not a course notebook')")
    monkeypatch.setattr(run_all, "NOTEBOOKS", d)
    return d


def counts(runs, name):
    return {p.stem[6:]: int(p.read_text()) for p in (runs / name).glob("count_*.txt")}


def test_order_selection_and_errors(nbdir):
    nbs = run_all.course_notebooks()
    assert [p.stem for p in nbs] == ["00_first", "01_second", "01b_companion"]
    assert [p.stem for p in run_all.select(nbs, start="01")] == ["01_second", "01b_companion"]
    assert [p.stem for p in run_all.select(nbs, only="01")] == ["01_second", "01b_companion"]
    assert [p.stem for p in run_all.select(nbs, only="01b")] == ["01b_companion"]
    with pytest.raises(SystemExit, match="matches no notebook"):
        run_all.select(nbs, start="07")


def exit_code(argv) -> int:
    "run_all.main's exit status: what it returns, or the SystemExit a refused setting raises."
    try: return run_all.main(argv)
    except SystemExit as e: return e.code


REFUSED = [  # (arguments, the one error line)
    (["--profile", "huge"], "error: profile: unknown profile 'huge'; valid profiles: tiny, gpu1"),
    (["--set", "vocab=3"], "error: vocab: unknown setting;"),
    (["--set", "depth=0"], "error: depth: must be positive, got 0"),
    (["--set", "depth=abc"], "error: depth: expected an integer, got 'abc'"),
    (["--set", "depth=-3"], "error: depth: must be positive, got -3"),
    (["--set", "max_seq_len=0"], "error: max_seq_len: must be positive, got 0"),
    (["--set", "device=tpu"], "error: device: must be one of auto, cuda, mps, cpu; got 'tpu'"),
    (["--set", "num_iterations=-5"], "error: num_iterations: must be 0 or more, got -5"),
    (["--set", "tok_vocab_size=10"], "error: tok_vocab_size: must be at least 265"),
    (["--set", "total_batch_size=1000"], "error: total_batch_size=1000 is not a multiple of"),
    (["--set", "depth"], "error: --set: expects key=value"),
    (["--name", "../escape"], "error: run_name: bad run name '../escape'"),
    (["--name", ".hidden"], "error: run_name: bad run name '.hidden'"),
]


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("args,line", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_a_bad_setting_is_one_line_and_exit_2_even_in_a_dry_run(nbdir, runs_tmp, capsys, args, line, dry):
    argv = (["--profile", "tiny"] if "--profile" not in args else []) + args + (["--dry-run"] if dry else [])
    assert exit_code(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith(line) and err.count("\n") == 1 and out == ""
    assert list(runs_tmp.iterdir()) == [] and not (runs_tmp.parent / "escape").exists()   # nothing ran, no folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_profile_plans_on_a_cpu_but_does_not_run(nbdir, runs_tmp, capsys):
    assert exit_code(["--profile", "tiny", "--set", "device=cuda", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: device: 'cuda' was asked for") and err.count("\n") == 1
    assert "would run 00_first" in out
    assert exit_code(["--profile", "tiny", "--set", "device=cuda", "--name", "g"]) == 2
    assert capsys.readouterr().err.startswith("error: device: 'cuda' was asked for")
    assert counts(runs_tmp, "g") == {}


@pytest.mark.slow
def test_runs_in_order_resumes_and_forces(nbdir, runs_tmp):
    assert run_all.main(["--profile", "tiny", "--name", "r1", "--set", "tok_vocab_size=512"]) == 0
    assert counts(runs_tmp, "r1") == {"first": 1, "second": 1, "companion": 1}
    assert (runs_tmp / "r1" / "01_second.ipynb").exists()
    report = (runs_tmp / "r1" / "report.md").read_text()
    assert "## Stage second" in report and "- vocab: 512" in report and "- profile: tiny" in report
    state = json.loads((runs_tmp / "r1" / "run.json").read_text())
    assert [state["notebooks"][k]["status"] for k in ("00_first", "01_second", "01b_companion")] == ["completed"] * 3
    # a second run skips what finished with the same parameters
    assert run_all.main(["--profile", "tiny", "--name", "r1", "--set", "tok_vocab_size=512"]) == 0
    assert counts(runs_tmp, "r1") == {"first": 1, "second": 1, "companion": 1}
    # --force and --only re-run exactly what they name
    assert run_all.main(["--profile", "tiny", "--name", "r1", "--set", "tok_vocab_size=512", "--only", "01b", "--force"]) == 0
    assert counts(runs_tmp, "r1") == {"first": 1, "second": 1, "companion": 2}
    # other parameters make finished notebooks stale
    assert run_all.main(["--profile", "tiny", "--name", "r1", "--from", "01"]) == 0
    assert counts(runs_tmp, "r1") == {"first": 1, "second": 2, "companion": 3}
    assert "- vocab: 4096" in (runs_tmp / "r1" / "report.md").read_text()


def lines(capsys) -> dict:
    "The progress line of each notebook in run_all's output, by notebook."
    return {l.split()[1].rstrip(":"): l for l in capsys.readouterr().out.splitlines() if l.startswith("[")}


@pytest.mark.slow
def test_edited_notebook_code_reruns_it_and_those_after_it(nbdir, runs_tmp, capsys):
    assert exit_code(["--profile", "tiny", "--name", "e"]) == 0
    capsys.readouterr()
    nb = nbformat.read(nbdir / "01_second.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("A note that changes no result."))
    nbformat.write(nb, nbdir / "01_second.ipynb")
    assert exit_code(["--profile", "tiny", "--name", "e"]) == 0
    seen = lines(capsys)
    assert counts(runs_tmp, "e") == {"first": 1, "second": 1, "companion": 1}      # prose alone re-runs nothing
    assert "skipped, finished with these settings and this code; its prose changed" in seen["01_second"]
    nb.cells.append(nbformat.v4.new_code_cell("x = 2"))
    nbformat.write(nb, nbdir / "01_second.ipynb")
    assert exit_code(["--profile", "tiny", "--name", "e"]) == 0
    seen = lines(capsys)
    assert counts(runs_tmp, "e") == {"first": 1, "second": 2, "companion": 2}
    assert "skipped" in seen["00_first"] and seen["01_second"].endswith("(its code changed)")
    assert seen["01b_companion"].endswith("(an earlier notebook's code changed)")


@pytest.mark.slow
def test_edited_settings_rerun_and_say_what_changed(nbdir, runs_tmp, capsys, monkeypatch, tmp_path):
    ini = tmp_path / "settings.ini"
    ini.write_text((core.repo_root() / "settings.ini").read_text())
    monkeypatch.setattr(run_all, "load_profile", lambda name, ov: core.load_profile(name, ov, path=ini))
    assert exit_code(["--profile", "tiny", "--name", "s"]) == 0
    assert exit_code(["--profile", "tiny", "--name", "s"]) == 0
    assert all("skipped" in l for l in lines(capsys).values())
    ini.write_text(ini.read_text().replace("[tiny]\n", "[tiny]\nchat_eval_top_k = 7\n"))
    assert exit_code(["--profile", "tiny", "--name", "s"]) == 0
    seen = lines(capsys)
    assert counts(runs_tmp, "s") == {"first": 2, "second": 2, "companion": 2}
    assert seen["00_first"].endswith("(settings changed (chat_eval_top_k 50 -> 7))")
    # the same values reached through --set are the same settings: nothing re-runs
    ini.write_text(ini.read_text().replace("[tiny]\nchat_eval_top_k = 7\n", "[tiny]\n"))
    assert exit_code(["--profile", "tiny", "--name", "s", "--set", "chat_eval_top_k=7"]) == 0
    assert counts(runs_tmp, "s") == {"first": 2, "second": 2, "companion": 2}
    state = json.loads((runs_tmp / "s" / "run.json").read_text())
    assert {n["key"] for n in state["notebooks"].values()} and len(state["configs"]) == 1


def test_dry_run_runs_nothing(nbdir, runs_tmp, capsys):
    assert run_all.main(["--profile", "tiny", "--name", "dry", "--dry-run"]) == 0
    assert "would run 01b_companion" in capsys.readouterr().out
    assert not (runs_tmp / "dry").exists()


def test_failure_names_notebook_cell_error_and_path(nbdir, runs_tmp, capsys):
    make_nb(nbdir / "01_second.ipynb", "x = 1", "def boom():\n    raise ValueError('corpus is empty')\nboom()")
    assert run_all.main(["--profile", "tiny", "--name", "bad"]) == 1
    err = capsys.readouterr().err
    assert "FAILED: notebook 01_second.ipynb" in err and "cell 3 of the executed notebook" in err and "raise ValueError" in err
    assert "ValueError: corpus is empty" in err and str(runs_tmp / "bad" / "01_second.ipynb") in err
    assert counts(runs_tmp, "bad") == {"first": 1}  # stopped at the failure: the companion did not run
    state = json.loads((runs_tmp / "bad" / "run.json").read_text())
    assert state["notebooks"]["01_second"]["status"] == "failed"
    assert (runs_tmp / "bad" / "report.md").exists()
