"""The training side: BatchNorm as PyTorch computes it, in numpy (``reference``: forward, backward,
running statistics), and exact recalibration of population statistics over a dataset, across
processes too (``calibrate``).
May import: ``bnrt.errors``, ``bnrt.progress``, ``bnrt.folding`` and ``bnrt.io``; not its siblings
``bnrt.verify`` and ``bnrt.deploy``, nothing above.
"""
