"""Data: ImageNet layout scan, DALI train/val loaders, CIFAR-10, dataset tools, synthetic data.

- ``source``: the dataset a config names (sizes for the preflight, loaders for the worker);
  ``loaders``: what a worker gets (``Data``, this rank's loaders, each a ``Loader``);
- ``shard_feed``: the sharded layout (``data shard``) read through the node's shard cache;
  ``shard_reads``: its epoch order and byte reader (no torch, no DALI);
- ``sharding``: who reads what in which order (pure functions of seed, epoch, rank, world);
- ``dali_pipeline`` / ``imagenet``: the DALI graphs and the loaders that iterate them;
- ``cifar``: CIFAR-10 held on the training device; ``layout``: the ImageNet folder scan;
- ``synth``, ``tools``, ``cli``: generated datasets, verify / prepare-val, the ``data`` command.

Import the submodule you need: DALI and torchvision load only with the modules that use them.
"""
