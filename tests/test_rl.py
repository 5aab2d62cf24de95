"RL: advantage and loss arithmetic, masks of prompts and forced tokens, pass@k, a toy that learns, the trainer end to end."
import itertools, json, math
import pytest, torch
from nanochat_lib.engine import Engine, ScriptedModel, random_gpt
from nanochat_lib.midtrain import pad_batch
from nanochat_lib.model import GPTConfig
from nanochat_lib.optim import make_optimizers
from nanochat_lib.model_io import load_model
from nanochat_lib.rl import (Completion, evaluate_pass_k, group_advantages, pass_at_k, pg_loss, rl, rl_rows, rl_update,
                             rollout, token_logprobs)
from nanochat_lib.task_gen import WordProblemTask
from nanochat_lib.tokenizer import Tokenizer
from chatkit import chat_cfg, make_run, one_thread  # noqa: F401 (one_thread: an autouse fixture)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.load(make_run(tmp_path_factory.mktemp("tok")) / "tokenizer")


def test_group_advantages_by_hand():
    adv = group_advantages([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0.5, 1.5, 1, 1]])
    assert adv.tolist() == [[0.75, -0.25, -0.25, -0.25], [0.25, 0.25, 0.25, -0.75], [0, 0, 0, 0], [-0.5, 0.5, 0, 0]]
    with pytest.raises(ValueError): group_advantages([1.0, 0.0])


def test_pg_loss_by_hand():
    logp = torch.tensor([[-9.0, -1.0, -2.0, -9.0], [-9.0, -0.5, -9.0, -9.0], [-3.0, -4.0, -5.0, -6.0]])
    targets = torch.tensor([[-1, 7, 8, -1], [-1, 3, -1, -1], [1, 2, -1, -1]])
    adv = torch.tensor([0.5, -1.0, 0.0])
    # trained-on tokens: (-1, -2) x 0.5, (-0.5) x -1, (-3, -4) x 0: five of them
    expected = -(0.5 * -3.0 + -1.0 * -0.5 + 0.0) / 5
    assert pg_loss(logp, targets, adv).item() == pytest.approx(expected, abs=1e-7)
    assert pg_loss(logp, targets, adv, num_tokens=10).item() == pytest.approx(expected / 2, abs=1e-7)
    # masked-out entries may hold anything: the loss does not see them
    noisy = torch.where(targets >= 0, logp, torch.full_like(logp, 123.0))
    assert pg_loss(noisy, targets, adv).item() == pytest.approx(expected, abs=1e-7)


def test_prompt_and_forced_tokens_carry_no_loss(tok):
    sp = tok.encode_special
    script = [sp("<|python_start|>"), *tok.encode("6*7"), sp("<|python_end|>"), 0, 0, 0, 0, *tok.encode(" #### 42"),
              sp("<|assistant_end|>")]
    eng = Engine(ScriptedModel(script, tok.vocab_size), tok)
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "What is 6 times 7?"}]})
    (c,) = rollout(eng, prompt, 1, max_tokens=40)
    forced = [t for t, m in zip(c.ids, c.mask) if m == 0]
    assert tok.decode(forced) == "<|output_start|>42<|output_end|>"
    assert c.ended and c.ids[-1] == sp("<|assistant_end|>") and c.mask[-1] == 1 and c.answer_ids == c.ids[:-1]
    rows = rl_rows(prompt, [c])
    x, y = pad_batch(rows + [(prompt + c.ids[:3], [0] * len(prompt) + [1, 1, 1])], tok.bos_id)
    trained = (y >= 0)
    assert [t for t in y[0].tolist() if t >= 0] == [t for t, m in zip(c.ids, c.mask) if m]     # sampled tokens only
    assert not trained[:, :len(prompt) - 1].any()                                              # never the prompt

    # Through a model: the gradient w.r.t. the logits is zero exactly where the target is masked out, and the
    # model's own loss path (token_logprobs) gives the same loss and parameter gradients as one that only looks
    # at the trained-on positions.
    model = random_gpt(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    adv = torch.tensor([0.7, -0.3])
    loss = pg_loss(token_logprobs(model, x, y), y, adv)
    loss.backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(x)
    logits.retain_grad()
    picked = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    manual = -(picked[trained] * adv[:, None].expand_as(y)[trained]).sum() / trained.sum()
    manual.backward()
    assert manual.item() == pytest.approx(loss.item(), rel=1e-5)
    assert (logits.grad[~trained] == 0).all() and (logits.grad[trained].abs().sum(-1) > 0).all()
    for a, p in zip(g1, model.parameters()): torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 8, 1) == 1.0 and pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)                     # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)                     # 1 - C(3,3)/C(5,3) = 1 - 1/10
    for n, c, k in [(6, 2, 3), (7, 1, 4), (8, 3, 2)]:                   # = the share of k-subsets with a right answer
        right = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(right, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError): pass_at_k(4, 5, 1)
    with pytest.raises(ValueError): pass_at_k(4, 1, 5)


def test_evaluate_pass_k_counts_right_answers(tok):
    task = WordProblemTask(3, split="test")
    answers = [task[i]["answer"] for i in range(3)]
    # a scripted model that always answers problem 0's number: right on problem 0 only (when the numbers differ)
    script = tok.encode(f"#### {answers[0]}") + [tok.encode_special("<|assistant_end|>")]
    eng = Engine(ScriptedModel(script, tok.vocab_size), tok)
    r = evaluate_pass_k(eng, tok, task, 4, max_tokens=20, temperature=1.0)
    right = sum(a == answers[0] for a in answers)
    assert r["problems"] == 3 and r["ended"] == 1.0
    assert r["pass_at_k"] == pytest.approx([right / 3] * 4)


def test_toy_rl_raises_the_mean_reward(tok):
    "A random tiny GPT learns that the first token should be one it rarely picked at first."
    torch.manual_seed(0)
    model = random_gpt(GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32), seed=1)
    engine = Engine(model, tok, cast_weights=False)
    prompt = [tok.bos_id, *tok.encode("hello")]
    with torch.no_grad(): first = model(torch.tensor([prompt]))[0, -1].float().softmax(-1)
    target = int(first.topk(8).indices[5])
    opts = make_optimizers(model, dict(matrix_lr=0.02, embedding_lr=0.05, unembedding_lr=0.02, weight_decay=0.0))
    curve = []
    for step in range(16):
        out = rl_update(model, engine, opts, [prompt] * 4, lambda i, c: float(c.ids[0] == target),
                        [1000 * step + i for i in range(4)], num_samples=8, max_tokens=2, top_k=8, pad_id=tok.bos_id)
        assert out["rewards"].shape == (4, 8) and out["advantages"].sum().abs() < 1e-5
        curve.append(out["rewards"].mean().item())
    assert sum(curve[:4]) / 4 < 0.4 and sum(curve[-4:]) / 4 > sum(curve[:4]) / 4 + 0.3, curve


def _rl_cfg(**kw):
    return chat_cfg(rl_num_steps=2, rl_problems_per_step=2, rl_num_samples=3, rl_max_new_tokens=8, rl_top_k=20,
                    rl_device_batch_size=4, rl_eval_every=1, rl_eval_problems=3, rl_pass_k=2, rl_save_every=0,
                    rl_lr_frac=0.5, **kw)


class ParityReward(WordProblemTask):
    "Word problems rewarded by whether the answer has an odd number of characters: mixed rewards even from a random model."
    def reward(self, conversation, completion): return float(len(completion) % 2)


def test_rl_trainer_end_to_end_and_exact_resume(tmp_path):
    a = make_run(tmp_path / "a", phase="sft")
    summary = rl(_rl_cfg(), a)                            # the real reward: a random model never gets it right
    model, _, meta = load_model(a, "rl")                 # the rl checkpoint loads like every other phase
    assert meta["step"] == 2 and meta["phase"] == "rl" and meta["source"]["phase"] == "sft"
    assert summary["samples"] == 2 * 2 * 3 and summary["eval_problems"] == 3 and len(summary["pass_at_k_after"]) == 2
    assert [s for s, _ in summary["pass_curve"]] == [0, 1, 2] and [s for s, _ in summary["reward_curve"]] == [1, 2]
    recs = [json.loads(l) for l in (a / "metrics" / "rl_train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "pass_at_k" in r] == [0, 1, 2] and [r["step"] for r in recs if "reward" in r] == [1, 2]
    assert all(r == 0 for _, r in summary["reward_curve"])
    sft_model = load_model(a, "sft")[0]
    for p, q in zip(model.parameters(), sft_model.parameters()): torch.testing.assert_close(p, q, rtol=0, atol=0)  # no signal, no step

    # with mixed rewards the weights move; stopped after step 1 and resumed: the same weights as uninterrupted
    train = ParityReward(100, seed=1)
    full = rl(_rl_cfg(), a, train_task=train)
    assert 0 < sum(r for _, r in full["reward_curve"]) < 2
    moved = load_model(a, "rl")[0]
    assert any((p != q).any() for p, q in zip(moved.parameters(), sft_model.parameters()))
    b = make_run(tmp_path / "b", phase="sft")
    rl(_rl_cfg(), b, stop_at=1, train_task=train)
    rl(_rl_cfg(), b, resume=True, train_task=train)
    resumed = load_model(b, "rl")[0]
    for p, q in zip(moved.parameters(), resumed.parameters()): torch.testing.assert_close(p, q)
    recs_b = [json.loads(l) for l in (b / "metrics" / "rl_train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs_b if "pass_at_k" in r] == [0, 1, 2]
