"""`dsv32 agent`: run one task of a synthesized environment with a model and print the transcript.

    dsv32 agent --model preset:tiny --env envs/trip-0000 --task trip-0000-00
    dsv32 agent --base-url http://127.0.0.1:8000/v1 --env envs/trip-0000 --task trip-0000-00 --messages t.json

In-process (`--model`), the trajectory can be saved as an RL `Rollout` (`--rollout F.jsonl`); against an
endpoint (`--base-url`, any OpenAI-compatible server) it is kept as messages (`--messages F.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv32 import chat
from dsv32.agents.loop import STRATEGIES, AgentConfig, EngineBackend, OpenAIBackend, load_task, run_env_task
from dsv32.agents.tools import SCHEMAS
from dsv32.engine import Engine
from dsv32.registry import load_model
from dsv32.rl import rollout as rollout_io
from dsv32.tokenizer import SMALL_NAME, load_tokenizer


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model / endpoint and sampling options `dsv32 agent` and `dsv32 eval agent` share."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="in-process: HF dir, .gguf, shipped name (smollm2-135m) or preset:NAME")
    src.add_argument("--base-url", help="any OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", help="endpoint key (default: $OPENAI_API_KEY, else none)")
    p.add_argument("--tokenizer", help="in-process: tokenizer (default: the model's; for preset:NAME the small "
                   "preset's BPE)")
    p.add_argument("--served-model", help="model name at the endpoint (default: the first it lists)")
    p.add_argument("--thinking", choices=["auto", "on", "off"], default="auto",
                   help="thinking mode (auto: on for V3.2-format models, off for ChatML and unknown endpoints)")
    p.add_argument("--max-turns", type=int, default=16, help="model turns per task")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens per model turn")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context", type=int, help="context window in tokens (in-process default: the model's, "
                   "at most 4096; endpoint default: its max_model_len if it reports one)")
    p.add_argument("--context-strategy", choices=STRATEGIES, default="none",
                   help="test-time context management (V3.2 §4.4; evaluation only)")
    p.add_argument("--context-share", type=float, default=0.8, help="share of the window that triggers it")
    p.add_argument("--tools", default="", help=f"general tools to add, comma list of {', '.join(SCHEMAS)} "
                   "(python/bash run in the sandbox)")
    p.add_argument("--system", help="system prompt (default: a short agent prompt; '' for none)")
    p.add_argument("--unsafe", action="store_true",
                   help="run environment tools and verifiers WITHOUT the sandbox (only if you trust them)")


def detect_family(tokenizer: Any) -> str:
    """The chat format of a tokenizer from its markers (the same rule as `dsv32 serve`)."""
    if tokenizer.token_to_id(chat.USER) is not None:
        return "deepseek-v3.2"
    if tokenizer.token_to_id(chat.IM_START) is not None:
        return "chatml"
    raise ValueError("cannot tell the model's chat format from its tokenizer (no <｜User｜> or <|im_start|>)")


@dataclass
class Session:
    """A backend ready for tasks and what closes it."""

    backend: EngineBackend | OpenAIBackend
    family: str | None  # None: an endpoint of unknown format
    close: Callable[[], None]
    name: str


def open_session(args: argparse.Namespace) -> Session:
    if args.base_url:
        key = args.api_key or os.environ.get("OPENAI_API_KEY")
        be = OpenAIBackend(args.base_url, model=args.served_model, api_key=key)
        return Session(be, None, lambda: None, f"{args.base_url} ({be.model})")
    model = load_model(args.model)
    # a preset has random weights and no tokenizer of its own: the small preset's BPE unless told otherwise
    tok = load_tokenizer(args.tokenizer or (SMALL_NAME if args.model.startswith("preset:") else args.model))
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and tok.vocab_size > vocab:
        raise SystemExit(f"dsv32: tokenizer {tok.name} has {tok.vocab_size} ids but the model's vocabulary is {vocab}; "
                         "pass a matching --tokenizer")
    family = detect_family(tok)
    engine = Engine(model, max_slots=1, max_len=args.context)
    return Session(EngineBackend(engine, tok, family=family), family, engine.shutdown, args.model)


def config_from_args(args: argparse.Namespace, session: Session, *, samples: int = 1) -> AgentConfig:
    if args.thinking == "auto":
        thinking = session.family == "deepseek-v3.2"
    else:
        thinking = args.thinking == "on"
    temperature = args.temperature if args.temperature is not None else (1.0 if samples > 1 else 0.0)
    kw: dict[str, Any] = {} if args.system is None else {"system": args.system or None}
    return AgentConfig(max_turns=args.max_turns, max_tokens=args.max_tokens, context=args.context,
                       thinking=thinking, temperature=temperature, top_p=args.top_p, top_k=args.top_k,
                       seed=args.seed, context_strategy=args.context_strategy, context_share=args.context_share,
                       **kw)


def print_event(kind: str, value: Any) -> None:
    """One transcript line (or block) per loop event."""
    if kind == "turn":
        print(f"--- turn {value + 1}")
    elif kind == "reasoning":
        print(f"[reasoning] {value.strip()}")
    elif kind == "content":
        print(f"[assistant] {value.strip()}")
    elif kind == "call":
        args = value["arguments"]
        print(f"[call] {value['name']}({json.dumps(args, ensure_ascii=False) if not isinstance(args, str) else args})")
    elif kind == "result":
        text = value["content"]
        text = text if len(text) <= 2000 else text[:2000] + f" ... [{len(text) - 2000} more characters]"
        print(f"[result{'' if value['ok'] else ' ERROR'}] {value['name']}: {text}")
    else:
        print(f"[{kind}] {value}")
    sys.stdout.flush()


def cli_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv32 agent", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--env", type=Path, required=True, help="an environment directory written by `dsv32 synth`")
    p.add_argument("--task", help="task id (default: the environment's first task)")
    p.add_argument("--rollout", type=Path, help="save the trajectory as an RL Rollout (JSONL + safetensors; "
                   "in-process only)")
    p.add_argument("--messages", type=Path, help="save the trajectory (messages, calls, verdict) as JSON")
    args = p.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    task = load_task(args.env, args.task)
    session = open_session(args)
    try:
        cfg = config_from_args(args, session)
        print(f"[task {task['id']}] {task['prompt']}")
        traj = run_env_task(session.backend, args.env, task, cfg, toolbox_tools=tools, unsafe=args.unsafe,
                            on_event=print_event)
    except chat.ChatFormatError as e:  # e.g. a chat format without a tool-call convention
        print(f"dsv32 agent: {session.name}: {e}", file=sys.stderr)
        return 2
    finally:
        session.close()
    print(f"[stop] {traj.stop}; {traj.turns} turns, {len(traj.calls)} tool calls "
          f"({sum(c['valid'] for c in traj.calls)} valid), {traj.completion_tokens} generated tokens")
    print(f"[answer] {json.dumps(traj.answer, ensure_ascii=False)}")
    print(f"[verdict] {traj.verdict}" + (f" ({traj.reason})" if traj.reason else ""))
    if args.messages:
        args.messages.write_text(json.dumps(traj.to_json(), indent=1, ensure_ascii=False))
    if args.rollout:
        if traj.rollout is None:
            print("dsv32 agent: no rollout to save (an endpoint run, or context management rewrote the "
                  "trajectory)", file=sys.stderr)
            return 1
        rollout_io.save([traj.rollout], args.rollout)
    return 0
