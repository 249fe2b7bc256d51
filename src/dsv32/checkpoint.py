"""Checkpoints in DeepSeek's HF format: safetensors (one file or shards + index), HF names, FP8 blocks.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards named by
``model.safetensors.index.json`` (DeepSeek's release layout). On disk the names are HF's: ``model.`` + ours for the
embedding, layers and final norm; ``lm_head.weight`` as is; MTP module j lives at decoder index
``num_hidden_layers + j`` together with copies of the shared embedding and head; routed experts are one 2-D
tensor per expert (we keep them stacked as 3-D parameters).

DeepSeek stores most linear weights as float8 e4m3 with a float32 ``<module>.weight_scale_inv`` per 128x128
block: ``W[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128]`` (:func:`dequantize_fp8_blocks`).

Loading streams: the model is built on the meta device, materialised uninitialised with ``to_empty`` and each
tensor is copied into place in row chunks, so peak memory stays near the loaded weights' size even for the
671B model. Before any data is read the whole checkpoint is checked against the model (names, shapes, dtypes,
scales), and every problem raises :class:`CheckpointError` naming the tensor and the file.

Saving never leaves nothing: :func:`save_model` writes a complete directory next to the destination
(``.NAME.tmp-<pid>``), then swaps it in with renames (old away to ``.NAME.old-<pid>``, new in, old deleted). A
kill before the swap leaves the previous export untouched and a temporary the next save removes; a kill between
the two renames leaves the previous export as ``.NAME.old-<pid>``, which the next save or load puts back.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dsv32.config import ModelConfig
from dsv32.model import Transformer
from dsv32.quant import FP8_MAX

__all__ = [
    "CheckpointError",
    "FP8_DTYPE",
    "FP8_MAX",
    "FP8_QUANTIZATION_CONFIG",
    "dequantize_fp8_blocks",
    "is_fp8_weight",
    "load_model",
    "quantize_fp8_blocks",
    "save_model",
]

FP8_DTYPE = torch.float8_e4m3fn
BLOCK = 128
# What DeepSeek-V3.1/V3.2 write into config.json (their released checkpoints).
FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
    "scale_fmt": "ue8m0",
}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Read at most this many elements per copy, so the transient memory of a load does not grow with the largest
# tensor (the 671B model's embedding is 0.9G elements).
_CHUNK_ELEMS = 1 << 22
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": FP8_DTYPE,
}
_STACKED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Linear weights DeepSeek stores in FP8 (V3 report §3.3; 128x128 blocks); matched against on-disk names.
_FP8_WEIGHT = re.compile(
    r"(?:\.self_attn\.(?:q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|indexer\.wq_b|indexer\.wk)"
    r"|\.mlp\.(?:experts\.\d+\.|shared_experts\.)?(?:gate_proj|up_proj|down_proj))\.weight$"
)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: names the offending tensor and file (also as attributes)."""

    def __init__(self, message: str, *, tensor: str | None = None, file: str | Path | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor
        self.file = str(file) if file is not None else None


# ---------------------------------------------------------------------------------------------- FP8 blocks
def _ceil_pow2(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x (x > 0), exactly: frexp gives x = m * 2^e with m in [0.5, 1)."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), e - (m == 0.5).to(e.dtype))


def quantize_fp8_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantise a 2-D weight to e4m3 with one float32 ``scale_inv`` per ``block`` x ``block`` tile.

    Scales are UE8M0 like DeepSeek's: amax/448 rounded *up* to a power of two, so every ``|w| / scale``
    fits e4m3's range (<= 448) and dequantising is an exact multiplication. Edge tiles of dims that are not
    multiples of ``block`` are scaled from their real elements only (the same as zero padding). An all-zero
    tile gets scale 1. Returns ``(fp8 [R, C], scale_inv [ceil(R/block), ceil(C/block)])``.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_fp8_blocks: expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    rb, cb = math.ceil(rows / block), math.ceil(cols / block)
    x = w.detach().float()
    if rows % block or cols % block:
        x = torch.nn.functional.pad(x, (0, cb * block - cols, 0, rb * block - rows))
    tiles = x.view(rb, block, cb, block)
    amax = torch.maximum(-tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))).double()
    # smallest scale 2^-126 keeps the reciprocal finite in float32
    scale = (
        _ceil_pow2(torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))).clamp_min(2.0**-126).float()
    )
    # dividing by a power of two is exact, so multiplying by its reciprocal is the same and cheaper
    q = torch.mul(tiles, scale.reciprocal()[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE).view(rb * block, cb * block)[:rows, :cols].contiguous(), scale


def _scale_blocks_(x: torch.Tensor, scale_inv: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """In place: ``x[i, j] *= scale_inv[i // bh, j // bw]`` without materialising the expanded scale
    (full tiles as one broadcast, then the ragged right/bottom edges)."""
    rows, cols = x.shape
    nr, nc = rows // bh, cols // bw
    s = scale_inv.to(device=x.device, dtype=x.dtype)
    if nr and nc:
        x[: nr * bh, : nc * bw].unflatten(1, (nc, bw)).unflatten(0, (nr, bh)).mul_(s[:nr, :nc, None][:, None])
    if nr and cols % bw:
        x[: nr * bh, nc * bw :].unflatten(0, (nr, bh)).mul_(s[:nr, nc, None, None])
    if rows % bh and nc:
        x[nr * bh :, : nc * bw].unflatten(1, (nc, bw)).mul_(s[nr, :nc, None])
    if rows % bh and cols % bw:
        x[nr * bh :, nc * bw :].mul_(s[nr, nc])
    return x


def dequantize_fp8_blocks(
    fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``W[i, j] = fp8[i, j].float() * scale_inv[i // block, j // block]``, cast to ``dtype``.

    ``scale_inv`` is ceil-sized: a 576-row weight has 5 scale rows, the last covering rows 512..575. The
    product is taken in float32 (float64 when ``dtype`` is float64), then cast.
    """
    if fp8.ndim != 2:
        raise ValueError(f"dequantize_fp8_blocks: expected a 2-D weight, got shape {tuple(fp8.shape)}")
    rows, cols = fp8.shape
    want = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"dequantize_fp8_blocks: scale_inv shape {tuple(scale_inv.shape)} != {want} for weight "
            f"{tuple(fp8.shape)} with {block}x{block} blocks"
        )
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = _scale_blocks_(fp8.to(work), scale_inv, block, block)
    return out.to(dtype)


def is_fp8_weight(disk_name: str) -> bool:
    """Whether DeepSeek stores this on-disk tensor as FP8: attention, indexer wq_b/wk and FFN linears."""
    return _FP8_WEIGHT.search(disk_name) is not None


def _is_pow2(t: torch.Tensor) -> bool:
    t = t.float()
    m, _ = torch.frexp(t)
    return bool(((t > 0) & (m == 0.5)).all())


# ---------------------------------------------------------------------------------------------- names
@dataclass(frozen=True)
class _Target:
    """Where one on-disk tensor goes: ``dest[key]`` (or ``dest[key][expert]`` for a stacked expert)."""

    key: str
    expert: int | None
    shape: tuple[int, ...]


def _disk_prefix(key: str, file_layers: int) -> str:
    """Our name -> HF name (before expert splitting). MTP j sits at decoder index ``file_layers + j``."""
    if key.startswith("mtp."):
        j, rest = key[len("mtp.") :].split(".", 1)
        return f"model.layers.{file_layers + int(j)}.{rest}"
    if key == "lm_head.weight":
        return key
    return "model." + key


def _disk_names(key: str, shape: tuple[int, ...], file_layers: int) -> Iterator[tuple[str, _Target]]:
    """The on-disk tensors holding our tensor ``key``: one, or one per expert for stacked experts."""
    name = _disk_prefix(key, file_layers)
    m = _STACKED_EXPERT.match(name)
    if m:
        for e in range(shape[0]):
            yield f"{m.group(1)}.{e}.{m.group(2)}.weight", _Target(key, e, shape[1:])
    else:
        yield name, _Target(key, None, shape)


def _mtp_copies(shapes: Mapping[str, tuple[int, ...]], file_layers: int, n_mtp: int) -> dict[str, str]:
    """On-disk duplicates of the shared embedding/head in each MTP layer: disk name -> our source key."""
    head = "lm_head.weight" if "lm_head.weight" in shapes else "embed_tokens.weight"
    out = {}
    for j in range(n_mtp):
        out[f"model.layers.{file_layers + j}.embed_tokens.weight"] = "embed_tokens.weight"
        out[f"model.layers.{file_layers + j}.shared_head.head.weight"] = head
    return out


def _n_mtp(keys: Iterable[str]) -> int:
    return len({k.split(".")[1] for k in keys if k.startswith("mtp.")})


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def _diagnose_unreadable(file: Path, expected: list[str], err: Exception) -> CheckpointError:
    """A safetensors file failed to open: find the tensor its header places beyond the end of the file."""
    size = file.stat().st_size
    tensor: str | None = None
    why = f"not a readable safetensors file ({err})"
    try:
        with open(file, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n)) if 8 + n <= size else None
        if header is None:
            why = f"truncated inside its header ({size} bytes on disk, header alone needs {8 + n})"
        else:
            header.pop("__metadata__", None)
            cut = sorted(
                (v["data_offsets"][1], k) for k, v in header.items() if 8 + n + v["data_offsets"][1] > size
            )
            if cut:
                tensor = cut[0][1]
                why = (
                    f"truncated: {size} bytes on disk, but tensor {tensor!r} ends at byte "
                    f"{8 + n + cut[0][0]} ({len(cut)} tensor(s) cut off)"
                )
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        pass
    if tensor is None and expected:
        tensor = expected[0]
        why += f"; it should hold {tensor!r}" + (
            f" and {len(expected) - 1} more" if len(expected) > 1 else ""
        )
    return CheckpointError(f"{file}: {why}", tensor=tensor, file=file)


class _Checkpoint:
    """A checkpoint directory: its config, files and every tensor's file, dtype and shape (headers only)."""

    def __init__(self, path: str | Path) -> None:
        self.dir = Path(path)
        if not self.dir.is_dir():
            _recover_export(self.dir)  # an export killed mid-swap: its previous version is put back
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: not a checkpoint directory")
        cfg_path = self.dir / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: missing (a checkpoint needs config.json)", file=cfg_path)
        try:
            self.config = ModelConfig.from_hf(cfg_path)
        except ValueError as e:
            raise CheckpointError(f"{cfg_path}: {e}", file=cfg_path) from None
        self.entries: dict[str, _Entry] = {}
        self.index: dict[str, Path] | None = None
        index_path = self.dir / INDEX_NAME
        if index_path.is_file():
            self.index_path: Path | None = index_path
            self.index = self._read_index(index_path)
            files = sorted(set(self.index.values()))
        elif (self.dir / SINGLE_NAME).is_file():
            self.index_path = None
            files = [self.dir / SINGLE_NAME]
        else:
            raise CheckpointError(
                f"{self.dir}: neither {SINGLE_NAME} nor {INDEX_NAME}", file=self.dir / SINGLE_NAME
            )
        by_file: dict[Path, list[str]] = {}
        for name, f in (self.index or {}).items():
            by_file.setdefault(f, []).append(name)
        for f in files:
            # a single file must at least hold the embedding: name it if the file is unreadable
            self._scan(f, by_file.get(f, []) if self.index is not None else ["model.embed_tokens.weight"])
        if self.index is not None:
            for name, f in self.index.items():
                if name not in self.entries or self.entries[name].file != f:
                    raise CheckpointError(
                        f"tensor {name!r}: {self.index_path} places it in {f}, which does not contain it",
                        tensor=name,
                        file=f,
                    )
            for name, e in self.entries.items():
                if name not in self.index:
                    raise CheckpointError(
                        f"unexpected tensor {name!r} in {e.file}: not listed in {self.index_path}",
                        tensor=name,
                        file=e.file,
                    )

    def _read_index(self, index_path: Path) -> dict[str, Path]:
        try:
            wm = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid index ({e})", file=index_path) from None
        index = {name: self.dir / f for name, f in wm.items()}
        missing: dict[Path, list[str]] = {}
        for name, f in index.items():
            if not f.is_file():
                missing.setdefault(f, []).append(name)
        if missing:
            f, names = next(iter(missing.items()))
            raise CheckpointError(
                f"tensor {names[0]!r}"
                + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
                + f": {index_path} names shard {f}, which does not exist",
                tensor=names[0],
                file=f,
            )
        return index

    def _scan(self, f: Path, expected: list[str]) -> None:
        try:
            with safe_open(f, framework="pt") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    if name in self.entries:
                        raise CheckpointError(
                            f"tensor {name!r} appears in both {self.entries[name].file} and {f}",
                            tensor=name,
                            file=f,
                        )
                    self.entries[name] = _Entry(f, sl.get_dtype(), tuple(sl.get_shape()))
        except (SafetensorError, OSError) as e:
            raise _diagnose_unreadable(f, expected, e) from None

    def layer_present(self, layer: int) -> bool:
        prefix = f"model.layers.{layer}."
        return any(n.startswith(prefix) for n in self.entries)

    def where(self, name: str) -> Path:
        """The file a tensor is (or should be) in, for error messages."""
        if name in self.entries:
            return self.entries[name].file
        if self.index is not None:
            return self.index.get(name, self.index_path)  # type: ignore[arg-type]
        return self.dir / SINGLE_NAME


@dataclass
class _Plan:
    """What to read: on-disk name -> target, plus names to skip (dropped layers, duplicated MTP copies)."""

    targets: dict[str, _Target]
    copies: dict[str, tuple[int, ...]]  # optional duplicates: disk name -> expected shape
    skip_layers: range  # decoder indices in the file that are not loaded
    block: tuple[int, int]
    ue8m0: bool


def _make_plan(shapes: Mapping[str, tuple[int, ...]], file_config: ModelConfig, skip_layers: range) -> _Plan:
    n_file = file_config.num_hidden_layers
    targets: dict[str, _Target] = {}
    for key, shape in shapes.items():
        for name, t in _disk_names(key, shape, n_file):
            targets[name] = t
    copies = {n: shapes[src] for n, src in _mtp_copies(shapes, n_file, _n_mtp(shapes)).items()}
    q = file_config.quantization_config or {}
    block = tuple(q.get("weight_block_size") or (BLOCK, BLOCK))
    return _Plan(targets, copies, skip_layers, (int(block[0]), int(block[1])), q.get("scale_fmt") == "ue8m0")


def _check(ckpt: _Checkpoint, plan: _Plan) -> None:
    """Every problem, before any data is read; raises on the first with a count of the rest."""
    problems: list[CheckpointError] = []
    cfg = ckpt.dir / CONFIG_NAME
    hint = f" (does {cfg} match the weights?)"

    def bad(msg: str, name: str, file: Path | None = None) -> None:
        problems.append(CheckpointError(msg, tensor=name, file=file or ckpt.where(name)))

    bh, bw = plan.block
    for name, t in plan.targets.items():
        e = ckpt.entries.get(name)
        if e is None:
            bad(f"missing tensor {name!r}: expected in {ckpt.where(name)}{hint}", name)
            continue
        if e.shape != t.shape:
            bad(
                f"tensor {name!r} in {e.file} has shape {list(e.shape)}, the model expects "
                f"{list(t.shape)}{hint}",
                name,
            )
        if e.dtype not in _DTYPES:
            bad(f"tensor {name!r} in {e.file} has unsupported dtype {e.dtype}", name)
        elif _DTYPES[e.dtype] == FP8_DTYPE:
            sname = name + "_scale_inv"
            s = ckpt.entries.get(sname)
            want = tuple(math.ceil(d / b) for d, b in zip(t.shape, (bh, bw)))
            if len(t.shape) != 2:
                bad(f"FP8 tensor {name!r} in {e.file} is not 2-D", name)
            elif s is None:
                bad(f"FP8 tensor {name!r} in {e.file} has no {sname!r}", sname, e.file)
            elif s.shape != want or s.dtype not in ("F32", "BF16", "F16", "F64"):
                bad(
                    f"scale {sname!r} in {s.file} is {s.dtype}{list(s.shape)}, expected float "
                    f"{list(want)} for {name!r} {list(t.shape)} in {bh}x{bw} blocks",
                    sname,
                )
    for name, e in ckpt.entries.items():
        if name in plan.targets:
            continue
        if name.endswith("_scale_inv"):
            w = name[: -len("_scale_inv")]
            if w in plan.targets and ckpt.entries.get(w, e).dtype == "F8_E4M3":
                continue
            m = _LAYER.match(w)
            if (w in plan.copies) or (m and int(m.group(1)) in plan.skip_layers):
                continue
            bad(f"unexpected tensor {name!r} in {e.file}: no FP8 weight {w!r} to scale", name)
            continue
        if name in plan.copies:
            if e.shape != plan.copies[name]:
                bad(
                    f"tensor {name!r} in {e.file} (a copy of the shared embedding/head) has shape "
                    f"{list(e.shape)}, expected {list(plan.copies[name])}{hint}",
                    name,
                )
            continue
        m = _LAYER.match(name)
        if m and int(m.group(1)) in plan.skip_layers:
            continue
        bad(f"unexpected tensor {name!r} in {e.file}: the model has no such parameter{hint}", name)
    if problems:
        first = problems[0]
        if len(problems) > 1:
            rest = "; ".join(str(p) for p in problems[1:4])
            first = CheckpointError(
                f"{first} [and {len(problems) - 1} more problem(s): {rest}]",
                tensor=first.tensor,
                file=first.file,
            )
        raise first


class _Reader:
    """One safetensors file, re-opened after ``budget`` bytes: its data is memory-mapped and touched pages
    count as resident until unmapped, so a long-lived handle would hold a whole shard in RSS."""

    def __init__(self, file: Path, budget: int) -> None:
        self.file, self.budget, self.read = file, budget, 0
        self._fh: Any = None

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.__exit__(None, None, None)
            self._fh = None

    def rows(self, name: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` of ``name`` (all of it when omitted) as a tensor owning its memory."""
        if self.read > self.budget:
            self.close()
            self.read = 0
        if self._fh is None:
            self._fh = safe_open(self.file, framework="pt").__enter__()
        sl = self._fh.get_slice(name)
        t = sl[r0:r1] if r0 is not None else sl[:]
        self.read += t.numel() * t.element_size()
        return t


def _stream(ckpt: _Checkpoint, plan: _Plan, dest: Mapping[str, torch.Tensor]) -> None:
    """Copy every planned tensor into ``dest``, file by file, in row chunks, casting or dequantising."""
    total = sum(
        math.prod(e.shape) * _DTYPES.get(e.dtype, torch.float32).itemsize for e in ckpt.entries.values()
    )
    budget = max(32 << 20, min(1 << 30, total // 16))
    by_file: dict[Path, list[str]] = {}
    for name in plan.targets:
        by_file.setdefault(ckpt.entries[name].file, []).append(name)
    bad_scales: list[str] = []
    bh, bw = plan.block
    buf = torch.empty(0)  # float32 scratch for dequantising into low-precision parameters, reused
    for file, names in by_file.items():
        with _Reader(file, budget) as rd:
            for name in names:
                t = plan.targets[name]
                dst = dest[t.key] if t.expert is None else dest[t.key][t.expert]
                if ckpt.entries[name].dtype != "F8_E4M3":
                    if len(t.shape) < 2:
                        dst.copy_(rd.rows(name))
                        continue
                    step = max(1, _CHUNK_ELEMS // math.prod(t.shape[1:]))
                    for r0 in range(0, t.shape[0], step):
                        dst[r0 : r0 + step].copy_(rd.rows(name, r0, min(r0 + step, t.shape[0])))
                    continue
                sname = name + "_scale_inv"
                sfile = ckpt.entries[sname].file
                if sfile == file:
                    scale = rd.rows(sname).float()
                else:
                    with _Reader(sfile, budget) as other:
                        scale = other.rows(sname).float()
                if plan.ue8m0 and not _is_pow2(scale):
                    bad_scales.append(f"{sname} ({sfile.name})")
                rows, cols = t.shape
                step = max(bh, _CHUNK_ELEMS // cols // bh * bh)
                for r0 in range(0, rows, step):
                    r1 = min(r0 + step, rows)
                    s_rows = scale[r0 // bh : math.ceil(r1 / bh)]
                    if dst.dtype in (torch.float32, torch.float64):  # as dequantize_fp8_blocks, in place
                        _scale_blocks_(dst[r0:r1].copy_(rd.rows(name, r0, r1)), s_rows, bh, bw)
                    else:
                        if buf.numel() < (r1 - r0) * cols:
                            buf = torch.empty((r1 - r0) * cols, device=dst.device)
                        work = buf[: (r1 - r0) * cols].view(r1 - r0, cols).copy_(rd.rows(name, r0, r1))
                        dst[r0:r1].copy_(_scale_blocks_(work, s_rows, bh, bw))
    if bad_scales:
        warnings.warn(
            f"{ckpt.dir}: quantization_config.scale_fmt is 'ue8m0' but {len(bad_scales)} weight_scale_inv "
            f"tensor(s) are not all positive powers of two, e.g. {bad_scales[0]}; loaded them as they are",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------- load
def _build_model(config: ModelConfig) -> nn.Module:
    return Transformer(config)


def _set_param_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters become ``dtype``; buffers keep the dtype the model chose (the router's fp32 bias).

    Done on the meta device, so it costs nothing; tied parameters stay tied.
    """
    done: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)
            setattr(mod, pname, done[id(p)])


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_layers: int | None = None,
) -> nn.Module:
    """Load an HF-format DeepSeek-V3.2 directory (bf16/fp16/fp32 or FP8 blocks) into a ``Transformer``.

    Parameters are created in ``dtype`` on ``device`` (FP8 weights are dequantised into it); the router's
    ``e_score_correction_bias`` stays float32. ``num_layers=N`` keeps only the first N decoder layers and
    drops the MTP module (whose tensors sit after the last layer in the file). A config that declares MTP
    layers whose tensors are entirely absent (transformers' ``save_pretrained`` never writes them) loads
    without MTP and warns. Raises :class:`CheckpointError` on any mismatch between files and model.
    """
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"load_model: dtype must be float64/32/16 or bfloat16, got {dtype}")
    ckpt = _Checkpoint(path)
    file_cfg = ckpt.config
    n_file = file_cfg.num_hidden_layers
    n_mtp = file_cfg.num_nextn_predict_layers
    if n_mtp and not any(ckpt.layer_present(n_file + j) for j in range(n_mtp)):
        warnings.warn(
            f"{ckpt.dir}: config.json declares {n_mtp} MTP layer(s) but the checkpoint has no tensor "
            f"'model.layers.{n_file}.*'; loading without MTP",
            stacklevel=2,
        )
        n_mtp = 0
    keep = n_file if num_layers is None else int(num_layers)
    if not 1 <= keep <= n_file:
        raise ValueError(f"num_layers={num_layers}: the checkpoint has {n_file} decoder layers")
    mtp_keep = n_mtp if keep == n_file else 0
    config = file_cfg.replace(
        num_hidden_layers=keep,
        num_nextn_predict_layers=mtp_keep,
        quantization_config=None,  # the model holds dequantised weights
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    with torch.device("meta"):
        model = _build_model(config)
    _set_param_dtype(model, dtype)
    dest = model.state_dict()
    plan = _make_plan(
        {k: tuple(v.shape) for k, v in dest.items()},
        file_cfg.replace(num_nextn_predict_layers=mtp_keep),
        range(keep, n_file + n_mtp) if keep < n_file else range(0),
    )
    _check(ckpt, plan)
    model.to_empty(device=device)
    dest = model.state_dict()
    with torch.no_grad():
        _stream(ckpt, plan, dest)
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()
    return model.eval()


# ---------------------------------------------------------------------------------------------- save
def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def save_model(
    model: nn.Module, path: str | Path, *, fp8: bool = False, max_shard_bytes: int | None = None
) -> None:
    """Write ``model`` as an HF-format directory: ``config.json`` + ``model.safetensors``, or shards + index
    when the tensors exceed ``max_shard_bytes``.

    ``fp8=True`` stores the linear weights DeepSeek stores in FP8 (:func:`is_fp8_weight`) as e4m3 with UE8M0
    128x128 ``weight_scale_inv`` blocks and sets DeepSeek's ``quantization_config``. Every other tensor
    (embedding, head, norms, router, indexer ``weights_proj``/``k_norm``, MTP ``eh_proj``/norms) is written in
    the dtype it has in the model, so the only loss is the FP8 rounding; cast the model to bfloat16 first for
    files laid out exactly like DeepSeek's. Stale ``model*.safetensors``/index files in ``path`` are removed;
    its other files (a tokenizer, a README) are kept.

    Atomic: the new directory is written in full beside ``path`` and renamed into place (see the module
    docstring), so a crash at any moment leaves either the previous export or the new one, never a mix.
    """
    out = Path(os.path.abspath(path))
    if out.is_symlink():  # write where the link points; the link stays
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"save_model: {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover_export(out)
    if os.path.ismount(out) or not os.access(out.parent, os.W_OK):
        warnings.warn(f"save_model: {out} cannot be swapped in by rename (a mount point, or its parent is not "
                      "writable); writing in place, so a crash mid-save leaves a partial export", stacklevel=2)
        out.mkdir(exist_ok=True)
        for old in _own_files(out):
            old.unlink()
        _write_export(model, out, fp8=fp8, max_shard_bytes=max_shard_bytes)
        return
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if out.is_dir():  # keep what else lives there: hard links (copies where links fail), never our files
            own = set(_own_files(out))
            shutil.copytree(out, tmp, symlinks=True, copy_function=_link_or_copy,
                            ignore=lambda d, names: [n for n in names if Path(d) / n in own])
        else:
            tmp.mkdir()
        _write_export(model, tmp, fp8=fp8, max_shard_bytes=max_shard_bytes)
        fsync_path(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _own_files(d: Path) -> list[Path]:
    """The files :func:`save_model` writes (and replaces) in ``d``."""
    return [p for p in [*d.glob("model-*-of-*.safetensors"), d / SINGLE_NAME, d / INDEX_NAME, d / CONFIG_NAME]
            if p.is_file() or p.is_symlink()]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk; best effort where the OS refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``: the old ``out`` goes aside first, and is deleted only after."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    cwd = None
    try:
        here = Path.cwd()
        if here.is_relative_to(out):
            cwd = here  # the process works inside the export: follow it to the new directory
    except (FileNotFoundError, ValueError):
        pass
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
        fsync_path(out.parent)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
    else:
        os.rename(tmp, out)
    fsync_path(out.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    if cwd is not None:
        try:
            os.chdir(cwd)
        except OSError:
            pass


def _recover_export(out: Path) -> None:
    """Undo what a save killed mid-way left beside ``out``: a previous export moved aside (``.NAME.old-*``) comes
    back when ``out`` is missing, else it is deleted; temporaries (``.NAME.tmp-*``) of dead processes go."""
    out = Path(os.path.abspath(out))
    parent = out.parent
    if not parent.is_dir() or not out.name:
        return
    for p in sorted(parent.glob(f".{out.name}.old-*")):
        if not out.exists():
            warnings.warn(f"{out}: restored from {p.name}, left by a save that was interrupted", stacklevel=3)
            try:
                os.rename(p, out)
            except OSError:
                raise FileNotFoundError(f"{out} is missing; its previous version is in {p}") from None
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".{out.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue  # another process is saving there right now
        shutil.rmtree(p, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (so a temporary named after it may be in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_export(model: nn.Module, out: Path, *, fp8: bool, max_shard_bytes: int | None) -> None:
    """The body of :func:`save_model`: config, weights (and index) into the existing directory ``out``."""
    config: ModelConfig = model.config  # type: ignore[assignment]
    state = model.state_dict()
    n_layers = config.num_hidden_layers

    # (bytes on disk, producer of {name: tensor}); an FP8 weight and its scale travel together.
    items: list[tuple[int, Callable[[], dict[str, torch.Tensor]]]] = []

    def add(name: str, key: str, expert: int | None, copy: bool = False) -> None:
        t = state[key] if expert is None else state[key][expert]
        if fp8 and is_fp8_weight(name) and t.dim() == 2:

            def quantized() -> dict[str, torch.Tensor]:
                q, scale_inv = quantize_fp8_blocks(t.detach().to("cpu"))
                return {name: q, name + "_scale_inv": scale_inv}

            rb, cb = math.ceil(t.shape[0] / BLOCK), math.ceil(t.shape[1] / BLOCK)
            items.append((t.numel() + 4 * rb * cb, quantized))
            return

        def produce() -> dict[str, torch.Tensor]:
            c = t.detach().to("cpu")
            # safetensors refuses tensors sharing storage: copy expert slices and the MTP's duplicates only
            if copy or not c.is_contiguous() or c.untyped_storage().nbytes() != c.numel() * c.element_size():
                c = c.clone(memory_format=torch.contiguous_format)
            return {name: c}

        items.append((t.numel() * t.element_size(), produce))

    for key, t in state.items():
        for name, tgt in _disk_names(key, tuple(t.shape), n_layers):
            add(name, key, tgt.expert)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name, src in _mtp_copies(shapes, n_layers, _n_mtp(state)).items():
        add(name, src, None, copy=True)

    shards: list[list[int]] = [[]]
    size = 0
    for i, (nbytes, _) in enumerate(items):
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes

    weight_map: dict[str, str] = {}
    total = 0
    for si, shard in enumerate(shards):
        fname = SINGLE_NAME if len(shards) == 1 else _shard_name(si, len(shards))
        tensors: dict[str, torch.Tensor] = {}
        for i in shard:
            tensors.update(items[i][1]())
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, out / fname, metadata={"format": "pt"})
        fsync_path(out / fname)
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    config.replace(
        quantization_config=dict(FP8_QUANTIZATION_CONFIG) if fp8 else None,
        torch_dtype=str(state["embed_tokens.weight"].dtype).removeprefix(
            "torch."
        ),  # the high-precision dtype
    ).to_hf(out)
