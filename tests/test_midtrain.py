"Mid-training: targets from masks, best-fit packing with padding, rank shares, resume, and a few steps that learn."
import json
import numpy as np
import pytest, torch
from nanochat_lib.checkpoint import latest_checkpoint, read_meta
from nanochat_lib.midtrain import (ChatPacker, best_fit_padded_row, chat_val_loss, conversation_example,
                                   estimate_epoch_steps, midtrain, pack_examples, rows_to_batch, shift_targets)
from nanochat_lib.dataloader import DocBuffer
from nanochat_lib.tokenizer import Tokenizer
from chatkit import chat_cfg, conversations, make_run, one_thread  # noqa: F401 (one_thread: an autouse fixture)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rdir = make_run(tmp_path_factory.mktemp("mid"))
    return rdir, Tokenizer.load(rdir / "tokenizer")


def test_shift_targets_keeps_only_trained_on_tokens():
    x, y = shift_targets([1, 5, 6, 7, 8], [0, 0, 1, 1, 0])
    assert x.tolist() == [1, 5, 6, 7] and y.tolist() == [-1, 6, 7, -1]
    with pytest.raises(ValueError, match="same shape"):
        shift_targets([1, 2], [0])


def test_packed_rows_are_bos_aligned_whole_and_masked(run):
    _, tok = run
    row_len = 129
    examples = [conversation_example(tok, c, row_len) for c in conversations(30, 20, 10)]
    rows = pack_examples(examples, row_len, buffer_size=16)
    placed = [i for r in rows for _, (i, _) in r]
    assert sorted(placed) == list(range(len(examples)))                       # every conversation exactly once
    for r in rows:
        assert sum(len(p) for p, _ in r) <= row_len
        for piece, (i, _) in r:
            assert len(piece) == len(examples[i][0])                          # never cut
    inputs, targets = rows_to_batch(rows, row_len, tok.bos_id)
    assert inputs.shape == (len(rows), row_len - 1)
    assert (inputs[:, 0] == tok.bos_id).all()                                 # every row starts a conversation
    assert int((targets >= 0).sum()) == sum(int(m[1:].sum()) for _, m in examples)
    for r, pieces in enumerate(rows):                                         # the padding: BOS in, -1 out
        used = sum(len(p) for p, _ in pieces)
        assert (inputs[r, used:] == tok.bos_id).all() and (targets[r, used - 1:] == -1).all()
        off = 0
        for piece, (i, mask) in pieces:                                      # targets follow each conversation's mask
            want = np.where(mask[1:] == 1, piece[1:], -1)
            assert targets[r, off:off + len(piece) - 1].tolist() == want.tolist()
            off += len(piece)


def test_too_long_conversation_is_a_clear_error():
    buf = DocBuffer(); buf.add(np.arange(20), (0, np.ones(20)))
    with pytest.raises(ValueError, match="longer than a row"):
        best_fit_padded_row(buf, 10)


def test_ranks_take_disjoint_conversations_and_resume_exactly(run):
    _, tok = run
    convs = conversations(20, 10, 6)
    packers = [ChatPacker(convs, tok, 2, 128, rank=r, world_size=3, buffer_size=6) for r in range(3)]
    shares = [set(p.positions) for p in packers]
    assert set.union(*shares) == set(range(len(convs))) and sum(map(len, shares)) == len(convs)
    p = packers[1]
    next(p); state = p.state_dict()
    want = next(p)
    q = ChatPacker(convs, tok, 2, 128, rank=1, world_size=3, buffer_size=6)
    q.load_state_dict(state)
    got = next(q)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    with pytest.raises(ValueError, match="does not match"):
        ChatPacker(convs, tok, 4, 128, rank=1, world_size=3, buffer_size=6).load_state_dict(state)


def test_epoch_estimate_is_close(run):
    _, tok = run
    convs = conversations(60, 30, 10)
    est = estimate_epoch_steps(convs, tok, 129, rows_per_step=4, sample=50, buffer_size=16)
    exact = len(pack_examples([conversation_example(tok, c, 129) for c in convs], 129, 16))
    assert abs(est["steps_per_epoch"] - exact / 4) <= max(2, 0.3 * exact / 4)


def test_val_loss_ignores_masked_tokens(run):
    rdir, tok = run
    from nanochat_lib.model_io import load_model
    model, _, _ = load_model(rdir, "base")
    ex = [conversation_example(tok, c, 129) for c in conversations(4, 2, 2)]
    a = chat_val_loss(model, ex, 3, tok.bos_id)
    b = chat_val_loss(model, ex, 8, tok.bos_id)                                # batching does not change it
    assert a["tokens"] == sum(int(m[1:].sum()) for _, m in ex)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_few_steps_reduce_the_loss_and_resume_repeats_them(run):
    rdir, tok = run
    train, val = conversations(60, 30, 10), conversations(10, 6, 4, seed=7)
    cfg = chat_cfg()
    s = midtrain(cfg, rdir, train_tasks=train, val_tasks=val)
    assert s["steps"] == 8 and s["val_loss"] < s["val_loss_start"] - 0.5
    meta = read_meta(latest_checkpoint(rdir / "checkpoints" / "mid"))
    assert meta["step"] == 8 and meta["model_config"]["n_embd"] == 64 and meta["source"] == {"phase": "base", "step": 0}
    recs = [json.loads(l) for l in (rdir / "metrics" / "mid_train.jsonl").read_text().splitlines()]
    lrs = [r["lr_mult"] for r in recs if "lr_mult" in r]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == 1.0 and lrs[-1] < 0.5  # flat, then decaying; never rising
    straight = [r.get("loss") for r in recs]
    import shutil; shutil.rmtree(rdir / "checkpoints" / "mid")
    midtrain(cfg, rdir, train_tasks=train, val_tasks=val, stop_at=4)
    midtrain(cfg, rdir, train_tasks=train, val_tasks=val, resume=True)
    again = [json.loads(l).get("loss") for l in (rdir / "metrics" / "mid_train.jsonl").read_text().splitlines()]
    assert again == pytest.approx(straight)


def test_conversations_with_nothing_to_learn_are_skipped(run):
    _, tok = run
    long_question = dict(messages=[dict(role="user", content="why " * 400), dict(role="assistant", content="because")])
    convs = [long_question] + conversations(6, 0, 0)
    p = ChatPacker(convs, tok, 2, 64, buffer_size=4)
    x, y = next(p)
    assert p.stats["skipped"] == 1 and ((y >= 0).sum(1) > 0).all()           # every row has a target
    with pytest.raises(ValueError, match="nothing|no conversation|train on"):
        next(ChatPacker([long_question] * 3, tok, 2, 64, buffer_size=4))
