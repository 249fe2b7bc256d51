"""`dsv32 train`: one trainer for pre-training, continued training (``--init-from``) and SFT (``--sft``).

Notable choices (DeepSeek-V3 report, arXiv:2412.19437, unless noted):
- AdamW; no weight decay on norms, biases and embeddings; linear warm-up then cosine to ``--min-lr``;
  global-norm gradient clipping; gradient accumulation (``--grad-accum`` micro-batches per optimiser step).
- Loss = LM cross-entropy + ``--mtp-weight`` x MTP loss (§2.2, eq. 25: lambda 0.3 early, 0.1 later) +
  ``--balance-alpha`` x sequence-wise balance loss (§2.1.2, eq. 17-20). Cross-entropy runs in row chunks
  from the hidden states (``losses.chunked_cross_entropy``), never through a full [B, S, V] logits tensor.
- Auxiliary-loss-free balancing (§2.1.2): after every optimiser step each MoE layer's router bias moves by
  ``--bias-update-speed`` towards balance, from the step's routes over the global batch (all-reduced).
- Every loss is a sum over the global batch divided by the global count of its terms, so accumulation and
  data parallelism give the same numbers as one big batch (tested: 2 processes = 1 process within 1e-5).
- fp32 on CPU; bf16 autocast (fp32 master weights) on CUDA.
- Data-parallel over ``torchrun`` (gloo on CPU, nccl on CUDA): every rank reads its own part of the global
  batch (``TokenDataset.batch(..., rank, world_size)``), gradients and expert loads are all-reduced by hand
  (one flat buffer), so ranks stay bit-identical; rank 0 alone writes metrics and checkpoints.
- ``--fsdp``: the same data parallelism with parameters, gradients and AdamW state sharded over the ranks
  (PyTorch FSDP2, ``fully_shard`` per decoder block and MTP module, then the root), for models whose
  replica does not fit one device. Gradients are reduce-scattered as sums (the losses are already global
  means); checkpoints hold the same full, unsharded tensors as a replicated run, so either kind resumes
  the other.
- Checkpoints (``run.RunLoop``, the loop sparsify and RL share, over ``checkpointing.py``): atomic,
  checksummed, last ``--keep`` kept, saved every ``--save-every`` steps, at the end, and on SIGINT/SIGTERM (the
  step in flight finishes, then save, exit 0). ``--resume`` restores model, optimiser, scheduler, RNG states,
  router biases and the data position exactly.
- ``--preset`` on data prepared with another tokenizer takes that tokenizer's vocabulary size from the data's
  manifest (logged; ``--vocab-size`` overrides).
- Batches are pure functions of (seed, step, micro-batch, rank), so resuming needs no loader state.
- MFU = FLOPs/token (``flops_per_token``) x tokens/s / the matmul rate measured at start-up.

CPU example (a few minutes on 2 cores)::

    dsv32 data prepare --out runs/data --source shakespeare --tokenizer runs/tok
    dsv32 train --preset small --data runs/data --out runs/small --max-steps 200 --save-every 50 \\
        --seq-len 256 --batch-size 8 --lr 1e-3 --warmup 20 --eval-every 50
    dsv32 plot runs/small
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dsv32.chat import encode_chat
from dsv32.checkpoint import load_model, save_model
from dsv32.config import ModelConfig
from dsv32.data import TokenDataset, read_manifest
from dsv32.model import Transformer
from dsv32.tokenizer import load_tokenizer
from dsv32.train.losses import (
    chunked_cross_entropy,
    expert_load,
    mtp_targets,
    sequence_balance_loss,
    update_router_bias,
)
from dsv32.train.run import (
    Dist,
    RunLoop,
    all_reduce_grads,
    check_replicas,
    full_state,
    is_sharded,
    load_optimizer_state,
    lr_at,
    setup_dist,
)

# ============================================================================================ FLOPs and MFU


def flops_per_token(cfg: ModelConfig, seq_len: int, *, mtp: bool = True) -> float:
    """Model FLOPs of one training token (forward + backward), the numerator of MFU.

    6 x the matmul parameters a token activates (routed experts: only K of E; the embedding lookup is free;
    the LM head once per prediction head), plus causal attention in MLA's MHA form, 6 x H (d_qk + d_v) per
    attended key. With DSA active (``seq_len > index_topk``) each query attends to min(t+1, k) keys and the
    lightning indexer scores all earlier keys; the indexer gets no gradient from the LM loss (its top-k only
    selects), so its projections and scores count forward-only (2 per parameter / multiply-add).
    ``mtp=False`` leaves out the MTP modules (for models trained without them, such as HF's).
    """
    D, V, H = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    Dq, Dl, R = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    Dn, Dv = cfg.qk_nope_head_dim, cfg.v_head_dim
    attn = D * Dq + Dq * H * (Dn + R) + D * (Dl + R) + Dl * H * (Dn + Dv) + H * Dv * D
    indexer = Dq * cfg.index_n_heads * cfg.index_head_dim + D * cfg.index_head_dim + D * cfg.index_n_heads
    moe = 3 * D * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    moe += D * cfg.n_routed_experts  # router
    dense = 3 * D * cfg.intermediate_size

    def ffn(layer_id: int) -> int:
        return moe if cfg.is_moe_layer(layer_id) else dense

    S = seq_len
    sparse = cfg.use_dsa and S > cfg.index_topk
    k = cfg.index_topk if sparse else S
    keys = (k * (k + 1) / 2 + (S - k) * k) / S  # mean attended keys per query (causal, capped at k)
    core = 6 * H * (Dn + R + Dv) * keys
    index_scores = 2 * cfg.index_n_heads * cfg.index_head_dim * (S + 1) / 2 if sparse else 0.0

    n_mtp = cfg.num_nextn_predict_layers if mtp else 0
    L = cfg.num_hidden_layers
    trained = sum(attn + ffn(i) for i in range(L)) + D * V
    trained += sum(2 * D * D + attn + ffn(L + j) + D * V for j in range(n_mtp))
    per_layer_fwd_only = (indexer + index_scores / 2) if sparse else 0.0
    return 6.0 * trained + (L + n_mtp) * (core + 2.0 * per_layer_fwd_only)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """Best sustained square-matmul rate (FLOP/s) on this device with the current thread count: the MFU peak.

    Measured rather than looked up because a CPU's rate depends on its vector units, clock and the threads
    torch uses; n = 1024 is large enough to reach the BLAS plateau on a laptop core and quick everywhere.
    """
    n = 1024 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 50 if device.type == "cuda" else 4

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    (a @ b).sum().item()  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            c = a @ b
        sync()
        dt = time.perf_counter() - t
        del c
        best = max(best, 2 * n**3 * reps / dt)
        if time.perf_counter() > deadline:
            return best


# ============================================================================================ optimiser


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (>= 2-d) except embeddings; none on norms, biases, embeddings.

    Decay pulls weights towards zero, which suits projections but only shrinks a norm's gain or an
    embedding row that a rare token seldom updates (the usual GPT-2/nanoGPT split).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ============================================================================================ distributed


def shard_model(model: nn.Module, d: Dist) -> None:
    """FSDP2: shard every decoder block, every MTP module and then the root (embedding, final norm, head) over
    the ranks. Gradients are reduce-scattered as sums: each rank's loss is already divided by the global
    count, as in the replicated path. Parameters must be loaded before this call (it shards them in place)."""
    # lazy: FSDP takes about a second to import and only --fsdp runs need it
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if d.world < 2:
        raise SystemExit("dsv32 train: --fsdp shards over ranks; launch with torchrun --nproc-per-node N (N >= 2)")
    for block in [*model.layers, *model.mtp]:
        fully_shard(block)
    for block in model.mtp:  # MTP modules are entered through forward_mtp, not forward
        register_fsdp_forward_method(block, "forward_mtp")
    fully_shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives: gloo has no PREMUL_SUM


# ============================================================================================ data


@dataclass
class Batch:
    """One micro-batch: ``ids`` [B, S+1] (inputs ids[:, :-1], labels ids[:, 1:]); ``loss_mask`` [B, S] marks
    the labels that count (None: all); ``valid`` [B, S] marks real (non-padding) input tokens (None: all)."""

    ids: torch.Tensor
    loss_mask: torch.Tensor | None = None
    valid: torch.Tensor | None = None


class PretrainBatches:
    """Windows of the prepared token stream (``dsv32.data.TokenDataset``)."""

    def __init__(self, data_dir: str | Path, *, seed: int, batch_size: int, seq_len: int) -> None:
        self.ds = TokenDataset(data_dir, "train", seed=seed)
        self.vocab_size = self.ds.vocab_size
        self.batch_size, self.seq_len = batch_size, seq_len

    def get(self, index: int, rank: int, world: int) -> Batch:
        return Batch(self.ds.batch(index, batch_size=self.batch_size, seq_len=self.seq_len, rank=rank,
                                   world_size=world))


class SFTBatches:
    """Chat conversations (JSONL of ``{"messages": [...], "tools"?: [...]}``) encoded with ``dsv32.chat``;
    only the tokens the assistant produced are trained on (``encode_chat``'s mask).

    One conversation per row, cut to ``seq_len + 1`` tokens, padded to the longest row of the micro-batch.
    Row g of the global sample order is conversation ``perm_e[g mod n]`` of epoch e = g // n (a seeded
    permutation), and micro-batch ``index`` on ``rank`` holds rows ``(index * world + rank) * B + b``, the same
    rule as ``TokenDataset.batch``: stateless, so resume and data parallelism are exact.
    """

    def __init__(self, path: str | Path, tokenizer: Any, *, seed: int, batch_size: int, seq_len: int) -> None:
        self.rows: list[tuple[list[int], list[int]]] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    conv = json.loads(line)
                    ids, mask = encode_chat(conv["messages"], tools=conv.get("tools"),
                                            thinking=bool(conv.get("thinking", False)), tokenizer=tokenizer)
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: not a conversation ({e})") from e
                ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
                if len(ids) >= 2 and any(mask[1:]):
                    self.rows.append((ids, mask))
        if not self.rows:
            raise ValueError(f"{path}: no conversation with assistant tokens")
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.vocab_size = max(max(ids) for ids, _ in self.rows) + 1
        self.seed, self.batch_size, self.seq_len = seed, batch_size, seq_len
        self._perms: dict[int, np.ndarray] = {}

    def _row(self, g: int) -> tuple[list[int], list[int]]:
        epoch, pos = divmod(g, len(self.rows))
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch, 0x534654]).permutation(len(self.rows))
        return self.rows[int(self._perms[epoch][pos])]

    def get(self, index: int, rank: int, world: int) -> Batch:
        first = (index * world + rank) * self.batch_size
        rows = [self._row(first + b) for b in range(self.batch_size)]
        L = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(len(rows), L - 1, dtype=torch.bool)
        valid = torch.zeros(len(rows), L - 1, dtype=torch.bool)
        for b, (r_ids, r_mask) in enumerate(rows):
            n = len(r_ids)
            ids[b, :n] = torch.tensor(r_ids)
            loss_mask[b, : n - 1] = torch.tensor(r_mask[1:], dtype=torch.bool)  # label t = token t+1
            valid[b, : n - 1] = True
        return Batch(ids, loss_mask, valid)


# ============================================================================================ the step


def moe_gates(model: nn.Module, n_mtp: int | None = None) -> list[nn.Module]:
    """Router modules in the order of ``ForwardOutput.routes``: main MoE layers, then the first ``n_mtp`` MTP
    modules' (all by default)."""
    blocks = [*model.layers, *list(model.mtp)[:n_mtp]]
    return [b.mlp.gate for b in blocks if getattr(b, "is_moe", False)]


def _route_valid(model: nn.Module, valid: torch.Tensor | None, seq_len: int, n_mtp: int
                 ) -> list[torch.Tensor | None]:
    """The valid-token mask matching each routed layer's tokens, main layers then the ``n_mtp`` MTP modules run
    (MTP depth j sees the first S-1-j positions)."""
    out: list[torch.Tensor | None] = []
    for layer in model.layers:
        if layer.is_moe:
            out.append(valid)
    for j, m in enumerate(list(model.mtp)[:n_mtp]):
        if m.is_moe:
            out.append(None if valid is None else valid[:, : seq_len - 1 - j])
    return out


@dataclass
class StepStats:
    loss: float
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    grad_norm: float
    tokens: int


class Trainer:
    """The optimisation step and evaluation; the CLI (``train``) wires data, checkpoints and logging around it.

    Reusable by other stages: they build a model, an optimiser and batches, then call :meth:`step` with a list
    of micro-batches per optimiser step (inside a ``run.RunLoop`` step function, as ``train`` does).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, d: Dist, *,
                 mtp_weight: float = 0.3, balance_alpha: float = 1e-4, bias_update_speed: float = 1e-3,
                 clip: float = 1.0, dense: bool = False) -> None:
        self.model, self.opt, self.sched, self.d = model, optimizer, scheduler, d
        self.mtp_weight, self.balance_alpha, self.bias_speed, self.clip = (
            mtp_weight, balance_alpha, bias_update_speed, clip)
        self.dense = dense  # DSA off: dense MLA, as in pre-training before DSA is introduced
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n_mtp = len(model.mtp) if mtp_weight > 0 else 0
        self.gates = moe_gates(model, self.n_mtp)
        self.sharded = is_sharded(model)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda"
                         else nullcontext())

    def step(self, batches: list[Batch]) -> StepStats:
        """One optimiser step over ``batches`` (this rank's micro-batches). Collective: every rank calls it."""
        model, d = self.model, self.d
        model.train()
        dev = d.device
        n_mtp = self.n_mtp
        # Global counts first, so each micro-batch's loss is its share of the global-batch mean.
        local = torch.zeros(2 + n_mtp, dtype=torch.float64)
        for b in batches:
            S = b.ids.shape[1] - 1
            m = b.loss_mask if b.loss_mask is not None else torch.ones(b.ids.shape[0], S, dtype=torch.bool)
            local[0] += m.sum()
            local[1] += b.ids.shape[0]
            for j in range(n_mtp):
                local[2 + j] += m[:, j + 1 :].sum()
        counts = d.all_reduce(local).clamp_min(1.0).tolist()
        n_lm, n_seq, n_mtp_tok = counts[0], counts[1], counts[2:]

        E = self.gates[0].e_score_correction_bias.numel() if self.gates else 0
        loads = torch.zeros(len(self.gates), E, dtype=torch.float32)
        sums = torch.zeros(2 + n_mtp, dtype=torch.float64)  # lm, balance, mtp_0..
        tokens = 0
        want_scores = self.balance_alpha > 0
        for b in batches:
            ids = b.ids.to(dev)
            inp, labels = ids[:, :-1], ids[:, 1:]
            mask = None if b.loss_mask is None else b.loss_mask.to(dev)
            valid = None if b.valid is None else b.valid.to(dev)
            B, S = inp.shape
            tokens += int(valid.sum()) if valid is not None else B * S
            with self.autocast:
                # model(...), not model.forward(...): FSDP2 gathers the parameters in forward hooks
                out = model(inp, compute_logits=False, return_hidden=True, return_mtp=n_mtp > 0,
                            return_router_scores=want_scores, return_routes=True, dense=self.dense)
            head = model.head_weight  # after the forward: under FSDP2 the root's gathered weight
            lm = chunked_cross_entropy(out.hidden, head, labels, mask, reduction="sum")
            loss = lm / n_lm
            sums[0] += lm.item()
            for j, h in enumerate((out.mtp_hidden or [])[:n_mtp]):
                mj = None if mask is None else mask[:, j + 1 :]
                lj = chunked_cross_entropy(h, head, mtp_targets(labels, j), mj, reduction="sum")
                loss = loss + self.mtp_weight / n_mtp * lj / n_mtp_tok[j]
                sums[2 + j] += lj.item()
            route_valid = _route_valid(model, valid, S, n_mtp)
            if want_scores:
                bal = sum(sequence_balance_loss(s, r, B, v).sum()
                          for s, r, v in zip(out.router_scores, out.routes, route_valid, strict=True))
                loss = loss + self.balance_alpha * bal / n_seq
                sums[1] += float(bal.detach())
            loss.backward()
            for i, (r, v) in enumerate(zip(out.routes, route_valid, strict=True)):
                loads[i] += expert_load(r.cpu(), E, None if v is None else v.cpu())
            del out, loss

        if not self.sharded:  # FSDP2 reduce-scatters the gradients itself during backward
            all_reduce_grads(self.params, d)
        if self.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP2
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

        # One collective for everything else: expert loads, loss sums, the token count.
        flat = torch.cat([loads.reshape(-1).double(), sums, torch.tensor([float(tokens)], dtype=torch.float64)])
        flat = d.all_reduce(flat)
        loads = flat[: loads.numel()].view_as(loads).float()
        sums = flat[loads.numel() : loads.numel() + sums.numel()]
        tokens = int(flat[-1])
        update_router_bias([g.e_score_correction_bias for g in self.gates], list(loads), self.bias_speed)

        lm_loss = float(sums[0]) / n_lm
        mtp_loss = sum(float(sums[2 + j]) / n_mtp_tok[j] for j in range(n_mtp)) / n_mtp if n_mtp else 0.0
        balance = self.balance_alpha * float(sums[1]) / n_seq
        return StepStats(
            loss=lm_loss + self.mtp_weight * mtp_loss + balance,
            lm_loss=lm_loss,
            mtp_loss=mtp_loss,
            balance_loss=balance,
            grad_norm=grad_norm,
            tokens=tokens,
        )

    @torch.no_grad()
    def evaluate(self, batches: Iterator[torch.Tensor]) -> float:
        """Mean next-token loss (main head only) over ``batches`` of this rank, averaged over all ranks' tokens."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for ids in batches:
            ids = ids.to(self.d.device)
            with self.autocast:
                out = self.model(ids[:, :-1], compute_logits=False, return_hidden=True, dense=self.dense)
            total[0] += chunked_cross_entropy(out.hidden, self.model.head_weight, ids[:, 1:], reduction="sum").item()
            total[1] += ids[:, 1:].numel()
        total = self.d.all_reduce(total)
        self.model.train()
        return float(total[0] / total[1].clamp_min(1))


# ============================================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv32 train",
        description="pre-train, continue training (--init-from) or fine-tune on chats (--sft) a DeepSeek-V3.2 model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # --- model
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="ModelConfig preset: tiny, small, deepseek-v3.2")
    src.add_argument("--config", type=Path, help="config.json (file or directory) of the model to build")
    src.add_argument("--init-from", type=Path, metavar="HF_DIR", help="start from these weights (HF format)")
    # --- data
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, metavar="DIR", help="prepared token directory (dsv32 data prepare)")
    g.add_argument("--sft", type=Path, metavar="JSONL", help='chat fine-tuning: lines of {"messages": [...]}')
    g.add_argument("--vocab-size", type=int, default=None,
                   help="model vocabulary (default: the preset's, or the --data tokenizer's when they differ)")
    g.add_argument("--tokenizer", default=None, help="tokenizer for --sft (default: --init-from's, else bundled)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per rank")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    # --- optimisation
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, required=True, help="optimiser steps (the cosine ends here)")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="cosine floor (None: lr / 10)")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--mtp-weight", type=float, default=0.3, help="MTP loss weight lambda (V3: 0.3, later 0.1)")
    g.add_argument("--balance-alpha", type=float, default=1e-4, help="sequence-wise balance loss factor")
    g.add_argument("--bias-update-speed", type=float, default=1e-3, help="router bias step (aux-loss-free)")
    g.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
    g.add_argument("--dense", action="store_true",
                   help="DSA off (dense MLA): pre-training before the sparsify stages introduce DSA")
    # --- evaluation, output
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="run directory: metrics.jsonl, ckpt/, final/")
    g.add_argument("--eval-every", type=int, default=100, help="validation every N steps (0: never)")
    g.add_argument("--eval-batches", type=int, default=8,
                   help="validation size in global batches (batch-size x grad-accum x ranks windows each)")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept (0: all)")
    g.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in OUT")
    g.add_argument("--no-export", action="store_true", help="do not write the HF-format OUT/final/")
    # --- runtime
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimiser state over the ranks (FSDP2)")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: cores / ranks)")
    g.add_argument("--peak-flops", type=float, default=None, help="MFU denominator per rank (default: measured)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _load_model_config(args: argparse.Namespace, log: Callable[[str], None] | None = None) -> ModelConfig:
    """The config ``--preset``/``--config``/``--init-from`` name, with ``--vocab-size`` applied.

    A preset's vocabulary belongs to its bundled tokenizer; trained on data prepared with another tokenizer
    (``dsv32 data prepare --tokenizer ...``) it takes that tokenizer's size from the data's manifest instead, and
    says so. ``--config``/``--init-from`` keep theirs: a file states its vocabulary on purpose.
    """
    if args.preset:
        cfg = ModelConfig.from_name(args.preset)
        if args.vocab_size is None and args.data is not None:
            tok = read_manifest(args.data)["tokenizer"]
            if tok["vocab_size"] != cfg.vocab_size:
                if log is not None:
                    log(f"vocab_size {tok['vocab_size']} from {args.data / 'manifest.json'} (tokenizer "
                        f"{tok.get('name')!r}) instead of the {args.preset!r} preset's {cfg.vocab_size}; "
                        "--vocab-size N overrides")
                cfg = cfg.replace(vocab_size=int(tok["vocab_size"]))
    else:
        cfg = ModelConfig.from_hf(args.config if args.config else args.init_from)
    if args.vocab_size is not None:
        cfg = cfg.replace(vocab_size=args.vocab_size)
    return cfg


def _jsonable(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _export_final(model: nn.Module, out: Path, tokenizer_spec: Any, log: Callable[[str], None]) -> None:
    """``OUT/final/``: HF-format weights (``dsv32.save_model``) plus the tokenizer when it is a real file."""
    try:
        save_model(model, out)
    except Exception as e:  # the export must never cost the checkpoint that is already on disk
        log(f"warning: could not export {out} ({type(e).__name__}: {e})")
        return
    if tokenizer_spec is not None:
        try:
            if hasattr(tokenizer_spec, "save"):
                tokenizer_spec.save(out)
            else:  # a path or a bundled name (e.g. dsv32-small-8k): the export must be usable on its own
                load_tokenizer(tokenizer_spec).save(out)
        except Exception as e:
            log(f"warning: tokenizer not copied to {out} ({e})")
    log(f"exported {out}")


def _arch(c: ModelConfig) -> dict[str, Any]:
    """What a config computes (speed-only switches left out): a resumed run must match it."""
    return {k: v for k, v in c.to_hf().items() if k.removeprefix("dsv32_") not in ModelConfig._SPEED_ONLY}


def train(args: argparse.Namespace) -> int:
    """Run the training described by ``args`` (see ``build_parser``). Returns the process exit code.

    The model, data and :class:`Trainer` step are built here; resume, checkpoints, metrics and the graceful stop
    are ``run.RunLoop``'s.
    """
    if args.data is None and args.sft is None:
        raise SystemExit("dsv32 train: give --data DIR and/or --sft JSONL")
    d = setup_dist(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif d.device.type == "cpu" and d.local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.local_world))
    out: Path = args.out
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr

    with RunLoop(out, name="dsv32 train", max_steps=args.max_steps, save_every=args.save_every, keep=args.keep,
                 resume=args.resume, d=d, progress=not args.no_progress) as loop:
        log = loop.log
        # ---------------------------------------------------------------- model
        torch.manual_seed(args.seed)
        parts = loop.resume_parts
        if parts is not None:  # the checkpoint's config is authoritative (an --init-from dir may be gone)
            saved = ModelConfig.from_dict(parts["trainer"]["model_config"])
            if not args.init_from and _arch(_load_model_config(args)) != _arch(saved):
                raise SystemExit(f"dsv32 train: {loop.resume_checkpoint} was trained with a different model config")
            model = Transformer(saved)
        elif args.init_from:
            model = load_model(args.init_from)
        else:
            model = Transformer(_load_model_config(args, log))
        model.to(d.device).train()
        cfg: ModelConfig = model.config
        if parts is not None:  # before sharding: fully_shard splits the loaded tensors in place
            model.load_state_dict(parts["model"])
            del parts["model"]  # the loop keeps the rest for load() below; no second copy of the weights
        resuming = parts is not None
        del parts
        if args.fsdp:
            shard_model(model, d)

        # ---------------------------------------------------------------- data
        tokenizer: Any = None
        if args.sft:
            tokenizer = load_tokenizer(args.tokenizer or args.init_from)
            batches: Any = SFTBatches(args.sft, tokenizer, seed=args.seed, batch_size=args.batch_size,
                                      seq_len=args.seq_len)
        else:
            batches = PretrainBatches(args.data, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len)
            tokenizer = batches.ds.manifest["tokenizer"].get("name")
        if batches.vocab_size > cfg.vocab_size:
            fix = ("--vocab-size N or a --config with a larger vocab_size" if not args.init_from and not resuming
                   else "a tokenizer whose ids fit the model")
            raise SystemExit(f"dsv32 train: the data uses {batches.vocab_size} token ids but the model's "
                             f"vocab_size is {cfg.vocab_size}; use {fix}")
        val = None
        if args.data is not None and args.eval_every > 0:
            val = TokenDataset(args.data, "val", seed=args.seed)
            if val.num_tokens <= args.seq_len:
                log(f"validation split has {val.num_tokens} tokens (< seq_len + 1): no validation")
                val = None

        # ---------------------------------------------------------------- optimiser, schedule, trainer
        opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                betas=(args.beta1, args.beta2), eps=1e-8, fused=False)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: lr_at(i, lr=args.lr, min_lr=min_lr, warmup=args.warmup, max_steps=args.max_steps)
            / args.lr)
        trainer = Trainer(model, opt, sched, d, mtp_weight=args.mtp_weight, balance_alpha=args.balance_alpha,
                          bias_update_speed=args.bias_update_speed, clip=args.clip, dense=args.dense)
        layout = {"batch_size": args.batch_size, "seq_len": args.seq_len, "grad_accum": args.grad_accum,
                  "world_size": d.world}
        tokens_total = 0

        def load(parts: dict[str, Any]) -> None:
            nonlocal tokens_total
            load_optimizer_state(model, opt, parts["optimizer"])
            sched.load_state_dict(parts["trainer"]["scheduler"])
            tokens_total = parts["trainer"]["tokens"]
            was = parts["trainer"]["data"]
            if {k: was.get(k) for k in layout} != layout:
                log(f"warning: resuming with a different batch layout ({was} -> {layout}); the data order changes")

        def state() -> dict[str, Any] | None:
            if not args.fsdp:  # replicas must agree; FSDP ranks hold different shards by design
                check_replicas(model, d)
            model_sd, opt_sd = full_state(model, opt)  # collective under FSDP
            if not d.main:
                return None
            return {
                "model": model_sd,
                "optimizer": opt_sd,
                "trainer": {
                    "tokens": tokens_total,
                    "scheduler": sched.state_dict(),
                    "data": {"kind": "sft" if args.sft else "tokens", "next_step": loop.step, "seed": args.seed,
                             **layout},
                    "model_config": cfg.to_hf(),
                    "args": _jsonable(args),
                },
            }

        if d.main:
            cfg.to_hf(out / "config.json")
            (out / "train_args.json").write_text(json.dumps(_jsonable(args), indent=2) + "\n")

        # ---------------------------------------------------------------- MFU denominator
        flops_tok = flops_per_token(cfg.replace(use_dsa=cfg.use_dsa and not args.dense), args.seq_len,
                                    mtp=args.mtp_weight > 0)
        peak = args.peak_flops or measure_matmul_flops(
            d.device, torch.bfloat16 if d.device.type == "cuda" else torch.float32)
        peak_total = float(d.all_reduce(torch.tensor([peak], dtype=torch.float64, device=d.device)).item())
        if d.main and cfg.use_dsa and not args.dense and args.seq_len > cfg.index_topk:
            log(f"note: DSA selects {cfg.index_topk} of up to {args.seq_len} keys, but this trainer gives the "
                "lightning indexer no gradient (its top-k only selects); train it with the sparsify stages, or "
                "pass --dense to pre-train with dense attention")
        if d.main and loop.start_step == 0:
            log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                f"{flops_tok / 1e6:.1f} MFLOP/token; peak {peak_total / 1e9:.1f} GFLOP/s over {d.world} rank(s), "
                f"{torch.get_num_threads()} thread(s) each")

        # ---------------------------------------------------------------- the step
        def step(i: int) -> dict[str, Any]:
            nonlocal tokens_total
            t0 = time.perf_counter()
            micro = [batches.get(i * args.grad_accum + m, d.rank, d.world) for m in range(args.grad_accum)]
            lr = opt.param_groups[0]["lr"]
            stats = trainer.step(micro)
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            dt = time.perf_counter() - t0
            tokens_total += stats.tokens
            tps = stats.tokens / dt
            rec: dict[str, Any] = {
                "loss": stats.loss,
                "lm_loss": stats.lm_loss,
                "mtp_loss": stats.mtp_loss,
                "balance_loss": stats.balance_loss,
                "lr": lr,
                "grad_norm": stats.grad_norm,
                "tokens": tokens_total,
                "tokens_per_s": tps,
                "mfu": flops_tok * tps / peak_total,
            }
            if val is not None and ((i + 1) % args.eval_every == 0 or i + 1 == args.max_steps):
                rec["val_loss"] = trainer.evaluate(val.iter_eval_batches(
                    batch_size=args.batch_size, seq_len=args.seq_len, rank=d.rank, world_size=d.world,
                    max_batches=args.eval_batches * args.grad_accum))
            return rec

        def postfix(rec: dict[str, Any]) -> dict[str, str]:
            val_field = {"val": f"{rec['val_loss']:.4f}"} if "val_loss" in rec else {}
            return {"loss": f"{rec['loss']:.4f}", "tok_s": f"{rec['tokens_per_s']:,.0f}",
                    "mfu": f"{100 * rec['mfu']:.1f}%", **val_field}

        result = loop.run(step, state=state, load=load, postfix=postfix)
        if result.stopped:
            return 0
        if not args.no_export:
            export = model
            if args.fsdp:  # gather the full weights (collective) into a plain replica on rank 0
                model_sd, _ = full_state(model, None)
                if d.main:
                    export = Transformer(cfg)
                    export.load_state_dict(model_sd)
            if d.main:
                _export_final(export, out / "final", tokenizer, log)
        d.barrier()
    return 0


def cli_main(argv: list[str]) -> int:
    """``dsv32 train ...`` (also under ``torchrun --nproc-per-node N -m dsv32 train ...``)."""
    args = build_parser().parse_args(argv)
    if args.max_steps < 1 or args.batch_size < 1 or args.grad_accum < 1 or args.seq_len < 2:
        raise SystemExit("dsv32 train: --max-steps, --batch-size, --grad-accum must be >= 1, --seq-len >= 2")
    if args.vocab_size is not None and (args.init_from or args.vocab_size < 1):
        raise SystemExit("dsv32 train: --vocab-size must be >= 1 and goes with --preset/--config (--init-from "
                         "weights fix their own vocabulary)")
    try:
        return train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
