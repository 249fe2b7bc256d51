"""Model configuration: every field of DeepSeek-V3.2's HF ``config.json`` under its HF name, plus named presets.

The field names are the ones in DeepSeek's released ``config.json`` so that a checkpoint directory round-trips
through :meth:`ModelConfig.from_hf` / :meth:`ModelConfig.to_hf` unchanged. Fields that only dsv32 knows (behaviour
switches such as turning DSA off or simulating the FP8 indexer) carry a ``dsv32_`` prefix in the JSON.

Both RoPE spellings load: DeepSeek's release (``rope_theta`` + ``rope_scaling={"type": "yarn", ...}``) and
transformers v5's ``rope_parameters={"rope_type": "yarn", "rope_theta": ..., ...}``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fields that exist only in dsv32 (not in DeepSeek's config.json); written with this prefix.
_OURS_PREFIX = "dsv32_"


@dataclass
class ModelConfig:
    """DeepSeek-V3.2 hyper-parameters. Defaults are the released 671B model (``deepseek-v3.2``)."""

    # --- identity
    architectures: list[str] = field(default_factory=lambda: ["DeepseekV32ForCausalLM"])
    model_type: str = "deepseek_v32"
    # --- sizes
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # per routed expert and per shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # MLA: informational only (every head has its own decompressed K/V)
    # --- MoE (DeepSeekMoE, noaux_tc routing)
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    # --- MLA
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # --- DSA lightning indexer
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # --- MTP
    num_nextn_predict_layers: int = 1
    # --- positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    # --- misc
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    use_cache: bool = True
    torch_dtype: str = "bfloat16"
    quantization_config: dict[str, Any] | None = None
    # --- dsv32-only behaviour switches (written as dsv32_<name>)
    use_dsa: bool = True  # False: dense MLA (V3.1-style), the indexer is still built (and trainable)
    indexer_hadamard: bool = False  # rotate indexer q/k by the orthonormal Hadamard matrix (reference does)
    indexer_fp8: bool = False  # simulate e4m3 quantisation of indexer q/k with UE8M0 128-block scales
    mla_cache_fp8: bool = False  # simulate the reference's FP8 round-trip of c_kv before caching
    # DSA over at most this many context keys (S > 1 queries) runs as dense MHA under the top-k mask (the
    # paper's "masked MHA mode" for short prefill): same selection and softmax, dense cost, no gather; 0 = off
    masked_mha_max_len: int = 0

    _OURS = ("use_dsa", "indexer_hadamard", "indexer_fp8", "mla_cache_fp8", "masked_mha_max_len")
    _SPEED_ONLY = ("masked_mha_max_len",)  # switches that change how, not what, is computed (resume ignores them)

    # ------------------------------------------------------------------ derived quantities
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    def is_moe_layer(self, layer_id: int) -> bool:
        """DeepSeek's rule: layers >= first_k_dense_replace are MoE (every ``moe_layer_freq``-th)."""
        return (
            self.n_routed_experts > 0
            and layer_id >= self.first_k_dense_replace
            and layer_id % self.moe_layer_freq == 0
        )

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The YaRN parameters, or None for plain RoPE."""
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type")) not in ("yarn",):
            return None
        return rs

    @property
    def softmax_scale(self) -> float:
        """MLA softmax scale: qk_head_dim^-0.5, times mscale^2 under YaRN (DeepSeek's reference code)."""
        scale = self.qk_head_dim**-0.5
        y = self.yarn
        if y is not None:
            mscale_all_dim = float(y.get("mscale_all_dim", 0.0) or 0.0)
            factor = float(y["factor"])
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    # ------------------------------------------------------------------ validation
    def validate(self) -> ModelConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"ModelConfig: {msg}")

        need(self.hidden_size > 0 and self.num_hidden_layers > 0, "hidden_size and num_hidden_layers must be > 0")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        need(
            self.index_head_dim >= self.qk_rope_head_dim,
            f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim={self.qk_rope_head_dim}",
        )
        if self.n_routed_experts:
            need(
                self.n_routed_experts % self.n_group == 0,
                f"n_routed_experts={self.n_routed_experts} must divide into n_group={self.n_group}",
            )
            need(self.topk_group <= self.n_group, f"topk_group={self.topk_group} > n_group={self.n_group}")
            need(
                self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                "num_experts_per_tok exceeds the experts in the kept groups",
            )
            need(self.scoring_func == "sigmoid", f"scoring_func={self.scoring_func!r}: only 'sigmoid' (V3) is built")
        need(self.hidden_act == "silu", f"hidden_act={self.hidden_act!r}: only 'silu' is built")
        need(self.q_lora_rank > 0, "q_lora_rank must be > 0 (the indexer reuses the q latent)")
        if self.indexer_hadamard:
            d = self.index_head_dim
            need(d & (d - 1) == 0, f"indexer_hadamard needs a power-of-two index_head_dim, got {d}")
        return self

    # ------------------------------------------------------------------ presets / JSON
    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[name]).validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        # transformers v5 spelling: rope_parameters = {rope_type, rope_theta, factor, ...}
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            rtype = rp.pop("rope_type", rp.pop("type", "default"))
            if rtype in ("default", None):
                d.setdefault("rope_scaling", None)
            else:
                d.setdefault("rope_scaling", {"type": rtype, **rp})
        if isinstance(d.get("rope_scaling"), dict) and "rope_type" in d["rope_scaling"]:
            rs = dict(d["rope_scaling"])
            rs["type"] = rs.pop("rope_type")
            d["rope_scaling"] = rs
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        # transformers' layer-type list: "dense" for the first layers; recover first_k_dense_replace
        mlt = d.pop("mlp_layer_types", None)
        if mlt and "first_k_dense_replace" not in d:
            d["first_k_dense_replace"] = next((i for i, t in enumerate(mlt) if t != "dense"), len(mlt))
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            if k.startswith(_OURS_PREFIX) and k[len(_OURS_PREFIX) :] in cls._OURS:
                kwargs[k[len(_OURS_PREFIX) :]] = v
            elif k in names and k not in cls._OURS:
                kwargs[k] = v
            # other keys (transformers bookkeeping such as layer_types, head_dim, qk_head_dim) are derived
        return cls(**kwargs).validate()

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: no config.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = copy.deepcopy(getattr(self, f.name))
            if f.name in self._OURS:
                out[_OURS_PREFIX + f.name] = v
            elif f.name == "quantization_config" and v is None:
                continue
            else:
                out[f.name] = v
        return out

    def to_hf(self, path: str | Path | None = None) -> dict[str, Any]:
        """The ``config.json`` dict (DeepSeek's spelling); written to ``path`` (dir or file) when given."""
        d = self.to_dict()
        if path is not None:
            p = Path(path)
            if p.suffix != ".json":
                p.mkdir(parents=True, exist_ok=True)
                p = p / "config.json"
            p.write_text(json.dumps(d, indent=2) + "\n")
        return d

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes).validate()


def _tiny() -> ModelConfig:
    """CI-sized: 3 layers (1 dense + 2 MoE with expert groups), MTP on, index_topk 16 < the tests' lengths."""
    return ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=16,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 256,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        torch_dtype="float32",
    )


def _small() -> ModelConfig:
    """CPU-trainable (~20M parameters with the 8K BPE vocab): the dense base the sparsify recipe converts."""
    return ModelConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=192,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        first_k_dense_replace=1,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=256,
        masked_mha_max_len=2048,  # training at 1024-2048 tokens: masked MHA beats gathering (docs/training.md)
        num_nextn_predict_layers=1,
        max_position_embeddings=131072,
        rope_scaling={
            "type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        bos_token_id=0,
        eos_token_id=1,
        torch_dtype="float32",
    )


def _deepseek_v32() -> ModelConfig:
    """The released 671B model, field for field (DeepSeek-V3.2's released ``config.json``)."""
    return ModelConfig(
        quantization_config={
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "scale_fmt": "ue8m0",
        }
    )


PRESETS: dict[str, ModelConfig] = {
    "tiny": _tiny(),
    "small": _small(),
    "deepseek-v3.2": _deepseek_v32(),
}
