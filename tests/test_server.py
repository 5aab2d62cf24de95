"""The chat server: validation, the OpenAI API through the official client (whole and streamed), concurrent streams,
disconnects, the command line on a real tiny checkpoint, and the web page in headless Chromium.

Hermetic: uvicorn on 127.0.0.1 (a free port) in a thread or a subprocess; rule-driven stand-in models (servekit)
whose replies are known exactly, and a tiny random checkpoint for the command line.
"""
import contextlib, json, math, os, socket, subprocess, sys, threading, time
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

from browserkit import browser_page  # noqa: F401 (a fixture)
from chatkit import make_run
from servekit import EchoModel, expected_reply
from nanochat_lib.core import load_profile
from nanochat_lib.engine import Engine
from nanochat_lib.chat_protocol import (RequestError, ServeLimits, assistant_parts_from_text, latest_run,
                                        parse_chat_request, prompt_ids, resolve_run, serving_devices)
from nanochat_lib.server import ServerThread, create_app
from nanochat_lib.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = Tokenizer.from_merges([])
LIMITS = ServeLimits(max_messages=8, max_chars=400, max_tokens=2048, max_temperature=2.0, max_top_k=100,
                     temperature=0.0, top_k=50, default_max_tokens=256)
USER = [{"role": "user", "content": "hello"}]


def echo_engines(n=2, **kw):
    return [Engine(EchoModel(TOK, **kw), TOK) for _ in range(n)]


@pytest.fixture(scope="module")
def server():
    with ServerThread(create_app(echo_engines(2, delay=0.002), "echo", LIMITS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=20)


def wait_idle(url, timeout=5.0) -> dict:
    "/health once no worker is busy (the generation threads hand their workers back asynchronously)."
    t0 = time.time()
    while True:
        h = httpx.get(f"{url}/health").json()
        if h["busy"] == 0 or time.time() - t0 > timeout: return h
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------- validation

def test_parse_accepts_openai_shapes_and_applies_defaults():
    r = parse_chat_request({"model": "x", "messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                    {"type": "text", "text": "b"}]}],
                            "max_completion_tokens": 7, "seed": 3, "stream": True,
                            "stream_options": {"include_usage": True}}, LIMITS)
    assert r.messages[1] == {"role": "user", "content": "ab"} and r.max_tokens == 7 and r.seed == 3
    assert r.stream and r.include_usage and r.temperature == 0.0 and r.top_k == 50 and r.top_p is None
    d = parse_chat_request({"messages": USER}, LIMITS)
    assert (d.max_tokens, d.stream, d.seed) == (256, False, None)


BAD = [
    ("not a dict", [1, 2], None),
    ("no messages", {}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("too many messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 4
                           + [{"role": "user", "content": "c"}]}, "messages"),
    ("too many characters", {"messages": [{"role": "user", "content": "x" * 401}]}, "messages"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("roles out of order", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "messages[1].role"),
    ("system later", {"messages": USER + [{"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}]},
     "messages[2].role"),
    ("ends with assistant", {"messages": USER + [{"role": "assistant", "content": "b"}]}, "messages"),
    ("message without content", {"messages": [{"role": "user"}]}, "messages[0]"),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    ("temperature too high", {"messages": USER, "temperature": 2.5}, "temperature"),
    ("temperature negative", {"messages": USER, "temperature": -0.1}, "temperature"),
    ("temperature a string", {"messages": USER, "temperature": "hot"}, "temperature"),
    ("top_k too big", {"messages": USER, "top_k": 101}, "top_k"),
    ("top_k negative", {"messages": USER, "top_k": -1}, "top_k"),
    ("top_k fractional", {"messages": USER, "top_k": 2.5}, "top_k"),
    ("top_p zero", {"messages": USER, "top_p": 0}, "top_p"),
    ("max_tokens zero", {"messages": USER, "max_tokens": 0}, "max_tokens"),
    ("max_tokens too big", {"messages": USER, "max_tokens": 2049}, "max_tokens"),
    ("max_tokens bool", {"messages": USER, "max_tokens": True}, "max_tokens"),
    ("n > 1", {"messages": USER, "n": 2}, "n"),
    ("stream not bool", {"messages": USER, "stream": "yes"}, "stream"),
]


@pytest.mark.parametrize("name,body,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_refused_with_the_field_named(name, body, param):
    with pytest.raises(RequestError) as e: parse_chat_request(body, LIMITS)
    assert e.value.status == 400 and e.value.param == param and e.value.message


def test_bad_requests_get_400_json_over_http(server):
    served = wait_idle(server.url)["served"]
    for name, body, param in BAD:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert r.status_code == 400, name
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"], name
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert httpx.get(f"{server.url}/v1/chat/completions").status_code == 405
    assert httpx.get(f"{server.url}/nope").status_code == 404
    assert wait_idle(server.url)["served"] == served     # nothing above reached a worker


def test_a_conversation_longer_than_the_context_is_refused():
    engine = Engine(EchoModel(TOK, sequence_len=32), TOK)
    with ServerThread(create_app([engine], "short", LIMITS)) as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 40}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "abcdefghijklmnop"}],
                                                               "max_tokens": 1000}).json()
        # max_tokens is cut to the context left: 32 - 20 prompt tokens = 12 tokens of the 16-letter echo
        assert r["choices"][0]["finish_reason"] == "length" and r["choices"][0]["message"]["content"] == "abcdefghijkl"


def test_prompt_turns_streamed_tool_markers_back_into_special_tokens():
    text = "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>It is 5."
    assert assistant_parts_from_text(text) == [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
                                               {"type": "text", "text": "It is 5."}]
    ids = prompt_ids(TOK, [{"role": "user", "content": "<|python_start|> is text here"},
                           {"role": "assistant", "content": text}, {"role": "user", "content": "ok"}])
    sp = TOK.encode_special
    assert ids.count(sp("<|python_start|>")) == 1 and ids.count(sp("<|output_end|>")) == 1
    assert ids[0] == sp("<|bos|>") and ids[-1] == sp("<|assistant_start|>")
    assert TOK.decode(ids).endswith("<|user_start|>ok<|user_end|><|assistant_start|>")


# ------------------------------------------------------------------------------------------------ the OpenAI API

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["echo"]
    h = httpx.get(f"{server.url}/health").json()
    assert h["status"] == "ok" and h["model"] == "echo" and h["workers"] == 2 and h["devices"] == ["cpu", "cpu"]


def test_openai_client_whole_reply(client):
    r = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "Hello there!"}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == "Hello there!"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len("Hello there!") and r.usage.prompt_tokens == len(TOK.render_for_completion(
        {"messages": [{"role": "user", "content": "Hello there!"}]}))
    r = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "Hello there!"}], max_tokens=5)
    assert r.choices[0].message.content == "Hello" and r.choices[0].finish_reason == "length"


def test_openai_client_streamed_reply_with_usage(client):
    chunks = list(client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "stream me"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == "stream me" and len(content) == len("stream me")    # one piece per byte token
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"] and chunks[-1].usage.completion_tokens == 9 and not chunks[-1].choices
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_framing(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "ab"}], "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    objs = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert [o["choices"][0]["delta"] for o in objs] == [{"role": "assistant", "content": ""}, {"content": "a"},
                                                        {"content": "b"}, {}]
    assert [o["choices"][0]["finish_reason"] for o in objs] == [None, None, None, "stop"]
    assert all(o["object"] == "chat.completion.chunk" and o["model"] == "echo" for o in objs)


def test_streams_never_split_a_character(client):
    text = "héllo 👋 世界 🇫🇷!"                            # 2-, 3- and 4-byte characters, a flag of two code points
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": text}], stream=True) if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "👋" in pieces and "世" in pieces and "界" in pieces         # each arrives whole, in one piece


def test_tool_calls_stream_as_marker_text_with_the_forced_result(client):
    r = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "calc: 12*7"}])
    assert r.choices[0].message.content == expected_reply("calc: 12*7") == \
        "<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|> done"
    # the reply sent back as history becomes real tool tokens again, and the conversation goes on
    r2 = client.chat.completions.create(model="echo", messages=[
        {"role": "user", "content": "calc: 12*7"}, {"role": "assistant", "content": r.choices[0].message.content},
        {"role": "user", "content": "thanks"}])
    assert r2.choices[0].message.content == "thanks"


def test_simultaneous_streaming_clients_each_get_their_own_stream(server):
    texts = [f"client {i}: " + "abcdefghij"[i:] * 3 for i in range(6)]
    results, errors = {}, []

    def one(i):
        try:
            c = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
            pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": texts[i]}], stream=True) if ch.choices]
            results[i] = pieces
        except Exception as e: errors.append(e)

    before = httpx.get(f"{server.url}/health").json()["served"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads: t.start()
    for t in threads: t.join(60)
    assert not errors
    for i, t in enumerate(texts):
        assert "".join(results[i]) == t and len(results[i]) == len(t) + 2    # + the role and finish chunks
    h = wait_idle(server.url)
    assert h["served"] - before == 6 and h["busy"] == 0 and h["waiting"] == 0


def test_a_disconnected_client_frees_its_worker():
    model = EchoModel(TOK, delay=0.005, endless=True)
    with ServerThread(create_app([Engine(model, TOK)], "slow", LIMITS)) as srv:
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json={
                "messages": USER, "stream": True, "max_tokens": 2000}) as r:
            it = r.iter_lines()
            got = [next(it) for _ in range(6)]                   # a few chunks, then hang up mid-reply
            assert any('"x"' in g for g in got)
        h = wait_idle(srv.url, timeout=3)
        assert h["busy"] == 0
        n = model.forwards
        time.sleep(0.2)
        assert model.forwards == n < 400                            # stopped long before its 2000 tokens
        # the only worker serves the next request
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": USER, "max_tokens": 3}).json()
        assert r["choices"][0]["message"]["content"] == "xxx"


def test_a_client_leaving_a_whole_reply_frees_its_worker():
    model = EchoModel(TOK, delay=0.005, endless=True)
    with ServerThread(create_app([Engine(model, TOK)], "slow", LIMITS)) as srv:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": USER, "max_tokens": 2000}, timeout=0.3)
        h = wait_idle(srv.url, timeout=3)
        assert h["busy"] == 0 and model.forwards < 1000
        n = model.forwards
        time.sleep(0.2)
        assert model.forwards == n


def test_requests_queue_for_a_single_worker():
    with ServerThread(create_app([Engine(EchoModel(TOK, delay=0.002), TOK)], "one", LIMITS)) as srv:
        out = [None] * 4
        def one(i):
            out[i] = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                                json={"messages": [{"role": "user", "content": f"q{i}" * 5}]}).json()
        ts = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in ts: t.start()
        for t in ts: t.join(60)
        assert [o["choices"][0]["message"]["content"] for o in out] == [f"q{i}" * 5 for i in range(4)]
        assert wait_idle(srv.url)["served"] == 4


# ------------------------------------------------------------------------------------- runs and the command line

def test_latest_run_and_resolve_run(runs_tmp):
    with pytest.raises(FileNotFoundError, match="no run"): latest_run("sft")
    old = make_run(runs_tmp/"old", phase="sft", vocab_size=300)
    new = make_run(runs_tmp/"new", phase="sft", vocab_size=300)
    make_run(runs_tmp/"base_only", phase="base", vocab_size=300)
    t = time.time()
    for run, age in ((old, 100), (new, 10)):
        meta = next((run/"checkpoints"/"sft").glob("step_*"))/"meta.json"
        os.utime(meta, (t - age, t - age))
    assert latest_run("sft") == new and latest_run("base") == runs_tmp/"base_only"
    assert resolve_run(None, "sft") == new and resolve_run("old") == old and resolve_run(str(old)) == old
    with pytest.raises(FileNotFoundError, match="no run folder"): resolve_run("missing")
    with pytest.raises(ValueError, match="unknown phase"): latest_run("pretrain")


def test_serving_devices():
    assert serving_devices({**load_profile("tiny"), "serve_workers": 0}) == [torch.device("cpu")]
    assert serving_devices({**load_profile("tiny"), "serve_workers": 3}) == [torch.device("cpu")] * 3
    with pytest.raises(ValueError): serving_devices({**load_profile("tiny"), "serve_workers": -1})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_command_line_serves_a_checkpoint_to_the_openai_client(runs_tmp):
    make_run(runs_tmp/"tinyrun", phase="sft", vocab_size=300)
    port = free_port()
    env = {**os.environ, "NANOCHAT_RUNS": str(runs_tmp), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # no --run: the most recent run with an sft checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_lib.server", "-i", "sft", "--port", str(port),
                             "--set", "device=cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url, t0 = f"http://127.0.0.1:{port}", time.time()
        while True:
            try:
                h = httpx.get(f"{url}/health", timeout=1).json(); break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() - t0 < 60, "server did not come up"
                time.sleep(0.2)
        assert h["model"] == "nanochat-tinyrun-sft" and h["phase"] == "sft" and h["run"].endswith("tinyrun")
        c = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        msgs = [{"role": "user", "content": "What is 2+2?"}]
        whole = c.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=8)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="m", messages=msgs, temperature=0, max_tokens=8, stream=True) if ch.choices)
        assert whole.usage.completion_tokens >= 1 and streamed == whole.choices[0].message.content
        assert httpx.get(url + "/").text.startswith("<!doctype html>")
    finally:
        proc.terminate()
        proc.wait(10)


def test_command_line_explains_a_missing_run(runs_tmp):
    p = subprocess.run([sys.executable, "-m", "nanochat_lib.server", "--port", "1"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "NANOCHAT_RUNS": str(runs_tmp)})
    assert p.returncode != 0 and "no run in" in p.stderr and "sft checkpoint" in p.stderr


# ------------------------------------------------------------------------------------------------- the web page

def test_the_page_is_self_contained(server):
    html = httpx.get(server.url + "/").text
    assert "echo" in html and "<script" in html and "{{" not in html
    assert 'id="temperature" type="number" min="0" max="2.0" step="0.1" value="0.0"' in html   # the server's settings
    assert "src=" not in html and "href=" not in html and "@import" not in html     # nothing fetched from elsewhere


def test_chat_round_trip_in_chromium(server, browser_page):
    page = browser_page
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server.url) else None)
    page.goto(server.url + "/")
    page.fill("#input", "hi from chromium ✓")
    page.press("#input", "Enter")                                       # Enter sends
    page.wait_for_selector(".msg.assistant.done")
    assert page.inner_text(".msg.user") == "hi from chromium ✓"
    assert page.inner_text(".msg.assistant.done") == "hi from chromium ✓"
    # a second turn: the conversation so far goes with it; a tool call shows in boxes of its own
    page.fill("#input", "calc: 6*7")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant.done').length == 2")
    last = page.locator(".msg.assistant").nth(1)
    assert last.locator(".tool-call").inner_text() == "6*7" and last.locator(".tool-output").inner_text() == "42"
    assert last.inner_text().endswith(" done")
    assert page.locator(".msg").count() == 4 and page.locator(".msg.error").count() == 0
    page.click("#clear")                                                 # a new chat
    assert page.locator(".msg").count() == 0
    page.fill("#input", "again")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant.done")
    assert page.inner_text(".msg.assistant") == "again" and page.locator(".msg").count() == 2
    assert not outside and not page.js_errors


def test_page_shows_a_refused_request(server, browser_page):
    page = browser_page
    page.goto(server.url + "/")
    page.fill("#temperature", "9")                                       # out of range: the server says 400
    page.fill("#input", "hello")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.error")
    assert "temperature" in page.inner_text(".msg.error")
    assert not page.js_errors


# ------------------------------------------------------------------------- hostile input: never a 5xx, never early reads

from hypothesis import HealthCheck, given, settings, strategies as st
from openai import AuthenticationError
from nanochat_lib.model import sample_next_token, top_k_top_p
from nanochat_lib.server import (MAX_JSON_DEPTH, AccessPolicy, access_policy, check_port, host_name, json_depth,
                                 parse_json_body)

CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


def post_raw(url, raw: bytes, headers=JSON, **kw):
    return httpx.post(url + CHAT, content=raw, headers=headers, timeout=30, **kw)


@pytest.mark.parametrize("key,value", [("temperature", float("nan")), ("temperature", float("inf")),
                                       ("top_p", float("nan")), ("top_p", float("-inf")), ("top_k", float("inf")),
                                       ("max_tokens", float("nan")), ("seed", float("inf")), ("top_p", 1.5),
                                       ("seed", 2**64), ("top_k", 10**400)])
def test_sampling_numbers_must_be_finite_and_in_range(key, value):
    with pytest.raises(RequestError) as e: parse_chat_request({"messages": USER, key: value}, LIMITS)
    assert e.value.status == 400 and e.value.param == key and len(e.value.message) < 120


def test_non_finite_json_numbers_are_refused_over_http(server):
    for raw in (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
                b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}',
                b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}',
                b'{"messages": [{"role": "user", "content": "hi"}], "top_k": ' + b"9" * 5000 + b"}"):
        r = post_raw(server.url, raw)
        assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json", raw[-40:]


def test_a_tiny_top_p_or_temperature_keeps_the_best_candidate(server):
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    vals, ids = top_k_top_p(logits, None, 1e-46)                       # below float32's smallest number
    assert ids[0, 0] == 1 and torch.isfinite(vals).sum() == 1
    g = torch.Generator().manual_seed(0)
    for t in (5e-324, 1e-300, 1e-30):
        assert sample_next_token(logits, g, t).item() == 1                 # no inf - inf = NaN
        assert sample_next_token(logits, g, t, top_k=3, top_p=1e-46).item() == 1
    for body in ({"top_p": 1e-46}, {"temperature": 1e-300}, {"temperature": 5e-324, "top_p": 1e-46, "top_k": 1}):
        r = httpx.post(server.url + CHAT, json={"messages": [{"role": "user", "content": "still fine"}], **body})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "still fine", body


def test_json_depth_counts_brackets_outside_strings():
    assert json_depth(b"") == 0 and json_depth(b"1") == 0 and json_depth(b"[]") == 1
    assert json_depth(b'{"a": "]]]{{{[[[", "b": [{"c": []}]}') == 4
    assert json_depth(rb'["a\"[[[", [["\\"], [1]]]') == 3              # escaped quotes do not end a string
    assert json_depth(b'["unterminated [[[[') == 1
    deep = b"[" * 100_000 + b"]" * 100_000
    assert json_depth(deep) == 100_000
    with pytest.raises(RequestError) as e: parse_json_body(deep)
    assert e.value.code == "json_too_deep"
    ok = b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}'
    assert json_depth(ok) == 5 <= MAX_JSON_DEPTH and parse_json_body(ok)["messages"][0]["role"] == "user"


def test_deep_json_is_a_400_not_a_recursion_error(server):
    for raw in (b"[" * 200_000 + b"]" * 200_000, b'{"messages": ' + b"[" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000):
        r = post_raw(server.url, raw)
        assert r.status_code in (400, 413) and "error" in r.json()


def test_only_json_bodies_are_read(server):
    body = json.dumps({"messages": USER}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        r = post_raw(server.url, body, headers={"content-type": ctype} if ctype else {})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", ctype
    assert post_raw(server.url, body, headers={"content-type": "application/json; charset=utf-8"}).status_code == 200
    r = httpx.post(server.url + CHAT, data={"messages": "x"})                         # an HTML form
    assert r.status_code == 415


def _read_response(sock, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            got = sock.recv(65536)
            if not got: break
            data += got
    except (socket.timeout, ConnectionResetError): pass
    return data


def test_a_declared_huge_body_is_refused_before_it_is_sent(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {50 * 2**20}\r\n\r\n".encode() + b'{"messages": [')
        reply = _read_response(s, 10)                                  # the other 50 MB never come: no waiting for them
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]


def test_a_chunked_huge_body_is_cut_off_at_the_limit(server):
    chunk, sent, reply = b"[" + b" " * 65535, 0, b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
                  f"Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            while sent < 50 * 2**20:
                s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
                s.settimeout(0.001)
                with contextlib.suppress(socket.timeout, BlockingIOError): reply += s.recv(65536)
                s.settimeout(10)
                if reply: break
        except (BrokenPipeError, ConnectionResetError): pass
        reply += _read_response(s, 5)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    assert sent < LIMITS.max_body_bytes + 4 * 2**20                    # refused near the limit, not after 50 MB


def test_host_names_and_policies():
    assert host_name("127.0.0.1:8000") == "127.0.0.1" and host_name("[::1]:80") == "::1" and host_name("::1") == "::1"
    assert host_name("LocalHost.:8000") == "localhost" and host_name("") == ""
    assert access_policy("127.0.0.1").hosts == ("127.0.0.1", "localhost", "::1")
    assert "box.lan" in access_policy("box.lan").hosts and access_policy("0.0.0.0").hosts == ("*",)
    p = access_policy("0.0.0.0", allowed_hosts="chat.example.org, 10.0.0.5:8000", api_key="k")
    assert p.hosts == ("chat.example.org", "10.0.0.5") and p.api_key == "k"
    assert access_policy("127.0.0.1", api_key="").api_key is None
    assert check_port(0) == 0 and check_port(65535) == 65535
    for bad in (99999, -1, "80", True):
        with pytest.raises(ValueError, match="--port: must be a port number"): check_port(bad)


def test_foreign_hosts_and_origins_are_refused(server):
    port, served = server.port, wait_idle(server.url)["served"]
    ok = {"messages": USER}
    for headers, status, code in (({"host": "evil.example"}, 400, "host_not_allowed"),
                                  ({"host": f"attacker.test:{port}"}, 400, "host_not_allowed"),
                                  ({"origin": "https://evil.example"}, 403, "origin_not_allowed"),
                                  ({"origin": "null"}, 403, "origin_not_allowed"),
                                  ({"origin": f"http://127.0.0.1:{port + 1}"}, 403, "origin_not_allowed")):
        r = httpx.post(server.url + CHAT, json=ok, headers=headers)
        assert r.status_code == status and r.json()["error"]["code"] == code, headers
    assert httpx.get(server.url + "/", headers={"host": "rebound.example"}).status_code == 400
    assert wait_idle(server.url)["served"] == served                       # none of it reached a worker
    for headers in ({"origin": f"http://127.0.0.1:{port}"}, {"host": f"localhost:{port}", "origin": f"http://localhost:{port}"},
                    {"host": f"[::1]:{port}"}):
        assert httpx.post(server.url + CHAT, json=ok, headers=headers).status_code == 200, headers
    with ServerThread(create_app(echo_engines(1), "open", LIMITS, policy=access_policy(
            "0.0.0.0", allowed_origins="http://ui.example:3000"))) as srv:
        assert httpx.post(srv.url + CHAT, json=ok, headers={"host": "anything.example"}).status_code == 200
        assert httpx.post(srv.url + CHAT, json=ok, headers={"origin": "http://ui.example:3000"}).status_code == 200
        assert httpx.post(srv.url + CHAT, json=ok, headers={"origin": "http://ui.example:3001"}).status_code == 403


def test_errors_have_openai_shape_everywhere(server):
    for r in (httpx.get(server.url + "/nope"), httpx.get(server.url + CHAT)):
        err = r.json()["error"]
        assert r.status_code in (404, 405) and err["message"] and err["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def keyed_server():
    with ServerThread(create_app(echo_engines(1), "keyed", LIMITS, policy=AccessPolicy(api_key="sk-test-123"))) as srv:
        yield srv


def test_api_key_is_what_the_openai_client_sends(keyed_server):
    url = keyed_server.url
    good = OpenAI(base_url=f"{url}/v1", api_key="sk-test-123", max_retries=0, timeout=20)
    r = good.chat.completions.create(model="keyed", messages=[{"role": "user", "content": "with key"}])
    assert r.choices[0].message.content == "with key"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0, timeout=20).models.list()
    for headers in ({}, {"authorization": "sk-test-123"}, {"authorization": "Basic sk-test-123"},
                    {"authorization": "Bearer sk-test-12"}):
        r = httpx.post(url + CHAT, json={"messages": USER}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
    assert httpx.get(url + "/health").status_code == 401
    assert httpx.get(url + "/health", headers={"authorization": "Bearer sk-test-123"}).json()["model"] == "keyed"
    page = httpx.get(url + "/")                                            # the page is public: it asks for the key
    assert page.status_code == 200 and "const NEEDS_KEY = true" in page.text and "sk-test-123" not in page.text


def test_the_page_sends_the_api_key(keyed_server, browser_page):
    page = browser_page
    page.goto(keyed_server.url + "/")
    assert page.is_visible("#apikey")
    page.fill("#input", "no key yet")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.error")
    assert "API key" in page.inner_text(".msg.error")
    page.fill("#apikey", "sk-test-123")
    page.dispatch_event("#apikey", "change")
    page.fill("#input", "now with the key")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant.done').length == 2")
    assert page.locator(".msg.assistant").nth(1).inner_text() == "now with the key" and not page.js_errors


# Arbitrary JSON values, wrong types, extreme numbers and deep nesting, in and around a chat request.
NUMBERS = (st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0, -0.0, 1, -1, 1e-46, 5e-324, 1e-300, 2.0000001, 1e308, 2**53, 2**63, 2**64, -2**63]))
LEAF = st.none() | st.booleans() | NUMBERS | st.text(max_size=12)
JSONV = st.recursive(LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=12)
ROLE = st.sampled_from(["user", "assistant", "system", "tool", "", None]) | JSONV
CONTENT = st.text(max_size=30) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}),
                                           max_size=3) | JSONV
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": CONTENT}) | JSONV
FIELDS = ["temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "seed", "n", "stream",
          "stream_options", "model"]
ALTERNATING = st.integers(0, 2).flatmap(lambda k: st.lists(st.text(max_size=20), min_size=2 * k + 1, max_size=2 * k + 1)).map(
    lambda xs: [{"role": ("user", "assistant")[i % 2], "content": x} for i, x in enumerate(xs)])   # a valid conversation
IN_RANGE = st.floats(0, 2) | st.integers(0, 100) | st.just(1e-46)
REQUEST = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, max_size=5) | ALTERNATING},
    optional={k: IN_RANGE | NUMBERS | JSONV | st.booleans() for k in FIELDS}) | JSONV
DEEP = st.integers(1, 3000).map(lambda n: b'{"messages": ' + b"[" * n + b"]" * n + b"}")


@settings(max_examples=400, deadline=None)
@given(REQUEST)
def test_parse_never_fails_other_than_with_a_4xx(body):
    try: req = parse_chat_request(body, LIMITS)
    except RequestError as e:
        assert 400 <= e.status < 500 and e.message
        return
    assert all(math.isfinite(x) for x in (req.temperature, req.top_p or 1))
    assert 0 <= req.temperature <= LIMITS.max_temperature and 1 <= req.max_tokens <= LIMITS.max_tokens
    assert req.messages[-1]["role"] == "user" and all(isinstance(m["content"], str) for m in req.messages)
    prompt_ids(TOK, req.messages)


@pytest.fixture(scope="module")
def fast_server():
    with ServerThread(create_app(echo_engines(1), "fast", LIMITS)) as srv:
        yield srv


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=REQUEST.map(lambda b: json.dumps(b).encode()) | DEEP | st.binary(max_size=64))
@pytest.mark.slow
def test_no_request_body_gets_a_5xx(fast_server, body):
    r = post_raw(fast_server.url, body)
    assert r.status_code < 500, (r.status_code, r.text[:200])
    if r.status_code == 200:
        obj = r.json() if r.headers["content-type"].startswith("application/json") else None
        if obj is not None: assert obj["object"] == "chat.completion"
        else: assert '"error"' not in r.text and r.text.endswith("data: [DONE]\n\n")
    else: assert r.json()["error"]["message"]


# ---------------------------------------------------------------------------- configuration errors: one line each

def test_bad_configuration_is_one_line_on_stderr(runs_tmp, capsys):
    from nanochat_lib import server
    cases = [(["--profile", "nope"], "nope"), (["--set", "no_equals_sign"], "--set"),
             (["--set", "serve_max_tokens=0"], "serve_max_tokens"), (["--set", "serve_temperature=hot"], "serve_temperature"),
             (["--port", "99999"], "--port"), (["--set", "serve_port=70000"], "serve_port"), ([], "no run in")]
    if not torch.cuda.is_available(): cases.append((["--set", "device=cuda"], "device"))
    for args, named in cases:                        # in this process: what main raises is what python prints
        with pytest.raises(SystemExit) as e: server.main(args)
        msg = capsys.readouterr().err
        assert e.value.code == 2 and msg.startswith("error: ") and msg.count("\n") == 1 and named in msg, (args, msg)
    p = subprocess.run([sys.executable, "-m", "nanochat_lib.server", "--port", "99999"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "NANOCHAT_RUNS": str(runs_tmp)}, timeout=120)
    assert p.returncode == 2 and p.stderr == "error: --port: must be a port number in [0, 65535], got 99999\n"
