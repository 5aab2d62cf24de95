import os, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture
def runs_tmp(tmp_path, monkeypatch):
    "Run folders go to a temporary directory (also for notebook kernels, which inherit the env)."
    d = tmp_path / "runs"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_RUNS", str(d))
    return d


def pytest_collection_modifyitems(config, items):
    "Every test that uses the browser marks itself `browser`, so `make check` (-m 'not browser') can leave it out."
    for item in items:
        if "browser_page" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
