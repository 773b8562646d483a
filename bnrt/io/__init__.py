"""Files in and out: what a model file is (``source``: its kind, decided once by content), loading
torch checkpoints (``load``), ONNX export (``export``), check and calibration data (``data``),
atomic writes and the overwrite policy (``save``), and the names and formats of what bnrt writes
(``artifacts``).
May import: ``bnrt.errors``, ``bnrt.version``, ``bnrt.session`` and ``bnrt.folding``; nothing above.
"""
