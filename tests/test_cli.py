"""The terminal chat: sessions and history, slash commands, the loop, and `python -m nanochat_lib.cli chat` on a tiny
checkpoint (one-shot -p, and interactive on piped stdin). Rule-driven stand-in models (servekit) make replies exact."""
import os, subprocess, sys
from pathlib import Path

import pytest
import torch

from chatkit import make_run
from servekit import EchoModel
from nanochat_lib.cli import ChatSession, Quit, chat_loop, for_terminal, run_command
from nanochat_lib.engine import Engine
from nanochat_lib.model_io import load_model
from nanochat_lib.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = Tokenizer.from_merges([])


def session(**kw):
    return ChatSession(Engine(EchoModel(TOK, sequence_len=kw.pop("sequence_len", 4096)), TOK), **kw)


def test_say_streams_the_reply_and_keeps_the_history():
    s, out = session(), []
    assert s.say("héllo 世界 👋", out.append) == "héllo 世界 👋"
    assert "".join(out) == "héllo 世界 👋" and "👋" in out and "\ufffd" not in "".join(out)
    assert s.say("second", out.append) == "second"
    assert s.messages == [{"role": "user", "content": "héllo 世界 👋"}, {"role": "assistant", "content": "héllo 世界 👋"},
                          {"role": "user", "content": "second"}, {"role": "assistant", "content": "second"}]


def test_tool_calls_show_as_calc_brackets():
    s, out = session(), []
    reply = s.say("calc: 6*7", out.append)
    assert reply == "<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|> done"
    assert "".join(out) == "[calc 6*7 = 42] done" == for_terminal(reply)


def test_commands_change_settings_and_refuse_bad_values():
    s = session(temperature=0.8, top_k=50)
    s.say("hi")
    assert run_command(s, "/clear") == "(new conversation)" and s.messages == []
    assert run_command(s, "/temperature 0.3") == "temperature = 0.3" and s.temperature == 0.3
    assert run_command(s, "/temperature") == "temperature = 0.3"
    for bad in ("/temperature hot", "/temperature -1", "/temperature 3"):
        assert run_command(s, bad).startswith("error") and s.temperature == 0.3
    assert run_command(s, "/topk 7") == "top-k = 7" and s.top_k == 7
    assert run_command(s, "/topk 0") == "top-k = off" and s.top_k == 0
    for bad in ("/topk x", "/topk -2", "/topk 1.5", f"/topk {TOK.vocab_size + 1}"):
        assert run_command(s, bad).startswith("error") and s.top_k == 0
    assert "/clear" in run_command(s, "/help") and run_command(s, "/what").startswith("unknown command")
    with pytest.raises(Quit): run_command(s, "/quit")


def test_loop_runs_a_scripted_conversation():
    s, lines, out = session(), iter(["hello", "", "/topk 3", "again", "/clear", "after clear", "/quit", "never"]), []
    chat_loop(s, read=lambda prompt: next(lines), write=out.append)
    text = "".join(out)
    assert "nanochat> hello\n" in text and "top-k = 3\n" in text and "nanochat> again\n" in text
    assert "(new conversation)" in text and s.messages[0]["content"] == "after clear" and len(s.messages) == 2
    assert next(lines) == "never"                                         # /quit stopped reading


def test_loop_ends_at_end_of_input_and_explains_a_full_context():
    s, out = session(sequence_len=24), []
    lines = iter(["a" * 30])
    def read(prompt):
        try: return next(lines)
        except StopIteration: raise EOFError
    chat_loop(s, read=read, write=out.append)
    assert "error: the conversation is" in "".join(out) and "new chat" in "".join(out)


def cli_env(runs):
    return {**os.environ, "NANOCHAT_RUNS": str(runs), "OMP_NUM_THREADS": "1"}


def test_one_shot_prompt_prints_the_greedy_reply(runs_tmp):
    rdir = make_run(runs_tmp/"clirun", phase="sft", vocab_size=300)
    p = subprocess.run([sys.executable, "-m", "nanochat_lib.cli", "chat", "--run", "clirun", "-i", "sft",
                        "-p", "Hi there", "-t", "0", "--max-tokens", "12", "--set", "device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, env=cli_env(runs_tmp), timeout=120)
    assert p.returncode == 0, p.stderr
    model, tok, _ = load_model(rdir, "sft", "cpu")
    engine = Engine(model, tok)
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "Hi there"}]})
    expected = "".join(engine.stream_text(prompt, max_tokens=12, temperature=0))
    assert p.stdout == expected.replace("<|python_start|>", "[calc ").replace("<|python_end|>", "").replace(
        "<|output_start|>", " = ").replace("<|output_end|>", "]") + "\n"


def test_interactive_chat_on_piped_stdin(runs_tmp):
    make_run(runs_tmp/"clirun", phase="sft", vocab_size=300)
    p = subprocess.run([sys.executable, "-m", "nanochat_lib.cli", "chat", "--max-tokens", "5", "--set", "device=cpu"],
                       input="hello\n/temperature 0\n/topk 4\n/clear\nbye\n", cwd=ROOT, capture_output=True,
                       text=True, env=cli_env(runs_tmp), timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "sft checkpoint of run clirun" in out                          # no --run: the latest run
    assert out.count("nanochat> ") == 2 and "temperature = 0.0" in out and "top-k = 4" in out
    assert "(new conversation)" in out


def test_cli_errors_are_clear(runs_tmp):
    p = subprocess.run([sys.executable, "-m", "nanochat_lib.cli", "chat", "-p", "x"], cwd=ROOT, capture_output=True,
                       text=True, env=cli_env(runs_tmp), timeout=60)
    assert p.returncode != 0 and "no run in" in p.stderr
    p = subprocess.run([sys.executable, "-m", "nanochat_lib.cli", "chat", "-t", "5", "-p", "x"], cwd=ROOT,
                       capture_output=True, text=True, env=cli_env(runs_tmp), timeout=60)
    assert p.returncode != 0 and "--temperature: must be in" in p.stderr


def test_bad_configuration_is_one_line_on_stderr(runs_tmp, capsys):
    from nanochat_lib import cli
    cases = [(["--profile", "nope"], "nope"), (["--set", "no_equals_sign"], "--set"),
             (["--set", "serve_temperature=hot"], "serve_temperature"), (["-k", "-1"], "--top-k"),
             (["--max-tokens", "0"], "--max-tokens"), (["-t", "nan"], "--temperature"), ([], "no run in")]
    if not torch.cuda.is_available(): cases.append((["--set", "device=cuda"], "device"))
    for args, named in cases:                        # in this process: what main raises is what python prints
        with pytest.raises(SystemExit) as e: cli.main(["chat", "-p", "x", *args])
        msg = capsys.readouterr().err
        assert e.value.code == 2 and msg.startswith("error: ") and msg.count("\n") == 1 and named in msg, (args, msg)
    p = subprocess.run([sys.executable, "-m", "nanochat_lib.cli", "chat", "-p", "x", "--profile", "nope"], cwd=ROOT,
                       capture_output=True, text=True, env=cli_env(runs_tmp), timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "nope" in p.stderr and p.stderr.count("\n") == 1
