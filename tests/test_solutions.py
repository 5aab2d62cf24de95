"notebooks/solutions.ipynb: the worked solutions of the exercises run top to bottom on a CPU, with no trained run."
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kernel_name() -> str:
    sys.path.insert(0, str(ROOT))
    from run_all import kernel_name
    return kernel_name()


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
