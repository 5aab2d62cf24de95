"run_all.py's headless log: kernels over IPC (no ipykernel TCP warning), and the report's summary sent to the tracker."
import json

import nbformat
import pytest

import run_all
from nanochat_lib.tracker import offline_runs, read_offline_run

TCP_WARNING = "without encryption"

STAGE = """
import json
from ipykernel.connect import get_connection_info
from nanochat_lib.core import run_dir
from nanochat_lib.report import record_stage
(run_dir(run_name) / "transport.txt").write_text(json.loads(get_connection_info())["transport"])
record_stage(run_dir(run_name), "base", "Base model", {"steps": 3}, summary={"CORE (offline, 2 tasks)": 0.25}, column="BASE")
"""


def make_nb(path, code):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('profile = "tiny"\nrun_name = "dev"\noverrides = {}', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def one_stage(tmp_path, monkeypatch, runs_tmp):
    d = tmp_path / "nbs"
    d.mkdir()
    make_nb(d / "00_stage.ipynb", STAGE)
    monkeypatch.setattr(run_all, "NOTEBOOKS", d)
    return runs_tmp


def test_kernels_run_over_ipc_and_the_log_has_no_tcp_warning(one_stage, capfd):
    assert run_all.main(["--profile", "tiny", "--name", "quiet"]) == 0
    out, err = capfd.readouterr()                              # file-descriptor level: the kernel's own stderr too
    assert (one_stage / "quiet" / "transport.txt").read_text() == "ipc"
    assert TCP_WARNING not in out + err
    assert "[1/1] 00_stage" in out and "report:" in out


@pytest.mark.slow
def test_report_summary_goes_to_the_tracker(one_stage, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is missing: `make setup` installs it (dev pulls in the tracking extra)")
    for k, v in dict(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_CONSOLE="off", WANDB_SILENT="true").items():
        monkeypatch.setenv(k, v)
    try:
        assert run_all.main(["--profile", "tiny", "--name", "tracked", "--set", "tracker=wandb"]) == 0
    finally:
        wandb.teardown()
    runs = [read_offline_run(p) for p in offline_runs(tmp_path)]
    assert [r["name"] for r in runs] == ["tracked-report"]
    assert runs[0]["summary"]["CORE (offline, 2 tasks)/BASE"] == 0.25
    assert runs[0]["config"]["profile"] == "tiny" and runs[0]["config"]["stage"] == "report"
    assert json.loads((one_stage / "tracked" / "run.json").read_text())["overrides"] == {"tracker": "wandb"}
