"""Convert an HF-format DeepSeek-V3.2 checkpoint to GGUF for llama.cpp (arch ``deepseek32``, DSA included).

llama.cpp is a second, independent DeepSeek-V3.2 implementation (C++/ggml, lightning indexer and top-k
selection included), usable as a parity oracle and a speed peer through ``llama-cpp-python``. Its wheel does not
ship the HF -> GGUF converter, but the ``llama-cpp-python==0.3.36`` **sdist** vendors it:
``vendor/llama.cpp/convert_hf_to_gguf.py`` with its ``conversion/`` package, the matching ``gguf-py`` and
vocab-only GGUFs under ``models/``. :func:`find_converter` fetches that sdist once with
``pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps`` and extracts only those parts into
``$DSV32_CACHE/llama-cpp-python-0.3.36`` (else ``~/.cache/dsv32/llama-cpp-python-0.3.36``, about 6 MB).
``$DSV32_LLAMA_CPP_SDIST`` may name a local copy of the sdist (tarball) instead, and ``$DSV32_LLAMA_CPP_DIR``
an already extracted ``vendor/llama.cpp`` tree.

:func:`convert_v32` runs the vendored converter as a library in a subprocess (its ``gguf-py`` first on
``sys.path``), so that this process keeps the project's own ``gguf`` package. Three things differ from running
``convert_hf_to_gguf.py`` directly:

* **Vocabulary.** The V3.2 converter's ``set_vocab`` wants the checkpoint's HF tokenizer (with
  ``add_bos_token``); a bare ``save_pretrained`` directory has none. It is replaced by the token list, token
  types, merges and special ids of the sdist's ``models/ggml-vocab-deepseek-llm.gguf`` (pre-tokenizer
  ``deepseek-llm``, 102,400 tokens), padded with unused ``[PAD<i>]`` tokens when ``vocab_size`` is larger.
  A checkpoint with fewer than 102,400 tokens gets llama.cpp's ``none`` tokenizer instead (``vocab="none"``):
  it loads and evaluates token ids, but cannot tokenize or detokenize text.
* **config.json defaults.** The converter reads the router's activation from ``scoring_func``; without it
  the GGUF lacks ``expert_gating_func`` and llama.cpp refuses to load it. transformers' ``DeepseekV32Config``
  does not write that field (only extra kwargs such as ours do), so ``scoring_func="sigmoid"`` (the only
  router V3.2 has, and what transformers implements) is filled in when absent. ``topk_method`` is not read:
  llama.cpp applies the ``e_score_correction_bias`` (``exp_probs_b``) whenever the tensor is present, i.e.
  ``noaux_tc`` routing; the group limit comes from ``n_group`` / ``topk_group``. The indexer needs
  ``index_n_heads``, ``index_head_dim`` and ``index_topk``; MLA needs ``q_lora_rank`` (llama.cpp's deepseek32
  has no q-LoRA-less path), ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim`` and ``v_head_dim``.
* **MTP.** The V3.2 converter keeps the NextN (MTP) block after the last layer. When config.json declares
  ``num_nextn_predict_layers`` but the safetensors hold no ``model.layers.<num_hidden_layers>.*`` tensor
  (``save_pretrained`` never writes them), the block is dropped (the converter's ``--no-nextn``).

llama.cpp's deepseek32 graph rotates the indexer's q and k with one Hadamard matrix whose size is the largest
power of two (>= 64) dividing ``index_head_dim``, and aborts the process (a ``GGML_ASSERT``, not an exception)
unless that size is ``index_head_dim`` itself: ``index_head_dim`` must be a power of two >= 64, which
:func:`check_config` enforces. The rotation is orthonormal, so in fp32 it leaves the indexer scores unchanged
(``indexer_hadamard`` on or off on our side gives the same logits). The MLA sizes are free (kv_lora_rank 32 with
qk_rope_head_dim 8 converts and matches too).

    python -m dsv32.bench.llamacpp_v32 HF_DIR OUT.gguf [--outtype f32|f16|bf16|q8_0] [--vocab auto|deepseek-llm|none]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from dsv32.config import ModelConfig

VERSION = "0.3.36"
SDIST = f"llama-cpp-python=={VERSION}"
VOCAB_GGUF = "models/ggml-vocab-deepseek-llm.gguf"
VOCAB_SIZE = 102400  # tokens in VOCAB_GGUF
# what the converter needs from vendor/llama.cpp (directories end with "/")
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", VOCAB_GGUF, "LICENSE")
_DONE = ".complete"  # written last: a cache dir without it is an interrupted extraction
# config.json fields the converter or llama.cpp's deepseek32 loader cannot do without
REQUIRED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim", "index_topk",
)
DEFAULTS: dict[str, Any] = {"scoring_func": "sigmoid"}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def b16_config(**changes: Any) -> ModelConfig:
    """A tiny V3.2 config that llama.cpp's converter and CPU kernels accept (docs/benchmarks.md): 2 layers,
    hidden 128, kv_lora 512 + rope 64, indexer 4 x 64 (llama.cpp's Hadamard needs a power of two >= 64), top-64,
    the deepseek-llm vocab (102,400). ``changes`` override fields."""
    base = ModelConfig.from_name("tiny").replace(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=48, kv_lora_rank=512,
        qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, index_n_heads=4, index_head_dim=64, index_topk=64,
        num_nextn_predict_layers=0, max_position_embeddings=131072,
        rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    )
    return base.replace(**changes)


class ConverterUnavailable(RuntimeError):
    """The llama.cpp converter (from the llama-cpp-python sdist) could not be found or fetched."""


@dataclass(frozen=True)
class Converter:
    """An extracted ``vendor/llama.cpp`` tree holding the converter."""

    root: Path

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"

    @property
    def vocab_gguf(self) -> Path:
        return self.root / VOCAB_GGUF

    def check(self) -> Converter:
        missing = [m for m in ("conversion/deepseek.py", "gguf-py/gguf/__init__.py", VOCAB_GGUF)
                   if not (self.root / m).is_file()]
        if missing:
            raise ConverterUnavailable(f"{self.root}: not a llama.cpp converter tree (missing {', '.join(missing)})")
        return self


def cache_dir() -> Path:
    """``$DSV32_CACHE/llama-cpp-python-<VERSION>``, else ``~/.cache/dsv32/llama-cpp-python-<VERSION>``."""
    base = os.environ.get("DSV32_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "dsv32"
    return root / f"llama-cpp-python-{VERSION}"


def _download_sdist(dest: Path, timeout: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", SDIST, "--no-binary", ":all:", "--no-deps", "--no-input",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "20", "-d", str(dest)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConverterUnavailable(f"`{' '.join(cmd)}` failed: {e}") from None
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if r.returncode or not found:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise ConverterUnavailable(
            f"could not download the {SDIST} sdist (`{' '.join(cmd)}` exited {r.returncode}): "
            + " | ".join(tail)
            + "; set DSV32_LLAMA_CPP_SDIST to a local copy of the tarball or DSV32_LLAMA_CPP_DIR to an extracted "
            "vendor/llama.cpp tree"
        )
    return found[0]


def _extract(sdist: Path, dest: Path) -> None:
    """Extract the converter parts of ``vendor/llama.cpp`` from the sdist into ``dest`` (atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        n = 0
        with tarfile.open(sdist, "r:*") as tar:
            for m in tar:
                parts = m.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/<rel>
                if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not m.isfile():
                    continue
                rel = parts[3]
                if not any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in _MEMBERS):
                    continue
                m.name = rel
                # only regular files under vendor/llama.cpp, renamed: no links or absolute paths reach the disk
                tar.extract(m, tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
                n += 1
        if not n:
            raise ConverterUnavailable(f"{sdist}: no vendor/llama.cpp converter inside")
        Converter(tmp).check()
        (tmp / _DONE).write_text(f"{sdist.name}\n")
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first
            if not (dest / _DONE).is_file():
                raise
    except tarfile.TarError as e:
        raise ConverterUnavailable(f"{sdist}: cannot read the sdist ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_converter(*, download: bool = True, timeout: float = 300.0) -> Converter:
    """The llama.cpp converter tree: ``$DSV32_LLAMA_CPP_DIR``, else the cache (filled on first use from
    ``$DSV32_LLAMA_CPP_SDIST`` or, when ``download``, ``pip download``). Raises :class:`ConverterUnavailable`."""
    if env_dir := os.environ.get("DSV32_LLAMA_CPP_DIR"):
        return Converter(Path(env_dir).expanduser()).check()
    dest = cache_dir()
    if (dest / _DONE).is_file():
        return Converter(dest).check()
    if dest.exists():  # interrupted extraction
        shutil.rmtree(dest, ignore_errors=True)
    if env_sdist := os.environ.get("DSV32_LLAMA_CPP_SDIST"):
        sdist = Path(env_sdist).expanduser()
        if not sdist.is_file():
            raise ConverterUnavailable(f"DSV32_LLAMA_CPP_SDIST={env_sdist}: no such file")
        _extract(sdist, dest)
        return Converter(dest).check()
    if not download:
        raise ConverterUnavailable(f"{dest}: the llama.cpp converter is not cached and downloading is off")
    with tempfile.TemporaryDirectory(prefix="dsv32-llama-sdist-") as tmp:
        _extract(_download_sdist(Path(tmp), timeout), dest)
    return Converter(dest).check()


# ---------------------------------------------------------------------------------------------------- conversion
def _tensor_names(hf_dir: Path) -> set[str]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            names.update(h.keys())
    return names


def check_config(hf_dir: str | Path) -> dict[str, Any]:
    """Read ``config.json`` and check what the converter needs; returns it. Raises ``ValueError``."""
    p = Path(hf_dir) / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no config.json (an HF-format checkpoint directory is expected)") from None
    archs = cfg.get("architectures") or []
    if "DeepseekV32ForCausalLM" not in archs:
        raise ValueError(f"{p}: architectures={archs}, expected ['DeepseekV32ForCausalLM']")
    missing = [k for k in REQUIRED if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{p}: missing {', '.join(missing)} (needed by llama.cpp's deepseek32)")
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"{p}: scoring_func={cfg['scoring_func']!r}; DeepSeek-V3.2 routes with 'sigmoid'")
    d = int(cfg["index_head_dim"])
    if d < 64 or d & (d - 1):
        raise ValueError(f"{p}: index_head_dim={d}; llama.cpp's deepseek32 needs a power of two >= 64 (its indexer "
                         "Hadamard rotation would abort the process)")
    if cfg.get("quantization_config"):
        raise ValueError(f"{p}: quantized (FP8) checkpoints are not supported here; dequantize first")
    return cfg


# Runs in a subprocess: argv[1] is a JSON dict of arguments; prints one JSON line of results.
_DRIVER = r'''
import json, logging, os, struct, sys
from pathlib import Path

a = json.loads(sys.argv[1])
root = Path(a["root"])
sys.path[:0] = [str(root / "gguf-py"), str(root)]
import torch  # noqa: E402
import gguf  # noqa: E402

if not Path(gguf.__file__).resolve().is_relative_to((root / "gguf-py").resolve()):
    raise SystemExit(f"the vendored gguf-py was shadowed by {gguf.__file__}")
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
torch.set_num_threads(1)
hf_dir, out = Path(a["hf_dir"]), Path(a["out"])
hparams = ModelBase.load_hparams(hf_dir, False)
for k, v in a["defaults"].items():
    if hparams.get(k) is None:
        hparams[k] = v
cls = get_model_class(get_model_architecture(hparams, ModelType.TEXT))
cls.no_mtp = bool(a["no_mtp"])
KEYS = ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id",
        "add_bos_token", "add_eos_token")


def load_vocab(path):
    """The tokenizer.ggml.* fields of a vocab GGUF; cached as JSON beside it (GGUFReader takes seconds)."""
    cache = path.with_suffix(".json")
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    r = gguf.GGUFReader(path)
    v = {k: r.fields["tokenizer.ggml." + k].contents() for k in KEYS}
    try:
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(v))
        os.replace(tmp, cache)
    except OSError:  # a read-only tree: no cache
        pass
    return v


def set_vocab(self):
    n = int(self.hparams["vocab_size"])
    w = self.gguf_writer
    if a["vocab"] == "none":
        w.add_tokenizer_model("none")  # llama.cpp adds vocab_size dummy tokens ({arch}.vocab_size)
        return
    v = load_vocab(Path(a["vocab_gguf"]))
    tokens, types = list(v["tokens"]), list(v["token_type"])
    if n < len(tokens):
        raise SystemExit(f"vocab_size={n} < the {len(tokens)} tokens of {a['vocab_gguf']}")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n)]
    types += [int(gguf.TokenType.UNUSED)] * (n - len(types))
    w.add_tokenizer_model(v["model"])
    w.add_tokenizer_pre(v["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(v["merges"])
    w.add_bos_token_id(v["bos_token_id"])
    w.add_eos_token_id(v["eos_token_id"])
    w.add_pad_token_id(v["padding_token_id"])
    w.add_add_bos_token(v["add_bos_token"])
    w.add_add_eos_token(v["add_eos_token"])


cls.set_vocab = set_vocab
ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[a["outtype"]]
with torch.inference_mode():
    model = cls(hf_dir, ftype, out, hparams=hparams, model_name=a["name"])
    model.write()
with open(out, "rb") as f:
    magic, _version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
assert magic == b"GGUF", magic
print(json.dumps({"arch": gguf.MODEL_ARCH_NAMES[model.model_arch], "tensors": n_tensors, "kv": n_kv,
                  "class": cls.__name__}))
'''


def convert_v32(
    hf_dir: str | Path,
    out_gguf: str | Path,
    *,
    outtype: str = "f32",
    vocab: str = "auto",
    converter: Converter | None = None,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Convert the HF-format DeepSeek-V3.2 checkpoint ``hf_dir`` to the GGUF file ``out_gguf``.

    ``vocab``: ``"deepseek-llm"`` (the sdist's 102,400-token BPE vocabulary; needs ``vocab_size >= 102400``),
    ``"none"`` (no tokenizer; token ids only) or ``"auto"`` (the first when it fits). Returns a summary dict
    (``path``, ``arch``, ``tensors``, ``vocab``, ``mtp``, ``bytes``). Raises ``ValueError`` for a config the
    converter cannot take, :class:`ConverterUnavailable` without the converter, ``RuntimeError`` if it fails.
    """
    hf_dir, out = Path(hf_dir).resolve(), Path(out_gguf).resolve()
    cfg = check_config(hf_dir)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r}; one of {OUTTYPES}")
    n_vocab = int(cfg["vocab_size"])
    if vocab == "auto":
        vocab = "deepseek-llm" if n_vocab >= VOCAB_SIZE else "none"
    if vocab not in ("deepseek-llm", "none"):
        raise ValueError(f"vocab={vocab!r}; one of 'auto', 'deepseek-llm', 'none'")
    if vocab == "deepseek-llm" and n_vocab < VOCAB_SIZE:
        raise ValueError(f"vocab_size={n_vocab}: the deepseek-llm vocabulary needs >= {VOCAB_SIZE} (or vocab='none')")
    n_layers, n_mtp = int(cfg["num_hidden_layers"]), int(cfg.get("num_nextn_predict_layers") or 0)
    names = _tensor_names(hf_dir)
    if not names:
        raise ValueError(f"{hf_dir}: no *.safetensors")
    has_mtp = n_mtp > 0 and any(k.startswith(f"model.layers.{n_layers}.") for k in names)
    conv = (converter or find_converter()).check()
    out.parent.mkdir(parents=True, exist_ok=True)
    args = {
        "root": str(conv.root), "hf_dir": str(hf_dir), "out": str(out), "outtype": outtype, "vocab": vocab,
        "vocab_gguf": str(conv.vocab_gguf), "no_mtp": not has_mtp, "defaults": DEFAULTS, "name": hf_dir.name,
    }
    env = dict(os.environ, PYTHONNOUSERSITE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("PYTHONPATH", None)
    try:
        r = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(args)], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=str(out.parent))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"converting {hf_dir} timed out after {timeout:.0f} s") from None
    lines = r.stdout.strip().splitlines()
    if r.returncode or not lines or not out.is_file():
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-20:])
        raise RuntimeError(f"llama.cpp converter failed on {hf_dir} (exit {r.returncode}):\n{tail}")
    info = json.loads(lines[-1])
    return {"path": str(out), **info, "vocab": vocab, "mtp": has_mtp, "bytes": out.stat().st_size}


# ---------------------------------------------------------------------------------------------------- running
def llama_logits(gguf_path: str | Path, ids: list[int], *, n_threads: int = 1, n_ctx: int | None = None,
                 n_batch: int = 512, kv_f32: bool = True):
    """fp32 logits ``[len(ids), vocab]`` (numpy) of llama.cpp on one sequence, every position (``logits_all``),
    evaluated in chunks of ``n_batch`` tokens.

    ``kv_f32``: keep llama.cpp's KV cache (MLA latents and indexer keys) in fp32 rather than its default fp16;
    the fp16 cache alone costs about 3e-4 relative logit error on the tiny test models.
    """
    from llama_cpp import GGML_TYPE_F32, Llama  # lazy: llama-cpp-python is optional, installed only for this peer

    kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if kv_f32 else {}
    llm = Llama(model_path=str(gguf_path), logits_all=True, n_ctx=n_ctx or max(64, len(ids) + 16),
                n_batch=n_batch, n_ubatch=n_batch, n_threads=n_threads,
                n_threads_batch=n_threads, verbose=False, **kv)
    try:
        llm.eval(list(map(int, ids)))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv32.bench.llamacpp_v32", description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir", help="HF-format DeepSeek-V3.2 checkpoint directory (config.json + safetensors)")
    ap.add_argument("out", help="output GGUF file")
    ap.add_argument("--outtype", choices=OUTTYPES, default="f32")
    ap.add_argument("--vocab", choices=("auto", "deepseek-llm", "none"), default="auto")
    ap.add_argument("--no-download", action="store_true", help="fail instead of fetching the sdist with pip")
    a = ap.parse_args(argv)
    try:
        conv = find_converter(download=not a.no_download)
        info = convert_v32(a.hf_dir, a.out, outtype=a.outtype, vocab=a.vocab, converter=conv)
    except (ConverterUnavailable, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
