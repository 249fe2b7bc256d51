"""Training: the trainer (`dsv32 train`), its losses, checkpoints and the metrics plot (`dsv32 plot`).

- ``trainer``: pre-training, continued training and SFT in one loop; data-parallel under torchrun.
- ``run``: the run loop every stage shares (resume, step, save, graceful stop, metrics), distributed helpers.
- ``losses``: chunked cross-entropy, V3's balance loss and router-bias update, MTP targets.
- ``checkpointing``: atomic, checksummed, resumable checkpoints and graceful SIGINT/SIGTERM.
- ``plot``: PNG curves from ``metrics.jsonl``.

Submodules are imported on use, so ``import dsv32.train`` stays light.
"""
