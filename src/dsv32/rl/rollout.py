"""Rollouts as data: one :class:`Rollout` per completion, saved as JSONL plus a safetensors sidecar, and group
sampling through :class:`dsv32.engine.Engine`.

The record carries what GRPO with V3.2's stability measures needs (V3.2 report §3.1): the sampler's own
log-probabilities (pi_old of the unbiased KL and of Off-Policy Sequence Masking), the ids the top-k/top-p
truncation kept at each step (Keep Sampling Mask) and the MoE routes the engine took (Keep Routing). The agent
loop writes the same record: a multi-turn completion holds the tool output tokens too, with ``token_mask`` 0.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dsv32.engine import Engine, SamplingParams


@dataclass
class Rollout:
    """One completion of one prompt.

    prompt_ids [P], completion_ids [C]: the model saw ``prompt_ids + completion_ids``.
    token_mask [C]: 1 = sampled by the policy and trained on; 0 = not the policy's (tool output) or not trained.
    logprobs [C]: log-probability of each token under the distribution actually sampled from (after temperature
        and top-k/top-p truncation), as the engine reported it; 0.0 where ``token_mask`` is 0.
    kept: per completion token, the ids the truncation kept (int64 [k], Keep Sampling Mask); an entry is None
        where nothing was truncated (or ``token_mask`` is 0); the whole field is None when the rollout was
        sampled without truncation or without ``return_allowed``.
    routes: per MoE layer of the main model, expert ids [P + C - 1, K] (Keep Routing) for every position the
        engine computed: the P prompt positions, then the positions of completion tokens 0..C-2 (fed back to
        sample the next token). The last sampled token's own position was never computed, and the MTP layers
        do not run in the engine: in training both route freely (the last position's logits predict nothing
        the loss uses). None = not recorded.
    reward / verdict: the scorer's reward and its one-word verdict (e.g. "correct", "wrong", "no_answer").
    temperature / top_p / top_k / max_tokens / seed: the sampling settings of this completion.
    group / sample: prompt index within the step and completion index within its group (prompt-major order).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    token_mask: list[int]
    logprobs: list[float]
    kept: list[torch.Tensor | None] | None = None
    routes: list[torch.Tensor] | None = None
    reward: float | None = None
    verdict: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = None
    seed: int | None = None
    group: int = 0
    sample: int = 0
    step: int = 0
    finish_reason: str | None = None
    task: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        C = len(self.completion_ids)
        for name in ("token_mask", "logprobs"):
            if len(getattr(self, name)) != C:
                raise ValueError(f"Rollout.{name} has {len(getattr(self, name))} entries for {C} completion tokens")
        if self.kept is not None and len(self.kept) != C:
            raise ValueError(f"Rollout.kept has {len(self.kept)} entries for {C} completion tokens")
        n_pos = len(self.prompt_ids) + C - 1
        for layer, r in enumerate(self.routes or []):
            if r.dim() != 2 or r.shape[0] != n_pos:
                raise ValueError(f"Rollout.routes[{layer}] is {tuple(r.shape)}; expected [{n_pos}, K] "
                                 "(prompt positions + completion positions but the last)")

    @property
    def num_trained(self) -> int:
        return int(sum(self.token_mask))


# ------------------------------------------------------------------------------------------- save / load

_TENSOR_FIELDS = ("kept", "routes")


def sidecar_path(path: str | Path) -> Path:
    """``rollouts.jsonl`` -> ``rollouts.safetensors`` (kept sets and routes)."""
    return Path(path).with_suffix(".safetensors")


def save(rollouts: Sequence[Rollout], path: str | Path) -> None:
    """Write ``path`` (JSONL, one rollout a line) and its safetensors sidecar.

    Sidecar keys per rollout ``i``: ``{i}.routes`` [L, P + C - 1, K] (int16 when the ids fit), ``{i}.kept_ids``
    (all kept sets concatenated, int32) and ``{i}.kept_len`` [C] (set sizes; 0 marks a None entry: a real
    kept set is never empty).
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    lines = []
    for i, ro in enumerate(rollouts):
        rec = {f.name: getattr(ro, f.name) for f in fields(ro) if f.name not in _TENSOR_FIELDS}
        rec["has_kept"], rec["has_routes"] = ro.kept is not None, ro.routes is not None
        lines.append(json.dumps(rec))
        if ro.routes is not None:
            r = torch.stack([x.long() for x in ro.routes]) if ro.routes else torch.zeros(0, 0, 0, dtype=torch.long)
            small = r.numel() == 0 or (int(r.max()) < 2**15 and int(r.min()) >= -(2**15))
            tensors[f"{i}.routes"] = r.to(torch.int16 if small else torch.int32).contiguous()
        if ro.kept is not None:
            sizes = [0 if k is None else int(k.numel()) for k in ro.kept]
            if any(k is not None and k.numel() == 0 for k in ro.kept):
                raise ValueError(f"rollout {i}: an empty kept set (None means 'nothing truncated')")
            parts = [k.reshape(-1).to(torch.int32) for k in ro.kept if k is not None]
            tensors[f"{i}.kept_ids"] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
            tensors[f"{i}.kept_len"] = torch.tensor(sizes, dtype=torch.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    side = sidecar_path(path)
    side_tmp = side.with_name(side.name + ".tmp")
    save_file(tensors, str(side_tmp))
    side_tmp.replace(side)
    tmp.replace(path)


def load(path: str | Path) -> list[Rollout]:
    """Read what :func:`save` wrote (ids as int64)."""
    path = Path(path)
    tensors = load_file(str(sidecar_path(path)))
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        rec = json.loads(line)
        has_kept, has_routes = rec.pop("has_kept"), rec.pop("has_routes")
        if has_routes:
            rec["routes"] = list(tensors[f"{i}.routes"].long().unbind(0))
        if has_kept:
            ids = tensors[f"{i}.kept_ids"].long()
            sizes = tensors[f"{i}.kept_len"].tolist()
            kept: list[torch.Tensor | None] = []
            start = 0
            for n in sizes:
                kept.append(ids[start : start + n] if n else None)
                start += n
            rec["kept"] = kept
        out.append(Rollout(**rec))
    return out


# ------------------------------------------------------------------------------------------ group sampling


def completion_seed(run_seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one completion, a function of (run seed, step, prompt index, sample index) only: a redone
    or resumed step, or a step spread over several workers, draws exactly the same tokens."""
    key = f"dsv32.rl:{run_seed}:{step}:{prompt_index}:{sample_index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1  # 63-bit, >= 0


def sample_groups(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    group_size: int,
    *,
    run_seed: int,
    step: int,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int] = (),
    keep_routes: bool = True,
    first_prompt: int = 0,
) -> list[Rollout]:
    """Sample ``group_size`` completions of every prompt; returns rollouts prompt-major (group, sample).

    Every completion is its own request with its own derived seed (:func:`completion_seed`), so its tokens do
    not depend on how the engine batched it. The engine reports the sampler's log-probabilities, the kept ids
    (when top-k/top-p/temperature truncates) and, with ``keep_routes``, the MoE routes. Rewards are the
    caller's (decode, then score with a task). ``first_prompt``: the step-wide index of ``prompts[0]`` (a worker
    sampling a slice of the step's prompts numbers groups, and so derives seeds, as one process would).
    """
    if temperature <= 0:
        raise ValueError("RL sampling needs temperature > 0 (greedy rollouts have no log-probabilities)")
    handles = []
    for g, prompt in enumerate(prompts, start=first_prompt):
        for j in range(group_size):
            seed = completion_seed(run_seed, step, g, j)
            params = SamplingParams(
                max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                stop_token_ids=tuple(stop_token_ids), return_allowed=True, return_routes=keep_routes,
            )
            handles.append((g, j, seed, list(prompt), params, engine.submit(prompt, params)))
    out = []
    for g, j, seed, prompt, _params, handle in handles:
        res = handle.result()
        if res.error is not None:
            raise RuntimeError(f"rollout (prompt {g}, sample {j}) failed in the engine: {res.error}")
        seq = res.sequences[0]
        routes = None
        if keep_routes and res.prompt_routes is not None:
            # prompt positions, then the positions completion tokens 0..C-2 were fed at (token t's own routes
            # are those of the position it was sampled from, P-1+t: the first one repeats the last prompt row)
            fed = seq.routes[1:]
            routes = [
                torch.cat([pr.long(), torch.stack([r[layer] for r in fed]).long()]) if fed else pr.long()
                for layer, pr in enumerate(res.prompt_routes)
            ]
        # a kept set exists wherever the sampler removed ids: truncation, but also a logits mask or min_tokens
        # (the engine then reports ``allowed`` at those steps only; None elsewhere = nothing removed)
        truncated = any(a is not None for a in seq.allowed)
        out.append(Rollout(
            prompt_ids=prompt,
            completion_ids=list(seq.tokens),
            token_mask=[1] * len(seq.tokens),
            logprobs=list(seq.logprobs),
            kept=[a.long() if a is not None else None for a in seq.allowed] if truncated else None,
            routes=routes,
            temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
            group=g, sample=j, step=step, finish_reason=seq.finish_reason,
        ))
    return out
