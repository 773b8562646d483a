"""Fold stage: find who feeds whom, plan one decision per BatchNorm, merge the BNs into their
neighbouring layers, for torch modules and ONNX graphs alike.

Owns: the fold math (``foldmath``), the decisions and refusal codes (``decision``), the graph-view
protocol (``view``), the rule table (``rules``) and the engine that walks it (``engine``),
structural reparameterization (``reparam``), torch capture (``capture``) and the two backends
(``torchgraph`` + ``torchfold`` for torch, ``onnxgraph`` + ``onnxscope`` + ``onnxfold`` for ONNX).
May import: ``bnrt.errors`` and ``bnrt.session`` (graph probes); nothing above.
"""
