"""Inference state for V3.2 models: per-layer MLA latent cache and DSA indexer-key cache.

Per token and layer, MLA caches only the compressed latent ``c_kv`` (kv_lora_rank) and the shared RoPE key
``k_pe`` (qk_rope_head_dim), stored together as one row of ``kv_lora_rank + qk_rope_head_dim`` values (the
FlashMLA "576" layout). The lightning indexer caches one key per token (index_head_dim), either in float or as
FP8 e4m3 plus one fp32 scale per token (132 bytes/token at dI=128, as production engines store it).

Legend: L layers (incl. MTP layers the model asks for), B slots (rows), T max tokens, Dl latent+rope dims,
dI indexer head dim.

Rows are independent slots: each has its own length, writes may start at any position (chunked prefill,
prefix reuse), and a row can be reset for a new request. Keys beyond a query's position are masked by the
attention's causal rule, so stale data in a reused row is never read.
"""

from __future__ import annotations

import torch

from dsv32.quant import FP8_MAX, ue8m0_scale


class RowCache:
    """Row bookkeeping shared by every model family's cache: per-row lengths, default positions, overflow checks,
    reset/truncate of slots, and the scatter-write at arbitrary positions. Subclasses own the buffers."""

    max_len: int
    lengths: torch.Tensor  # [B] tokens held per row

    def positions_for(self, seq_len: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Default positions of ``seq_len`` new tokens appended to each row -> [B', S]."""
        lens = self.lengths if rows is None else self.lengths[rows]
        return lens.unsqueeze(1) + torch.arange(seq_len, device=lens.device).unsqueeze(0)

    def check_positions(self, positions: torch.Tensor) -> None:
        if positions.numel() and int(positions.max()) >= self.max_len:
            raise ValueError(
                f"cache overflow: position {int(positions.max())} >= max_len {self.max_len} of this cache"
            )

    def advance(self, positions: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Record that tokens at ``positions`` [B', S] were written: length = max(length, last + 1)."""
        new = positions.max(dim=1).values + 1
        if rows is None:
            self.lengths = torch.maximum(self.lengths, new)
        else:
            self.lengths[rows] = torch.maximum(self.lengths[rows], new)

    def reset(self, rows: int | list[int] | torch.Tensor | None = None) -> None:
        """Forget the contents of some rows (all when None); buffers are reused, not freed."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)] = 0

    def truncate(self, row: int, length: int) -> None:
        """Keep only the first ``length`` tokens of ``row`` (e.g. after padded prefill or a rejected draft)."""
        self.lengths[row] = min(int(self.lengths[row]), length)

    @staticmethod
    def row_index(rows: torch.Tensor | None) -> slice | torch.Tensor:
        """How to pick ``rows`` out of a buffer: a slice (a view, no copy) when they are consecutive slots in
        order — the engine's usual batch — else the index tensor itself (a gather)."""
        if rows is None:
            return slice(None)
        n = rows.numel()
        if n and (n == 1 or bool((rows[1:] - rows[:-1] == 1).all())):
            r0 = int(rows[0])
            return slice(r0, r0 + n)
        return rows

    @staticmethod
    def _write(buf: torch.Tensor, new: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None):
        B, S = positions.shape
        r = torch.arange(B, device=buf.device) if rows is None else rows
        buf[r.unsqueeze(1).expand(B, S), positions] = new.to(buf.dtype)


class MLACache(RowCache):
    """Static buffers created by ``Transformer.new_cache``; the engine uses only the public methods."""

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        max_len: int,
        latent_dim: int,
        index_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        index_fp8: bool = False,
    ) -> None:
        self.num_layers, self.batch_size, self.max_len = num_layers, batch_size, max_len
        self.index_fp8 = index_fp8
        self.kv = [torch.zeros(batch_size, max_len, latent_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        if index_fp8:
            self.index_k = [
                torch.zeros(batch_size, max_len, index_dim, dtype=torch.float8_e4m3fn, device=device)
                for _ in range(num_layers)
            ]
            self.index_scale = [
                torch.ones(batch_size, max_len, dtype=torch.float32, device=device) for _ in range(num_layers)
            ]
        else:
            self.index_k = [
                torch.zeros(batch_size, max_len, index_dim, dtype=torch.float32, device=device)
                for _ in range(num_layers)
            ]
            self.index_scale = None
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] tokens held per row

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.kv + self.index_k)
        if self.index_scale is not None:
            n += sum(t.numel() * t.element_size() for t in self.index_scale)
        return n

    # ------------------------------------------------------------------ per-layer write / read
    def update(
        self,
        layer: int,
        kv_new: torch.Tensor,
        index_k_new: torch.Tensor | None,
        positions: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Write this step's latent rows kv_new [B',S,Dl] and indexer keys [B',S,dI] at ``positions``."""
        self._write(self.kv[layer], kv_new, positions, rows)
        if index_k_new is not None:
            if self.index_fp8:
                amax = index_k_new.detach().float().abs().amax(-1).clamp_min(1e-4)  # one scale per token
                scale = ue8m0_scale(amax)
                q8 = (index_k_new.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
                self._write(self.index_k[layer], q8, positions, rows)
                self._write(self.index_scale[layer], scale, positions, rows)
            else:
                self._write(self.index_k[layer], index_k_new, positions, rows)

    def read(
        self, layer: int, T: int, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The first T positions -> (kv [B',T,Dl], index_k [B',T,dI] (e4m3 when FP8), index_scale [B',T] or None)."""
        r = self.row_index(rows)
        sel = lambda t: t[r, :T]  # noqa: E731
        kv = sel(self.kv[layer])
        ik = sel(self.index_k[layer])
        if self.index_fp8:  # raw e4m3 + scale: the ops dequantise block by block (no fp32 copy of the cache)
            return kv, ik, sel(self.index_scale[layer])
        return kv, ik, None
