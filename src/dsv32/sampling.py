"""Token sampling: temperature, top-k, top-p (nucleus). Pure functions on logits; shared by `generate` and the engine.

Returns what post-training needs besides the token: the log-probability of the sampled token under the
distribution actually sampled from (after temperature and truncation).
"""

from __future__ import annotations

import torch


def truncated_logprobs(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """logits [N,V] -> log-probabilities [N,V] of the sampling distribution (-inf outside the kept set).

    temperature <= 0 means greedy: all mass on the arg-max (ties to the lower id).
    """
    logits = logits.float()
    if temperature <= 0:
        out = torch.full_like(logits, float("-inf"))
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
    x = logits / temperature
    if top_k and top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter_(-1, order, sorted_x)
    return x.log_softmax(-1)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N,V] -> (token ids [N], their log-probabilities [N] under the truncated distribution)."""
    lp = truncated_logprobs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature <= 0:
        tok = lp.argmax(-1)
    else:
        if generator is None:
            generator = torch.Generator(device=logits.device)
            generator.seed()
        probs = lp.exp()
        tok = torch.tensor([draw(p, generator) for p in probs], device=logits.device)
    return tok, lp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)


def draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One sample from ``probs`` [V] by inverting the CDF with a single uniform number.

    Why not ``torch.multinomial``: on CPU it costs ~5 ms for a 129K vocabulary (it spends random numbers
    on the whole row), more than a tiny model's whole decode step; this costs a cumsum. Ids with zero
    probability are never returned: the target lies in (0, total], and the first index whose cumulative
    mass reaches it is where the mass grows. The engine and `dsv32 generate` both draw this way, so the same
    seed gives the same tokens in both.
    """
    cdf = probs.double().cumsum(-1)
    u = float(torch.rand((), generator=gen, device=probs.device, dtype=torch.float64))
    target = (1.0 - u) * cdf[-1]
    return min(int(torch.searchsorted(cdf, target.reshape(1))), probs.shape[-1] - 1)
