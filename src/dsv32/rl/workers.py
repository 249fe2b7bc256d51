"""Rollouts in Ray actors: ``dsv32 rl --rollout-workers N`` (the optional ``rl`` extra).

Each :class:`RolloutWorker` holds its own copy of the policy and its own :class:`dsv32.engine.Engine`; the
learner stays in the driver. A step's prompts are split into N contiguous slices, one per worker; every
completion keeps the seed it has in a single process (``sample_groups(first_prompt=...)`` numbers the groups
step-wide), so the rollouts, and therefore the run, are those of ``--rollout-workers 0``. After each update the
driver puts the new state dict into Ray's object store once and every worker copies it in
(:meth:`RaySampler.refresh`) before the next step samples.

Only ``dsv32.rl.cli`` imports this module, and only when ``--rollout-workers`` > 0: a default run never imports
Ray.
"""

from __future__ import annotations

from typing import Any

import ray
import torch
from torch import nn

from dsv32.engine import Engine
from dsv32.rl.rollout import Rollout, sample_groups


@ray.remote
class RolloutWorker:
    """One engine over one copy of the policy, in its own process."""

    def __init__(self, model: nn.Module, slots: int, max_len: int, threads: int | None) -> None:
        torch.set_num_threads(threads or 1)
        self.model = model.eval().requires_grad_(False)
        self.engine = Engine(self.model, max_slots=slots, max_len=max_len, num_threads=threads or 1,
                             prefix_reuse=False)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.model.load_state_dict(state)

    def sample(self, prompts: list[list[int]], group_size: int, first_prompt: int, kw: dict[str, Any]) -> list[Rollout]:
        return sample_groups(self.engine, prompts, group_size, first_prompt=first_prompt, **kw)

    def close(self) -> None:
        self.engine.shutdown()


def _slices(n: int, k: int) -> list[tuple[int, int]]:
    """``range(n)`` in at most ``k`` contiguous non-empty slices, as equal as possible."""
    k = min(k, n)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


class RaySampler:
    """The ``--rollout-workers N`` sampler: the same interface as ``rl.cli.LocalSampler``.

    Starts Ray (``num_cpus=N``) unless the caller already did, and shuts it down on :meth:`close` only then.
    """

    def __init__(self, policy: nn.Module, workers: int, *, slots: int, max_len: int, threads: int | None) -> None:
        if workers < 1:
            raise ValueError(f"RaySampler needs at least one worker, got {workers}")
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        model_ref = ray.put(policy)
        self.actors = [RolloutWorker.options(num_cpus=1).remote(model_ref, slots, max_len, threads)
                       for _ in range(workers)]

    def sample(self, prompts: list[list[int]], group_size: int, **kw: Any) -> list[Rollout]:
        parts = _slices(len(prompts), len(self.actors))
        futures = [a.sample.remote(prompts[s:e], group_size, s, kw) for a, (s, e) in zip(self.actors, parts)]
        return [ro for part in ray.get(futures) for ro in part]  # prompt-major, as one process returns them

    def refresh(self, policy: nn.Module) -> None:
        """Broadcast the policy's weights: one object in the store, copied in by every worker."""
        state = ray.put({k: v.detach().cpu() for k, v in policy.state_dict().items()})
        ray.get([a.load_state.remote(state) for a in self.actors])

    def close(self) -> None:
        try:
            ray.get([a.close.remote() for a in self.actors])
        finally:
            for a in self.actors:
                ray.kill(a)
            if self.owns_ray:
                ray.shutdown()
