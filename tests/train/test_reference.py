"""The numpy reference BatchNorm against torch.nn.BatchNorm1d/2d/3d and autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnrt.train import reference as ref

BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _shape(ndim: int, n: int, c: int) -> tuple[int, ...]:
    return (n, c, *([3] * (ndim - 2)))


@settings(max_examples=120, deadline=None)
@given(ndim=st.sampled_from([2, 3, 4, 5]), n=st.integers(2, 4), c=st.integers(1, 4), affine=st.booleans(),
       momentum=st.sampled_from([0.1, 0.5, None]), dtype=st.sampled_from([torch.float64, torch.float32]),
       steps=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_train_forward_backward_and_running_stats_match_torch(ndim, n, c, affine, momentum, dtype, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    bn = BN[ndim](c, affine=affine, momentum=momentum).to(dtype)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.randn(c, generator=gen, dtype=dtype))
            bn.bias.copy_(torch.randn(c, generator=gen, dtype=dtype))
    mirror = ref.ReferenceBatchNorm(c, momentum=momentum, affine=affine,
                                    weight=None if not affine else bn.weight.detach().double().numpy(),
                                    bias=None if not affine else bn.bias.detach().double().numpy())
    tol = TOL[dtype]
    for _ in range(steps):
        x = (torch.randn(_shape(ndim, n, c), generator=gen, dtype=dtype) * 3 + 1).requires_grad_(True)
        dy = torch.randn(_shape(ndim, n, c), generator=gen, dtype=dtype)
        y = bn(x)
        y.backward(dy)
        y_ref = mirror.forward(x.detach().double().numpy())
        dx, dw, db = mirror.backward(dy.double().numpy())
        np.testing.assert_allclose(y_ref, y.detach().double().numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(dx, x.grad.double().numpy(), rtol=tol, atol=tol * 10)
        if affine:
            np.testing.assert_allclose(dw, bn.weight.grad.double().numpy(), rtol=tol, atol=tol * 10)
            np.testing.assert_allclose(db, bn.bias.grad.double().numpy(), rtol=tol, atol=tol * 10)
            bn.weight.grad = bn.bias.grad = None
        np.testing.assert_allclose(mirror.running_mean, bn.running_mean.double().numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(mirror.running_var, bn.running_var.double().numpy(), rtol=tol, atol=tol)
        assert mirror.num_batches_tracked == int(bn.num_batches_tracked)
    bn.eval()
    mirror.training = False
    x = torch.randn(_shape(ndim, n, c), generator=gen, dtype=dtype)
    np.testing.assert_allclose(mirror.forward(x.double().numpy()), bn(x).detach().double().numpy(), rtol=tol, atol=tol)


def test_track_running_stats_false_uses_batch_statistics_in_eval():
    bn = nn.BatchNorm2d(3, track_running_stats=False).double().eval()
    mirror = ref.ReferenceBatchNorm(3, track_running_stats=False, training=False)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64) * 5 + 2
    np.testing.assert_allclose(mirror.forward(x.numpy()), bn(x).detach().numpy(), rtol=1e-12, atol=1e-12)
    assert mirror.running_mean is None


def test_cumulative_average_with_momentum_none():
    mirror = ref.ReferenceBatchNorm(1, momentum=None)
    batches = [np.array([[1.0], [3.0]]), np.array([[5.0], [9.0]]), np.array([[0.0], [2.0]])]
    for b in batches:
        mirror.forward(b)
    # running mean: plain average of the three batch means (2, 7, 1) -- initial value forgotten
    assert mirror.running_mean[0] == pytest.approx(10 / 3)
    # running var: average of unbiased batch variances (2, 8, 2)
    assert mirror.running_var[0] == pytest.approx(4.0)
    assert mirror.num_batches_tracked == 3


def test_one_value_per_channel_in_training_is_the_same_error_as_torch():
    with pytest.raises(ValueError) as ours:
        ref.ReferenceBatchNorm(2).forward(np.ones((1, 2)))
    with pytest.raises(ValueError) as theirs:
        nn.BatchNorm1d(2)(torch.ones(1, 2))
    assert str(ours.value) == str(theirs.value)
    ref.ReferenceBatchNorm(2).forward(np.ones((2, 2)))  # two values per channel are enough


def test_two_pass_moments_are_stable_where_the_naive_formula_cancels():
    rng = np.random.default_rng(0)
    std = 1.0
    x = (1e4 * std + std * rng.standard_normal((4096, 2))).astype(np.float32)
    exact = np.var(x.astype(np.longdouble), axis=0)  # extended precision, two-pass
    _, mean, m2 = ref.moments(x)
    ours = m2 / x.shape[0]
    naive = (x * x).mean(axis=0, dtype=np.float32) - x.mean(axis=0, dtype=np.float32) ** 2
    assert np.max(np.abs(ours - exact) / exact) < 1e-10
    assert np.max(np.abs(naive - exact) / exact) > 0.1  # the catastrophic cancellation bnrt avoids


def test_merge_moments_equals_one_pass():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 3, 5)) * 4 + 100
    whole = ref.moments(x)
    merged = (0, np.zeros(3), np.zeros(3))
    for part in (x[:10], x[10:11], x[11:]):
        merged = ref.merge_moments(merged, ref.moments(part))
    assert merged[0] == whole[0]
    np.testing.assert_allclose(merged[1], whole[1], rtol=1e-13)
    np.testing.assert_allclose(merged[2], whole[2], rtol=1e-12)
