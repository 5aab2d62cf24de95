#!/usr/bin/env python
"""Run the course headless: papermill executes the notebooks in order into runs/<name>/.

    python run_all.py --profile tiny                    # the whole course, CPU, offline data
    python run_all.py --profile tiny --from 04          # from 04_pretraining on
    python run_all.py --profile tiny --only 01          # just 01 (and its companions, 01b ...)
    python run_all.py --profile gpu1 --set tok_vocab_size=16384 --name my-run
    python run_all.py --profile speedrun --dry-run      # print the plan, run nothing

A notebook that finished with the same parameters is skipped (use --force to re-run it), so a
stopped run resumes where it stopped. The report (runs/<name>/report.md) is rewritten after
every notebook.
"""
import argparse, datetime as dt, hashlib, json, re, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from nanochat_lib.core import load_profile, parse_overrides, profile_names, run_dir  # noqa: E402
from nanochat_lib.report import atomic_write_json, write_report  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
# Course notebooks are NN_name.ipynb or NNx_name.ipynb with NN below 90 (90+ are benchmarks, not stages).
COURSE_NB = re.compile(r"^(\d\d)([a-z]?)_[\w-]+\.ipynb$")
KERNEL = "nanochat"


def course_notebooks() -> list:
    "The course notebooks in running order."
    nbs = [p for p in NOTEBOOKS.glob("*.ipynb") if (m := COURSE_NB.match(p.name)) and int(m.group(1)) < 90]
    return sorted(nbs, key=lambda p: COURSE_NB.match(p.name).groups())


def select(nbs, start=None, only=None) -> list:
    "Notebooks from `start` on, or only those whose name starts with `only` ('06' also takes 06b)."
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


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def load_state(rdir: Path) -> dict:
    path = rdir / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def first_lines(text: str, n: int = 6) -> str:
    lines = text.strip().splitlines()
    return "\n".join(["    " + l for l in lines[:n]] + (["    ..."] if len(lines) > n else []))


def run_notebook(nb: Path, out: Path, params: dict, log_output: bool):
    import papermill as pm
    pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name=kernel_name(), language="python", cwd=str(NOTEBOOKS),
                        progress_bar=True, log_output=log_output, request_save_on_cell_execute=True)


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--profile", default="tiny", help="settings.ini section (default: tiny)")
    ap.add_argument("--name", help="run folder name under runs/ (default: the profile name)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override one profile setting (repeatable)")
    ap.add_argument("--from", dest="start", metavar="NN", help="start at notebook NN (e.g. 04)")
    ap.add_argument("--only", metavar="NN", help="run only notebook NN and its companions (e.g. 06 runs 06 and 06b)")
    ap.add_argument("--force", action="store_true", help="re-run notebooks that already finished")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--log-output", action="store_true", help="stream every cell's output to this terminal")
    args = ap.parse_args(argv)

    try:
        overrides = parse_overrides(args.sets)
        cfg = load_profile(args.profile, overrides)
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    name = args.name or args.profile
    plan = select(course_notebooks(), args.start, args.only)
    params = dict(profile=args.profile, run_name=name, overrides=overrides)

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
    phash = params_hash(params)

    for i, nb in enumerate(plan, 1):
        out = rdir / nb.name
        prev = state["notebooks"].get(nb.stem, {})
        if prev.get("status") == "completed" and prev.get("params") == phash and out.exists() and not args.force:
            print(f"[{i}/{len(plan)}] {nb.stem}: already finished, skipped (--force re-runs it)")
            continue
        print(f"[{i}/{len(plan)}] {nb.stem} -> {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", flush=True)
        t0 = time.time()
        state["notebooks"][nb.stem] = dict(status="running", params=phash, started=dt.datetime.now().isoformat(timespec="seconds"))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
