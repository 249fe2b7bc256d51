"""Post-training with GRPO and DeepSeek-V3.2's four stability measures (V3.2 report §3.1).

losses: the maths as pure functions. rollout: the rollout record (JSONL + safetensors) and group sampling
through the engine. batch: rollouts -> tensors, the replayed training forward. step: one GRPO step (mini-batch
updates). tasks / rewards: verifiable tasks and their scorers (the optional ``rl`` extra). replay_check: the
Keep Routing / Keep Sampling Mask measurement. Nothing is imported eagerly: ``import dsv32.rl.losses`` needs
torch only.
"""
