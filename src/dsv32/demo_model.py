"""`make demo`: the most complete job dsv32 runs today, end to end on this machine, saying plainly what it shows.

1. the real DeepSeek-V3.2 tokenizer and chat encoding (thinking mode, a DSML tool call);
2. a DeepSeek-V3.2-architecture model (small sizes, the real 129,280-token vocabulary, random weights);
3. saving it as an HF-format checkpoint and as DeepSeek's FP8 block-quantised format, reloading both;
4. DeepSeek Sparse Attention at work: a real ~2,000-token document, each query attending to its top-256 keys,
   prefill then cached decode, compared with dense attention;
5. streaming generation through the same code path as `dsv32 generate`.

The weights are random, so the generated text is meaningless: the demo shows the machinery (formats,
numerics, caching, sparse attention), not a trained model's quality.
"""

from __future__ import annotations

import inspect
import json
import tempfile
import time
from pathlib import Path

import torch

from dsv32.chat import encode_chat, parse_completion
from dsv32.checkpoint import load_model, save_model
from dsv32.config import ModelConfig
from dsv32.generate import generate_ids, stream_text
from dsv32.model import Transformer
from dsv32.tokenizer import load_tokenizer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _dir_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in p.iterdir()) / 2**20


def demo_config() -> ModelConfig:
    """The `tiny` architecture with the real vocabulary and a top-k well below the demo's context."""
    return ModelConfig.from_name("tiny").replace(
        vocab_size=129280, hidden_size=128, index_topk=256, index_n_heads=8, index_head_dim=32,
        num_attention_heads=8, max_position_embeddings=8192,
    )


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    torch.manual_seed(0)
    print(__doc__)

    # 1 ---------------------------------------------------------------- tokenizer + chat format
    tok = load_tokenizer()
    print(f"[1] DeepSeek-V3.2 tokenizer: {tok.vocab_size} tokens; <｜User｜>={tok.user_id}, "
          f"<｜Assistant｜>={tok.assistant_id}, <think>={tok.think_id}, ｜DSML｜={tok.dsml_id}")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather in Seoul?"},
        {"role": "assistant", "reasoning_content": "I should call the tool.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Seoul"}'}}]},
        {"role": "tool", "content": '{"temp_c": 3}'},
    ]
    ids, mask = encode_chat(messages, tools=tools, thinking=True, tokenizer=tok)
    print(f"    a thinking-mode conversation with one DSML tool call: {len(ids)} tokens, "
          f"{sum(mask)} of them produced by the assistant (the SFT mask)")
    completion = '<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n' \
        '<｜DSML｜parameter name="city" string="true">Busan</｜DSML｜parameter>\n</｜DSML｜invoke>\n' \
        '</｜DSML｜function_calls><｜end▁of▁sentence｜>'
    parsed = parse_completion("Let me check.</think>\n\n" + completion, thinking=True)
    print(f"    parsed a DSML completion -> reasoning={parsed['reasoning_content']!r}, "
          f"tool_calls={json.dumps([c['function'] for c in parsed['tool_calls']])}")

    # 2 ---------------------------------------------------------------- model
    cfg = demo_config()
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger-than-default random weights so attention and routing are not uniform
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.08)
    print(f"\n[2] V3.2 architecture, demo sizes: {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense, "
          f"{cfg.num_hidden_layers - cfg.first_k_dense_replace} MoE with {cfg.n_routed_experts} experts in "
          f"{cfg.n_group} groups), MLA latent {cfg.kv_lora_rank}+{cfg.qk_rope_head_dim}, indexer "
          f"{cfg.index_n_heads}x{cfg.index_head_dim}, top-k {cfg.index_topk}, MTP {cfg.num_nextn_predict_layers}; "
          f"{model.num_params() / 1e6:.1f}M parameters (random)")
    full = ModelConfig.from_name("deepseek-v3.2")
    with torch.device("meta"):
        n_full = Transformer(full).num_params()
    print(f"    the same code builds the released config: {n_full / 1e9:.1f}B parameters (meta device)")

    # 3 ---------------------------------------------------------------- checkpoints
    doc = inspect.getsource(json.decoder)[:8000]  # a real document shipped with every Python
    doc_ids = tok.encode(doc, add_bos=True)[:2048]
    x = torch.tensor([doc_ids])

    def hidden(m: torch.nn.Module, **kw) -> torch.Tensor:  # final hidden states: no [S, 129280] logits needed
        return m.forward(x, compute_logits=False, return_hidden=True, **kw).hidden

    ref = hidden(model)
    with tempfile.TemporaryDirectory() as d:
        hf_dir, fp8_dir = Path(d) / "hf", Path(d) / "fp8"
        save_model(model, hf_dir)
        save_model(model, fp8_dir, fp8=True)
        m2, m8 = load_model(hf_dir), load_model(fp8_dir)
        print(f"\n[3] saved HF-format checkpoints: fp32 {_dir_mb(hf_dir):.1f} MB, FP8 e4m3 with 128x128 UE8M0 "
              f"blocks {_dir_mb(fp8_dir):.1f} MB")
        s0, s8 = model.state_dict(), m8.state_dict()
        w_err = max(_rel(s8[k], s0[k]) for k in s0 if k.endswith("proj.weight") or k.endswith("_proj"))
        r0 = model.forward(x, return_routes=True, compute_logits=False).routes
        r8 = m8.forward(x, return_routes=True, compute_logits=False).routes
        flips = sum(float((a.sort(-1).values != b.sort(-1).values).any(-1).float().mean()) for a, b in zip(r0, r8))
        print(f"    reloaded fp32: final hidden states rel. error {_rel(hidden(m2), ref):.1e}")
        print(f"    FP8 twin: weights within {w_err:.1%}; final hidden states {_rel(hidden(m8), ref):.1%} off, because "
              f"{flips / len(r0):.0%} of tokens change MoE experts (random weights make routing knife-edge)")

    # 4 ---------------------------------------------------------------- DSA at work
    T = len(doc_ids)
    out = model.forward(x, return_indexer=True, compute_logits=False)
    sel = out.indexer[-1].topk_idx
    attended = (sel >= 0).sum(-1).float()  # keys per query
    causal = torch.arange(1, T + 1).float()
    print(f"\n[4] DSA on a {T}-token document (json/decoder.py source): each query attends to at most "
          f"{cfg.index_topk} keys;")
    print(f"    mean keys attended {attended.mean():.0f} vs {causal.mean():.0f} for dense "
          f"({attended.sum() / causal.sum():.1%} of the causal attention work), last query "
          f"{int(attended[0, -1])} of {T}")
    dense = hidden(model, dense=True)
    print(f"    DSA vs dense hidden states differ by {_rel(ref, dense):.1%} (random weights: the indexer is untrained)")
    cache = model.new_cache(1, T + 32)
    t0 = time.perf_counter()
    model.forward(x[:, :-16], cache=cache, last_only=True)
    t1 = time.perf_counter()
    steps = [model.forward(x[:, t : t + 1], cache=cache) for t in range(T - 16, T)]
    t2 = time.perf_counter()
    dec = torch.cat(steps, 1)
    ref = model.logits_from_hidden(ref[:, -16:])
    print(f"    prefill {T - 16} tokens in {t1 - t0:.2f}s, then 16 cached decode steps ({(t2 - t1) / 16 * 1e3:.1f} "
          f"ms/token); cached == full forward: rel. error {_rel(dec, ref):.1e}; cache holds "
          f"{cache.nbytes() / 2**20:.1f} MB")

    # 5 ---------------------------------------------------------------- streaming generation
    prompt = tok.encode("The capital of France is", add_bos=True)
    print("\n[5] streaming 24 tokens (random weights, so the text is noise):")
    print("    >>> ", end="")
    for piece in stream_text(tok, generate_ids(model, prompt, max_new_tokens=24, temperature=0.8, seed=0)):
        print(piece.replace("\n", " "), end="", flush=True)
    print("\n\nDone: tokenizer/chat format, model, checkpoints (incl. FP8), DSA and caching all ran for real.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
