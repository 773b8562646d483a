"""Deploy stage: running a model over a data file (``run``), a Triton model repository
(``triton``), and ``bnrt serve``: the KServe v2 wire format (``kserve``) and the server with its
batcher (``serve``).
May import: ``bnrt.errors``, ``bnrt.version``, ``bnrt.session`` and ``bnrt.io``; not its siblings
``bnrt.verify`` and ``bnrt.train``, nothing above.
"""
