"""`dsv32 generate`: stream a completion from any model following the model protocol (docs/design.md).

Prefill once into the model's cache, then decode one token at a time; text is streamed as soon as the
decoded bytes form complete characters.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

import torch

from dsv32.quant import WEIGHT_FORMATS, pack_linears
from dsv32.registry import add_placement_args, load_model, placement_from_args
from dsv32.sampling import sample
from dsv32.tokenizer import Detokenizer, Tokenizer, load_tokenizer


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_ids: tuple[int, ...] = (),
    dense: bool = False,
) -> Iterator[int]:
    """Yield new token ids one by one (stops at ``stop_ids``, which are not yielded, or after max_new_tokens)."""
    if not prompt_ids:
        raise ValueError("generate: the prompt is empty (add a BOS token or some text)")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    extra = {"dense": True} if dense else {}
    logits = model.forward(torch.tensor([prompt_ids], device=device), cache=cache, last_only=True, **extra)
    for _ in range(max_new_tokens):
        tok, _ = sample(logits[:, -1], temperature=temperature, top_p=top_p, top_k=top_k, generator=gen)
        t = int(tok)
        if t in stop_ids:
            return
        yield t
        logits = model.forward(tok.view(1, 1), cache=cache, last_only=True, **extra)


def stream_text(tokenizer: Tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Incremental detokenisation (O(1) per token, see `Detokenizer`): yields each non-empty piece of text as
    soon as its bytes form complete characters, then whatever was still held back."""
    detok = Detokenizer(tokenizer)
    for t in ids:
        piece = detok.add(t)
        if piece:
            yield piece
    rest = detok.flush()
    if rest:
        yield rest


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv32 generate", description=__doc__)
    p.add_argument("--model", required=True, help="HF-format checkpoint directory or shipped model name")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dense", action="store_true", help="turn DSA off (dense MLA)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    p.add_argument("--num-layers", type=int, default=None, help="load only the first N layers (debugging)")
    p.add_argument("--weights-format", choices=WEIGHT_FORMATS, default="fp32",
                   help="CPU inference format of the linear weights (dsv32.quant.pack_linears)")
    add_placement_args(p)
    args = p.parse_args(argv)
    device, dtype = placement_from_args(p, args)
    if args.weights_format != "fp32" and (device.type != "cpu" or dtype != torch.float32):
        p.error(f"--weights-format {args.weights_format} packs fp32 weights for the CPU; use it with --device cpu "
                "--dtype float32")

    model = load_model(args.model, num_layers=args.num_layers, device=device, dtype=dtype).eval()
    pack_linears(model, args.weights_format)
    tok = load_tokenizer(args.model)
    ids = tok.encode(args.prompt, add_bos=not args.no_bos)
    stops = tuple(i for i in (tok.eos_id,) if i is not None)
    t0 = time.perf_counter()
    n = 0
    stream = generate_ids(
        model,
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_ids=stops,
        dense=args.dense,
    )

    def counted():
        nonlocal n
        for t in stream:
            n += 1
            yield t

    for piece in stream_text(tok, counted()):
        sys.stdout.write(piece)
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    print(f"\n[{len(ids)} prompt tokens, {n} generated in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0
