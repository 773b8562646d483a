"""Verify stage: the one check every comparison goes through (``check``), the sides it compares
(``sides``, ``torchside``, ``onnxside``), the metrics and pass criterion (``metrics``, numpy
only), the first divergent module (``localise``) and the check's table and plot (``report``).
May import: ``bnrt.errors``, ``bnrt.progress``, ``bnrt.session``, ``bnrt.folding`` and ``bnrt.io``;
not its siblings ``bnrt.train`` and ``bnrt.deploy``, nothing above.
"""
