"""The GPU proof: ``make gpu-check`` and the DALI wheels it needs on a machine without them.

- ``check``: ``python -m pipeline.gpu.check`` runs every part of the GPU path it can on this
  machine (DALI ``mixed`` against CPU decode, bf16 + channels_last training with and without
  ``torch.compile``, NCCL DDP with the bf16 hook, ResNet-50 throughput), writes one JSON and
  exits 0 (all passed), 1 (a check failed), 2 (bad arguments) or 3 (no GPU: the CPU parts
  passed, the GPU parts were skipped). Its parts are in ``check_parts``, their work in
  ``images``, ``dali_check`` and ``train_check``.
- ``bundle``: ``python -m pipeline.gpu.bundle build|unpack``, the DALI wheels for Python 3.12 in
  parts small enough to upload one per command, and the commands that send, unpack and run them.

Nothing here imports Ray or W&B; ``check`` needs torch, torchvision, DALI, NumPy, Pillow and
PyYAML, ``bundle`` the standard library only (docs/gpu-check.md).
"""
