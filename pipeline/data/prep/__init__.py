"""Offline dataset tools: what ``python -m pipeline data ...`` runs before and beside training.

- ``cli``: the ``data`` command; ``synth`` / ``synth_cifar``: generated datasets in the real formats;
- ``verify``: ``data verify`` / ``prepare-val``; ``mean``: ``data stats`` (the training set's mean);
- ``shard_writer`` / ``shard_cli``: ``data shard`` (tar shards and their manifest for object storage).

Training never imports this package: it reads what these tools write through ``pipeline.data``
(``layout``, ``shard_manifest``, ``stats``).
"""
