"""CPU weight formats (``dsv32.quant.pack_linears``): each packed linear against fp32 ``F.linear``, and a tiny
model's outputs through the transform."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsv32.config import ModelConfig
from dsv32.model import Transformer
from dsv32.quant import WEIGHT_FORMATS, PackedLinear, pack_linears

# max |error| / max |fp32 output|: packed is fp32 (summation order only), fp16 rounds the weights (2^-11),
# int8 rounds weights and activations to 8 bits (per output channel / per tensor)
TOL = {"packed": 1e-5, "fp16": 2e-3, "int8": 4e-2}


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS[1:])
@pytest.mark.parametrize("rows,bias", [(1, False), (8, True), (300, True)])
def test_packed_linear_matches_fp32(fmt, rows, bias):
    g = torch.Generator().manual_seed(rows)
    lin = nn.Linear(96, 200, bias=bias)
    x = torch.randn(2, rows, 96, generator=g)
    want = F.linear(x, lin.weight, lin.bias)
    p = PackedLinear(lin, fmt)
    assert p.weight is lin.weight and p.state_dict().keys() == lin.state_dict().keys()
    with torch.inference_mode():
        got = p(x)
    assert got.shape == want.shape
    err = (got - want).abs().max() / want.abs().max()
    assert err <= TOL[fmt], f"{fmt}: relative error {err:.2e}"
    assert not torch.equal(got, torch.zeros_like(got))


def test_packed_linear_falls_back_under_autograd():
    lin = nn.Linear(16, 8)
    p = PackedLinear(lin, "int8")
    x = torch.randn(3, 16, requires_grad=True)
    y = p(x)  # grad enabled: the exact fp32 path, differentiable
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias))
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def test_repack_follows_a_changed_weight():
    lin = nn.Linear(32, 32, bias=False)
    p = PackedLinear(lin, "fp16")
    x = torch.randn(4, 32)
    with torch.no_grad():
        lin.weight.mul_(2)
        stale = p(x)
        p.repack()
        fresh = p(x)
    torch.testing.assert_close(fresh, F.linear(x, lin.weight), rtol=2e-3, atol=2e-3)
    assert not torch.allclose(stale, fresh)


def test_pack_linears_rejects_unknown_format_and_skips():
    with pytest.raises(ValueError, match="bf8"):
        pack_linears(nn.Linear(4, 4), "bf8")
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    assert pack_linears(m, "fp32") == 0 and type(m[0]) is nn.Linear
    assert pack_linears(m, "packed", skip=("1",)) == 1
    assert isinstance(m[0], PackedLinear) and type(m[1]) is nn.Linear


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS[1:])
def test_pack_linears_keeps_a_tiny_model_close(fmt):
    """The tiny DeepSeek-V3.2 model (MLA, DSA indexer, MoE): logits through the packed model stay close to fp32."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny")).eval()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids)
        n = pack_linears(model, fmt)
        got = model(ids)
    assert n > 10
    # relative L2 error of all logits; int8 on this random 64-wide model measured 0.08 (its real cost: SmolLM2's
    # perplexity and greedy agreement, docs/benchmarks.md)
    err = (got - want).norm() / want.norm()
    assert err <= {"packed": 1e-5, "fp16": 2e-3, "int8": 0.15}[fmt], f"{fmt}: relative logit error {err:.2e}"
    if fmt != "int8":
        assert torch.equal(got.argmax(-1), want.argmax(-1))
