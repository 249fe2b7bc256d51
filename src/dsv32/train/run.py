"""The one run loop every training stage shares: resume -> step -> save -> graceful stop, with metrics.

`dsv32 train` (``trainer.py``), `dsv32 sparsify` (``sparsify.py``) and RL plug into :class:`RunLoop`; each keeps
only what is its own: the model, the optimiser, the data and the optimiser step. Everything around the step
lives here once:

- **Where to start.** Rank 0 finds the newest checkpoint that verifies (``checkpointing.latest_valid``:
  leftovers of an interrupted save cleaned up, corrupt checkpoints moved aside) or refuses an output directory
  that already holds checkpoints without ``--resume``; every rank follows its answer.
- **Exact resume.** A checkpoint holds the caller's parts plus, in its ``trainer`` part, the step count and
  every RNG state; at resume the loop hands the parts back to the caller, restores the RNGs and drops the lines
  of ``metrics.jsonl`` past the checkpoint (they are redone). Steps must therefore be pure functions of
  (saved state, step index): data as a function of the step (``TokenDataset.batch``), no hidden iterators.
- **Saving.** Every ``save_every`` steps, at the end, and when SIGINT/SIGTERM arrived (the step in flight
  finishes, the flag is OR-ed over ranks so all stop after the same step, then save and return).
  ``state()`` runs on every rank (it may be collective, e.g. gathering FSDP shards); rank 0 alone writes.
- **Distributed helpers** (torchrun, gloo on CPU / nccl on CUDA), optimiser state in the replicated layout
  under FSDP, the LR schedule, and ``metrics.jsonl``.

How a new stage plugs in (RL is the model)::

    d = setup_dist(args.device)
    with RunLoop(args.out, name="dsv32 rl", max_steps=args.max_steps, save_every=args.save_every,
                 resume=args.resume, d=d) as loop:
        parts = loop.resume_parts                     # None on a fresh start; read what building needs
        model, opt = build(...)
        if parts is not None:
            model.load_state_dict(parts["model"])     # or inside load(); before FSDP sharding, as the trainer

        def step(i: int) -> dict:                     # optimiser step with 0-based index i (the i+1-th step)
            ...                                       # a pure function of (state, i): derive seeds from i
            return {"loss": ..., "seconds": ...}      # one metrics.jsonl line; the loop adds "step": i + 1

        def state() -> dict:                          # name -> torch-saveable object (weights_only loadable)
            return {"model": model.state_dict(), "optimizer": opt.state_dict(), "trainer": {"extra": ...}}

        def load(parts: dict) -> None:                # the same dict back, at resume
            opt.load_state_dict(parts["optimizer"])

        result = loop.run(step, state=state, load=load)
    if result.stopped: ...                            # a signal (or loop.request_stop()) ended it; saved

The ``trainer`` part is shared: the loop writes ``step`` and ``rng`` into it beside the caller's own keys.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dsv32.train import checkpointing as ckpt

#: The checkpoint part that holds the loop's own state (step, RNGs) beside the caller's extra state.
RUN_PART = "trainer"

# ============================================================================================ schedule


def lr_at(i: int, *, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Learning rate of the optimiser step with 0-based index ``i``: linear warm-up over ``warmup`` steps,
    then a cosine from ``lr`` down to ``min_lr``, reached at the last step."""
    if i < warmup:
        return lr * (i + 1) / warmup
    span = max(1, max_steps - 1 - warmup)
    progress = min(1.0, (i - warmup) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ============================================================================================ distributed


@dataclass
class Dist:
    """This process's place in a data-parallel group (a world of one without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        """The reduced tensor, on ``t``'s device (the collective itself runs on this rank's device: nccl
        only reduces CUDA tensors). Use the return value; ``t`` may or may not be updated in place."""
        if self.world == 1:
            return t
        x = t.to(self.device)
        dist.all_reduce(x, op=op)
        return x.to(t.device)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if self.world == 1:
            return flag
        return bool(self.all_reduce(torch.tensor([float(flag)]), dist.ReduceOp.MAX).item() > 0)


def setup_dist(device_arg: str) -> Dist:
    """Read torchrun's environment and join the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_arg)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, local_world, device)


def all_reduce_grads(params: list[nn.Parameter], d: Dist, bucket_bytes: int = 32 << 20) -> None:
    """Sum gradients over ranks in flat buckets (each rank's loss is already divided by the *global* count)."""
    if d.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in [*grads, None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            off = 0
            for b in bucket:
                b.copy_(flat[off : off + b.numel()].view_as(b))
                off += b.numel()
            bucket, size = [], 0


def param_fingerprint(model: nn.Module) -> torch.Tensor:
    """A cheap fp64 summary of every parameter and buffer: equal on all ranks while they stay in lockstep."""
    sd = model.state_dict()
    return torch.stack([t.double().sum() + t.double().abs().sum() for t in sd.values()]).sum().reshape(1)


def check_replicas(model: nn.Module, d: Dist) -> None:
    """Raise when data-parallel replicas no longer hold the same weights (collective; a no-op for one rank)."""
    if d.world == 1:
        return
    fp = param_fingerprint(model).to(d.device)
    lo, hi = d.all_reduce(fp.clone(), dist.ReduceOp.MIN), d.all_reduce(fp.clone(), dist.ReduceOp.MAX)
    if not torch.allclose(lo, hi, rtol=1e-9, atol=0):
        raise RuntimeError("data-parallel ranks diverged (parameter fingerprints differ)")


# ============================================================================================ optimiser state


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 module. FSDP is looked up, not imported: importing it costs about a second,
    and a process that never imported it cannot have sharded anything."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def _optimizer_order(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimiser's own order: index i of ``opt.state_dict()`` is name ``order[i]``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def _rekey_optimizer_state(sd: dict[str, Any], key: Callable[[Any], Any]) -> dict[str, Any]:
    """An optimiser state dict with every parameter key (in ``state`` and in the groups' ``params``) mapped by
    ``key``: between ``opt.state_dict()``'s integer indices and the parameter names DCP uses."""
    return {
        "state": {key(k): v for k, v in sd["state"].items()},
        "param_groups": [{**g, "params": [key(k) for k in g["params"]]} for g in sd["param_groups"]],
    }


def full_state(model: nn.Module, opt: torch.optim.Optimizer | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The unsharded model and optimiser state (CPU tensors) in the replicated layout: ``model.state_dict()``
    keys and ``opt.state_dict()``'s integer parameter indices. Collective under FSDP (every rank calls it;
    rank 0 receives the tensors, the others empty dicts)."""
    if not is_sharded(model):
        return ({k: v.detach().cpu() for k, v in model.state_dict().items()},
                None if opt is None else opt.state_dict())
    # lazy: only FSDP runs need DCP, and it is slow to import (see is_sharded)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=options)
    if opt is None:
        return msd, None
    osd = get_optimizer_state_dict(model, opt, options=options)
    if not osd:
        return msd, {}
    index = {n: i for i, n in enumerate(_optimizer_order(model, opt))}
    return msd, _rekey_optimizer_state(osd, index.__getitem__)


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load ``opt.state_dict()``-layout state (as ``full_state`` writes it), sharding it under FSDP."""
    if not is_sharded(model):
        opt.load_state_dict(sd)
        return
    # lazy: only FSDP runs need DCP, and it is slow to import (see is_sharded)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    order = _optimizer_order(model, opt)
    fqn = _rekey_optimizer_state(sd, lambda i: order[int(i)])
    # strict=False: parameters that never received a gradient (an unused indexer) have no AdamW state, as in
    # ``opt.state_dict()`` itself
    set_optimizer_state_dict(model, opt, fqn, options=StateDictOptions(full_state_dict=True, strict=False))
    for name, param in model.named_parameters():  # ... and stay without it (the loader initialises one)
        if name not in fqn["state"]:
            opt.state.pop(param, None)


# ============================================================================================ RNG and metrics


def rng_state() -> dict[str, Any]:
    """Every RNG the process uses, as tensors and plain containers (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """``OUT/metrics.jsonl``: one JSON object per optimiser step, appended and flushed as it happens."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop the steps after the checkpoint (they are redone) and any torn last line."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, rec: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")


# ============================================================================================ the loop


@dataclass
class RunResult:
    step: int  # optimiser steps done (== max_steps unless a signal stopped the run)
    stopped: bool  # a SIGINT/SIGTERM ended the run early (its checkpoint is saved)


class RunLoop:
    """Resume -> step -> save -> graceful stop around a caller's step function (see the module docstring).

    Entering the context installs the SIGINT/SIGTERM handlers and decides where the run starts:
    :attr:`resume_checkpoint` / :attr:`resume_parts` / :attr:`start_step`. :meth:`run` then restores the
    caller's state and RNGs, runs ``step_fn`` until ``max_steps``, and saves. Checkpoints go to ``OUT/ckpt``
    (``keep`` newest kept; None or 0: all), metrics to ``OUT/metrics.jsonl``; rank 0 alone writes.
    """

    def __init__(self, out: str | Path, *, name: str, max_steps: int, save_every: int, keep: int | None = 3,
                 resume: bool = False, d: Dist | None = None, progress: bool = True) -> None:
        self.out, self.name = Path(out), name
        self.ckpt_root = self.out / "ckpt"
        self.max_steps, self.save_every, self.keep, self.resume = max_steps, save_every, keep or None, resume
        self.d = d if d is not None else Dist()
        self.progress = progress
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.d.main)
        self.stopper = ckpt.GracefulStop()
        self.resume_checkpoint: Path | None = None
        self.resume_parts: dict[str, Any] | None = None
        self.start_step = 0
        self.step = 0  # optimiser steps done so far (the step count a save records)

    def log(self, msg: str) -> None:
        """A line on stderr from rank 0 (above the progress bar)."""
        if self.d.main:
            tqdm.write(msg, file=sys.stderr)

    @property
    def stop_requested(self) -> bool:
        """A stop was asked of this rank (the loop stops after the step in flight, agreed over ranks)."""
        return self.stopper.requested

    def request_stop(self) -> None:
        """Stop after the step in flight, save and return, as SIGTERM would (e.g. a caller's time budget)."""
        self.stopper.requested = True

    def __enter__(self) -> RunLoop:
        self.stopper.__enter__()
        try:
            self._find_start()
        except BaseException:
            self.stopper.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopper.__exit__(*exc)

    def _find_start(self) -> None:
        # rank 0 decides (and cleans up); the others follow, so an error stops every rank alike
        start: tuple[str | None, str | None] = (None, None)  # (checkpoint to resume, error)
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume:
                found = ckpt.latest_valid(self.ckpt_root)
                start = (str(found[0]) if found else None, None)
                if found is None:
                    self.log("--resume: no checkpoint yet, starting from scratch")
            elif ckpt.list_checkpoints(self.ckpt_root):
                start = (None, f"{self.name}: {self.ckpt_root} already holds checkpoints; pass --resume to "
                               "continue, or use a fresh --out")
        path, error = self.d.broadcast_object(start)
        if error:
            raise SystemExit(error)
        if path is not None:
            self.resume_checkpoint = Path(path)
            self.resume_parts = ckpt.load_parts(path)
            self.start_step = self.step = int(self.resume_parts[RUN_PART]["step"])

    def run(self, step_fn: Callable[[int], dict[str, Any]], *, state: Callable[[], dict[str, Any] | None],
            load: Callable[[dict[str, Any]], None] | None = None,
            postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None,
            after_save: Callable[[int], None] | None = None) -> RunResult:
        """Restore (when resuming), then ``step_fn(i)`` for i = start_step .. max_steps - 1, saving as configured.

        ``step_fn(i)`` does optimiser step i and returns its metrics (without ``step``). ``state()`` returns the
        checkpoint parts (called on every rank; what non-zero ranks return is ignored); ``load(parts)`` receives
        them back at resume. ``postfix(record)`` gives the progress bar's fields; ``after_save(step)`` runs on
        rank 0 after each checkpoint (e.g. to export a side file).
        """
        d = self.d
        if self.resume_parts is not None:
            if load is not None:
                load(self.resume_parts)
            set_rng_state(self.resume_parts[RUN_PART]["rng"])
            self.metrics.truncate_after(self.step)
            self.log(f"resumed from {self.resume_checkpoint} at step {self.step}")
            self.resume_parts = None  # the tensors now live in the caller's objects
        elif self.metrics.enabled and self.metrics.path.exists():
            self.metrics.truncate_after(0)

        def save(reason: str) -> None:
            parts = state()  # every rank: may be collective (FSDP gathers its shards)
            if d.main:
                if parts is None:
                    raise RuntimeError(f"{self.name}: state() returned None on rank 0; it must return the parts")
                parts = {**parts, RUN_PART: {**parts.get(RUN_PART, {}), "step": self.step, "rng": rng_state()}}
                path = ckpt.save_checkpoint(self.ckpt_root, self.step, parts, keep=self.keep,
                                            info={"reason": reason})
                if after_save is not None:
                    after_save(self.step)
                self.log(f"step {self.step}: saved {path} ({reason})")
            d.barrier()

        bar = tqdm(total=self.max_steps, initial=self.step, disable=not self.progress or not d.main, unit="step",
                   dynamic_ncols=True)
        last_saved = self.step if self.resume_checkpoint is not None else -1
        try:
            while self.step < self.max_steps:
                rec = step_fn(self.step)
                self.step += 1
                rec = {"step": self.step, **rec}
                self.metrics.write(rec)
                bar.update(1)
                if postfix is not None:
                    bar.set_postfix(**postfix(rec))
                if d.any(self.stopper.requested):
                    save(f"stopped by {self.stopper.signal_name or 'request'}")
                    self.log(f"stopped at step {self.step}; resume with --resume")
                    return RunResult(self.step, stopped=True)
                if self.save_every and self.step % self.save_every == 0 and self.step < self.max_steps:
                    save("periodic")
                    last_saved = self.step
            if last_saved != self.step:
                save("final")
        finally:
            bar.close()
        return RunResult(self.step, stopped=False)


__all__ = [
    "RunLoop", "RunResult", "RUN_PART", "Dist", "setup_dist", "all_reduce_grads", "check_replicas",
    "param_fingerprint", "is_sharded", "full_state", "load_optimizer_state", "rng_state", "set_rng_state",
    "MetricsLog", "lr_at",
]
