"The notebook chat widget (nanochat_lib.chat_ui): its methods called directly, and the Voila chat app driven in Chromium."
import html as htmllib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from browserkit import browser_page  # noqa: F401  (a pytest fixture)
from chatkit import make_run, one_thread  # noqa: F401  (one_thread: an autouse fixture)
from nanochat_lib.chat_protocol import ReplyBuilder
from nanochat_lib.chat_ui import ChatUI, chat_html, load_chat_model
from nanochat_lib.checkpoint import save_checkpoint
from nanochat_lib.engine import Engine, ScriptedModel
from nanochat_lib.model import GPTConfig, build_model
from nanochat_lib.tokenizer import Tokenizer
from nanochat_lib.tools import calculator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_merges([])        # byte level: 256 bytes + the special tokens, nothing to train


def script_ids(tok, *pieces) -> list:
    "Token ids of pieces: str = text, ('python', s) = a calculator call, ('end',) = <|assistant_end|>."
    sp, ids = tok.encode_special, []
    for p in pieces:
        if isinstance(p, str): ids += tok.encode(p)
        elif p[0] == "python": ids += [sp("<|python_start|>"), *tok.encode(p[1]), sp("<|python_end|>")]
        elif p[0] == "end": ids.append(sp("<|assistant_end|>"))
    return ids


def scripted_ui(tok, *pieces, **kw) -> ChatUI:
    "A ChatUI on a ScriptedModel that always answers `pieces` (the engine forces calculator results in)."
    script = script_ids(tok, *pieces)
    call = next((p[1] for p in pieces if isinstance(p, tuple) and p[0] == "python"), None)
    if call is not None:            # where the engine forces <|output_start|> result <|output_end|>, the script has '?'
        i = script.index(tok.encode_special("<|python_end|>")) + 1
        script[i:i] = tok.encode("?") * (2 + len(tok.encode(calculator(call))))
    return ChatUI(Engine(ScriptedModel(script, tok.vocab_size), tok), refresh_every=0, **kw)


class StubEngine:
    "Records every generate call; answers 'reply <seed>' so that each sample is told apart by its seed."
    def __init__(self, tok, sequence_len=256):
        self.tokenizer, self.calls = tok, []
        self.model = ScriptedModel([0], tok.vocab_size, sequence_len=sequence_len)

    def generate(self, tokens, num_samples=1, **kw):
        self.calls.append(dict(tokens=list(tokens), num_samples=num_samples, **kw))
        for t in self.tokenizer.encode(f"reply {kw['seed']}") + [self.tokenizer.encode_special("<|assistant_end|>")]:
            yield [t], [1]


def bubbles(page_html: str, role: str) -> list:
    "The inner HTML of every `role` bubble."
    return re.findall(rf'<div class="nc-msg nc-{role}"[^>]*>(.*?)</div>(?=<div class="nc-msg|</div>$)', page_html)


# ---------------------------------------------------------------------------------------------------------------
# The widget's logic, called directly

def test_send_streams_reply_into_user_and_assistant_bubbles(tok):
    ui = scripted_ui(tok, "Hello there, friend.", ("end",))
    frames = []
    ui.view.observe(lambda ch: frames.append(ch["new"]), "value")
    reply = ui.send("  Hi model  ")
    assert reply == "Hello there, friend."
    assert ui.messages == [{"role": "user", "content": "Hi model"},
                           {"role": "assistant", "content": [{"type": "text", "text": "Hello there, friend."}]}]
    final = ui.view.value
    assert final == ui.render_html() == chat_html(ui.messages)
    assert bubbles(final, "user") == ["Hi model"]
    assert bubbles(final, "assistant") == ['<span class="nc-text">Hello there, friend.</span>']
    assert ui.input.value == "" and not ui.busy and not ui.send_button.disabled
    # streamed: the view was redrawn token by token, each time a longer prefix of the reply with a cursor
    texts = [htmllib.unescape(re.sub(r"<[^>]+>", "", bubbles(f, "assistant")[0])) for f in frames if bubbles(f, "assistant")]
    streaming = [t for t in texts if t.endswith("\u258c")]
    assert len(streaming) >= len("Hello there, friend.")
    shown = [t[:-1] for t in streaming]
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:])) and shown[-1] == "Hello there, friend."
    assert "\u258c" not in final
    assert "21 tokens" in ui.status.value and ui.last_stats["tokens"] == 21   # 20 text tokens + <|assistant_end|>


def test_tool_call_and_output_shown_distinctly(tok):
    ui = scripted_ui(tok, "Let me compute ", ("python", "12*37"), " so it is 444.", ("end",))
    reply = ui.send("What is 12*37?")
    parts = ui.messages[-1]["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
    assert [p["text"] for p in parts] == ["Let me compute ", "12*37", "444", " so it is 444."]
    assert reply == "Let me compute 12*37444 so it is 444."
    page = ui.view.value
    call = re.search(r'<div class="nc-tool-call"[^>]*>(.*?)</div>', page).group(1)
    out = re.search(r'<div class="nc-tool-output"[^>]*>(.*?)</div>', page).group(1)
    assert "<code>12*37</code>" in call and "<code>444</code>" in out
    assert "<|python_start|>" not in page and "&lt;|python_start|&gt;" not in page   # no raw special tokens
    # the next turn's prompt carries the tool call and its result back to the model, token for token
    ui.send("Thanks")
    convo = {"messages": [{"role": "user", "content": "What is 12*37?"},
                          {"role": "assistant", "content": parts}, {"role": "user", "content": "Thanks"}]}
    prefill = next(ids for pos, ids in reversed(ui.engine.model.fed) if pos == 0)[0]
    assert prefill == tok.render_for_completion(convo)


def test_user_input_and_model_output_are_html_escaped(tok):
    ui = scripted_ui(tok, "<i>bold</i> & <script>x()</script>", ("end",))
    ui.send('<b>hi</b> & "quotes" <script>alert(1)</script>')
    page = ui.view.value
    assert bubbles(page, "user") == [htmllib.escape('<b>hi</b> & "quotes" <script>alert(1)</script>')]
    assert "<script>" not in page and "<b>hi" not in page and "<i>bold" not in page
    assert "&lt;i&gt;bold&lt;/i&gt; &amp; &lt;script&gt;x()&lt;/script&gt;" in page


def test_clear_empties_history_and_restarts_seeds(tok):
    eng = StubEngine(tok)
    ui = ChatUI(eng, refresh_every=0)
    assert ui.send("one") == "reply 0" and ui.send("two") == "reply 1"
    assert len(ui.messages) == 4
    ui.clear()
    assert ui.messages == [] and ui.replies == 0 and ui.status.value == ""
    assert "nc-msg" not in ui.view.value and "nc-empty" in ui.view.value
    assert ui.send("one again") == "reply 0"               # a cleared chat starts from the first seed again
    assert eng.calls[-1]["tokens"] == tok.render_for_completion([{"role": "user", "content": "one again"}])


def test_regenerate_replaces_last_assistant_reply(tok):
    eng = StubEngine(tok)
    ui = ChatUI(eng, refresh_every=0)
    ui.send("first"); ui.send("second")
    assert ui.regenerate() == "reply 2"
    assert [m["role"] for m in ui.messages] == ["user", "assistant", "user", "assistant"]
    assert ui.messages[-1]["content"] == [{"type": "text", "text": "reply 2"}]
    assert ui.messages[1]["content"] == [{"type": "text", "text": "reply 0"}]    # earlier turns untouched
    assert eng.calls[-1]["tokens"] == eng.calls[-2]["tokens"]                    # same prompt, next seed
    assert [c["seed"] for c in eng.calls] == [0, 1, 2]
    page = ui.view.value
    assert "reply 1" not in page and bubbles(page, "assistant")[-1].endswith("reply 2</span>")
    # nothing to regenerate from an empty chat
    ui.clear()
    assert ui.regenerate() == "" and ui.messages == []


def test_controls_change_sampling_arguments(tok):
    eng = StubEngine(tok, sequence_len=64)
    ui = ChatUI(eng, temperature=0.6, top_k=50, max_tokens=32, seed=10, refresh_every=0)
    assert ui.sampling_kwargs() == dict(temperature=0.6, top_k=50, seed=10)
    ui.send("a")
    assert {k: eng.calls[-1][k] for k in ("temperature", "top_k", "seed", "max_tokens")} == \
           dict(temperature=0.6, top_k=50, seed=10, max_tokens=32)
    ui.temperature.value, ui.top_k.value, ui.max_tokens.value = 1.25, 7, 5
    ui.send("b")
    assert {k: eng.calls[-1][k] for k in ("temperature", "top_k", "seed", "max_tokens")} == \
           dict(temperature=1.25, top_k=7, seed=11, max_tokens=5)
    ui.top_k.value, ui.temperature.value = 0, 0.0                        # top-k 0 means off; temperature 0 greedy
    ui.send("c")
    assert eng.calls[-1]["top_k"] is None and eng.calls[-1]["temperature"] == 0.0
    # the budget never runs past the context: max tokens 63 after a prompt of n tokens asks for 64 - n
    ui.max_tokens.value = 63
    ui.send("d")
    assert eng.calls[-1]["max_tokens"] == 64 - len(eng.calls[-1]["tokens"])


def test_conversation_too_long_is_refused(tok):
    eng = StubEngine(tok, sequence_len=32)
    ui = ChatUI(eng, refresh_every=0)
    assert ui.send("x" * 40) == ""
    assert ui.messages == [] and eng.calls == [] and ui.input.value == "x" * 40
    assert "context" in ui.status.value and "Clear" in ui.status.value
    assert ui.send("   ") == "" and "type a message" in ui.status.value


def test_buttons_only_forward_to_the_methods(tok):
    eng = StubEngine(tok)
    ui = ChatUI(eng, refresh_every=0)
    ui.input.value = "via the button"
    ui.send_button.click()
    assert ui.messages[0] == {"role": "user", "content": "via the button"} and len(eng.calls) == 1
    ui.regenerate_button.click()
    assert len(ui.messages) == 2 and ui.messages[1]["content"][0]["text"] == "reply 1"
    ui.clear_button.click()
    assert ui.messages == []

    def broken(*a, **k): raise RuntimeError("boom")
    eng.generate = broken
    ui.input.value = "hello"
    ui.send_button.click()                                 # the error shows in the status line, the UI stays usable
    assert "RuntimeError: boom" in ui.status.value and not ui.busy and not ui.send_button.disabled


def test_reply_builder_parts_utf8_and_ends(tok):
    sp = tok.encode_special
    rb = ReplyBuilder(tok)
    emoji = tok.encode("\U0001F600")                        # 4 byte tokens
    pieces = [rb.push(t) for t in tok.encode("a") + emoji]
    assert pieces == ["a", "", "", "", "\U0001F600"]        # never half a character
    rb.push(sp("<|user_end|>"))                             # a stray special token inside a reply: dropped
    rb.push(sp("<|user_start|>"))                           # the model starts the user's turn: the reply is over
    assert rb.done and rb.push(tok.encode("z")[0]) == ""
    assert rb.finish() == [{"type": "text", "text": "a\U0001F600"}]
    rb = ReplyBuilder(tok)                                  # a call cut off mid-way keeps its part
    for t in [sp("<|python_start|>"), *tok.encode("1+")]: rb.push(t)
    assert rb.finish() == [{"type": "python", "text": "1+"}]


def test_load_chat_model_prefers_rl_then_sft_then_random(tmp_path, capsys):
    model, tokenizer, phase = load_chat_model(tmp_path / "empty")
    assert phase is None and tokenizer.vocab_size == 256 + 9 and model.config.vocab_size == tokenizer.vocab_size
    assert "NOTE" in capsys.readouterr().out
    rdir = make_run(tmp_path / "run", phase="sft")
    _, tokenizer, phase = load_chat_model(rdir)
    assert phase == "sft" and tokenizer.vocab_size == 512
    make_run(tmp_path / "run", phase="rl", seed=1)
    assert load_chat_model(rdir, verbose=False)[2] == "rl"
    _, tokenizer, phase = load_chat_model(make_run(tmp_path / "run2", phase="base"))
    assert phase is None and tokenizer.vocab_size == 512      # no chat checkpoint: random model, the run's tokenizer


# ---------------------------------------------------------------------------------------------------------------
# The Voila chat app in a browser

APP_REPLY = "Hello from the test model!"


def bigram_chat_run(root: Path, text: str = APP_REPLY) -> Path:
    """A run folder whose `sft` checkpoint is a real GPT that answers `text` to anything, whatever the sampling.

    A fresh GPT's blocks add nothing (their output projections start at zero), so its logits depend on the last
    token only. Giving each token of <|assistant_start|> + text its own basis vector as embedding and a head that
    maps it to the next token makes a bigram model that spells `text`, then <|assistant_end|>, with a logit
    margin of about 29 (after the softcap): no temperature or top-k of the widget can make it stray."""
    rdir = make_run(root, phase="base")
    tok = Tokenizer.load(rdir / "tokenizer")
    seq = [tok.encode_special("<|assistant_start|>"), *tok.encode(text), tok.encode_special("<|assistant_end|>")]
    assert len(set(seq[:-1])) == len(seq) - 1, "the reply's tokens must be distinct for a bigram model"
    model = build_model(GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        for i, (a, b) in enumerate(zip(seq, seq[1:])):
            model.wte.weight[a] = 0
            model.wte.weight[a, i] = 1.0
            model.lm_head.weight[:, i] = -4.0
            model.lm_head.weight[b, i] = 4.0
    save_checkpoint(rdir / "checkpoints" / "sft", 0, model, meta=dict(phase="sft", model_config=vars(model.config)))
    return rdir


def test_bigram_chat_run_answers_its_text(tmp_path):
    rdir = bigram_chat_run(tmp_path / "run")
    model, tokenizer, phase = load_chat_model(rdir, verbose=False)
    ui = ChatUI(Engine(model, tokenizer), temperature=2.0, top_k=0, refresh_every=0)
    assert phase == "sft" and ui.send("anything at all") == APP_REPLY and ui.send("again?") == APP_REPLY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def voila_app(tmp_path, runs_tmp):
    "Voila serving notebooks/08d_chat_app.ipynb on a free 127.0.0.1 port, chatting with a bigram test model."
    rdir = bigram_chat_run(tmp_path / "chat_run")
    # The notebook has no kernelspec, so Voila asks for `python3`: make that this interpreter (JUPYTER_PATH comes
    # first in Jupyter's search path, before any user-wide or system-wide python3 kernel).
    kdir = tmp_path / "jupyter" / "kernels" / "python3"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps(dict(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                                                             "{connection_file}"], display_name="test", language="python")))
    env = {**os.environ, "NANOCHAT_CHAT_RUN": str(rdir), "JUPYTER_PATH": str(tmp_path / "jupyter"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "OMP_NUM_THREADS": "1"}
    port = free_port()
    log = open(tmp_path / "voila.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "voila", str(ROOT / "notebooks" / "08d_chat_app.ipynb"),
                             "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1", "--show_tracebacks=True",
                             "--VoilaConfiguration.preheat_kernel=False"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "voila/static/", timeout=2): pass
                break
            except urllib.error.HTTPError: break          # the server answers (404 is fine): it is up
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"voila did not start:\n{(tmp_path / 'voila.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        log.close()


def test_voila_chat_app_in_chromium(voila_app, browser_page):
    page = browser_page
    page.set_default_timeout(60000)
    page.goto(voila_app, wait_until="domcontentloaded")
    box = page.locator(".nc-chat-ui textarea")
    box.wait_for(state="visible")
    assert page.locator(".nc-empty").count() == 1 and "RANDOM" not in page.content()
    # record every state of the assistant bubble the browser renders: (its text, whether the cursor shows)
    page.evaluate("""() => { window.frames_seen = [];
        new MutationObserver(() => { const a = document.querySelector('.nc-assistant');
            if (a) window.frames_seen.push([a.textContent, !!a.querySelector('.nc-cursor')]); })
        .observe(document.body, {subtree: true, childList: true, characterData: true}); }""")
    box.fill("Hi <there> & welcome")
    page.get_by_role("button", name="Send").click()
    reply = page.locator(".nc-assistant").first
    page.wait_for_function("document.querySelector('.nc-assistant') && "
                           f"document.querySelector('.nc-assistant').textContent === {APP_REPLY!r}")
    assert reply.inner_text() == APP_REPLY
    assert page.locator(".nc-user").inner_text() == "Hi <there> & welcome"   # escaped in HTML: shown as typed
    assert box.input_value() == ""
    frames = page.evaluate("window.frames_seen")
    streaming = [text[:-1] for text, cursor in frames if cursor]     # drawn while the reply was being written
    assert streaming and all(APP_REPLY.startswith(t) for t in streaming), frames
    assert frames[-1] == [APP_REPLY, False]
    page.wait_for_function("document.body.innerText.includes('tokens in')")  # the status line after the reply
    page.get_by_role("button", name="Clear").click()
    page.locator(".nc-empty").wait_for(state="visible")
    assert page.locator(".nc-msg").count() == 0
    assert page.js_errors == []
