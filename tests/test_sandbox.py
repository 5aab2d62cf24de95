"""The sandbox that runs model-written code: every attack is contained and the caller stays fine.

Attacks are kept small (1-2 s timeouts, 256 MB memory limits). The fork-bomb tests rely on
RLIMIT_NPROC, which the kernel enforces only for non-root users: as root the sandbox runs programs
as `nobody`, and these tests also check that nothing of that user is left afterwards.
"""
import os, shutil, subprocess, sys, time, tracemalloc
import pytest
from nanochat_lib import sandbox
from nanochat_lib.sandbox import (MAX_PROCESSES, SandboxResult, check_completion, humaneval_program, run_untrusted,
                                  sandbox_user)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox tests need Linux (/proc)")

USER = sandbox_user()          # (uid, gid) when the tests run as root, else None


def leftovers() -> list:
    "Processes of the sandbox user still alive (only meaningful as root, where that user is private)."
    return sandbox._processes_of(USER[0]) if USER else []


def timed(**kw):
    t0 = time.monotonic()
    r = run_untrusted(**kw)
    return r, time.monotonic() - t0


# ---- ordinary programs ----------------------------------------------------------------------------

def test_normal_program_succeeds_with_its_output():
    r = run_untrusted("import sys\nprint('hello')\nprint('warn', file=sys.stderr)\nprint(sum(range(101)))")
    assert isinstance(r, SandboxResult)
    assert r.success and r.returncode == 0 and not r.timed_out and not r.memory_exceeded and not r.output_truncated
    assert r.stdout == "hello\n5050\n" and r.stderr == "warn\n"
    assert 0 < r.duration_s < 5


def test_stdin_is_passed():
    r = run_untrusted("import sys\nprint(sys.stdin.read().upper(), end='')", stdin="abc\ndef\n")
    assert r.success and r.stdout == "ABC\nDEF\n"
    assert run_untrusted("print(input())").returncode == 1          # no stdin: EOFError, not a hang


def test_syntax_error_fails_cleanly():
    r = run_untrusted("def f(:\n    return 1\n")
    assert not r.success and r.returncode == 1 and not r.timed_out
    assert r.error.startswith("SyntaxError")


def test_exceptions_and_exit_codes():
    r = run_untrusted("raise ValueError('bad value')")
    assert not r.success and r.error == "ValueError: bad value"
    assert run_untrusted("import sys; sys.exit(3)").returncode == 3
    r = run_untrusted("def f(): return f()\nf()")
    assert not r.success and r.error.startswith("RecursionError")


def test_child_runs_isolated_and_limited():
    r = run_untrusted("import os, resource, sys\nprint(sys.flags.isolated, sys.flags.no_site)\n"
                      "print(resource.getrlimit(resource.RLIMIT_AS)[0] // 2**20)\n"
                      "print(resource.getrlimit(resource.RLIMIT_CORE))\nprint(os.getuid(), os.getgroups())",
                      memory_mb=300)
    isolated, mem, core, ids = r.stdout.splitlines()
    assert isolated == "1 1" and mem == "300" and core == "(0, 0)"
    if USER: assert ids == f"{USER[0]} []"


# ---- time -----------------------------------------------------------------------------------------

def test_infinite_loop_is_killed_in_time():
    r, took = timed(code="print('start', flush=True)\nwhile True: pass", timeout_s=1.0)
    assert r.timed_out and not r.success and r.returncode == -9
    assert took < 1.0 + 10.0  # killed, not left to run: generous because CI machines are loaded
    assert r.stdout == "start\n"


def test_sleeping_program_with_closed_output_is_killed_in_time():
    r, took = timed(code="import os, time\nos.close(1); os.close(2)\ntime.sleep(60)", timeout_s=1.0)
    assert r.timed_out and not r.success and took < 15.0


def test_children_holding_the_pipes_do_not_keep_us_waiting():
    # The program exits at once but leaves a child that sleeps with our pipes open.
    r, took = timed(code="import os, time\nif os.fork() == 0:\n    time.sleep(60)\nprint('parent done')", timeout_s=5.0)
    assert r.success and r.stdout == "parent done\n" and took < 15.0  # not the 60 s of the child
    assert leftovers() == []


def test_child_that_leaves_the_process_group_is_still_killed():
    if not USER: pytest.skip("only as root can the sandbox kill processes that left its group (setsid)")
    r, took = timed(code="import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(60)\nprint('done')",
                    timeout_s=5.0)
    assert r.success and took < 15.0
    assert leftovers() == []


# ---- processes ------------------------------------------------------------------------------------

def test_dry_run_five_children():
    "The harmless version of the fork bomb: five children, well under the process limit."
    code = ("import os, time\nkids = []\nfor i in range(5):\n    pid = os.fork()\n    if pid == 0:\n"
            "        time.sleep(0.1); os._exit(0)\n    kids.append(pid)\n"
            "print(sum(os.waitpid(k, 0)[1] == 0 for k in kids))")
    r = run_untrusted(code)
    assert r.success and r.stdout == "5\n"
    assert leftovers() == []


def test_process_limit_stops_forking():
    code = ("import os, time\nkids = []\nfor i in range(4 * %d):\n    try: pid = os.fork()\n"
            "    except OSError: break\n    if pid == 0:\n        time.sleep(0.3); os._exit(0)\n    kids.append(pid)\n"
            "for k in kids: os.waitpid(k, 0)\nprint(len(kids))" % MAX_PROCESSES)
    r = run_untrusted(code)
    assert r.success and int(r.stdout) < MAX_PROCESSES
    assert leftovers() == []


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True: os.fork()",                                                # dies when fork fails
    "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass",             # keeps trying
    "import os\nwhile True:\n    try:\n        if os.fork() == 0: os.setsid()\n    except OSError: pass",  # and hides
], ids=["naive", "persistent", "setsid"])
def test_fork_bomb_is_contained(bomb):
    if not USER and "setsid" in bomb: pytest.skip("as a non-root user, setsid escapes the group kill")
    r, took = timed(code=bomb, timeout_s=1.0)
    assert not r.success and (r.timed_out or r.returncode != 0)
    assert took < 1.0 + 15.0                          # the timeout, plus init reaping the orphans
    assert leftovers() == []
    # We and the machine are fine: we can still start processes, and the sandbox still works.
    assert subprocess.run(["true"]).returncode == 0
    assert run_untrusted("print('ok')").stdout == "ok\n"


# ---- memory and output ------------------------------------------------------------------------------

def test_memory_hog_is_stopped():
    r = run_untrusted("blocks = []\nwhile True: blocks.append(bytearray(8 * 2**20))", memory_mb=256)
    assert r.memory_exceeded and not r.success and not r.timed_out
    assert r.error == "MemoryError"
    r = run_untrusted("x = 'a' * 10**9", memory_mb=256)
    assert r.memory_exceeded and not r.success


def test_huge_output_is_truncated_and_our_memory_stays_bounded():
    cap = 10_000
    tracemalloc.start()
    try:
        r = run_untrusted("import sys\nwhile True: sys.stdout.write('x' * 65536)", timeout_s=1.5, max_output_bytes=cap)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.output_truncated and r.timed_out
    assert "bytes of output cut" in r.stdout and len(r.stdout) < cap + 100
    assert peak < 2 * 2**20, f"the parent held {peak:,} bytes while reading a flood"


def test_capped_stream_keeps_head_and_tail():
    s = sandbox._CappedStream(cap=100, tail=20)
    for i in range(1000): s.add(b"%04d\n" % i)
    text = s.text()
    assert text.startswith("0000\n0001\n") and text.endswith("0998\n0999\n")
    assert s.cut == 5000 - 100 and "4,900 bytes of output cut" in text
    small = sandbox._CappedStream(cap=100)
    small.add(b"short")
    assert small.text() == "short" and small.cut == 0


# ---- environment, shell and files ------------------------------------------------------------------

def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "s3cr3t-value")
    code = ("import os\nprint(sorted(os.environ))\nprint(os.environ.get('NANOCHAT_TEST_SECRET'))\n"
            "try: print(b's3cr3t-value' in open(f'/proc/{os.getppid()}/environ', 'rb').read())\n"
            "except OSError as e: print(type(e).__name__)")
    r = run_untrusted(code)
    names, value, via_proc = r.stdout.splitlines()
    assert r.success and "s3cr3t-value" not in r.stdout
    assert eval(names) == ["HOME", "LANG", "PATH", "TMPDIR"] and value == "None"
    if USER: assert via_proc == "PermissionError"     # as nobody, root's /proc/<pid>/environ is closed


def test_os_system_runs_harmlessly(monkeypatch):
    "os.system is not blocked: it runs a shell with the scrubbed environment (and as nobody when we are root)."
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "s3cr3t-value")
    r = run_untrusted("import os\nrc = os.system('echo hi; echo \"[$NANOCHAT_TEST_SECRET]\"; id -u')\nprint('rc', rc)")
    assert r.success
    lines = r.stdout.splitlines()
    assert lines[:2] == ["hi", "[]"] and lines[-1] == "rc 0"
    if USER: assert lines[2] == str(USER[0])


def test_files_go_to_a_private_folder_that_is_deleted(tmp_path):
    r = run_untrusted("import os\nopen('out.txt', 'w').write('data')\nos.makedirs('a/b')\nprint(os.getcwd())\n"
                      "print(sorted(os.listdir('.')))")
    cwd, listing = r.stdout.splitlines()
    assert r.success and listing == "['a', 'out.txt', 'program.py']"
    assert not os.path.exists(cwd)


def test_files_left_in_shared_tmp_are_removed_and_ours_are_not_writable(tmp_path):
    if not USER: pytest.skip("as a non-root user the program writes with our rights")
    stray = f"/tmp/nanochat-sandbox-test-stray-{os.getpid()}"
    r = run_untrusted(f"import os\nopen({stray!r}, 'w').write('x')\nos.mkdir({stray + '-dir'!r})\nprint('wrote')")
    assert r.success and not os.path.exists(stray) and not os.path.exists(stray + "-dir")
    target = tmp_path / "evil.txt"
    r = run_untrusted(f"open({str(target)!r}, 'w').write('x')")
    # our folder is closed to nobody (PermissionError), or, in the private view of /tmp, not there at all
    assert not r.success and r.error.startswith(("PermissionError", "FileNotFoundError")) and not target.exists()


# The program walks the filesystem and plants a file, a folder and a file in it in every folder it may write to
# (as `nobody`: every one it can; as an ordinary user: the world-writable ones, not our own files).
PLANT = r"""
import os, stat
token, anywhere, written, stack = {token!r}, {anywhere!r}, [], ["/"]
while stack:
    d = stack.pop()
    try: entries = list(os.scandir(d))
    except OSError: continue
    for e in entries:
        if e.path in ("/proc", "/sys") or e.path == os.getcwd() or e.name.startswith(token): continue
        try:
            if not e.is_dir(follow_symlinks=False) or not os.access(e.path, os.X_OK): continue
            st = e.stat(follow_symlinks=False)
        except OSError: continue
        stack.append(e.path)
        if os.access(e.path, os.W_OK) and (anywhere or st.st_mode & stat.S_IWOTH):
            p = os.path.join(e.path, token)
            try:
                open(p, "w").write("x"); os.mkdir(p + "-dir"); open(p + "-dir/inner", "w").write("x")
                written.append(p)
            except OSError: pass
print("\n".join(written))
"""


def plant_everywhere(token: str) -> list:
    r = run_untrusted(PLANT.format(token=token, anywhere=USER is not None), timeout_s=60)
    assert r.success, r.stderr
    return r.stdout.split()


def found_on_disk(token: str) -> list:
    "Entries named after `token` in every place the sandbox user could write to (and the usual temporary folders)."
    places = {p[0] for p in sandbox.writable_places(USER)} | {"/tmp", "/var/tmp", "/dev/shm", "/run/lock"}
    hits = []
    for d in places:
        try: hits += [os.path.join(d, n) for n in os.listdir(d) if n.startswith(token)]
        except OSError: pass
    return hits


def test_writable_places_are_found():
    places = {p[0]: p for p in sandbox.writable_places(USER)}
    assert "/tmp" in places and places["/tmp"][1] & 0o002
    assert all(not p.startswith(("/proc/", "/sys/")) for p in places)
    assert sandbox._top_places([("/a", 0, 0, 0), ("/a/b", 0, 0, 0), ("/ab", 0, 0, 0)]) == (("/a", 0, 0, 0), ("/ab", 0, 0, 0))


def test_nothing_is_left_in_any_world_writable_place():
    token = f"nanochat-plant-{os.getpid()}-{time.time_ns()}"
    written = plant_everywhere(token)
    tops = {p[0] for p in sandbox._top_places(sandbox.writable_places(USER))}
    assert tops <= {os.path.dirname(w) for w in written}          # it did write in every place it could see
    assert not [w for w in written if os.path.lexists(w)] and not found_on_disk(token)


def test_without_a_private_view_the_sweep_cleans_every_writable_place(monkeypatch):
    if not USER: pytest.skip("the sweep needs a uid of its own (root); an ordinary user relies on the private view")
    nested = f"/tmp/nanochat-shared-{os.getpid()}"                # a world-writable folder inside another one
    os.mkdir(nested); os.chmod(nested, 0o1777)
    try:
        sandbox.writable_places.cache_clear()
        monkeypatch.setattr(sandbox, "_private_view_works", lambda user, python: False)
        token = f"nanochat-sweep-{os.getpid()}-{time.time_ns()}"
        written = plant_everywhere(token)
        assert "/run/lock/" + token in written and f"{nested}/{token}" in written
        assert not [w for w in written if os.path.lexists(w)] and not found_on_disk(token)
    finally:
        shutil.rmtree(nested, ignore_errors=True)
        sandbox.writable_places.cache_clear()


def test_file_size_is_limited():
    chunks = sandbox.MAX_FILE_BYTES // 2**20 + 2
    r = run_untrusted(f"with open('big.bin', 'wb') as f:\n    for _ in range({chunks}): f.write(b'x' * 2**20)")
    assert not r.success and "File too large" in r.error


# ---- arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,exc", [(dict(code=b"print(1)"), TypeError), (dict(code="", timeout_s=0), ValueError),
                                    (dict(code="", timeout_s=float("inf")), ValueError),
                                    (dict(code="", memory_mb=8), ValueError), (dict(code="", max_output_bytes=-1), ValueError),
                                    (dict(code="", stdin=None), TypeError)])
def test_bad_arguments_are_rejected(kw, exc):
    with pytest.raises(exc): run_untrusted(**kw)


# ---- HumanEval --------------------------------------------------------------------------------------

PROBLEM = {"task_id": "Test/0", "entry_point": "running_max",
           "prompt": 'def running_max(xs: list) -> list:\n    """The largest value seen so far, at each position."""\n',
           "test": "def check(candidate):\n    assert candidate([]) == []\n    assert candidate([1, 3, 2, 5, 4]) == [1, 3, 3, 5, 5]\n"
                   "    assert candidate([-2, -5]) == [-2, -2]\n"}
GOOD = "    out, best = [], None\n    for x in xs:\n        best = x if best is None else max(best, x)\n        out.append(best)\n    return out\n"


def test_humaneval_program_shape():
    prog = humaneval_program(PROBLEM, GOOD)
    assert prog.startswith(PROBLEM["prompt"] + GOOD) and prog.rstrip().endswith("check(running_max)")
    with pytest.raises(KeyError, match="entry_point"): humaneval_program({"prompt": "", "test": ""}, "")
    with pytest.raises(ValueError, match="function name"):
        humaneval_program({**PROBLEM, "entry_point": "f); import os; os.system('x'"}, "")


@pytest.mark.parametrize("completion,passes", [
    (GOOD, True),
    ("    return sorted(xs)\n", False),                     # wrong answer: AssertionError
    ("    return [max(xs[:i + 1]) for i in range(len(xs))\n", False),   # syntax error
    ("    while True: pass\n", False),                      # never returns
    ("    import os\n    os._exit(0)\n", False),            # exits 0 before the tests: caught by the nonce
])
def test_check_completion(completion, passes):
    r = check_completion(PROBLEM, completion, timeout_s=1.5)
    assert r.success is passes
    if "while True" in completion: assert r.timed_out
    if "sorted" in completion: assert r.error == "AssertionError"
