"""Rule-driven stand-in chat models for the server and CLI tests: replies you can predict exactly, at a chosen speed.

    tok = Tokenizer.from_merges([])                  # bytes + special tokens: any text round-trips
    engine = Engine(EchoModel(tok), tok)             # replies with the last user message, then <|assistant_end|>
    engine = Engine(EchoModel(tok, delay=0.01), tok) # 10 ms per forward pass: time to disconnect mid-stream

A user message "calc: EXPR" gets a calculator call instead: <|python_start|>EXPR<|python_end|>, the engine's forced
<|output_start|>result<|output_end|>, then " done".
"""
import time

import torch
import torch.nn as nn

from nanochat_lib.model import GPTConfig
from nanochat_lib.tools import calculator

__all__ = ["EchoModel", "last_user_text", "expected_reply"]


def last_user_text(tok, ids) -> str:
    "The text of the last user message in prompt `ids`."
    us, ue = tok.encode_special("<|user_start|>"), tok.encode_special("<|user_end|>")
    start = len(ids) - 1 - ids[::-1].index(us)
    end = ids.index(ue, start)
    return tok.decode(ids[start + 1:end])


def expected_reply(text: str) -> str:
    "What an EchoModel's reply to user message `text` reads like on the wire (tool calls as marker text)."
    if text.startswith("calc: "):
        expr = text[len("calc: "):]
        return f"<|python_start|>{expr}<|python_end|><|output_start|>{calculator(expr)}<|output_end|> done"
    return text


class EchoModel(nn.Module):
    "Predicts, token by token, its reply to the prompt's last user message, then <|assistant_end|> (see module doc)."
    def __init__(self, tok, delay: float = 0.0, sequence_len: int = 4096, endless: bool = False):
        super().__init__()
        self.tok, self.delay, self.endless = tok, delay, endless
        self.config = GPTConfig(sequence_len=sequence_len, vocab_size=tok.vocab_size, n_layer=1, n_head=1,
                                n_kv_head=1, n_embd=2)
        self.anchor = nn.Parameter(torch.zeros(1))      # gives the model a device and a dtype
        self.script, self.prompt_len, self.forwards = [], 0, 0

    def reply_ids(self, text: str) -> list:
        tok, sp = self.tok, self.tok.encode_special
        if self.endless: return tok.encode("x") * 100000   # never ends by itself: max_tokens or a cancel stops it
        if text.startswith("calc: "):
            expr = text[len("calc: "):]
            forced = 2 + len(tok.encode(str(calculator(expr))))  # the engine forces these positions
            return [sp("<|python_start|>"), *tok.encode(expr), sp("<|python_end|>"), *[0] * forced, *tok.encode(" done")]
        return tok.encode(text)

    def forward_cached(self, idx, cache, last_only: bool = False):
        B, T = idx.shape
        if cache.pos == 0:                              # a prefill: a new prompt
            self.prompt_len = T
            self.script = self.reply_ids(last_user_text(self.tok, idx[0].tolist()))
        self.forwards += 1
        if self.delay: time.sleep(self.delay)
        end = self.tok.encode_special("<|assistant_end|>")
        logits = torch.zeros(B, T, self.config.vocab_size)
        for t in range(T):
            k = cache.pos + t + 1 - self.prompt_len
            logits[:, t, self.script[k] if 0 <= k < len(self.script) else end] = 50.0
        cache.advance(T)
        return logits[:, -1:] if last_only else logits
