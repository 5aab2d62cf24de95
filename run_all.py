#!/usr/bin/env python
"""Run the course headless: papermill executes the notebooks in order into runs/<name>/.

    python run_all.py --profile tiny                    # the whole course, CPU, offline data
    python run_all.py --profile tiny --from 04          # from 04_pretraining on
    python run_all.py --profile tiny --only 01          # just 01 (and its companions, 01b ...)
    python run_all.py --profile gpu1 --set tok_vocab_size=16384 --name my-run
    python run_all.py --profile speedrun --dry-run      # print the plan, run nothing

The profile and the run name are checked before anything runs (a dry run too): a bad setting is one
line `error: <key>: <why>` and exit status 2.

A notebook that finished is skipped while its key holds: the resolved settings (every value after
--set), its code cells and those of the notebooks before it. Edit settings.ini, a --set value or a
notebook's code and that notebook, and every one after it, runs again; each line says why a
notebook runs or is skipped (--force re-runs it anyway). So a stopped run resumes where it stopped.
The report (runs/<name>/report.md) is rewritten after every notebook. Kernels, and the trainers they
launch, run with PYTHONHASHSEED=0 (unless set): the same commit and profile give the same numbers.
"""
import argparse, atexit, datetime as dt, hashlib, json, os, re, shutil, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from nanochat_lib.core import (ConfigError, check_device, check_run_name, cli_errors, load_profile,  # noqa: E402
                               parse_overrides, profile_names, run_dir)
from nanochat_lib.fetch import atomic_write_json  # noqa: E402
from nanochat_lib.report import write_report  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
# Course notebooks are NN_name.ipynb or NNx_name.ipynb with NN below 90 (90+ are benchmarks, not stages).
COURSE_NB = re.compile(r"^(\d\d)([a-z]?)_[\w-]+\.ipynb$")
KERNEL = "nanochat"


def course_notebooks() -> list:
    "The course notebooks in running order."
    nbs = [p for p in NOTEBOOKS.glob("*.ipynb") if (m := COURSE_NB.match(p.name)) and int(m.group(1)) < 90]
    return sorted(nbs, key=lambda p: COURSE_NB.match(p.name).groups())


def select(nbs, start=None, only=None) -> list:
    "Notebooks from `start` on, or only those whose name starts with `only` ('05' also takes 05b, 05c and 05d)."
    names = [p.name for p in nbs]
    for flag, val in (("--from", start), ("--only", only)):
        if val and not any(n.startswith(val) for n in names):
            raise SystemExit(f"error: {flag} {val} matches no notebook; notebooks: {', '.join(p.stem for p in nbs)}")
    if only: return [p for p in nbs if p.name.startswith(only)]
    if start: return [p for p in nbs if p.name >= start or p.name.startswith(start)]
    return nbs


def kernel_name() -> str:
    "The venv's registered kernel if there is one (make registers it), else the default python3."
    from jupyter_client.kernelspec import KernelSpecManager
    return KERNEL if KERNEL in KernelSpecManager().find_kernel_specs() else "python3"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def notebook_hashes(nb: Path) -> dict:
    "Hashes of a notebook's code cells (what can change a result) and of its prose (what cannot)."
    cells = json.loads(nb.read_text(encoding="utf-8")).get("cells", [])
    text = lambda c: "".join(c.get("source", "")) if isinstance(c.get("source"), list) else c.get("source", "")
    return dict(code=_sha([text(c) for c in cells if c.get("cell_type") == "code"]),
                prose=_sha([text(c) for c in cells if c.get("cell_type") != "code"]))


def notebook_keys(nbs: list, cfg: dict, name: str) -> dict:
    "Each course notebook's skip key: the resolved settings, its code and the code of every notebook before it."
    config, upstream, keys = _sha(dict(cfg, run_name=name)), _sha([]), {}
    for nb in nbs:
        h = notebook_hashes(nb)
        keys[nb.stem] = dict(config=config, code=h["code"], prose=h["prose"], upstream=upstream,
                             key=_sha([config, upstream, h["code"]]))
        upstream = _sha([upstream, h["code"]])
    return keys


def _changes(old: dict, new: dict, most: int = 4) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = ", ".join(f"{k} {old.get(k, '(none)')!r} -> {new.get(k, '(none)')!r}" for k in keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def stale_reasons(prev: dict, want: dict, out_exists: bool, configs: dict, cfg: dict) -> list:
    "Why a notebook must run again (empty: it may be skipped)."
    if not prev: return ["not run yet"]
    if prev.get("status") != "completed": return [f"{prev.get('status', 'unfinished')} last time"]
    if "key" not in prev: return ["finished under an older run_all that did not record its code"]
    if not out_exists: return ["its executed copy is missing"]
    why = []
    if prev.get("config") != want["config"]:
        old = configs.get(prev.get("config"))
        why.append("settings changed" + (f" ({_changes(old, cfg)})" if old else ""))
    if prev.get("code") != want["code"]: why.append("its code changed")
    if prev.get("upstream") != want["upstream"]: why.append("an earlier notebook's code changed")
    return why


def load_state(rdir: Path) -> dict:
    path = rdir / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def first_lines(text: str, n: int = 6) -> str:
    lines = text.strip().splitlines()
    return "\n".join(["    " + l for l in lines[:n]] + (["    ..."] if len(lines) > n else []))


def kernel_config():
    """Kernel manager settings for papermill: kernels talk over IPC sockets in a private temporary folder,
    not unencrypted TCP on localhost (so ipykernel does not warn about that once per notebook). POSIX only."""
    if os.name == "nt": return {}
    from traitlets.config import Config
    d = tempfile.mkdtemp(prefix="nanochat-kernel-")
    atexit.register(shutil.rmtree, d, True)
    return dict(config=Config(KernelManager=dict(transport="ipc", ip=os.path.join(d, "kernel"))))


def run_notebook(nb: Path, out: Path, params: dict, log_output: bool):
    import papermill as pm
    pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name=kernel_name(), language="python", cwd=str(NOTEBOOKS),
                        progress_bar=True, log_output=log_output, request_save_on_cell_execute=True, **kernel_config())


def print_plan(plan: list, cfg: dict):
    "The notebooks that would run, and the run's estimated compute, time, cost, disk and download."
    from nanochat_lib.pretrain import run_estimate
    for nb in plan: print(f"  would run {nb.stem}")
    e = run_estimate(cfg)
    p = e["plan"]
    where = f"{e['devices']} x {cfg['device']}" if e["devices"] > 1 else cfg["device"]
    print(f"model: d{cfg['depth']}, {p['num_params']:,} parameters, {p['num_iterations']:,} pretraining steps x "
          f"{p['total_batch_size']:,} tokens")
    print(f"compute: {e['flops']:.2e} FLOPs of pretraining (the later stages add a few percent)")
    print(f"time: ~{e['hours'] * 60:.0f} min on {where}" + (f", ~${e['usd']:,.0f}" if e["usd"] else ""))
    print(f"download: ~{sum(e['download_mb'].values()):,.0f} MB (" +
          ", ".join(f"{k} {v:,.0f} MB" for k, v in e["download_mb"].items()) + ")")
    print(f"disk: ~{e['disk_mb']:,.0f} MB (downloads + checkpoints {e['checkpoint_mb']:,.0f} MB)")
    from nanochat_lib.bench import memory_for_profile, memory_line
    try: mem = memory_line(memory_for_profile(cfg))      # a trace of the model on fake tensors: seconds, no memory
    except Exception as err: mem = f"no estimate ({type(err).__name__}: {err})"
    print(f"memory: {mem} (details: python -m nanochat_lib.bench memory --profile {cfg['profile']})")


@cli_errors()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--profile", default="tiny", help="settings.ini section (default: tiny)")
    ap.add_argument("--name", help="run folder name under runs/ (default: the profile name)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override one profile setting (repeatable)")
    ap.add_argument("--from", dest="start", metavar="NN", help="start at notebook NN (e.g. 04)")
    ap.add_argument("--only", metavar="NN", help="run only notebook NN and its companions (e.g. 05 runs 05, 05b, 05c and 05d)")
    ap.add_argument("--force", action="store_true", help="re-run notebooks that already finished")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--log-output", action="store_true", help="stream every cell's output to this terminal")
    args = ap.parse_args(argv)

    # Everything the run would refuse is refused here, before anything runs (a dry run included).
    overrides = parse_overrides(args.sets)
    cfg = load_profile(args.profile, overrides)
    name = check_run_name(args.name or args.profile)
    from nanochat_lib.pretrain import make_plan
    make_plan(cfg, cfg["tok_vocab_size"])                  # model shape and batch sizes fit together
    nbs = course_notebooks()
    plan = select(nbs, args.start, args.only)
    params = dict(profile=args.profile, run_name=name, overrides=overrides)
    try: check_device(cfg)
    except ConfigError as e:
        if not args.dry_run: raise
        # planning a GPU run on a laptop is fine; running it is not
        print(f"warning: {e} (the plan follows; the run itself would stop here)", file=sys.stderr)

    print(f"profile {args.profile} -> runs/{name}/  ({len(plan)} notebooks)")
    for k, v in overrides.items(): print(f"  --set {k}={v}")
    if args.dry_run:
        print_plan(plan, cfg)
        return 0

    rdir = run_dir(name)
    state = load_state(rdir)
    if state.get("profile") not in (None, args.profile):
        print(f"note: runs/{name} was started with profile {state['profile']}; finished notebooks with other "
              f"parameters will re-run", file=sys.stderr)
    state.update(profile=args.profile, overrides=overrides)
    state.setdefault("started", dt.datetime.now().isoformat(timespec="seconds"))
    state.setdefault("notebooks", {})
    keys = notebook_keys(nbs, cfg, name)
    configs = state.setdefault("configs", {})              # settings by hash, to say what changed
    configs[_sha(dict(cfg, run_name=name))] = cfg
    # Kernels (and the trainers they launch) get one hash seed: no set or dict order can differ between two runs.
    os.environ.setdefault("PYTHONHASHSEED", "0")

    for i, nb in enumerate(plan, 1):
        out = rdir / nb.name
        prev, want = state["notebooks"].get(nb.stem, {}), keys[nb.stem]
        why = ["--force"] if args.force else stale_reasons(prev, want, out.exists(), configs, cfg)
        if not why:
            prose = "; its prose changed since (--force refreshes the executed copy)" if prev.get("prose") != want["prose"] else ""
            print(f"[{i}/{len(plan)}] {nb.stem}: skipped, finished with these settings and this code{prose}")
            continue
        print(f"[{i}/{len(plan)}] {nb.stem} -> {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} "
              f"({'; '.join(why)})", flush=True)
        t0 = time.time()
        state["notebooks"][nb.stem] = dict(status="running", **want, started=dt.datetime.now().isoformat(timespec="seconds"))
        used = {n.get("config") for n in state["notebooks"].values()}
        for h in [h for h in configs if h not in used]: del configs[h]
        atomic_write_json(rdir / "run.json", state)
        try:
            run_notebook(nb, out, params, args.log_output)
        except Exception as e:  # papermill's PapermillExecutionError carries the failing cell
            elapsed = time.time() - t0
            state["notebooks"][nb.stem].update(status="failed", elapsed_s=round(elapsed, 1))
            atomic_write_json(rdir / "run.json", state)
            write_report(rdir)
            cell = getattr(e, "cell_index", None)
            msg = [f"\nFAILED: notebook {nb.name}"]
            if cell is not None:
                msg.append(f"  cell {cell} of the executed notebook (execution count {getattr(e, 'exec_count', '?')}):\n{first_lines(getattr(e, 'source', ''))}")
                msg.append(f"  error: {e.ename}: {e.evalue}")
            else:
                msg.append(f"  error: {type(e).__name__}: {e}")
            msg.append(f"  executed notebook (with outputs): {out}")
            msg.append(f"  re-run from here: python run_all.py --profile {args.profile} --name {name} --from {nb.stem[:2]}")
            print("\n".join(msg), file=sys.stderr)
            return 1
        elapsed = time.time() - t0
        state["notebooks"][nb.stem].update(status="completed", elapsed_s=round(elapsed, 1),
                                           finished=dt.datetime.now().isoformat(timespec="seconds"))
        atomic_write_json(rdir / "run.json", state)
        write_report(rdir)
        print(f"    done in {elapsed:.1f}s", flush=True)

    report = write_report(rdir)
    print(f"report: {report}")
    from nanochat_lib.tracker import track_report       # the summary table to the tracker (nothing when tracker = none)
    track_report(cfg, name, rdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
