"""BatchNorm fold arithmetic: pure functions on float64 numpy arrays.

This is the only place the fold formulas live; the torch folder (``bnrt.folding.torchfold``) and any graph
folder call these and cast the results back to the model dtype once. Notation:
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


def _grouped(w: np.ndarray, groups: int, per_group_rows: int, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w`` viewed as ``[g, per_group_rows, n, k...]`` and ``v`` (length g·n) viewed to broadcast
    along axis 2: the channel layout both grouped folds scale."""
    k = w.shape[2:]
    n = w.shape[1]
    return w.reshape(groups, per_group_rows, n, *k), v.reshape(groups, 1, n, *([1] * len(k)))


def fold_convtranspose_backward(weight, bias, s, t, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose -> BN. ``weight`` is ``[Cin, Cout/g, k...]``; output channel
    ``gi * Cout/g + j`` of group ``gi`` is ``weight[gi * Cin/g : (gi+1) * Cin/g, j]``, so the weight
    is viewed as ``[g, Cin/g, Cout/g, k...]`` and axis 2 is scaled by ``s`` viewed as
    ``[g, 1, Cout/g, 1...]``. ``b' = s * b + t``."""
    w, s, t = _f64(weight), _f64(s), _f64(t)
    cin, cout_g = w.shape[0], w.shape[1]
    if cin % groups or cout_g * groups != s.shape[0]:
        raise ValueError(f"weight {w.shape} with groups={groups} does not give {s.shape[0]} output channels")
    view, scale = _grouped(w, groups, cin // groups, s)
    b = np.zeros_like(s) if bias is None else _f64(bias)
    return (view * scale).reshape(w.shape), s * b + t


def fold_forward_linear(weight, bias, s, t) -> tuple[np.ndarray, np.ndarray]:
    """BN -> Linear, with ``s``/``t`` given per input feature (already expanded through any
    flatten): ``W'[:, i] = W[:, i] * s_i`` and ``b' = b + W @ t``."""
    w, s, t = _f64(weight), _f64(s), _f64(t)
    if w.shape[1] != s.shape[0]:
        raise ValueError(f"weight has {w.shape[1]} input features, scale has {s.shape[0]}")
    b = np.zeros(w.shape[0]) if bias is None else _f64(bias)
    return w * s[None, :], b + w @ t


def fold_forward_conv(weight, bias, s, t, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """BN -> Conv (exact only without zero padding). ``weight`` is ``[Cout, Cin/g, k...]``; output
    channel ``o`` of group ``gi`` reads absolute input channels ``gi * Cin/g + i``:
    ``W'[o, i, k] = W[o, i, k] * s_ci`` and ``b'_o = b_o + sum_{i,k} W[o, i, k] * t_ci``."""
    w, s, t = _f64(weight), _f64(s), _f64(t)
    cout, cin_g = w.shape[0], w.shape[1]
    if cout % groups or cin_g * groups != s.shape[0]:
        raise ValueError(f"weight {w.shape} with groups={groups} does not take {s.shape[0]} input channels")
    view, scale = _grouped(w, groups, cout // groups, s)
    _, shift_by = _grouped(w, groups, cout // groups, t)
    b = np.zeros(cout) if bias is None else _f64(bias)
    return (view * scale).reshape(w.shape), b + (view * shift_by).reshape(cout, -1).sum(axis=1)


def pad_kernel(weight, kernel: tuple[int, ...]) -> np.ndarray:
    """A conv weight ``[Cout, Cin/g, k...]`` zero-padded, centred, to spatial size ``kernel`` (odd
    sizes): a smaller "same" conv computes the same as the padded one with the larger padding."""
    w = _f64(weight)
    pads = [(0, 0), (0, 0)] + [((K - k) // 2, (K - k) // 2) for k, K in zip(w.shape[2:], kernel)]
    return np.pad(w, pads)


def identity_kernel(scale, cin_per_group: int, kernel: tuple[int, ...]) -> np.ndarray:
    """The conv weight ``[C, Cin/g, k...]`` of ``y_c = scale_c · x_c`` (a BN's scale, or ones for the
    input itself): channel ``c`` reads its own input channel, index ``c mod Cin/g`` in its group,
    at the kernel's centre."""
    s = _f64(scale)
    w = np.zeros((s.shape[0], cin_per_group, *kernel))
    centre = tuple(k // 2 for k in kernel)
    w[(np.arange(s.shape[0]), np.arange(s.shape[0]) % cin_per_group, *centre)] = s
    return w
