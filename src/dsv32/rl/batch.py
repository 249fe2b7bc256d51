"""Rollouts -> padded training tensors, and the training policy's log-probabilities of the sampled tokens.

:func:`policy_logprobs` is the training side of Keep Routing (the engine's routes forced through
``forced_routes``) and Keep Sampling Mask (the sampler's kept ids renormalised over with
:func:`dsv32.rl.losses.kept_logprobs`), V3.2 report §3.1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from dsv32.rl.losses import kept_logprobs
from dsv32.rl.rollout import Rollout


@dataclass
class Batch:
    """S rollouts, right-padded. L = the longest ``prompt + completion[:-1]`` (every position whose logits the
    loss reads), T = the longest completion.

    input_ids [S, L]; logit_pos [S, T]: the input position whose logits sampled completion token t
    (``P_i - 1 + t``; 0 on padding); targets / token_mask / logp_old [S, T]; kept [S, T, V] bool or None
    (an all-False row = not truncated); routes: per MoE layer [S * L, K] (padding rows route to experts
    0..K-1, which only padding positions see) or None; rewards [S]; input_len [S]: each row's real length.
    """

    input_ids: torch.Tensor
    logit_pos: torch.Tensor
    targets: torch.Tensor
    token_mask: torch.Tensor
    logp_old: torch.Tensor
    kept: torch.Tensor | None
    routes: list[torch.Tensor] | None
    rewards: torch.Tensor
    temperature: float
    input_len: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[name] = v.to(device)
        if self.routes is not None:
            moved["routes"] = [r.to(device) for r in self.routes]
        return Batch(**moved)


def collate(
    rollouts: Sequence[Rollout],
    vocab_size: int,
    *,
    keep_sampling_mask: bool = True,
    keep_routing: bool = True,
    pad_id: int = 0,
) -> Batch:
    """Pad ``rollouts`` into a :class:`Batch`. ``keep_sampling_mask`` / ``keep_routing`` off (the ablations)
    leave ``kept`` / ``routes`` None; on, routes must have been recorded for every rollout."""
    if not rollouts:
        raise ValueError("collate needs at least one rollout")
    temps = {ro.temperature for ro in rollouts}
    if len(temps) != 1:
        raise ValueError(f"rollouts of one batch must share a temperature, got {sorted(temps)}")
    S = len(rollouts)
    seqs = [(ro.prompt_ids + ro.completion_ids)[:-1] for ro in rollouts]
    L = max(len(s) for s in seqs)
    T = max(max(len(ro.completion_ids) for ro in rollouts), 1)
    input_ids = torch.full((S, L), pad_id, dtype=torch.long)
    logit_pos = torch.zeros(S, T, dtype=torch.long)
    targets = torch.zeros(S, T, dtype=torch.long)
    token_mask = torch.zeros(S, T, dtype=torch.bool)
    logp_old = torch.zeros(S, T, dtype=torch.float32)
    for i, (ro, s) in enumerate(zip(rollouts, seqs)):
        C, P = len(ro.completion_ids), len(ro.prompt_ids)
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        logit_pos[i, :C] = torch.arange(P - 1, P - 1 + C)
        targets[i, :C] = torch.tensor(ro.completion_ids, dtype=torch.long)
        token_mask[i, :C] = torch.tensor(ro.token_mask, dtype=torch.bool)
        logp_old[i, :C] = torch.tensor(ro.logprobs, dtype=torch.float32)

    kept = None
    if keep_sampling_mask and any(ro.kept is not None for ro in rollouts):
        kept = torch.zeros(S, T, vocab_size, dtype=torch.bool)
        for i, ro in enumerate(rollouts):
            for t, ids in enumerate(ro.kept or []):
                if ids is not None:
                    kept[i, t, ids.long()] = True

    routes = None
    if keep_routing:
        missing = [i for i, ro in enumerate(rollouts) if ro.routes is None]
        if missing:
            raise ValueError(f"keep_routing: rollouts {missing[:8]} carry no routes (sampled without return_routes)")
        n_layers = {len(ro.routes) for ro in rollouts}  # type: ignore[arg-type]
        if len(n_layers) != 1:
            raise ValueError(f"rollouts disagree on the number of MoE layers: {sorted(n_layers)}")
        n = n_layers.pop()
        if n:
            K = rollouts[0].routes[0].shape[-1]  # type: ignore[index]
            routes = []
            for layer in range(n):
                r = torch.arange(K, dtype=torch.long).repeat(S, L, 1)  # [S, L, K]
                for i, ro in enumerate(rollouts):
                    rr = ro.routes[layer]  # type: ignore[index]
                    r[i, : rr.shape[0]] = rr.long()
                routes.append(r.reshape(S * L, K))
    rewards = torch.tensor([float(ro.reward) if ro.reward is not None else 0.0 for ro in rollouts])
    input_len = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return Batch(input_ids, logit_pos, targets, token_mask, logp_old, kept, routes, rewards, temps.pop(), input_len)


def policy_logprobs(model: torch.nn.Module, batch: Batch, *, forward_kwargs: dict | None = None) -> torch.Tensor:
    """Log-probabilities [S, T] of the sampled tokens under ``model``, replaying ``batch.routes`` (Keep Routing)
    and renormalising over ``batch.kept`` (Keep Sampling Mask) at the rollout temperature. Differentiable.

    Only the completion positions go through the output head (hidden states gathered first).
    """
    kw = dict(forward_kwargs or {})
    if batch.routes is not None:
        kw["forced_routes"] = batch.routes
    out = model(batch.input_ids, return_hidden=True, compute_logits=False, **kw)
    h = out.hidden  # [S, L, D]
    idx = batch.logit_pos.unsqueeze(-1).expand(-1, -1, h.shape[-1])  # [S, T, D]
    logits = model.logits_from_hidden(h.gather(1, idx))  # [S, T, V]
    return kept_logprobs(logits, batch.targets, batch.kept, temperature=batch.temperature)


@torch.no_grad()
def route_flip_rate(model: torch.nn.Module, batch: Batch, *, forward_kwargs: dict | None = None) -> float:
    """Share of (position, MoE layer) pairs whose expert set under ``model``'s own routing differs from the
    recorded routes: what Keep Routing prevents once the weights have moved. Padding positions are left out."""
    if batch.routes is None:
        raise ValueError("route_flip_rate needs recorded routes (collate with keep_routing=True)")
    out = model(batch.input_ids, return_routes=True, compute_logits=False, **(forward_kwargs or {}))
    S, L = batch.input_ids.shape
    real = (torch.arange(L, device=batch.input_len.device) < batch.input_len.unsqueeze(-1)).reshape(-1)  # [S*L]
    flips = total = 0
    for rec, free in zip(batch.routes, out.routes):  # main layers in order (no MTP: it did not run)
        differ = (rec.sort(-1).values != free.reshape(S * L, -1).sort(-1).values).any(-1)
        flips += int((differ & real).sum())
        total += int(real.sum())
    return flips / max(total, 1)
