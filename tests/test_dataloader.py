"The data loader: rank sharding loses and duplicates nothing, rows are BOS-aligned, best fit crops less, resume is exact."
import json, random
from collections import Counter
import numpy as np
import pytest, torch
from nanochat_lib.corpus import write_shard
from nanochat_lib.tokenizer import Tokenizer
from nanochat_lib.dataloader import (DataLoader, DocBuffer, DocStream, best_fit_row, encode_documents, pack_best_fit,
                                     pack_concat, pack_in_order, split_paths)
from nanochat_lib.core import rank_slice

WORDS = "the a cat dog sat ran on under mat log quickly slowly red blue big small and then it was".split()


def make_docs(n, seed=0, max_words=90):
    "Distinct documents of varied length (some longer than the rows used below)."
    rng = random.Random(seed)
    lens = [rng.choice([rng.randint(1, 12), rng.randint(5, 40), rng.randint(30, max_words)]) for _ in range(n)]
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(k)) + "." for i, k in enumerate(lens)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(make_docs(300, seed=99), 300)


@pytest.fixture
def shards(tmp_path):
    "Three parquet files of 100, 77 and 61 documents in row groups of 16 (the last group of each is short)."
    docs, paths, start = make_docs(238), [], 0
    for i, n in enumerate((100, 77, 61)):
        paths.append(write_shard(tmp_path / f"shard_{i:05d}.parquet", docs[start:start + n], row_group_docs=16))
        start += n
    return paths, docs


@pytest.fixture
def small_shards(tmp_path):
    "Two small files (15 and 9 documents, row groups of 4): a few batches cover several epochs."
    docs = make_docs(24, seed=5, max_words=40)
    return [write_shard(tmp_path / "a.parquet", docs[:15], row_group_docs=4),
            write_shard(tmp_path / "b.parquet", docs[15:], row_group_docs=4)]


def row_tokens(x, y):
    "Each row's real tokens: the first input, then every target that is not padding (-1)."
    out = []
    for xr, yr in zip(x.tolist(), y.tolist()):
        n = sum(t != -1 for t in yr)
        assert all(t == -1 for t in yr[n:]), "padding must only come at the end of a row"
        if n: out.append([xr[0]] + yr[:n])
    return out


def split_at_bos(row, bos):
    starts = [i for i, t in enumerate(row) if t == bos]
    assert starts and starts[0] == 0, "every row must start with BOS"
    return [tuple(row[a:b]) for a, b in zip(starts, starts[1:] + [len(row)])]


def match_prefixes(pieces, docs):
    "A perfect matching of cropped pieces to documents they are prefixes of (Kuhn's algorithm), or None."
    owner = {}
    def augment(p, seen):
        for d in range(len(docs)):
            if d not in seen and len(pieces[p]) < len(docs[d]) and docs[d][:len(pieces[p])] == pieces[p]:
                seen.add(d)
                if d not in owner or augment(owner[d], seen):
                    owner[d] = p
                    return True
        return False
    return owner if all(augment(p, set()) for p in range(len(pieces))) else None


def test_ranks_lose_and_duplicate_no_document(shards, tok):
    paths, texts = shards
    T, W = 24, 2
    doc_tokens = [tuple(d.tolist()) for d in encode_documents(tok, texts)]
    which = {t: i for i, t in enumerate(doc_tokens)}
    assert len(which) == len(texts)
    # where each document sits: (row group counted within its shard, index in the row group)
    place = {}
    for s, n in enumerate((100, 77, 61)):
        base = sum((100, 77, 61)[:s])
        for k in range(n): place[base + k] = (s, k // 16, k % 16)
    complete, cropped_pieces, reported_crop, per_rank = Counter(), [], 0, {}
    for rank in range(W):
        dl = DataLoader(paths, tok, B=3, T=T, split="train", rank=rank, world_size=W, epochs=1,
                        tokenizer_batch_size=5, buffer_docs=7)
        mine = []
        for x, y in dl:
            assert x.shape == y.shape == (3, T) and x.dtype == y.dtype == torch.int64
            for row in row_tokens(x, y):
                pieces = split_at_bos(row, tok.bos_id)
                for p in pieces[:-1]:
                    assert p in which, "only the last piece of a row may be cropped"
                last = pieces[-1]
                if last in which: pieces, tail = pieces, None
                else:
                    assert len(row) == T + 1, "a crop only happens to fill a full row"
                    pieces, tail = pieces[:-1], last
                for p in pieces:
                    complete[which[p]] += 1; mine.append(which[p])
                if tail: cropped_pieces.append(tail)
        reported_crop += dl.stats["cropped"]
        per_rank[rank] = mine
        # the documented rule: document j of a row group goes to rank j % world_size
        assert all(place[i][2] % W == rank for i in mine)
    assert max(complete.values()) == 1, "a document appeared twice"
    rest = [i for i in range(len(texts)) if i not in complete]
    assert len(rest) == len(cropped_pieces), "every document not seen whole must appear exactly once cropped"
    assert match_prefixes(cropped_pieces, [doc_tokens[i] for i in rest]) is not None
    assert reported_crop == sum(len(doc_tokens[i]) for i in rest) - sum(map(len, cropped_pieces))
    assert cropped_pieces, "the test corpus should force some crops"
    assert abs(len(per_rank[0]) - len(per_rank[1])) < 20


def test_rows_start_with_bos_and_targets_shift(small_shards, tok):
    paths = small_shards
    dl = DataLoader(paths, tok, B=4, T=32, buffer_docs=10)
    for _ in range(12):  # loops over the epoch boundary
        x, y = next(dl)
        assert (x[:, 0] == tok.bos_id).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert (y >= 0).all()  # train rows are always full: no padding
    assert dl.stream.epoch >= 1


def test_val_is_one_padded_pass(shards, tok, tmp_path):
    paths, texts = shards
    dl = DataLoader(paths[-1:], tok, B=4, T=32, split="val", buffer_docs=10)
    batches = list(dl)
    total = sum(len(d) for d in encode_documents(tok, texts[-61:]))
    assert dl.stats["tokens"] + dl.stats["cropped"] == total   # one pass: every token used or cropped
    assert len(batches) == -(-dl.stats["rows"] // 4) and next(dl, None) is None
    # a file of two short documents: one batch, its first row partly and the other rows fully padded
    one = write_shard(tmp_path / "one.parquet", ["doc: short.", "doc: and another."])
    (x, y), = list(DataLoader([one], tok, B=4, T=32, split="val"))
    n = sum(len(d) for d in encode_documents(tok, ["doc: short.", "doc: and another."]))
    assert (y[0, :n - 1] >= 0).all() and (y[0, n - 1:] == -1).all() and (y[1:] == -1).all()
    assert (x[0, n:] == tok.bos_id).all() and (x[1:] == tok.bos_id).all()


def test_best_fit_crops_less_than_in_order():
    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(4.5, 1.0, 3000).astype(int), 2, 3000)
    docs = [np.arange(n) for n in lens]
    row = 257
    rows_bf, crop_bf = pack_best_fit(docs, row, buffer_docs=200)
    rows_io, crop_io = pack_in_order(docs, row)
    for rows, crop in ((rows_bf, crop_bf), (rows_io, crop_io)):
        used = [sum(len(p) for p, _ in r) for r in rows]
        assert all(u == row for u in used[:-1]) and used[-1] <= row
        assert sum(used) + crop == lens.sum()
        assert all(r[0][0][0] == 0 for r in rows)  # every row starts at a document start
    assert crop_bf < crop_io
    rows_cc, orphans = pack_concat(docs, row)
    assert sum(len(p) for r in rows_cc for p, _ in r) == lens.sum() and orphans > 0


def test_best_fit_row_rule():
    buf = DocBuffer()
    for i, n in enumerate([10, 9, 8, 12, 7, 4]): buf.add(np.arange(n), i)
    pieces, crop = best_fit_row(buf, 16)
    assert [t for _, t in pieces] == [3, 5] and crop == 0
    pieces, crop = best_fit_row(buf, 16)
    assert [t for _, t in pieces] == [0, 4] and crop == 1 and len(pieces[1][0]) == 6
    assert buf.lengths() == [8, 9]


@pytest.mark.parametrize("k", [0, 1, 6, 23])
def test_resume_is_exact(small_shards, tok, k):
    paths = small_shards
    kw = dict(B=2, T=20, rank=1, world_size=2, tokenizer_batch_size=4, buffer_docs=9)
    a = DataLoader(paths, tok, **kw)
    for _ in range(k): next(a)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [next(a) for _ in range(8)]
    b = DataLoader(paths, tok, **kw)
    b.load_state_dict(state)
    got = [next(b) for _ in range(8)]
    for (x1, y1), (x2, y2) in zip(expected, got):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert a.stats == b.stats and (k < 23 or a.stream.epoch >= 2)


def test_resume_rejects_other_settings(shards, tok):
    paths, _ = shards
    state = DataLoader(paths, tok, B=2, T=20, buffer_docs=9).state_dict()
    with pytest.raises(ValueError, match="buffer_docs"):
        DataLoader(paths, tok, B=2, T=20, buffer_docs=10).load_state_dict(state)
    DataLoader(paths, tok, B=5, T=20, buffer_docs=9).load_state_dict(state)  # B does not change the rows


def test_doc_stream_rule_and_position(shards):
    paths, _ = shards
    assert list(rank_slice(10, 1, 3)) == [1, 4, 7]
    s = DocStream(paths, rank=2, world_size=3, epochs=1)
    coords, texts = s.read(7)
    assert [c[2] % 3 for c in coords] == [2] * 7 and coords[:2] == [(0, 0, 2), (0, 0, 5)]
    assert s.texts_at(coords[::-1]) == texts[::-1]
    pos = s.position()
    more = s.read(5)
    s.seek(pos)
    assert s.read(5) == more


def test_corpus_folder_and_errors(tmp_path, tok):
    docs = make_docs(50)
    for i in range(3): write_shard(tmp_path / f"shard_{i:05d}.parquet", docs[i * 17:(i + 1) * 17], row_group_docs=8)
    assert [p.name for p in split_paths(tmp_path, "val")] == ["shard_00002.parquet"]
    assert len(split_paths(tmp_path, "train")) == 2
    x, y = next(DataLoader(tmp_path, tok, B=2, T=16, split="val", buffer_docs=4))
    assert x.shape == (2, 16)
    with pytest.raises(ValueError, match="split"): split_paths(tmp_path, "test")
    with pytest.raises(FileNotFoundError): split_paths([tmp_path / "nope.parquet"], "train")
    with pytest.raises(ValueError, match="no documents"):
        next(DataLoader(split_paths(tmp_path, "val")[:1], tok, B=1, T=8, rank=17, world_size=18))
