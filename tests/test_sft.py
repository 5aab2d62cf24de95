"SFT: padded one-conversation rows, rank shares, accumulation arithmetic, and a few steps that learn."
import json
import numpy as np
import pytest, torch
from nanochat_lib.checkpoint import latest_checkpoint, read_meta
from nanochat_lib.midtrain import conversation_example, pad_batch
from nanochat_lib.sft import ConversationStream, sft, sft_accumulation
from nanochat_lib.tokenizer import Tokenizer
from chatkit import chat_cfg, conversations, make_run, one_thread  # noqa: F401 (one_thread: an autouse fixture)


def test_padding_and_masking_by_hand():
    ex = [(np.array([9, 1, 2, 3, 4]), np.array([0, 0, 1, 1, 1])),
          (np.array([9, 5, 6]), np.array([0, 1, 0]))]
    x, y = pad_batch(ex, pad_id=9)
    assert x.tolist() == [[9, 1, 2, 3], [9, 5, 9, 9]]
    assert y.tolist() == [[-1, 2, 3, 4], [5, -1, -1, -1]]     # -1 where the mask is 0 and in the padding
    with pytest.raises(ValueError):
        pad_batch([], 0)


def test_padded_batches_of_rendered_conversations(tmp_path):
    tok = Tokenizer.load(make_run(tmp_path) / "tokenizer")
    ex = [conversation_example(tok, c, 129) for c in conversations(3, 2, 2)]
    x, y = pad_batch(ex, tok.bos_id)
    ended = 0
    assert x.shape == (len(ex), max(len(i) for i, _ in ex) - 1)
    for r, (ids, mask) in enumerate(ex):
        n = len(ids) - 1
        assert x[r, 0] == tok.bos_id and x[r, :n].tolist() == ids[:-1].tolist()
        assert (x[r, n:] == tok.bos_id).all() and (y[r, n:] == -1).all()
        assert [t for t in y[r].tolist() if t >= 0] == [int(t) for t, m in zip(ids[1:], mask[1:]) if m]
        if len(ids) < 129:                                                     # not cropped: the turn's end is trained on
            ended += 1
            assert y[r, n - 1] == tok.encode_special("<|assistant_end|>")
    assert ended > 0


def test_stream_shares_and_accumulation(tmp_path):
    tok = Tokenizer.load(make_run(tmp_path) / "tokenizer")
    convs = conversations(5, 3, 2)
    streams = [ConversationStream(convs, tok, 129, rank=r, world_size=4) for r in range(4)]
    assert sorted(p for s in streams for p in s.positions) == list(range(10))
    s = streams[0]; a = s.take(3); b = s.take(1)                               # rank 0 has 3: the 4th wraps
    assert b[0][0].tolist() == a[0][0].tolist() and s.epochs == 4 / 3
    assert sft_accumulation(32, 4, 8) == 1 and sft_accumulation(32, 4, 1) == 8
    with pytest.raises(ValueError, match="multiple"):
        sft_accumulation(30, 4, 2)


def test_a_few_steps_reduce_the_loss(tmp_path):
    rdir = make_run(tmp_path, phase="mid")
    train, val = conversations(60, 30, 10), conversations(10, 6, 4, seed=7)
    s = sft(chat_cfg(sft_lr_frac=1.0), rdir, train_tasks=train, val_tasks=val)
    assert s["steps"] == 8 and s["grad_accum_steps"] == 2 and s["conversations"] == 64
    assert s["val_loss"] < s["val_loss_start"] - 0.2
    meta = read_meta(latest_checkpoint(rdir / "checkpoints" / "sft"))
    assert meta["step"] == 8 and meta["source"] == {"phase": "mid", "step": 0} and "model_config" in meta
    recs = [json.loads(l) for l in (rdir / "metrics" / "sft_train.jsonl").read_text().splitlines()]
    lrs = [r["lr_mult"] for r in recs if "lr_mult" in r]
    assert lrs == pytest.approx([1 - k / 8 for k in range(8)])                # linear from 1 towards 0


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    rdir = make_run(tmp_path, phase="mid")
    train, val = conversations(30, 10, 4), conversations(6, 4, 2, seed=7)
    cfg = chat_cfg(sft_num_iterations=6)
    sft(cfg, rdir, train_tasks=train, val_tasks=val)
    log = rdir / "metrics" / "sft_train.jsonl"
    straight = [json.loads(l) for l in log.read_text().splitlines()]
    import shutil; shutil.rmtree(rdir / "checkpoints" / "sft")
    sft(cfg, rdir, train_tasks=train, val_tasks=val, stop_at=3)
    assert read_meta(latest_checkpoint(rdir / "checkpoints" / "sft"))["step"] == 3
    sft(cfg, rdir, train_tasks=train, val_tasks=val, resume=True)
    again = [json.loads(l) for l in log.read_text().splitlines()]
    assert [r.get("loss") for r in again] == pytest.approx([r.get("loss") for r in straight])
    assert again[-1]["val_loss"] == pytest.approx(straight[-1]["val_loss"])


def test_stream_skips_conversations_cropped_before_the_answer(tmp_path):
    tok = Tokenizer.load(make_run(tmp_path) / "tokenizer")
    long_question = dict(messages=[dict(role="user", content="why " * 400), dict(role="assistant", content="because")])
    s = ConversationStream([long_question] + conversations(3, 0, 0), tok, 65)
    got = s.take(3)
    assert s.cursor == 4 and all(m[1:].any() for _, m in got)
    with pytest.raises(ValueError, match="train on"):
        ConversationStream([long_question], tok, 65).take(1)


def test_greedy_replies_match_the_engine_one_prompt_at_a_time(tmp_path):
    from nanochat_lib.chat_eval import sample_completions
    from nanochat_lib.engine import Engine, random_gpt
    from nanochat_lib.model import GPTConfig
    from nanochat_lib.sft import greedy_replies
    tok = Tokenizer.load(make_run(tmp_path) / "tokenizer")
    model = random_gpt(GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=64), seed=3)
    engine = Engine(model, tok)
    prompts = [tok.render_for_completion(c) for c in conversations(2, 2, 1, seed=5)]
    assert len({len(p) for p in prompts}) > 1                                     # different lengths: left padding is used
    got = greedy_replies(engine, prompts, 12)
    assert got == [sample_completions(engine, p, 1, max_tokens=12, temperature=0.0)[0] for p in prompts]
    assert all(len(ids) <= 12 and isinstance(ended, bool) for ids, ended in got)
    with pytest.raises(ValueError, match="rotary"):
        greedy_replies(engine, prompts, 10 * 128)
