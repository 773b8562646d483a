"""BatchNorm fold arithmetic: pure functions on float64 numpy arrays.

This is the only place the fold formulas live; the torch folder (``bnrt.fold``) and any graph
folder call these and cast the results back to the model dtype once. Notation (DESIGN.md):
BN in eval is ``y = s * x + t`` per channel with ``s = gamma / sqrt(var + eps)`` and
``t = beta - mean * s``.
"""

from __future__ import annotations

import numpy as np


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def bn_scale_shift(
    mean, var, eps: float, gamma=None, beta=None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(s, t)`` of a BatchNorm in eval; ``gamma``/``beta`` None means affine=False."""
    mean, var = _f64(mean), _f64(var)
    gamma = np.ones_like(mean) if gamma is None else _f64(gamma)
    beta = np.zeros_like(mean) if beta is None else _f64(beta)
    s = gamma / np.sqrt(var + float(eps))
    return s, beta - mean * s


def _channel_view(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def fold_backward(weight, bias, s, t) -> tuple[np.ndarray, np.ndarray]:
    """Layer -> BN where the layer's output channels are axis 0 of ``weight``.

    Holds for Conv (``[Cout, Cin/g, k...]``, any groups) and Linear (``[out, in]``):
    ``W'[c] = s_c * W[c]`` and ``b' = s * b + t`` (``b = 0`` when ``bias`` is None).
    """
    w, s, t = _f64(weight), _f64(s), _f64(t)
    if w.shape[0] != s.shape[0]:
        raise ValueError(f"weight has {w.shape[0]} output channels, BN has {s.shape[0]}")
    b = np.zeros_like(s) if bias is None else _f64(bias)
    return w * _channel_view(s, w.ndim, 0), s * b + t
