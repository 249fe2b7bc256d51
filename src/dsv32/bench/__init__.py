"""`dsv32 bench <name>`: benchmarks, one module each (cost: the paper's Figure 3; peers: whole-model long context
vs HF; train; serve; kernels; grammar; weights: the CPU weight formats; rl-gain: SFT then GRPO).

Subcommands are imported lazily, so a benchmark whose module or optional dependency is missing only affects
itself.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module:function taking argv and returning an exit code, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "cost": ("dsv32.bench.cost:main", "one layer's attention cost, dense MLA vs DSA, by position (Fig. 3)"),
    "train": ("dsv32.bench.train:main", "training throughput"),
    "serve": ("dsv32.bench.serve:main", "serving throughput and latency vs HF generate and llama.cpp"),
    "peers": ("dsv32.bench.peers:main", "long-context prefill/decode and memory vs HF transformers' V3.2"),
    "kernels": ("dsv32.bench.kernels:main", "achieved TFLOP/s and TB/s of each DSA kernel and dense baseline (JSON)"),
    "grammar": ("dsv32.bench.grammar:main", "structured output: schema validity and overhead at N streams"),
    "weights": ("dsv32.bench.weights:main", "CPU weight formats (packed, fp16, int8): stream rate, perplexity, decode"),
    "rl-gain": ("dsv32.bench.rl_gain:main", "SFT then dsv32 rl on a small DSA + MoE model: held-out accuracy gain"),
}


def _usage() -> str:
    lines = ["usage: dsv32 bench <name> [options]", "", "benchmarks:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in BENCHES.items()]
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(f"dsv32 bench: unknown benchmark {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod_name, fn_name = BENCHES[name][0].split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("dsv32"):
            print(f"dsv32 bench: {name!r} is not available in this build ({e.name} missing)", file=sys.stderr)
            return 2
        raise
    return int(getattr(mod, fn_name)(rest) or 0)


__all__ = ["BENCHES", "cli_main"]
