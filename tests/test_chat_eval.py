"Chat evaluation: letter-restricted scoring on models whose answers are known, sampling, rank shares, ChatCORE, the report."
import json
import pytest, torch
from nanochat_lib.chat_eval import (CHATCORE_BASELINES, WORD_PROBLEMS_LABEL, LetterBiasModel, answer_positions_batch,
                                    chat_eval, chatcore, choose_letters, evaluate_task, sample_completions,
                                    summarize, valid_letter)
from nanochat_lib.core import rank_slice
from nanochat_lib.engine import Engine, ScriptedModel
from nanochat_lib.model_io import checkpoint_dir, load_model
from nanochat_lib.task_gen import WordProblemTask
from nanochat_lib.tasks import MultipleChoiceTask, mc_conversation
from nanochat_lib.tokenizer import Tokenizer
from chatkit import chat_cfg, make_run, one_thread  # noqa: F401 (one_thread: an autouse fixture)

SETTINGS = dict(max_problems=0, batch_size=3, num_samples=1, max_tokens=8, temperature=0.0, top_k=50, letter_checks=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rdir = make_run(tmp_path_factory.mktemp("eval"), phase="sft")
    return rdir, Tokenizer.load(rdir / "tokenizer")


def mc_task(answer: int, n: int = 7) -> MultipleChoiceTask:
    # questions of different lengths, so batches are padded
    return MultipleChoiceTask([dict(question="Pick one" + " please" * k + "?", choices=["red", "blue", "green", "grey"],
                                    answer=answer) for k in range(n)])


def biased(tok, scores: dict, elsewhere: str = "D") -> LetterBiasModel:
    ids = {tok.encode(letter)[0]: v for letter, v in scores.items()}
    return LetterBiasModel(tok.vocab_size, tok.encode_special("<|assistant_start|>"), ids, tok.encode(elsewhere)[0])


def engine_saying(tok, text: str) -> Engine:
    return Engine(ScriptedModel([tok.encode(text) + [tok.encode_special("<|assistant_end|>")]], tok.vocab_size), tok)


def test_restricted_letters_known_answers(run):
    _, tok = run
    says_b = biased(tok, {"B": 5.0})
    eng = engine_saying(tok, "B")
    right = evaluate_task(mc_task(1), says_b, eng, tok, SETTINGS)
    wrong = evaluate_task(mc_task(0), says_b, eng, tok, SETTINGS)
    assert right["correct"] / right["problems"] == 1.0 and right["problems"] == 7
    assert wrong["correct"] / wrong["problems"] == 0.0
    # a letter outside the choices never wins: E is the favourite, B the best of A-D
    assert choose_letters(biased(tok, {"E": 9.0, "B": 4.0, "A": 1.0}), tok, list(mc_task(1)), batch_size=4) == ["B"] * 7
    # the answer position is each row's own last prompt token, not the padded end (which favours D)
    convs = list(mc_task(2))
    assert choose_letters(biased(tok, {"C": 3.0}, elsewhere="D"), tok, convs, batch_size=7) == ["C"] * 7


def test_answer_positions_with_right_padding():
    ids, last = answer_positions_batch([[1, 2, 3], [4], [5, 6]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]] and last.tolist() == [2, 0, 1]
    ids, last = answer_positions_batch([[1, 2, 3, 4]], pad_id=0, max_len=2)
    assert ids.tolist() == [[3, 4]] and last.tolist() == [1]


def test_free_sampling_format_checks(run):
    _, tok = run
    conv = mc_conversation("Which?", ["a", "b", "c"], 2)
    (ids, ended), = sample_completions(engine_saying(tok, "C"), tok.render_for_completion(conv), max_tokens=8)
    assert tok.decode(ids) == "C" and ended
    assert valid_letter(conv, "C") and valid_letter(conv, " B.") and not valid_letter(conv, "D")
    assert not valid_letter(conv, "Because") and not valid_letter(conv, "")
    # a model that never ends its turn: the budget runs out, ended is False
    rambler = Engine(ScriptedModel([tok.encode("A A A A A A A A A A")], tok.vocab_size), tok)
    (ids, ended), = sample_completions(rambler, tok.render_for_completion(conv), max_tokens=4)
    assert len(ids) == 4 and not ended
    counts = evaluate_task(mc_task(1, n=4), biased(tok, {"B": 5.0}), engine_saying(tok, "B"), tok,
                           {**SETTINGS, "letter_checks": 3})
    assert (counts["checked"], counts["valid"], counts["ended"], counts["free_correct"]) == (3, 3, 3, 3)


def test_generative_tasks_are_graded_on_the_answer(run):
    _, tok = run
    task = WordProblemTask(2, split="test")
    good = f"so it is\n#### {task[0]['answer']}"
    r = evaluate_task(task[:1], None, engine_saying(tok, good), tok, {**SETTINGS, "max_tokens": 64})
    assert (r["problems"], r["correct"], r["ended"]) == (1, 1, 1)
    r = evaluate_task(task[:1], None, engine_saying(tok, "#### 123456789"), tok, {**SETTINGS, "max_tokens": 64})
    assert r["correct"] == 0


def test_rank_shares_cover_each_problem_once():
    for n in range(0, 40, 7):
        for world in (1, 2, 3, 8):
            shares = [list(rank_slice(n, r, world)) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(n))
    with pytest.raises(ValueError):
        rank_slice(5, 3, 3)


def test_chatcore_arithmetic():
    assert chatcore({n: b for n, b in CHATCORE_BASELINES.items()}) == 0.0
    assert chatcore({n: 1.0 for n in CHATCORE_BASELINES}) == 1.0
    accs = {"ARC-Easy": 0.4, "ARC-Challenge": 0.25, "MMLU": 0.55, "GSM8K": 0.1, "HumanEval": 0.0}
    assert chatcore(accs) == pytest.approx((0.2 + 0.0 + 0.4 + 0.1 + 0.0) / 5)
    assert chatcore({k: v for k, v in accs.items() if k != "HumanEval"}) is None


def test_summary_names_subsets_and_stand_ins():
    res = {n: dict(kind="categorical" if b else "generative", available=100, problems=40, correct=20,
                   **({"checked": 40, "valid": 39, "ended": 40, "free_correct": 18} if b else {"samples": 40, "ended": 30}))
           for n, b in CHATCORE_BASELINES.items()}
    res["WordProblems"] = dict(kind="generative", available=200, problems=200, correct=50, samples=200, ended=200)
    metrics, table, summary = summarize(res, "sft")
    assert metrics["MMLU problems"] == "40 of 100 (subset)"
    assert metrics[f"{WORD_PROBLEMS_LABEL} problems"] == "200 of 200" and WORD_PROBLEMS_LABEL in summary
    assert "WordProblems" not in summary and "GSM8K" in summary
    assert metrics["valid letter rate (all multiple choice)"] == pytest.approx(117 / 120)
    assert summary["ChatCORE"] == pytest.approx(chatcore({n: 0.5 for n in CHATCORE_BASELINES}))
    assert "subset" in metrics["ChatCORE problems"] and "ChatCORE" in table


def test_recorded_counts_reads_a_record_back():
    "recorded_counts recovers each task's (correct, problems) from a recorded evaluation, in CHANCE_LEVELS order."
    from nanochat_lib.chat_eval import CHANCE_LEVELS, recorded_counts
    res = {n: dict(kind="categorical" if b else "generative", available=100, problems=40, correct=k,
                   **({"checked": 0} if b else {"samples": 40, "ended": 30}))
           for k, (n, b) in enumerate(CHATCORE_BASELINES.items())}
    res["WordProblems"] = dict(kind="generative", available=200, problems=40, correct=31, samples=40, ended=40)
    metrics, table, summary = summarize(res, "mid")
    got = recorded_counts(dict(metrics=metrics))
    assert list(got) == [n for n in CHANCE_LEVELS if n in res]
    assert got == {n: (r["correct"], r["problems"]) for n, r in res.items()}
    assert recorded_counts(dict(metrics={})) == {}


def test_load_model_and_the_cli_path(run):
    rdir, tok = run
    model, tok2, meta = load_model(rdir, "sft")
    assert meta["step"] == 0 and model.config.vocab_size == tok2.vocab_size and not model.training
    with pytest.raises(FileNotFoundError, match="05_midtraining"):
        checkpoint_dir(rdir, "mid")
    with pytest.raises(FileNotFoundError, match="step 3"):
        checkpoint_dir(rdir, "sft", step=3)
    results = chat_eval(chat_cfg(chat_eval_word_problems=4), rdir, "sft", tasks=["WordProblems"])
    assert results["WordProblems"]["problems"] == 4
    rec = json.loads((rdir / "metrics" / "chat_eval_sft.json").read_text())
    assert rec["column"] == "SFT" and WORD_PROBLEMS_LABEL in rec["summary"] and "ChatCORE" not in rec["summary"]
    with pytest.raises(ValueError, match="unknown evaluation task"):
        chat_eval(chat_cfg(), rdir, "sft", tasks=["GSM9K"])


def _two_rank_worker(rank, port, tok_dir, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tok = Tokenizer.load(tok_dir)
    task = MultipleChoiceTask([dict(question=f"q{k}?", choices=["a", "b", "c", "d"], answer=k % 2) for k in range(9)])
    counts = evaluate_task(task, biased(tok, {"B": 5.0}), engine_saying(tok, "B"), tok, {**SETTINGS, "letter_checks": 5},
                           rank=rank, world_size=2)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(counts))
    dist.destroy_process_group()


def test_two_ranks_split_the_problems_and_sum_the_counts(run, tmp_path):
    import socket, torch.multiprocessing as mp
    rdir, _ = run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, rdir / "tokenizer", tmp_path), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1]                                       # every rank ends with the totals
    assert (got[0]["problems"], got[0]["correct"], got[0]["checked"], got[0]["valid"]) == (9, 4, 5, 5)


def test_wilson_interval_known_values():
    from nanochat_lib.chat_eval import wilson_interval
    assert wilson_interval(5, 10) == pytest.approx((0.236590, 0.763410), abs=1e-6)      # published: 0.2366, 0.7634
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277540), abs=1e-6) and wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] == pytest.approx(0.722460, abs=1e-6)
    assert wilson_interval(12, 40) == pytest.approx((0.180747, 0.454303), abs=1e-6)
    # the other closed form: (2k + z² ± z·sqrt(z² + 4k(n-k)/n)) / (2(n + z²))
    import math
    for k, n in ((3, 7), (1, 200), (150, 200)):
        z = 1.96
        root = z * math.sqrt(z * z + 4 * k * (n - k) / n)
        assert wilson_interval(k, n) == pytest.approx(((2 * k + z * z - root) / (2 * (n + z * z)),
                                                       (2 * k + z * z + root) / (2 * (n + z * z))), abs=1e-12)
    # z = 0: the interval is the point estimate
    assert wilson_interval(3, 7, z=0.0) == pytest.approx((3 / 7, 3 / 7))
    for bad in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError, match="0 <= k <= n"):
            wilson_interval(*bad)


def test_paired_intervals_on_known_data():
    import math
    from nanochat_lib.chat_eval import paired_bootstrap, paired_difference
    r = paired_difference([0, 0, 0, 0], [0, 0, 1, 1])
    se = math.sqrt(1 / 3) / 2
    assert (r["diff"], r["problems"]) == (0.5, 4) and r["se"] == pytest.approx(se)
    assert (r["low"], r["high"]) == pytest.approx((0.5 - 1.96 * se, 0.5 + 1.96 * se))
    same = paired_difference([0.25, 0.5, 0.75], [0.5, 0.75, 1.0])      # every problem moves by exactly 0.25
    assert (same["low"], same["diff"], same["high"]) == pytest.approx((0.25, 0.25, 0.25))
    # bootstrap of differences 0 and 1: means 0, 0.5, 1 with chances 1/4, 1/2, 1/4
    b = paired_bootstrap([0, 0], [0, 1], reps=4000, seed=1)
    assert (b["low"], b["diff"], b["high"]) == (0.0, 0.5, 1.0)
    assert paired_bootstrap([0.1] * 5, [0.3] * 5)["low"] == pytest.approx(0.2)
    # seeded: the same numbers twice; and close to the normal interval on a large sample
    g = torch.Generator().manual_seed(0)
    before, after = torch.rand(400, generator=g), torch.rand(400, generator=g) + 0.05
    b1, b2 = paired_bootstrap(before, after, seed=3), paired_bootstrap(before, after, seed=3)
    assert b1 == b2
    n = paired_difference(before, after)
    assert b1["low"] == pytest.approx(n["low"], abs=0.01) and b1["high"] == pytest.approx(n["high"], abs=0.01)
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1], [1])


def test_summary_carries_intervals_and_chance():
    from nanochat_lib.chat_eval import CHANCE_LEVELS
    res = {"MMLU": dict(kind="categorical", available=100, problems=40, correct=12, checked=0, valid=0, ended=0,
                        free_correct=0),
           "WordProblems": dict(kind="generative", available=200, problems=10, correct=5, samples=10, ended=10)}
    metrics, table, summary = summarize(res, "sft")
    assert metrics["MMLU 95% interval"] == "[0.18, 0.45]" and metrics["MMLU chance"] == 0.25
    assert metrics[f"{WORD_PROBLEMS_LABEL} 95% interval"] == "[0.24, 0.76]" and metrics[f"{WORD_PROBLEMS_LABEL} chance"] == 0.0
    assert "| MMLU | 0.3000 | [0.18, 0.45] | 0.25 | 12 / 40 | 100 |" in table
    assert set(CHANCE_LEVELS) == set(CHATCORE_BASELINES) | {"WordProblems"}
    assert all(CHANCE_LEVELS[k] == v for k, v in CHATCORE_BASELINES.items())


def test_show_solutions_prints_the_calculator_call(run, capsys):
    from nanochat_lib.chat_eval import show_solutions
    from nanochat_lib.tasks import GSM8KTask
    _, tok = run
    sp = tok.encode_special
    task = GSM8KTask([dict(question="Six boxes hold 7 pens each. How many pens?", answer="6*7=<<6*7=42>>42\n#### 42"),
                      dict(question="Two bags of 5 apples. How many apples?", answer="2*5=<<2*5=10>>10\n#### 10")])
    # the model writes the call; the engine forces <|output_start|>42<|output_end|> (the script's 0s stand in for them)
    script = [sp("<|python_start|>"), *tok.encode("6*7"), sp("<|python_end|>"), *[0] * (2 + len(tok.encode("42"))),
              *tok.encode(" so\n#### 42"), sp("<|assistant_end|>")]
    shown = show_solutions(Engine(ScriptedModel([script], tok.vocab_size), tok), tok, task, solved=1, failed=1)
    assert [(s["index"], s["correct"], s["calls"], s["outputs"], s["answer"]) for s in shown] == \
        [(0, True, ["6*7"], ["42"], "42"), (1, False, ["6*7"], ["42"], "42")]
    out = capsys.readouterr().out
    assert "[solved] problem 0: Six boxes" in out and "calculator: 6*7 -> 42" in out and "[FAILED] problem 1" in out
    assert "answer: 42 (reference 10)" in out
