"Bits per byte on hand-computed cases, sparse n-gram counts, the baselines, and bpb summed over 2 gloo ranks."
import math, random, socket
import pytest, torch
import torch.multiprocessing as mp
from nanochat_lib.corpus import write_shard
from nanochat_lib.tokenizer import Tokenizer
from nanochat_lib.dataloader import DataLoader
from nanochat_lib.loss_eval import (BigramLM, UnigramLM, K_GRID, count_bigrams, count_unigrams, evaluate_bpb, fit_bigram,
                                    fit_unigram, merge_counts, per_token_loss, sparse_counts)


class TableModel:
    "A fake model whose loss for target id i is losses[i] nats; returned flat or as (B, T)."
    def __init__(self, losses, flat=True): self.losses, self.flat = torch.as_tensor(losses, dtype=torch.float64), flat
    def __call__(self, inputs, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        out = torch.where(targets >= 0, self.losses[targets.clamp(min=0)], float("nan"))  # nan where ignored
        return out.reshape(-1) if self.flat else out


@pytest.mark.parametrize("flat", [True, False])
def test_bpb_hand_computed(flat):
    token_bytes = torch.tensor([0, 1, 2, 3, 0], dtype=torch.int32)  # 0 and 4 are special tokens
    model = TableModel([5.0, 0.5, 1.0, 2.0, 7.0], flat)
    x = torch.zeros(2, 4, dtype=torch.long)
    y1 = torch.tensor([[1, 2, 0, 3], [4, -1, 3, 1]])
    y2 = torch.tensor([[2, 2, -1, -1], [0, 0, 0, 0]])
    # counted targets: 1,2,3,3,1 then 2,2 -> nats 0.5+1+2+2+0.5 + 1+1 = 8, bytes 1+2+3+3+1 + 2+2 = 14
    bpb = evaluate_bpb(model, [(x, y1), (x, y2)], 2, token_bytes)
    assert bpb == pytest.approx(8 / (math.log(2) * 14), rel=1e-12)
    assert evaluate_bpb(model, [(x, y1), (x, y2)], 1, token_bytes) == pytest.approx(6 / (math.log(2) * 10))
    assert evaluate_bpb(model, iter([(x, y1), (x, y2)]), None, token_bytes) == pytest.approx(bpb)
    assert evaluate_bpb(model, [], 5, token_bytes) == float("inf")
    assert evaluate_bpb(model, [(x, torch.full((2, 4), -1))], 1, token_bytes) == float("inf")


def test_steps_does_not_pull_an_extra_batch():
    it = iter([(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))] * 3)
    evaluate_bpb(TableModel([1.0, 1.0]), it, 2, torch.tensor([1, 1]))
    assert len(list(it)) == 1


def test_bad_model_shape_is_explained():
    bad = lambda x, y, loss_reduction: torch.zeros(3)
    with pytest.raises(ValueError, match="one loss per target"):
        per_token_loss(bad, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_sparse_counts_match_dense():
    g = torch.Generator().manual_seed(0)
    V = 37
    x, y = torch.randint(V, (50, 30), generator=g), torch.randint(V, (50, 30), generator=g)
    y[y % 7 == 0] = -1
    keys, counts = count_bigrams(x, y, V, chunk=97)     # many chunks: exercises merge_counts
    dense = torch.zeros(V * V, dtype=torch.long)
    m = y >= 0
    dense.index_add_(0, (x[m] * V + y[m]), torch.ones(int(m.sum()), dtype=torch.long))
    assert torch.equal(keys, dense.nonzero().flatten()) and torch.equal(counts, dense[keys])
    assert torch.equal(count_unigrams(x, y, V), torch.bincount(y[m], minlength=V))
    a, b = sparse_counts(torch.tensor([5, 1, 5])), sparse_counts(torch.tensor([2, 5]))
    k, c = merge_counts(a, b)
    assert k.tolist() == [1, 2, 5] and c.tolist() == [1, 1, 3]


def test_ngram_models_are_normalised_and_follow_the_model_interface():
    V = 11
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(V, (8, 16), generator=g), torch.randint(V, (8, 16), generator=g)
    for model in (UnigramLM(count_unigrams(x, y, V), k=0.3), BigramLM(*count_bigrams(x, y, V), V, k=0.3)):
        for prev in range(V):
            p = model.logprob(torch.full((V,), prev), torch.arange(V)).exp().sum()
            assert p.item() == pytest.approx(1.0)
        yy = y.clone(); yy[0, :5] = -1
        per = model(x, yy, loss_reduction="none")
        assert per.shape == yy.shape and (per[0, :5] == 0).all()
        assert model(x, yy).item() == pytest.approx(per.sum().item() / (yy >= 0).sum().item())


STRUCTURED = ["the cat sat on the mat", "a dog ran under the log", "my bird sang in the tree", "one fish swam past the rock"]


def structured_docs(n, seed):
    rng = random.Random(seed)
    return [". ".join(rng.choice(STRUCTURED) for _ in range(rng.randint(2, 8))) + "." for _ in range(n)]


def test_bigram_beats_unigram_on_structured_text(tmp_path):
    tok = Tokenizer.train(structured_docs(50, 0), 280)
    for i, seed in enumerate((1, 2, 3)):
        write_shard(tmp_path / f"shard_{i:05d}.parquet", structured_docs(200, seed), row_group_docs=64)
    train = lambda: DataLoader(tmp_path, tok, B=8, T=64, split="train", buffer_docs=50)
    uni = fit_unigram(train(), tok.token_bytes, max_tokens=20_000)
    bi = fit_bigram(train(), tok.token_bytes, max_tokens=20_000)
    assert uni.k in K_GRID and bi.k in K_GRID and set(bi.k_scores) == set(K_GRID)
    assert uni.train_tokens >= 20_000 * 0.9
    val = list(DataLoader(tmp_path, tok, B=8, T=64, split="val", buffer_docs=50))
    u, b = evaluate_bpb(uni, val, None, tok.token_bytes), evaluate_bpb(bi, val, None, tok.token_bytes)
    assert b < 0.6 * u and u < 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, batches, token_bytes, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mine = batches[rank::world]
        out[rank] = evaluate_bpb(TableModel(torch.linspace(0.1, 3.0, 20)), mine, len(mine), token_bytes)
    finally:
        dist.destroy_process_group()


def test_bpb_all_reduced_over_two_gloo_ranks_equals_one_process():
    g = torch.Generator().manual_seed(2)
    batches = [(torch.zeros(2, 8, dtype=torch.long), torch.randint(-1, 20, (2, 8), generator=g)) for _ in range(5)]
    token_bytes = torch.randint(0, 4, (20,), generator=g, dtype=torch.int32)
    single = evaluate_bpb(TableModel(torch.linspace(0.1, 3.0, 20)), batches, 5, token_bytes)
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(_worker, args=(2, free_port(), batches, token_bytes, out), nprocs=2, join=True)
        results = dict(out)
    assert results[0] == pytest.approx(single, rel=1e-12) and results[1] == pytest.approx(single, rel=1e-12)


def test_chunked_loss_never_holds_more_logits_than_the_budget_and_gives_the_same_numbers():
    from nanochat_lib.loss_eval import LOGITS_BUDGET, chunked_loss, per_token_loss, rows_per_pass
    from nanochat_lib.model import GPTConfig, build_model
    torch.manual_seed(0)
    gpt = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)).eval()
    calls = []
    real_forward = gpt.forward
    gpt.forward = lambda x, y=None, loss_reduction="mean": calls.append(x.shape[0]) or real_forward(x, y, loss_reduction)
    x, y = torch.randint(0, 64, (7, 16)), torch.randint(0, 64, (7, 16))
    y[2, 3:] = -1                                                    # ignored targets stay ignored
    with torch.no_grad():
        whole = real_forward(x, y, loss_reduction="none").reshape(-1)
        torch.testing.assert_close(per_token_loss(gpt, x, y, max_logits=3 * 16 * 64), whole, rtol=1e-5, atol=1e-6)
        assert calls == [3, 3, 1]                                    # at most 3 rows x 16 positions x 64 logits per pass
        calls.clear()
        torch.testing.assert_close(chunked_loss(gpt, x, y, "sum", max_logits=16 * 64), whole.sum(), rtol=1e-5, atol=1e-4)
        assert calls == [1] * 7
        calls.clear()
        assert torch.equal(chunked_loss(gpt, x, y, "sum"), real_forward(x, y, loss_reduction="sum"))   # fits: one pass, same bits
        assert calls == [7]
    assert rows_per_pass(gpt, 16) == LOGITS_BUDGET // (16 * 64) and rows_per_pass(object(), 16) == 0
    assert rows_per_pass(type("M", (), {"vocab_size": 65536})(), 2048) == 1   # the d20 speedrun: one row per pass
