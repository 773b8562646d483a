"""A numpy reference of BatchNorm as PyTorch computes it: bnrt's oracle for tests and calibration.

Semantics (torch.nn.BatchNorm1d/2d/3d, ``F.batch_norm``):
- training normalises with the batch mean and the *biased* batch variance over every axis but C;
- running statistics update as ``running = (1 − momentum)·running + momentum·batch`` with the
  *unbiased* batch variance; ``momentum=None`` gives the cumulative average over
  ``num_batches_tracked`` (factor 1 / num_batches_tracked after it is incremented);
- eval normalises with the running statistics; with ``track_running_stats=False`` it uses batch
  statistics in eval too;
- training on a batch with one value per channel is an error.
Everything is computed in float64 with two-pass moments (mean first, then squared deviations),
never E[x²] − E[x]², which cancels catastrophically when |mean| ≫ std.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _axes(x: np.ndarray) -> tuple[int, ...]:
    if x.ndim < 2:
        raise ValueError(f"BatchNorm expects (N, C, ...) input, got shape {x.shape}")
    return (0,) + tuple(range(2, x.ndim))


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Per-channel ``(count, mean, M2)`` of ``x`` (N, C, ...) in float64, two-pass:
    M2 = Σ (x − mean)², the sum of squared deviations."""
    x = np.asarray(x, dtype=np.float64)
    axes = _axes(x)
    count = int(np.prod([x.shape[a] for a in axes]))
    mean = x.mean(axis=axes)
    m2 = ((x - _channel(mean, x.ndim)) ** 2).sum(axis=axes)
    return count, mean, m2


def merge_moments(a: tuple[int, np.ndarray, np.ndarray], b: tuple[int, np.ndarray, np.ndarray]):
    """Chan et al.'s exact merge of two ``(count, mean, M2)`` triples."""
    na, mean_a, m2_a = a
    nb, mean_b, m2_b = b
    n = na + nb
    if na == 0:
        return b
    if nb == 0:
        return a
    delta = mean_b - mean_a
    return n, mean_a + delta * (nb / n), m2_a + m2_b + delta ** 2 * (na * nb / n)


@dataclass
class ForwardCache:
    x_hat: np.ndarray
    inv_std: np.ndarray
    gamma: np.ndarray | None
    count: int


def forward_train(x, gamma=None, beta=None, eps: float = 1e-5):
    """Training-mode output, normalised with batch statistics. Returns ``(y, batch_mean,
    unbiased_batch_var, cache)``; raises ``ValueError`` for one value per channel."""
    x = np.asarray(x, dtype=np.float64)
    count, mean, m2 = moments(x)
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size torch.Size({list(x.shape)})")  # torch's words
    var_biased = m2 / count
    inv_std = 1.0 / np.sqrt(var_biased + eps)
    x_hat = (x - _channel(mean, x.ndim)) * _channel(inv_std, x.ndim)
    y = _affine(x_hat, gamma, beta)
    return y, mean, m2 / (count - 1), ForwardCache(x_hat, inv_std, None if gamma is None else np.asarray(gamma, np.float64), count)


def forward_eval(x, running_mean, running_var, gamma=None, beta=None, eps: float = 1e-5) -> np.ndarray:
    """Eval-mode output, normalised with the running statistics."""
    x = np.asarray(x, dtype=np.float64)
    mean = _channel(np.asarray(running_mean, np.float64), x.ndim)
    inv_std = 1.0 / np.sqrt(_channel(np.asarray(running_var, np.float64), x.ndim) + eps)
    return _affine((x - mean) * inv_std, gamma, beta)


def _affine(x_hat: np.ndarray, gamma, beta) -> np.ndarray:
    if gamma is not None:
        x_hat = x_hat * _channel(np.asarray(gamma, np.float64), x_hat.ndim)
    if beta is not None:
        x_hat = x_hat + _channel(np.asarray(beta, np.float64), x_hat.ndim)
    return x_hat


def backward_train(dy, cache: ForwardCache):
    """Gradients of a training-mode forward: ``(dx, dgamma, dbeta)`` (dgamma/dbeta None when
    affine=False). dx = inv_std / n · (n·g − Σg − x̂·Σ(g·x̂)) with g = dy·γ."""
    dy = np.asarray(dy, dtype=np.float64)
    axes = _axes(dy)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * cache.x_hat).sum(axis=axes)
    g = dy if cache.gamma is None else dy * _channel(cache.gamma, dy.ndim)
    n = cache.count
    sum_g = _channel(g.sum(axis=axes), dy.ndim)
    sum_gx = _channel((g * cache.x_hat).sum(axis=axes), dy.ndim)
    dx = _channel(cache.inv_std, dy.ndim) / n * (n * g - sum_g - cache.x_hat * sum_gx)
    if cache.gamma is None:
        return dx, None, None
    return dx, dgamma, dbeta


def update_running(running_mean, running_var, batch_mean, batch_var_unbiased, momentum: float | None,
                   num_batches_tracked: int):
    """New ``(running_mean, running_var, num_batches_tracked)`` after one training batch."""
    tracked = num_batches_tracked + 1
    factor = 1.0 / tracked if momentum is None else momentum
    mean = (1 - factor) * np.asarray(running_mean, np.float64) + factor * batch_mean
    var = (1 - factor) * np.asarray(running_var, np.float64) + factor * batch_var_unbiased
    return mean, var, tracked


@dataclass
class ReferenceBatchNorm:
    """Mirror of ``torch.nn.BatchNorm{1,2,3}d``: same attributes, ``forward`` and ``backward``."""

    num_features: int
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    training: bool = True
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    running_mean: np.ndarray | None = None
    running_var: np.ndarray | None = None
    num_batches_tracked: int = 0
    _cache: ForwardCache | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        c = self.num_features
        if self.affine:
            self.weight = np.ones(c) if self.weight is None else np.asarray(self.weight, np.float64)
            self.bias = np.zeros(c) if self.bias is None else np.asarray(self.bias, np.float64)
        if self.track_running_stats:
            self.running_mean = np.zeros(c) if self.running_mean is None else np.asarray(self.running_mean, np.float64)
            self.running_var = np.ones(c) if self.running_var is None else np.asarray(self.running_var, np.float64)

    def forward(self, x) -> np.ndarray:
        if self.training or not self.track_running_stats:
            y, mean, var_unbiased, self._cache = forward_train(x, self.weight, self.bias, self.eps)
            if self.training and self.track_running_stats:
                self.running_mean, self.running_var, self.num_batches_tracked = update_running(
                    self.running_mean, self.running_var, mean, var_unbiased, self.momentum, self.num_batches_tracked)
            return y
        self._cache = None
        return forward_eval(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def backward(self, dy):
        """``(dx, dweight, dbias)`` of the last batch-statistics forward."""
        if self._cache is None:
            raise RuntimeError("backward needs a forward that used batch statistics")
        return backward_train(dy, self._cache)
