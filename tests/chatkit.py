"Chat runs made in code for the mid-training, SFT and chat-eval tests: a tokenizer, a tiny model checkpoint, conversations."
from pathlib import Path
import pytest
import torch
from nanochat_lib.checkpoint import save_checkpoint
from nanochat_lib.core import load_profile
from nanochat_lib.model import GPTConfig, build_model
from nanochat_lib.task_gen import IdentityTask, MCPracticeTask, WordProblemTask
from nanochat_lib.tokenizer import Tokenizer


def conversations(n_mc=40, n_wp=20, n_id=10, seed=0) -> list:
    "Generated conversations (no downloads): multiple choice, word problems with calculator calls, identity chats."
    return list(MCPracticeTask(n_mc, seed=seed)) + list(WordProblemTask(n_wp, seed=seed)) + list(IdentityTask(n_id, seed=seed))


def conversation_text(conv) -> str:
    parts = []
    for m in conv["messages"]:
        c = m["content"]
        parts.append(c if isinstance(c, str) else "".join(p["text"] for p in c))
    return "\n".join(parts)


def make_run(root: Path, phase: str = "base", vocab_size: int = 512, seq_len: int = 128, n_layer: int = 2,
             n_embd: int = 64, seed: int = 0) -> Path:
    "A run folder with a tokenizer trained on generated chats and a randomly initialised checkpoint of `phase`."
    rdir = Path(root)
    texts = [conversation_text(c) for c in conversations(200, 100, 50, seed=1)]
    tok = Tokenizer.train(texts, vocab_size)
    tok.save(rdir / "tokenizer")
    torch.manual_seed(seed)
    model = build_model(GPTConfig(sequence_len=seq_len, vocab_size=tok.vocab_size, n_layer=n_layer, n_head=2,
                                  n_kv_head=2, n_embd=n_embd))
    save_checkpoint(rdir / "checkpoints" / phase, 0, model, meta=dict(phase=phase, model_config=vars(model.config)))
    return rdir


def chat_cfg(**kw) -> dict:
    "The tiny profile shrunk to test size."
    # learning rates pinned here so tuning the tiny profile cannot change what these tests check
    small = dict(device="cpu", compile=False, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, max_seq_len=128, device_batch_size=4, total_batch_size=512, mid_total_batch_size=512,
                 mid_num_iterations=8, mid_eval_every=0, mid_buffer_size=16, mid_warmdown_ratio=0.5,
                 sft_num_iterations=8, sft_device_batch_size=4, sft_examples_per_step=8, sft_lr_frac=0.5,
                 sft_eval_every=0, chat_val_examples=16, save_every=0, keep_checkpoints=2,
                 chat_eval_max_problems=0, chat_eval_max_tokens=16, chat_eval_letter_checks=0)
    return load_profile("tiny", {**small, **kw})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "One torch thread for these tiny models: threads buy nothing at this size, and cost a lot on a busy machine."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
