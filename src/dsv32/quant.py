"""FP8 (e4m3) helpers shared by the model (indexer / latent-cache simulation), the cache and checkpoint I/O.

DeepSeek-V3.1+ quantise with "UE8M0" scales: a power of two rounded *up* so that ``amax / scale <= 448``
(architecture.md §3.2 step 5, §6.1). With power-of-two scales, dequantisation is exact in fp32.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4  # DeepSeek's act_quant clamps amax from below


def ue8m0_scale(amax: torch.Tensor) -> torch.Tensor:
    """Power-of-two scale 2^ceil(log2(amax/448)) (fp32)."""
    return torch.exp2(torch.ceil(torch.log2(amax.float() / FP8_MAX)))


def fp8_roundtrip(x: torch.Tensor, block: int = 128, *, ue8m0: bool = True) -> torch.Tensor:
    """Simulate ``act_quant`` + dequant: per ``block`` values along the last dim, scale, cast to e4m3, scale back.

    Returns a tensor of x's dtype holding exactly the values an FP8 kernel would see. Gradients pass straight
    through (the quantisation is treated as identity in backward), which is what training through it needs.
    """
    d = x.shape[-1]
    blk = min(block, d)
    if d % blk:
        raise ValueError(f"fp8_roundtrip: last dim {d} is not a multiple of the block size {blk}")
    xf = x.detach().float().reshape(*x.shape[:-1], d // blk, blk)
    amax = xf.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR)
    scale = ue8m0_scale(amax) if ue8m0 else amax / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    q = q.reshape(x.shape).to(x.dtype)
    return x + (q - x).detach() if x.requires_grad else q


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Orthonormal Sylvester-ordered Hadamard matrix H_n / sqrt(n) (n a power of two); symmetric."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype=dtype, device=device)
