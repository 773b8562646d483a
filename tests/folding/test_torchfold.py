"""Fold rules: folded outputs equal unfolded ones (property tests), and every refusal keeps the BN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bnrt
from bnrt.errors import HealthError

from ..conftest import assert_folds_exactly, randomise_bn

CONV = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}


@given(
    rank=st.sampled_from([1, 2, 3]),
    groups=st.integers(1, 3),
    cin_per_group=st.integers(1, 3),
    cout_per_group=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_conv_bn_fold_is_exact(rank, groups, cin_per_group, cout_per_group, kernel, stride, dilation, padding,
                               padding_mode, bias, affine, seed):
    conv_t, bn_t = CONV[rank]
    size = 7 if rank < 3 else 5
    if padding_mode != "zeros":
        padding = min(padding, size - 1)
    gen = torch.Generator().manual_seed(seed)
    conv = conv_t(groups * cin_per_group, groups * cout_per_group, kernel, stride=stride, padding=padding,
                  dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode)
    bn = bn_t(groups * cout_per_group, affine=affine)
    model = nn.Sequential(conv, bn).double()
    randomise_bn(bn, gen)
    x = torch.randn(2, groups * cin_per_group, *([size] * rank), generator=gen, dtype=torch.float64)
    result = assert_folds_exactly(model, x, 1)
    assert result.decisions[0].rule == "conv->bn" and result.decisions[0].into == ("0",)
    assert result.bias_added == ([] if bias else ["0"])


@given(fin=st.integers(1, 16), fout=st.integers(1, 16), bias=st.booleans(), affine=st.booleans(),
       batch=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_linear_bn1d_fold_is_exact(fin, fout, bias, affine, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm1d(fout, affine=affine)
    model = nn.Sequential(nn.Linear(fin, fout, bias=bias), bn).double()
    randomise_bn(bn, gen)
    result = assert_folds_exactly(model, torch.randn(batch, fin, generator=gen, dtype=torch.float64), 1)
    assert result.decisions[0].rule == "linear->bn"


def test_float32_fold_matches_within_ulps_of_float64_fold():
    gen = torch.Generator().manual_seed(0)
    conv, bn = nn.Conv2d(8, 16, 3, bias=True), nn.BatchNorm2d(16)
    randomise_bn(bn, gen)
    model = nn.Sequential(conv, bn).eval()
    result = bnrt.fold(model, (torch.randn(2, 8, 6, 6),))
    folded = result.model[0]
    assert folded.weight.dtype == torch.float32
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    exact_w = conv.weight.double() * s.view(-1, 1, 1, 1)
    # cast once from float64: the float32 weight is the nearest float32 to the exact value
    assert torch.equal(folded.weight, exact_w.float())


def test_input_model_is_not_modified():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = bnrt.fold(model, (torch.randn(2, 3, 5, 5),))
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(result.model[1], nn.Identity)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --- refusals: the BN stays, the reason is given, outputs are unchanged -------------------------

class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class SecondConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


class DirectWeightUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight)


class BnCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.bn(self.conv(x)))


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2 - 1


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.spare = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x))


class LinearOnSequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):  # x (N, 6, 4): BN normalises dim 1 (the sequence), not the Linear's features
        return self.bn(self.fc(x))


def _weight_normed():
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 1))
    return nn.Sequential(conv, nn.BatchNorm2d(3))


REFUSALS = [  # (case, model, input shape, reason, refusal codes: backward, forward or the BN's own)
    ("called twice", CalledTwice, (2, 3, 4, 4), "'conv' is called 2 times", ('reused-layer', 'no-layer-after')),
    ("second consumer", SecondConsumer, (2, 3, 4, 4), "output of 'conv' also feeds 'add'", ('shared-output', 'no-layer-after')),
    ("tied weights", TiedWeights, (2, 4), "parameters of 'a' are shared with 'b'", ('shared-parameters', 'no-layer-after')),
    ("direct weight use", DirectWeightUse, (2, 3, 4, 4), "parameters of 'conv' are read directly in forward", ('shared-parameters', 'no-layer-after')),
    ("bn called twice", BnCalledTwice, (2, 3, 4, 4), "'bn' is called 2 times", ('reused-layer',)),
    ("no running stats", lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)),
     (2, 3, 4, 4), "no running statistics", ('no-running-stats',)),
    ("after nonlinearity", lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3)),
     (2, 3, 4, 4), "input comes from ReLU '1': no fold rule; forward: output feeds the model output", ('no-layer-before', 'no-layer-after')),
    ("bn -> nonlinearity -> layer", lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1)),
     (2, 3, 4, 4), "input comes from ReLU '0': no fold rule; forward: output feeds ReLU '2', not a layer it can fold into", ('no-layer-before', 'no-layer-after')),
    ("graph input", lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), (2, 3, 4, 4),
     "input comes from a graph input", ('graph-input', 'no-layer-after')),
    ("custom forward", lambda: nn.Sequential(ScaledConv(3, 3, 1), nn.BatchNorm2d(3)), (2, 3, 4, 4),
     "input comes from 'sub': no fold rule; forward: output feeds the model output", ('no-layer-before', 'no-layer-after')),
    ("parametrized", _weight_normed, (2, 3, 4, 4), "'0' has parametrizations", ('custom-forward', 'no-layer-after')),
    ("linear on sequence", LinearOnSequence, (2, 6, 4), "channels of 'fc' do not map one-to-one onto BN channels", ('channel-map', 'no-layer-after')),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refusal_keeps_bn_and_outputs(case):
    _, factory, shape, reason, codes = case
    torch.manual_seed(0)
    model = factory().eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            randomise_bn(m.double(), torch.Generator().manual_seed(1))
            m.float()
    x = torch.randn(*shape)
    result = bnrt.fold(model, (x,))
    skipped = [d for d in result.decisions if d.status == "skipped"]
    assert len(skipped) == 1 and skipped[0].reason is not None and reason in skipped[0].reason, result.decisions
    assert skipped[0].codes == codes
    assert [r.direction for r in skipped[0].refusals] == (["backward", "forward"] if len(codes) == 2 else [None])
    assert isinstance(result.model.get_submodule(skipped[0].bn), nn.modules.batchnorm._BatchNorm)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=0)


def test_unused_bn_is_reported_and_the_used_one_folded():
    result = bnrt.fold(Unused().eval(), (torch.randn(2, 3, 4, 4),))
    by_name = {d.bn: d for d in result.decisions}
    assert by_name["bn"].status == "folded"
    assert by_name["spare"].status == "skipped" and by_name["spare"].reason == "not called in forward"


def test_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train()
    result = bnrt.fold(model, (torch.randn(2, 3, 4, 4),))
    assert result.decisions[0].status == "skipped"
    assert result.decisions[0].reason == "in training mode: call model.eval() before folding"
    assert isinstance(result.model[1], nn.BatchNorm2d) and result.model.training


@pytest.mark.parametrize("field,value,message", [
    ("running_var", float("nan"), "BatchNorm '1': running_var holds NaN or Inf"),
    ("running_mean", float("inf"), "BatchNorm '1': running_mean holds NaN or Inf"),
    ("running_var", -1.0, "BatchNorm '1': running_var is negative in some channels"),
])
def test_unhealthy_statistics_are_errors(field, value, message):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()
    getattr(model[1], field)[1] = value
    with pytest.raises(HealthError) as err:
        bnrt.fold(model, (torch.randn(2, 3, 4, 4),))
    assert str(err.value) == message


def test_near_dead_channel_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()
    with torch.no_grad():
        model[1].running_var[2] = 0.0  # s = 1 / sqrt(1e-5) = 316
        model[1].weight[2] = 10.0     # s = 3162 > 1e3
    result = bnrt.fold(model, (torch.randn(2, 3, 4, 4),))
    assert result.decisions[0].status == "folded"
    assert result.decisions[0].warnings == ("1 near-dead channel(s) with |gamma/sigma| > 1000 (max 3.16e+03), e.g. channel 2",)


class ShapeDependent(nn.Module):
    """torch.fx cannot trace the shape test; torch.export (non-strict) specialises it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x):
        if x.shape[-1] > 6:
            x = x[..., :6, :6]
        y = self.bn_shared(self.shared(self.shared(self.bn(self.conv(x)))))
        return self.bn_fc(self.fc(torch.flatten(y, 1))) + F.linear(torch.flatten(y, 1), self.fc.weight).sum()


def test_torch_export_fallback_folds_and_refuses_like_fx():
    model = ShapeDependent().eval()
    gen = torch.Generator().manual_seed(0)
    for bn in (model.bn, model.bn_shared, model.bn_fc):
        randomise_bn(bn.double(), gen)
        bn.float()
    x = torch.randn(2, 3, 8, 8)
    result = bnrt.fold(model, (x,))
    assert result.tracer == "torch.export"
    assert [(d.bn, d.status, d.into, d.reason) for d in result.decisions] == [
        ("bn", "folded", ("conv",), None),
        ("bn_shared", "skipped", (), "'shared' is called 2 times; forward: parameters of 'fc' are read directly in forward"),
        ("bn_fc", "skipped", (), "parameters of 'fc' are read directly in forward; forward: output feeds 'add', not a layer it can fold into"),
    ]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d form: a BatchNorm subclass whose forward adds a child activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(x)


class ShapeDependentAct(nn.Module):
    """MobileViT's case: torch.fx fails on a shape test, torch.export shows each BN subclass call
    as one batch_norm (the activation is a child module of its own)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), BatchNormAct(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), BatchNormAct(4)

    def forward(self, x):
        if x.shape[-1] > 6:
            x = x[..., :6, :6]
        return self.bn2(self.conv2(self.bn(self.conv(x))))


def test_bn_subclasses_fold_with_identity_statistics_under_torch_export(tmp_path):
    model = ShapeDependentAct().eval()
    gen = torch.Generator().manual_seed(0)
    for bn in (model.bn, model.bn2):
        randomise_bn(bn.double(), gen)
        bn.float()
    x = torch.randn(2, 3, 8, 8)
    result = bnrt.fold(model, (x,))
    assert result.tracer == "torch.export"
    assert [(d.bn, d.status, d.into) for d in result.decisions] == [("bn", "folded", ("conv",)),
                                                                    ("bn2", "folded", ("conv2",))]
    folded = result.model  # the eager model: its BNs compute exact identities, their activations stay
    assert isinstance(folded.bn, BatchNormAct) and isinstance(folded.bn.act, nn.SiLU)
    assert float(folded.bn.running_mean.abs().max()) == 0.0 and float(folded.bn.weight.min()) == 1.0
    with torch.no_grad():
        for batch in (x, torch.randn(5, 3, 7, 9)):  # not specialised to the example's shape
            torch.testing.assert_close(folded(batch), model(batch), rtol=1e-5, atol=1e-5)
    proto = bnrt.export_onnx(folded, (x,), tmp_path / "m.onnx", names=(["x"], ["y"]))
    from bnrt.io.export import count_ops

    assert count_ops(proto, "BatchNormalization") == 0


def test_every_bn_gets_exactly_one_decision_on_the_example(example):
    loaded = bnrt.load_model(example, trust_code=True)
    result = bnrt.fold(loaded.model, (torch.randn(2, 1, 8, 8),))
    names = [n for n, m in loaded.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert [d.bn for d in result.decisions] == names
    assert [(d.rule, d.into) for d in result.decisions] == [
        ("conv->bn", ("stem.0",)), ("conv->bn", ("block.body.0.0",)), ("conv->bn", ("block.body.1.0",)),
        ("conv->bn", ("depthwise.0",)), ("conv->bn", ("pointwise.0",)), ("linear->bn", ("fc",)),
    ]
    assert result.bias_added == ["stem.0", "block.body.0.0", "block.body.1.0", "depthwise.0"]
