"""Post-training with GRPO and DeepSeek-V3.2's four stability measures (V3.2 report §3.1).

losses: the maths as pure functions. rollout: the rollout record, saved as JSONL + safetensors, and group
sampling through the engine. tasks / rewards: verifiable tasks and their scorers (optional ``rl`` extra).
Nothing here is imported eagerly: ``import dsv32.rl.losses`` needs torch only.
"""
