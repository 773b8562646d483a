"""The bundled example: the committed checkpoint, its training script and the digits split."""

import numpy as np
import torch
from torch import nn

import bnrt
from models.digits import DigitsNet, digits_split
from tools.train_digits import train

from .conftest import EXAMPLE


def test_committed_checkpoint_is_small_accurate_and_self_describing():
    assert EXAMPLE.stat().st_size < 1_000_000
    ckpt = torch.load(EXAMPLE, weights_only=True)
    assert ckpt["arch"] == "models.digits:DigitsNet" and ckpt["input_shape"] == [1, 1, 8, 8]
    model = bnrt.load_model(EXAMPLE, trust_code=True).model
    _, _, x, y = digits_split()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert acc >= 0.97


def test_folded_example_within_1e5_of_unfolded_on_the_test_split():
    model = bnrt.load_model(EXAMPLE, trust_code=True).model
    _, _, x, _ = digits_split()
    xt = torch.from_numpy(x)
    result = bnrt.fold(model, (xt[:2],))
    assert len(result.folded) == 6 and not result.skipped
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.model.modules())
    with torch.no_grad():
        err = float((result.model(xt) - model(xt)).abs().max())
    assert err < 1e-5


def test_split_is_fixed_and_stratified():
    x_tr, y_tr, x_te, y_te = digits_split()
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8) and x_te.dtype == np.float32
    assert 0.0 <= x_te.min() and x_te.max() <= 1.0
    assert np.bincount(y_te).min() >= 35
    np.testing.assert_array_equal(digits_split()[3], y_te)


def test_training_script_updates_batchnorm_statistics():
    model, acc = train(epochs=2, seed=0)
    fresh = DigitsNet()
    assert not torch.equal(model.stem[1].running_mean, fresh.stem[1].running_mean)
    assert int(model.fc_bn.num_batches_tracked) == 46  # 2 epochs of ceil(1437 / 64) batches
    assert acc > 0.9


def test_reference_batchnorm_agrees_with_torch_on_the_trained_example():
    from tools.train_digits import reference_agreement

    agreement = reference_agreement(bnrt.load_model(EXAMPLE, trust_code=True).model)
    assert set(agreement) == {"output", "grad_input", "running_mean", "running_var"}
    assert max(agreement.values()) < 1e-5
