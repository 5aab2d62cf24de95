"""The course site (`make site`): built once from runs/reference-tiny, served on loopback, read in Debian's Chromium.

The browser follows the README's course map from the home page to every notebook page and checks that every figure
loads; a crawler then fetches every same-site link and asset of every page and checks that it exists (and that an
anchor it points at is on the target page). Nothing may be fetched from another host."""
import functools
import html.parser
import http.server
import importlib.util
import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from browserkit import browser_page  # noqa: F401  (a pytest fixture)

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "reference-tiny"
spec = importlib.util.spec_from_file_location("build_site", ROOT / "docs" / "build_site.py")
build_site = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_site)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    "The site of the reference run, built once per session, served over HTTP on 127.0.0.1: its base URL."
    for mod in ("mkdocs", "mkdocs_jupyter", "mkdocstrings", "jupyter_server_mathjax"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is missing: `make setup` installs the site extra (pip install -e '.[site]')")
    out = tmp_path_factory.mktemp("site") / "_site"
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "build_site.py"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    handler = functools.partial(QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


def nb_title(stem):
    return build_site.notebook_title(json.loads((RUN / f"{stem}.ipynb").read_text()), stem)


@pytest.mark.site
def test_course_map_leads_to_every_notebook_and_every_figure_loads(site, browser_page):
    page, stems = browser_page, build_site.run_notebooks(RUN)
    assert len(stems) >= 20
    off_site, failed = [], []
    page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(site) else (off_site.append(r.request.url), r.abort()))
    page.on("response", lambda r: failed.append((r.status, r.url)) if r.status >= 400 else None)
    page.goto(site)
    assert page.title().startswith("nanochat course")
    map_links = page.locator("article table a[href^='notebooks/']")
    targets = dict(zip(map_links.evaluate_all("as => as.map(a => a.href)"), map_links.all_inner_texts()))
    # the README's map (or the list under it) links each executed notebook of the run exactly once
    assert sorted(urllib.parse.urlparse(u).path.rsplit("/", 1)[1] for u in targets) == sorted(f"{s}.html" for s in stems)
    figures = 0
    for url in targets:
        stem = url.rsplit("/", 1)[1].removesuffix(".html")
        page.goto(url)
        assert page.title().startswith(nb_title(stem)), (url, page.title())
        assert page.locator(".jupyter-wrapper .jp-Cell").count() > 3, f"{url}: no notebook cells rendered"
        sizes = page.evaluate("""() => Promise.all([...document.images].map(img => img.complete ? null :
                                     new Promise(done => { img.onload = img.onerror = done; })))
                                 .then(() => [...document.images].map(img => [img.src.slice(0, 60), img.naturalWidth]))""")
        broken = [src for src, w in sizes if w == 0]
        assert not broken, f"{url}: figures that did not load: {broken}"
        figures += sum(1 for src, w in sizes if src.startswith("data:image/png"))
    assert figures >= 10, f"only {figures} embedded figures over {len(stems)} notebooks"
    assert not failed, f"requests that failed: {failed}"
    assert not off_site, f"the site fetched from other hosts: {sorted(set(off_site))[:5]}"
    assert not page.js_errors, page.js_errors


class Links(html.parser.HTMLParser):
    "The hrefs and srcs of a page, and its element ids (anchor targets)."
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"): self.ids.add(a["id"])
        if tag == "a" and a.get("name"): self.ids.add(a["name"])
        for k in ("href", "src"):
            if a.get(k) and not a[k].startswith(("data:", "javascript:", "mailto:")): self.links.append(a[k])


@pytest.mark.site
def test_no_internal_link_is_broken(site):
    "Crawl every page reachable from the home page: each same-site href and src answers 200, each #anchor exists."
    pages, todo, seen, broken, anchors = {}, [site + "index.html"], set(), [], []
    while todo:
        url = todo.pop()
        if url in seen: continue
        seen.add(url)
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                status, body, ctype = r.status, r.read(), r.headers.get_content_type()
        except urllib.error.HTTPError as e:
            status = e.code
        if status != 200:
            broken.append((status, url)); continue
        if ctype != "text/html": continue
        p = Links(); p.feed(body.decode("utf-8", "replace"))
        pages[url] = p
        for link in p.links:
            target = urllib.parse.urljoin(url, link)
            if not target.startswith(site): continue
            target, frag = urllib.parse.urldefrag(target)
            if frag: anchors.append((url, target, urllib.parse.unquote(frag)))
            if target not in seen: todo.append(target)
    assert not broken, f"broken same-site links: {broken[:10]}"
    missing = [(src, f"{t}#{f}") for src, t, f in anchors if t in pages and f not in pages[t].ids]
    assert not missing, f"anchors that point nowhere: {missing[:10]}"
    stems = build_site.run_notebooks(RUN)
    assert {site + f"notebooks/{s}.html" for s in stems} <= set(pages)
    assert site + "api/core.html" in pages and site + "report.html" in pages
    assert "load_profile" in {i.rsplit(".", 1)[-1] for i in pages[site + "api/core.html"].ids}  # API from docstrings


def test_home_page_links_renumbered_and_unmapped_notebooks():
    readme = ("# c\n\n## The course map\n\n| Notebook | You learn | Exports |\n|---|---|---|\n"
              "| `00_core` | how | `core` |\n| `00d_corpus` | corpora | `corpus`, `nosuch` |\n| `90_bench` | speed | `bench` |\n"
              "\nSee [the run](runs/ref/) and [its report](runs/ref/report.md) and [settings](settings.ini).\n")
    stems = ["00_core", "01b_corpus", "02_data"]
    mods = {"core": ("", "00_core"), "corpus": ("", "00d_corpus"), "bench": ("", "90_bench")}
    text = build_site.home_page(readme, "runs/ref", stems, mods)
    assert "| [`00_core`](notebooks/00_core.ipynb) | how | [`core`](api/core.md) |" in text
    assert "| [`00d_corpus`](notebooks/01b_corpus.ipynb) | corpora | [`corpus`](api/corpus.md), `nosuch` |" in text
    assert "| `90_bench` | speed | [`bench`](api/bench.md) |" in text          # no executed copy: no page
    assert "Also in the reference run: [`02_data`](notebooks/02_data.ipynb)." in text
    assert text.index("Also in the reference run") > text.index("`90_bench`")   # right under the map
    assert "[the run](report.md)" in text and "[its report](report.md)" in text
    assert "[settings](" + build_site.repo_url() + "/blob/main/settings.ini)" in text
    assert build_site.match_notebook("00d_corpus", ["01b_corpus", "02_data"]) == "01b_corpus"
    assert build_site.match_notebook("05_x", ["05_y"]) is None


def test_toc_anchors_follow_the_real_heading_ids():
    page = ('<nav class="md-nav md-nav--secondary"><a href="#1-why" class="md-nav__link">1</a>'
            '<a href="#3" class="md-nav__link">3</a><a href="#31-a-hog" class="md-nav__link">3.1</a>'
            '<a href="#4-end" class="md-nav__link">4</a></nav><div class="jupyter-wrapper"><h1 id="title">T</h1>'
            '<h2 id="1-why">1</h2><h2 id="3-run_untrusted">3</h2><h3 id="31-a-hog-rlimit_as">3.1</h3><h2 id="4-end">4</h2>')
    fixed = build_site.fix_toc_anchors(page)
    assert re.findall(r'href="#([^"]+)"', fixed) == ["1-why", "3-run_untrusted", "31-a-hog-rlimit_as", "4-end"]
