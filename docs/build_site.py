#!/usr/bin/env python
"""Build the course site: the README's course map as the home page, the executed notebooks of a run (outputs and
figures included), the run's report, and each module's API from its docstrings, as static HTML.

    python docs/build_site.py                               # runs/reference-tiny -> _site/
    python docs/build_site.py --run runs/tiny --out /tmp/site

The pages come from what is there: every NN_name.ipynb in the run folder, every module in nanochat_lib/, and the
README's map, whose rows link to the run's notebook of the same name (or, failing that, of the same topic after the
number, so a map that renumbered a notebook still finds it). Nothing is fetched: the theme, the search and MathJax
(from the jupyter-server-mathjax package) are copied into the site, and figures are embedded in their pages.
"""
import argparse, ast, copy, json, logging, re, shutil, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                                     # this checkout's nanochat_lib
CONFIG = Path(__file__).resolve().parent / "mkdocs.yml"
NB_NAME = re.compile(r"^(\d\d)([a-z]?)_([\w-]+)$")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# jupyter-server-mathjax ships MathJax 2 with the STIX-Web fonts only: point the HTML-CSS output at them
# (mkdocs.yml loads this file as config `local/nanochat`).
MATHJAX_FONTS = """MathJax.Hub.Config({"HTML-CSS": {availableFonts: ["STIX-Web"], preferredFont: "STIX-Web",
                                      webFont: "STIX-Web", imageFont: null}});
MathJax.Ajax.loadComplete("[MathJax]/config/local/nanochat.js");
"""


def run_notebooks(run: Path) -> list:
    "The stems of the run's course notebooks, in course order (00, 00b, ..., 01, ...)."
    stems = [p.stem for p in run.glob("*.ipynb") if NB_NAME.match(p.stem)]
    return sorted(stems, key=lambda s: NB_NAME.match(s).groups()[:2])


def match_notebook(name: str, stems) -> str:
    "The run notebook for map entry `name`: the same stem, else the only one with the same topic after the number."
    if name in stems: return name
    m = NB_NAME.match(name)
    same = [s for s in stems if m and NB_NAME.match(s).group(3) == m.group(3)]
    return same[0] if len(same) == 1 else None


def notebook_title(nb: dict, stem: str) -> str:
    "'00b Fetching and caching data': the number and the notebook's first level-1 heading."
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "markdown" and src.startswith("# "):
            return f"{stem.split('_')[0]} {src.splitlines()[0][2:].strip()}"
    return stem


def clean_notebook(nb: dict) -> dict:
    "The notebook without widget state and widget views (they would need a widget manager from the network)."
    nb = copy.deepcopy(nb)
    nb["metadata"].pop("widgets", None)
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            if isinstance(o.get("data"), dict): o["data"].pop(WIDGET_MIME, None)
    return nb


def modules() -> dict:
    "Every nanochat_lib module: name -> (one-line docstring, the notebook it is exported from or None)."
    out = {}
    for py in sorted((ROOT / "nanochat_lib").glob("*.py")):
        if py.name.startswith("_"): continue
        text = py.read_text(encoding="utf-8")
        doc = (ast.get_docstring(ast.parse(text)) or "").strip().splitlines()
        src = re.search(r"File to edit: \.\./notebooks/([\w-]+)\.ipynb", text)
        out[py.stem] = (doc[0] if doc else "", src.group(1) if src else None)
    return out


def repo_url() -> str:
    "The Repository URL of pyproject.toml (links to files that are not pages go there), or '' if none."
    m = re.search(r'^Repository\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    return m.group(1).rstrip("/") if m else ""


def home_page(readme: str, run_rel: str, stems: list, mods: dict) -> str:
    "The README as the home page: map rows link to notebook and API pages; other relative links go to the repository."
    linked = set()

    def nb_link(m):
        name = m.group(1)
        stem = match_notebook(name, stems)
        if stem is None: return m.group(0)
        linked.add(stem)
        return f"| [`{name}`](notebooks/{stem}.ipynb) |"

    def api_link(m):
        return f"[`{m.group(1)}`](api/{m.group(1)}.md)" if m.group(1) in mods else m.group(0)

    lines = []
    for line in readme.splitlines():
        if re.match(r"^\| `\d\d[a-z]?_[\w-]+` \|", line):
            cells = line.split(" | ")
            line = re.sub(r"^\| `(\d\d[a-z]?_[\w-]+)` \|", nb_link, line, count=1)
            last = cells[-1]                                      # the Exports column: `module`, `module` |
            line = line[: len(line) - len(last)] + re.sub(r"`(\w+)`", api_link, last)
        lines.append(line)
    text = "\n".join(lines) + "\n"
    rest = [s for s in stems if s not in linked]
    if rest:                                                      # run notebooks the map does not name (yet)
        more = "\nAlso in the reference run: " + ", ".join(f"[`{s}`](notebooks/{s}.ipynb)" for s in rest) + ".\n"
        text = re.sub(r"(## The course map\n(?:.*\n)*?\|.*\|\n)(?!\|)", lambda m: m.group(1) + more, text, count=1) \
            if "## The course map" in text else text + more
    url = repo_url()

    def rel_link(m):
        label, path = m.group(1), m.group(2).removeprefix("./")
        if path.rstrip("/") == f"{run_rel}/report.md": return f"[{label}](report.md)"
        if path.rstrip("/") == run_rel: return f"[{label}](report.md)"
        if not url: return label
        return f"[{label}]({url}/{'tree' if path.endswith('/') else 'blob'}/main/{path})"
    return re.sub(r"\[([^\]]+)\]\((?!https?:|mailto:|#|notebooks/|api/)([^)\s]+)\)", rel_link, text)


def stage(run: Path, dest: Path) -> list:
    "Lay out the site's pages under `dest`; returns the navigation."
    import jupyter_server_mathjax
    stems, mods = run_notebooks(run), modules()
    if not stems: raise SystemExit(f"error: no executed notebooks (NN_name.ipynb) in {run}; run `make course` first")
    run_rel = run.resolve().relative_to(ROOT).as_posix() if run.resolve().is_relative_to(ROOT) else run.name
    (dest / "notebooks").mkdir(parents=True)
    course = []
    for s in stems:
        nb = json.loads((run / f"{s}.ipynb").read_text(encoding="utf-8"))
        (dest / "notebooks" / f"{s}.ipynb").write_text(json.dumps(clean_notebook(nb)), encoding="utf-8")
        course.append({notebook_title(nb, s): f"notebooks/{s}.ipynb"})
    nav = [{"Home": "index.md"}, {"Course": course}]
    (dest / "index.md").write_text(home_page((ROOT / "README.md").read_text(encoding="utf-8"), run_rel, stems, mods),
                                   encoding="utf-8")
    if (run / "report.md").exists():
        shutil.copy(run / "report.md", dest / "report.md")
        if (run / "plots").is_dir(): shutil.copytree(run / "plots", dest / "plots")
        nav.append({"Reference run report": "report.md"})
    (dest / "api").mkdir()
    index = ["# API", "", "The library the notebooks export, one module per notebook.", "",
             "| Module | What it holds |", "|---|---|"]
    for name, (doc, src) in mods.items():
        stem = match_notebook(src, stems) if src else None
        taught = f"Taught in [`{src}`](../notebooks/{stem}.ipynb).\n\n" if stem else ""
        (dest / "api" / f"{name}.md").write_text(f"# `nanochat_lib.{name}`\n\n{taught}::: nanochat_lib.{name}\n",
                                                 encoding="utf-8")
        index.append(f"| [`{name}`]({name}.md) | {doc.replace('|', '&#124;')} |")
    (dest / "api" / "index.md").write_text("\n".join(index) + "\n", encoding="utf-8")
    nav.append({"API": ["api/index.md", *[{name: f"api/{name}.md"} for name in mods]]})
    mathjax = dest / "assets" / "mathjax"
    shutil.copytree(Path(jupyter_server_mathjax.__file__).parent / "static", mathjax)
    (mathjax / "config" / "local").mkdir(exist_ok=True)
    (mathjax / "config" / "local" / "nanochat.js").write_text(MATHJAX_FONTS, encoding="utf-8")
    return nav


def fix_toc_anchors(page: str) -> str:
    """A notebook page whose table of contents links to the headings' real ids. mkdocs-jupyter slugs the TOC with
    Python-Markdown, which drops inline code (heading "3. `run_untrusted`" -> #3), while nbconvert's heading ids keep it
    (#3-run_untrusted); a TOC entry with no such id takes the next heading after the last one that matched."""
    ids = re.findall(r'<h[1-6][^>]* id="([^"]+)"', page[page.find('class="jupyter-wrapper"'):])
    toc = list(dict.fromkeys(re.findall(r'<a href="#([^"]+)" class="md-nav__link', page)))
    fixes, j, known = {}, 0, set(ids)
    for slug in toc:
        if slug in known: j = ids.index(slug, j) + 1 if slug in ids[j:] else j
        elif j < len(ids): fixes[slug] = ids[j]; j += 1
    for old, new in fixes.items():
        page = page.replace(f'href="#{old}"', f'href="#{new}"')
    return page


def build(run: Path, out: Path) -> Path:
    "Build the site of run folder `run` into `out` (replaced); returns `out`."
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config
    run, out = Path(run).resolve(), Path(out).resolve()
    if not logging.getLogger("mkdocs").handlers:                  # MkDocs' warnings (broken links, bad docstrings)
        h = logging.StreamHandler(); h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("mkdocs").addHandler(h); logging.getLogger("mkdocs").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="nanochat-site-") as tmp:
        docs = Path(tmp) / "docs"
        nav = stage(run, docs)
        cfg = load_config(config_file=str(CONFIG), docs_dir=str(docs), site_dir=str(out), nav=nav)
        # mkdocs-jupyter keeps converted notebooks (keyed by content and options) in the course cache, not in the cwd
        from nanochat_lib.core import cache_dir
        cfg["plugins"]["mkdocs-jupyter"].config["cache_dir"] = str(cache_dir("site", "mkdocs-jupyter"))
        mkdocs_build(cfg)
    for page in (out / "notebooks").glob("*.html"):
        page.write_text(fix_toc_anchors(page.read_text(encoding="utf-8")), encoding="utf-8")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "reference-tiny"), help="run folder (default: runs/reference-tiny)")
    ap.add_argument("--out", default=str(ROOT / "_site"), help="output folder (default: _site)")
    args = ap.parse_args(argv)
    if not Path(args.run).is_dir():
        print(f"error: run folder {args.run} not found; give --run runs/<name> (make course writes runs/tiny)", file=sys.stderr)
        return 2
    out = build(Path(args.run), Path(args.out))
    print(f"site: {out}/index.html ({sum(1 for _ in out.rglob('*.html'))} pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
