"""Test doubles for the engine/server/web tests: a byte-level tokenizer with V3.2's (or ChatML's) markers and a
scripted model that follows the model protocol and answers every prompt with a fixed text.

The scripted model lets the server tests check exact text, reasoning/tool-call splitting and streaming
without depending on what a random network happens to emit; the engine tests use the real tiny model.
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from dsv32 import chat
from dsv32.config import ModelConfig
from dsv32.model import Transformer
from dsv32.tokenizer import Tokenizer


def peaked_tiny_v32(seed: int = 0) -> torch.nn.Module:
    """Tiny V3.2 (MLA + DSA + MoE) with weights larger than the default init, so greedy choices are far from
    ties: the real model the engine and concurrency tests batch."""
    torch.manual_seed(seed)
    m = Transformer(ModelConfig.from_name("tiny")).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
            elif "bias" not in name:
                p.normal_(1.0, 0.1)
    return m


def byte_tokenizer(family: str = "deepseek-v3.2") -> Tokenizer:
    """256 byte tokens + the chat markers as single added tokens (vocab ~265)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if family == "chatml":
        backend.add_special_tokens(["<|endoftext|>", chat.IM_START, chat.IM_END])
        return Tokenizer(backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", name="bytes-chatml")
    backend.add_special_tokens([chat.BOS, chat.EOS])
    backend.add_tokens([chat.USER, chat.ASSISTANT, chat.THINK, chat.END_THINK, chat.DSML])
    return Tokenizer(backend, bos_token=chat.BOS, eos_token=chat.EOS, name="bytes-dsv32")


class ScriptedCache:
    """Remembers the tokens written per row; enough of the cache interface for the engine."""

    def __init__(self, batch_size: int, max_len: int) -> None:
        self.batch_size, self.max_len = batch_size, max_len
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)

    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size()

    def positions_for(self, seq_len: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        lens = self.lengths if rows is None else self.lengths[rows]
        return lens.unsqueeze(1) + torch.arange(seq_len).unsqueeze(0)

    def reset(self, rows=None) -> None:
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, dtype=torch.long)] = 0

    def truncate(self, row: int, length: int) -> None:
        self.lengths[row] = min(int(self.lengths[row]), length)


class ScriptedModel(torch.nn.Module):
    """After the last occurrence of ``trigger`` (+ ``skip`` tokens, e.g. V3.2's `</think>` opener), position k
    predicts ``script[k]``, then ``eos_id``; the scripted id gets logit ``margin``, every other id 0.

    ``delay`` (s) slows each forward down, so tests can catch a request mid-stream.
    """

    def __init__(
        self,
        vocab_size: int,
        script: list[int],
        *,
        trigger: list[int],
        eos_id: int,
        skip: int = 1,
        margin: float = 60.0,
        delay: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.vocab_size, self.script, self.trigger, self.skip = vocab_size, list(script), list(trigger), skip
        self.eos_id, self.margin, self.delay = eos_id, margin, delay
        self.forwards = 0

    def new_cache(self, batch_size: int, max_len: int) -> ScriptedCache:
        return ScriptedCache(batch_size, max_len)

    def _next(self, hist: list[int]) -> int:
        n = len(self.trigger)
        for end in range(len(hist) - 1, n - 2, -1):
            if hist[end - n + 1 : end + 1] == self.trigger:
                k = len(hist) - 1 - end - self.skip
                return self.script[k] if 0 <= k < len(self.script) else self.eos_id
        return self.eos_id

    def forward(
        self, input_ids, *, cache=None, positions=None, last_only=False, cache_rows=None, return_routes=False, **_
    ):
        self.forwards += 1
        if self.delay:
            time.sleep(self.delay)
        B, S = input_ids.shape
        rows = torch.arange(B) if cache_rows is None else cache_rows.cpu()
        if positions is None:
            positions = cache.positions_for(S, rows)
        if int(positions.max()) >= cache.max_len:
            raise ValueError("cache overflow")
        wanted = [S - 1] if last_only else list(range(S))
        logits = torch.zeros(B, len(wanted), self.vocab_size)
        for b in range(B):
            r = int(rows[b])
            cache.tokens[r, positions[b]] = input_ids[b].cpu()
            cache.lengths[r] = max(int(cache.lengths[r]), int(positions[b].max()) + 1)
            for j, s in enumerate(wanted):
                hist = cache.tokens[r, : int(positions[b, s]) + 1].tolist()
                logits[b, j, self._next(hist)] = self.margin
        if return_routes:
            return SimpleNamespace(logits=logits, routes=[torch.zeros(B * S, 2, dtype=torch.long)])
        return logits


def scripted(tok: Tokenizer, text: str, **kw) -> ScriptedModel:
    """A scripted model replying ``text`` (then EOS) after `<｜Assistant｜>` + the think opener."""
    if tok.token_to_id(chat.USER) is None:  # ChatML: reply after "<|im_start|>assistant\n"
        kw.setdefault("trigger", tok.encode(f"{chat.IM_START}assistant\n"))
        kw.setdefault("skip", 0)
    else:
        kw.setdefault("trigger", [tok.token_to_id(chat.ASSISTANT)])
    return ScriptedModel(tok.vocab_size, tok.encode(text), eos_id=tok.eos_id, **kw)


class LiveServer:
    """uvicorn in a background thread on 127.0.0.1 with a free port; ``stop()`` ends it and its engine."""

    def __init__(self, app) -> None:
        import uvicorn  # optional (the serve extra); the engine and RL tests use this module without it

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.app.state.engine.shutdown(0.0)
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
