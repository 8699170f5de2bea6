"""Data at run time: the ImageNet layouts, DALI train/val loaders, CIFAR-10; the dataset tools in ``prep``.

- ``source``: the dataset a config names (sizes for the preflight, loaders for the worker);
  ``loaders``: what a worker gets (``Data``, this rank's loaders, each a ``Loader``);
- ``shard_feed``: the sharded layout (``data shard``) read through the node's shard cache;
  ``shard_reads``: its epoch order and byte reader (no torch, no DALI);
- ``rank_split``: who reads what in which order (pure functions of seed, epoch, rank, world);
- ``dali_pipeline``: the DALI graphs; ``dali_loaders``: the loaders every ImageNet layout shares (one
  feed over a reader: file names or the shard cache's bytes); ``imagenet``: their builders;
- ``cifar``: CIFAR-10 held on the training device; ``layout``: the ImageNet folder scan;
  ``shard_manifest``: the sharded layout's manifest as training reads it; ``stats``: the
  training set's mean as training reads it; ``image_check``: whether a file decodes;
- ``prep``: the offline dataset tools of the ``data`` command (generated datasets, verify /
  prepare-val, the mean, the shard writer); training never imports it.

Import the submodule you need: DALI and torchvision load only with the modules that use them.
"""
