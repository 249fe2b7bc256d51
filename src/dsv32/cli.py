"""`dsv32 <command>`: one entry point; each command lives in the module that owns its concern.

Commands are imported lazily so `dsv32 --help` stays fast and a missing optional dependency only
affects the command that needs it. The help lists the benchmarks too, from `dsv32.bench.BENCHES` (a
table: reading it imports no benchmark).
"""

from __future__ import annotations

import importlib
import sys

from dsv32.bench import BENCHES

# command -> (module:function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("dsv32.generate:main", "stream a completion from a model"),
    "data": ("dsv32.data.prepare:cli_main", "prepare token shards from offline corpora or local text"),
    "tokenizer": ("dsv32.tokenizer:cli_main", "train a small byte-level BPE with V3.2's special tokens"),
    "train": ("dsv32.train.trainer:cli_main", "pre-train / continue-train / SFT a model"),
    "plot": ("dsv32.train.plot:cli_main", "plot metrics.jsonl curves to PNG"),
    "bench": ("dsv32.bench:cli_main", "benchmarks (dsv32 bench NAME; listed below)"),
    "eval": ("dsv32.evals:cli_main", "evaluations: ppl, passkey, retrieval, tasks, agent"),
    "sparsify": ("dsv32.train.sparsify:cli_main", "convert a dense model to DSA (warm-up, sparse stage)"),
    "rl": ("dsv32.rl.cli:cli_main", "GRPO post-training on verifiable tasks (V3.2's stability measures)"),
    "serve": ("dsv32.serve.cli:cli_main", "OpenAI-compatible HTTP server"),
    "synth": ("dsv32.agents.synth:cli_main", "synthesize agent environments (tools, tasks, verifiers)"),
    "agent": ("dsv32.agents.cli:cli_main", "run a model on an environment task with tools; print the transcript"),
    "agent-sft": ("dsv32.agents.sft:cli_main", "SFT a model on reference-solution agent trajectories"),
}


def _usage() -> str:
    lines = ["usage: dsv32 <command> [options]", "", "commands:"]
    for name, (_, help_) in COMMANDS.items():
        lines.append(f"  {name:<10} {help_}")
    lines += ["", "benchmarks (dsv32 bench NAME):"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in BENCHES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"dsv32: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[cmd][0]
    mod_name, fn_name = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("dsv32"):
            print(f"dsv32: command {cmd!r} is not available in this build ({e.name} missing)", file=sys.stderr)
            return 2
        raise
    rc = getattr(mod, fn_name)(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
