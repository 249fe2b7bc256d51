"""Number formats: FP8 (e4m3) helpers and the CPU inference weight formats of ``pack_linears``.

FP8 helpers are shared by the model (indexer / latent-cache simulation), the cache and checkpoint I/O.
DeepSeek-V3.1+ quantise with "UE8M0" scales: a power of two rounded *up* so that ``amax / scale <= 448``
(DeepSeek's ``inference/kernel.py`` ``act_quant`` and the checkpoint's ``weight_scale_inv``; docs/design.md).
With power-of-two scales, dequantisation is exact in fp32.

``pack_linears`` (opt-in, inference on CPU): a decode step multiplies a few activation rows by every weight,
so its speed is the rate at which a GEMM streams weights. On the dev box's AVX2 CPU a few-row fp32 ``F.linear``
streams at about a quarter of copy bandwidth because MKL repacks the weight on every call; a weight packed once
into the GEMM library's own layout skips that, and narrower weights move fewer bytes (docs/benchmarks.md):

- ``packed``: fp32 weights pre-packed for oneDNN (``mkldnn_linear``); same math, same results up to summation
  order.
- ``fp16``: fp16 weights packed for FBGEMM, fp32 activations and accumulation (``linear_dynamic_fp16``).
- ``int8``: int8 weights with one scale per output channel, packed for FBGEMM; activations quantised to uint8
  per call (dynamic quantisation, ``linear_dynamic``; rows pre-scaled so the scale is per token), int32
  accumulation.
  (``_weight_int8pack_mm``, torch's weight-only int8 kernel, is ~10x slower than fp32 here: no AVX2 path.)
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

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


# ============================================================================================ packed linears

WEIGHT_FORMATS = ("fp32", "packed", "fp16", "int8")


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that also holds its weight packed for a CPU GEMM library (``fmt``, module docstring).

    Same parameters, state dict and forward contract as the ``nn.Linear`` it replaces: the fp32 ``weight`` stays
    (tied weights stay tied; checkpoints are unchanged). Without autograd, fp32 inputs on CPU take the packed
    kernel; anything else (training, other dtypes or devices) runs plain ``F.linear`` on ``weight``. The packed
    copy is made from ``weight`` when the module is created: call ``repack()`` after changing the weight.
    """

    def __init__(self, linear: nn.Linear, fmt: str) -> None:
        nn.Module.__init__(self)
        if fmt not in WEIGHT_FORMATS[1:]:
            raise ValueError(f"PackedLinear: format {fmt!r} is not one of {', '.join(WEIGHT_FORMATS[1:])}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameter objects
        self.fmt = fmt
        self.repack()

    @torch.no_grad()
    def repack(self) -> None:
        """(Re)build the packed weight from ``weight`` (fp32 [out, in] on CPU)."""
        w = self.weight.detach()
        if w.device.type != "cpu" or w.dtype != torch.float32:
            raise ValueError(f"PackedLinear: weight must be fp32 on CPU to pack as {self.fmt!r}, got {w.dtype} on "
                             f"{w.device}")
        b = None if self.bias is None else self.bias.detach().float()
        if self.fmt == "packed":
            self._packed = w.to_mkldnn()  # oneDNN's blocked layout, packed once
            return
        bias = b if b is not None else torch.zeros(self.out_features)
        with warnings.catch_warnings():  # torch deprecates the quantized-tensor constructors; the FBGEMM
            warnings.simplefilter("ignore")  # packed-GEMM ops they feed are the fast path here (module docstring)
            if self.fmt == "fp16":
                self._packed = torch.ops.quantized.linear_prepack_fp16(w, bias)
            else:  # int8: symmetric, one scale per output channel; the bias is added after the per-row rescale
                scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()  # [out]
                qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
                self._packed = torch.ops.quantized.linear_prepack(qw, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed_ok = x.dtype == torch.float32 and x.device.type == "cpu" and not (
            torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        if not packed_ok:
            return F.linear(x, self.weight, self.bias)
        h = x.reshape(-1, self.in_features)  # [N, in]
        if self.fmt == "packed":
            y = torch.ops.mkldnn._linear_pointwise(h, self._packed, self.bias, "none", [], "")
        elif self.fmt == "fp16":
            y = torch.ops.quantized.linear_dynamic_fp16(h, self._packed)
        else:
            # FBGEMM quantises its input with one scale per call; dividing each row by its own amax first (and
            # multiplying the output back: the map is linear) makes that one scale per token. Per tensor, a
            # 512-token prefill put SmolLM2's perplexity at 43 instead of 16 (docs/benchmarks.md).
            amax = h.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)  # [N,1]
            y = torch.ops.quantized.linear_dynamic(h / amax, self._packed, True).mul_(amax)  # reduce_range: AVX2
            if self.bias is not None:
                y = y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fmt={self.fmt}"


def pack_linears(model: nn.Module, fmt: str, *, skip: tuple[str, ...] = ()) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` (in place) by a ``PackedLinear`` of format ``fmt``.

    ``fmt="fp32"`` leaves the model as it is. Modules whose qualified name contains one of ``skip`` are kept.
    Inference on CPU only (fp32 weights); returns how many linears were packed.
    """
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"pack_linears: weight format {fmt!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    if fmt == "fp32":
        return 0
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and not any(s in name for s in skip)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(m, fmt))
    return len(targets)
