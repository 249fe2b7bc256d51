"""`dsv32 serve`: load a model, build the app (`dsv32.serve.app`) and run it with uvicorn until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from dsv32 import chat
from dsv32.engine import Engine
from dsv32.registry import add_placement_args, load_model, placement_from_args
from dsv32.serve.app import create_app, is_loopback_host
from dsv32.serve.protocol import MAX_BODY_BYTES
from dsv32.tokenizer import load_tokenizer


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The start-up warning for a server anyone on the network can use, or None."""
    if api_key is not None or is_loopback_host(host):
        return None
    return (
        f"WARNING: listening on {host} without an API key: anyone who can reach this address can run the model "
        "(using its compute and reading what it generates). Set DSV32_API_KEY (or --api-key) to require a key, "
        "or bind 127.0.0.1."
    )


def serve(
    app: FastAPI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout: float = 10.0,
    log_level: str = "info",
    ready: Callable[[str], None] | None = None,
) -> int:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM. On the signal, uvicorn stops accepting connections
    and the engine gets ``drain_timeout`` seconds to finish in-flight requests before it cancels the rest
    (their streams end with finish_reason "abort"), so the process exits cleanly and promptly."""
    engine: Engine = app.state.engine
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    bound = sock.getsockname()[1]

    class _Server(uvicorn.Server):
        _drainer: threading.Thread | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn's own handler also re-raises the signal after shutdown (exit status -15); a drained
            # server has shut down cleanly, so `dsv32 serve` exits 0 instead.
            if self._drainer is None:
                self._drainer = threading.Thread(target=engine.shutdown, args=(drain_timeout,), daemon=True)
                self._drainer.start()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting
            self.should_exit = True

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
            print(f"dsv32 serve: listening on {url}", flush=True)
            if ready is not None:
                ready(url)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=int(drain_timeout) + 5, lifespan="on")
    server = _Server(config)
    server.run(sockets=[sock])
    engine.shutdown(0.0)
    return 0


def detect_family(tokenizer: Any) -> str:
    """The chat format a tokenizer was built for, from its marker tokens."""
    if tokenizer.token_to_id(chat.USER) is not None:
        return "deepseek-v3.2"
    if tokenizer.token_to_id(chat.IM_START) is not None:
        return "chatml"
    raise ValueError("cannot tell the model's chat format from its tokenizer; pass --chat-format")


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv32 serve", description="An OpenAI-compatible HTTP server over the engine.")
    p.add_argument("--model", required=True, help="HF-format checkpoint directory or shipped model name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start-up)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("DSV32_API_KEY"),
        help="require this Bearer key (prefer the env variable DSV32_API_KEY: a flag shows in the process list)",
    )
    p.add_argument("--model-name", default=None, help="the id clients send as 'model' (default: the model's name)")
    p.add_argument("--chat-format", default="auto", choices=["auto", *chat.FAMILIES])
    p.add_argument("--max-slots", type=int, default=8, help="concurrent sequences (cache rows)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per sequence (default: context, <= 4096)")
    p.add_argument("--memory-budget", default=None, help="cache bytes, e.g. 2GiB (lowers slots, then length)")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before answering 429")
    p.add_argument("--max-tokens", type=int, default=None, help="default completion cap when a request sets none")
    p.add_argument(
        "--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies are refused (413)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--dense", action="store_true", help="turn DSA off (dense MLA)")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="seconds in-flight requests get at SIGTERM")
    p.add_argument("--no-web", action="store_true", help="do not serve the chat page at /")
    p.add_argument("--log-level", default="info")
    add_placement_args(p)
    args = p.parse_args(argv)
    device, dtype = placement_from_args(p, args)

    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(f"dsv32 serve: {warning}", file=sys.stderr, flush=True)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    model = load_model(args.model, device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer(args.model)
    family = detect_family(tokenizer) if args.chat_format == "auto" else args.chat_format
    name = args.model_name or Path(str(args.model).rstrip("/")).name or str(args.model)
    try:
        app = create_app(
            model,
            tokenizer,
            model_name=name,
            family=family,
            api_key=args.api_key,
            default_max_tokens=args.max_tokens,
            web=not args.no_web,
            max_body_bytes=args.max_body_bytes,
            # loopback without a key: only loopback Host names (DNS rebinding); elsewhere the user chose to
            # expose the server (and was warned above) or it requires a key
            host_check=is_loopback_host(args.host) and args.api_key is None,
            max_slots=args.max_slots,
            max_len=args.max_len,
            memory_budget=args.memory_budget,
            max_waiting=args.max_waiting,
            num_threads=args.threads,
            forward_kwargs={"dense": True} if args.dense else None,
        )
    except ValueError as e:
        print(f"dsv32 serve: {e}", file=sys.stderr)
        return 2
    cap = app.state.engine.capacity
    print(
        f"dsv32 serve: model {name!r} ({family}), {cap['max_slots']} slots x {cap['max_len']} tokens, "
        f"cache {cap['cache_bytes'] / 2**20:.1f} MiB",
        flush=True,
    )
    return serve(app, host=args.host, port=args.port, drain_timeout=args.drain_timeout, log_level=args.log_level)
