"Tests of the headless driver on small notebooks made in code (the real course runs in test_course.py)."
import json
import nbformat
import pytest
import run_all


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


def test_unknown_profile_or_key_is_a_clear_error(nbdir, capsys):
    assert run_all.main(["--profile", "huge"]) == 2
    assert "valid profiles: tiny" in capsys.readouterr().err
    assert run_all.main(["--profile", "tiny", "--set", "vocab=3"]) == 2
    assert "valid keys:" in capsys.readouterr().err


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
