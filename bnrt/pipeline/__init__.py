"""Whole jobs, one call each: ``convert`` (``bnrt fold``: load, capture, plan, fold, export, check;
``bnrt inspect``), ``quantize`` (``bnrt quantize``) and ``bench`` (``bnrt bench``). They compose
the stages below and hold no stage logic of their own.
May import every stage package; not ``bnrt.cli``.
"""
