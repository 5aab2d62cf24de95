"nanochat_lib.chat_protocol: one marker table, requests, prompts, the reply parser and its events, model options."
import argparse, re, subprocess, sys
from pathlib import Path

import pytest

from servekit import EchoModel
from nanochat_lib import chat_protocol as cp
from nanochat_lib.core import load_profile
from nanochat_lib.engine import Engine, ScriptedModel
from nanochat_lib.tokenizer import PART_TYPES, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = Tokenizer.from_merges([])
sp = TOK.encode_special


def test_markers_come_from_the_tokenizer_table_only():
    assert cp.TOOL_PARTS == {s: (k, e) for k, (s, e, _) in PART_TYPES.items() if s}
    assert [p["type"] for p in cp.part_markers()] == ["python", "python_output"]
    js = cp.marker_pattern(until_end=True)
    assert re.fullmatch(js, "<|python_start|>1+") and not re.fullmatch(cp.marker_pattern(), "<|python_start|>1+")
    # no front end restates a marker: the literal tokens live in the tokenizer only
    for mod in ("chat_protocol", "server", "cli", "chat_ui"):
        text = (ROOT / "nanochat_lib" / f"{mod}.py").read_text()
        for p in cp.part_markers():
            assert p["open"] not in text and p["close"] not in text, (mod, p)


def test_the_chat_page_gets_the_pattern_from_the_table():
    from nanochat_lib.server import ServerThread, create_app
    import httpx
    with ServerThread(create_app([Engine(EchoModel(TOK), TOK)], "echo")) as srv:
        page = httpx.get(srv.url + "/").text
    assert "{{" not in page and re.escape("<|output_start|>").replace("\\", "\\\\") in page
    assert '["python", "python_output"]' in page


def test_cli_does_not_import_the_web_server():
    code = "import sys, nanochat_lib.cli; assert 'nanochat_lib.server' not in sys.modules and 'fastapi' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_limits_have_one_home():
    with pytest.raises(TypeError): cp.ServeLimits()                      # no defaults of its own
    with pytest.raises(TypeError): cp.ChatRequest(messages=[])
    cfg = load_profile()
    assert cp.default_limits() == cp.ServeLimits.from_cfg(cfg) and cp.default_limits().temperature == cfg["serve_temperature"]
    r = cp.parse_chat_request({"messages": [{"role": "user", "content": "hi"}]})
    assert (r.temperature, r.top_k, r.max_tokens) == (cfg["serve_temperature"], cfg["serve_top_k"],
                                                      min(cfg["serve_default_max_tokens"], cfg["serve_max_tokens"]))
    with pytest.raises(ValueError, match="serve_max_chars: missing"):
        cp.ServeLimits.from_cfg({k: v for k, v in cfg.items() if k != "serve_max_chars"})


def test_reply_events_parts_and_wire_text_agree():
    script = (TOK.encode("é ") + [sp("<|python_start|>")] + TOK.encode("6*7") + [sp("<|python_end|>"), sp("<|output_start|>")]
              + TOK.encode("42") + [sp("<|output_end|>"), sp("<|user_end|>")] + TOK.encode("ok") + [sp("<|assistant_end|>")])
    rb, events = cp.ReplyBuilder(TOK), []
    for t in script: events += rb.step(t)
    assert rb.done and events[-1] == {"end": "<|assistant_end|>"} and rb.step(sp("<|bos|>")) == []
    parts = rb.finish()
    assert parts == [{"type": "text", "text": "é "}, {"type": "python", "text": "6*7"},
                     {"type": "python_output", "text": "42"}, {"type": "text", "text": "ok"}]
    wire = cp.wire_text(events)
    assert wire == "é <|python_start|>6*7<|python_end|><|output_start|>42<|output_end|><|user_end|>ok"
    assert cp.assistant_parts_from_text(wire.replace("<|user_end|>", "")) == parts


def test_push_returns_only_part_text_and_a_special_token_flushes_pending_bytes():
    rb = cp.ReplyBuilder(TOK)
    b = "é".encode()
    assert rb.push(b[0]) == "" and rb.push(sp("<|python_start|>")) == "\ufffd"
    assert rb.parts == [{"type": "text", "text": "\ufffd"}, {"type": "python", "text": ""}]


def test_completion_events_stream_one_piece_per_token_markers_included():
    b = "é".encode()
    script = [b[0], sp("<|python_start|>"), *TOK.encode("1+1"), sp("<|user_start|>"), b[0], sp("<|assistant_end|>")]
    engine = Engine(ScriptedModel(script, TOK.vocab_size), TOK, tool=None)
    req = cp.ChatRequest(messages=[{"role": "user", "content": "x"}], temperature=0.0, top_k=0, max_tokens=50)
    events = list(cp.completion_events(engine, cp.prompt_ids(TOK, req.messages), req))
    texts = [e["text"] for e in events if "text" in e]
    # the server ends where the engine stops: <|user_start|> is streamed as text; pending bytes flush at the end
    assert texts == ["\ufffd<|python_start|>", "1", "+", "1", "<|user_start|>", "\ufffd"]
    assert events[-1] == {"finish": "stop", "completion_tokens": 7, "prompt_tokens": len(cp.prompt_ids(TOK, req.messages))}


def test_prompt_ids_take_parts_or_marker_text():
    parts = [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"}, {"type": "text", "text": "5."}]
    text = "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>5."
    msgs = lambda c: [{"role": "user", "content": "q"}, {"role": "assistant", "content": c}, {"role": "user", "content": "ok"}]
    assert cp.prompt_ids(TOK, msgs(parts)) == cp.prompt_ids(TOK, msgs(text))


def test_phase_flag_is_i_everywhere_and_the_old_name_says_so(capsys):
    ap = cp.add_model_arguments(argparse.ArgumentParser(prog="x"))
    assert ap.parse_args(["-i", "rl"]).phase == "rl" == ap.parse_args(["--phase", "rl"]).phase
    with pytest.raises(SystemExit): ap.parse_args(["--source", "sft"])
    assert "--source was renamed: use -i/--phase" in capsys.readouterr().err
