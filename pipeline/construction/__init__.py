"""The paper's constructed solution made runnable (He et al. 2015, Sec. 1).

"There exists a solution by construction to the deeper model: the added layers are identity
mapping, and the other layers are copied from the learned shallower model."

- ``deepen``: ``python -m pipeline deepen``, a trained shallower checkpoint -> the deeper
  network whose added blocks compute the identity (logits equal in eval mode, checked);
- ``experiment``: ``python -m pipeline construction`` (``make construction``), the three runs
  per family from the same start (constructed, from scratch, the shallower one continued);
- ``report``: the figure, the table over seeds and the verdict (``pipeline report --kind construction``).
"""
