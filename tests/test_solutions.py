"notebooks/solutions.ipynb: the worked solutions of the exercises run top to bottom on a CPU, with no trained run."
import pytest
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kernel_name() -> str:
    sys.path.insert(0, str(ROOT))
    from run_all import kernel_name
    return kernel_name()


@pytest.mark.slow
def test_solutions_notebook_runs(tmp_path):
    nb_path = ROOT / "notebooks" / "solutions.ipynb"
    nb = json.loads(nb_path.read_text())
    assert not any("default_exp" in "".join(c["source"]) for c in nb["cells"]), "solutions.ipynb must not export a module"
    # the kernel imports this checkout's nanochat_lib, and writes run folders into the temp dir
    env = {**os.environ, "NANOCHAT_RUNS": str(tmp_path / "runs"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    out = tmp_path / "solutions.ipynb"
    proc = subprocess.run([sys.executable, "-m", "papermill", str(nb_path), str(out), "--cwd", str(tmp_path),
                           "--no-progress-bar", "-k", kernel_name()], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(out.read_text())
    assert not any(o.get("output_type") == "error" for c in done["cells"] for o in c.get("outputs", []))
    code = [c for c in done["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), "every code cell ran"
    # one section per notebook, in course order
    sections = [l[3:].split(":")[0] for c in done["cells"] if c["cell_type"] == "markdown"
                for l in "".join(c["source"]).splitlines() if l.startswith("## ")]
    assert sections == sorted(sections) and "03_model" in sections, sections


def _md(cells):
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]


def test_every_exercise_has_a_worked_solution():
    "Each lesson ends with Summary (4-8 bullets) and Exercises (2-4, numbered, with the pointer line), "
    "and solutions.ipynb has exactly one `### <notebook>.N` heading per exercise, under `## <notebook>`."
    import re
    sol = _md(json.loads((ROOT/"notebooks"/"solutions.ipynb").read_text())["cells"])
    heads = [l for s in sol for l in s.splitlines() if l.startswith("#")]
    solved = [l[4:].split()[0] for l in heads if l.startswith("### ")]
    sections = [l[3:].split(":")[0] for l in heads if l.startswith("## ")]
    assert len(solved) == len(set(solved)), "a solution heading appears twice"
    wanted = []
    for path in sorted((ROOT/"notebooks").glob("*.ipynb")):
        nb = path.stem
        if nb == "solutions": continue
        cells = json.loads(path.read_text())["cells"]
        md = _md(cells)
        summary = [s for s in md if s.startswith("## Summary")]
        exercises = "".join(cells[-1]["source"])
        assert summary and exercises.startswith("## Exercises"), f"{nb}: must end with ## Summary, then ## Exercises"
        bullets = [l for l in summary[-1].splitlines() if l.startswith("- ")]
        assert 4 <= len(bullets) <= 8, f"{nb}: the Summary has {len(bullets)} bullets (4-8)"
        numbers = [int(n) for n in re.findall(r"^(\d+)\.\s", exercises, re.M)]
        assert 2 <= len(numbers) <= 4 and numbers == list(range(1, len(numbers) + 1)), f"{nb}: exercises {numbers}"
        assert f"Worked solutions: `notebooks/solutions.ipynb`, section `{nb}`." in exercises, f"{nb}: no pointer line"
        assert nb in sections, f"solutions.ipynb has no section ## {nb}"
        wanted += [f"{nb}.{n}" for n in numbers]
    assert sorted(solved) == sorted(wanted), (sorted(set(wanted) - set(solved)), sorted(set(solved) - set(wanted)))
    # each solution sits in its own notebook's section, in exercise order
    current, seen = None, []
    for l in heads:
        if l.startswith("## "): current = l[3:].split(":")[0]
        elif l.startswith("### "):
            name = l[4:].split()[0]
            assert name.rsplit(".", 1)[0] == current, f"{name} is under ## {current}"
            seen.append(name)
    assert seen == sorted(seen, key=lambda s: (s.rsplit(".", 1)[0], int(s.rsplit(".", 1)[1])))
