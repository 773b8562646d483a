"""Every fold placement beyond conv->BN and Linear->BN: property tests against unfolded outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import bnrt

from ..conftest import assert_folds_exactly, randomise_bn, trusted
from ..nets import FunctionalBN

CONVT = {1: (nn.ConvTranspose1d, nn.BatchNorm1d), 2: (nn.ConvTranspose2d, nn.BatchNorm2d),
         3: (nn.ConvTranspose3d, nn.BatchNorm3d)}
CONV = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}


@given(rank=st.sampled_from([1, 2, 3]), groups=st.integers(1, 3), cin_g=st.integers(1, 3), cout_g=st.integers(1, 3),
       kernel=st.integers(1, 3), stride=st.integers(1, 3), dilation=st.integers(1, 2), padding=st.integers(0, 1),
       out_pad=st.integers(0, 2), bias=st.booleans(), affine=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_convtranspose_bn_fold_is_exact(rank, groups, cin_g, cout_g, kernel, stride, dilation, padding, out_pad,
                                        bias, affine, seed):
    assume(out_pad < max(stride, dilation))
    conv_t, bn_t = CONVT[rank]
    gen = torch.Generator().manual_seed(seed)
    conv = conv_t(groups * cin_g, groups * cout_g, kernel, stride=stride, padding=padding, output_padding=out_pad,
                  groups=groups, bias=bias, dilation=dilation)
    bn = bn_t(groups * cout_g, affine=affine)
    model = nn.Sequential(conv, bn).double()
    randomise_bn(bn, gen)
    x = torch.randn(2, groups * cin_g, *([4 if rank < 3 else 3] * rank), generator=gen, dtype=torch.float64)
    result = assert_folds_exactly(model, x, 1)
    assert (result.decisions[0].rule, result.decisions[0].direction) == ("convtranspose->bn", "backward")


@given(fin=st.integers(1, 12), fout=st.integers(1, 12), bias=st.booleans(), affine=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_bn_linear_forward_fold_is_exact(fin, fout, bias, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm1d(fin, affine=affine)
    model = nn.Sequential(bn, nn.Linear(fin, fout, bias=bias)).double()
    randomise_bn(bn, gen)
    result = assert_folds_exactly(model, torch.randn(3, fin, generator=gen, dtype=torch.float64), 1)
    d = result.decisions[0]
    assert (d.rule, d.direction, d.into) == ("bn->linear", "forward", ("1",))


@given(c=st.integers(1, 4), h=st.integers(1, 3), w=st.integers(1, 3), fout=st.integers(1, 6),
       bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_bn2d_flatten_linear_forward_fold_is_exact(c, h, w, fout, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    model = nn.Sequential(nn.ReLU(), bn, nn.Flatten(), nn.Linear(c * h * w, fout, bias=bias)).double()
    randomise_bn(bn, gen)
    result = assert_folds_exactly(model, torch.randn(2, c, h, w, generator=gen, dtype=torch.float64), 1)
    d = result.decisions[0]
    assert (d.rule, d.through) == ("bn->linear", ("_2",))
    assert d.maps == ((None if h * w == 1 else tuple(i // (h * w) for i in range(c * h * w))),)


@given(rank=st.sampled_from([1, 2, 3]), groups=st.integers(1, 3), cin_g=st.integers(1, 3), cout_g=st.integers(1, 3),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), dilation=st.integers(1, 2), padding=st.integers(0, 1),
       padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]), bias=st.booleans(),
       affine=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_bn_conv_forward_fold_is_exact_without_zero_padding(rank, groups, cin_g, cout_g, kernel, stride, dilation,
                                                            padding, padding_mode, bias, affine, seed):
    conv_t, bn_t = CONV[rank]
    gen = torch.Generator().manual_seed(seed)
    bn = bn_t(groups * cin_g, affine=affine)
    conv = conv_t(groups * cin_g, groups * cout_g, kernel, stride=stride, padding=padding, dilation=dilation,
                  groups=groups, bias=bias, padding_mode=padding_mode)
    model = nn.Sequential(nn.ReLU(), bn, conv).double()
    randomise_bn(bn, gen)
    x = torch.randn(2, groups * cin_g, *([6] * rank), generator=gen, dtype=torch.float64)
    if padding and padding_mode == "zeros":
        model = model.eval()
        result = bnrt.fold(model, (x,))
        assert result.decisions[0].status == "skipped"
        assert "'2' pads with zeros, which a BN folded into it would not see" in result.decisions[0].reason
        return
    result = assert_folds_exactly(model, x, 1)
    assert (result.decisions[0].rule, result.decisions[0].direction) == ("bn->conv", "forward")


def test_bn_feeding_several_layers_folds_into_all():
    torch.manual_seed(0)

    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(5)
            self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 2, bias=False)

        def forward(self, x):
            y = self.bn(torch.relu(x))
            return torch.cat([self.a(y), self.b(y)], 1)

    model = Fork().double()
    randomise_bn(model.bn, torch.Generator().manual_seed(3))
    result = assert_folds_exactly(model, torch.randn(4, 5, dtype=torch.float64), 1)
    assert result.decisions[0].into == ("a", "b") and result.bias_added == ["b"]


def test_bn_feeding_a_layer_and_something_else_is_refused():
    class Leak(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.bn(torch.relu(x))
            return self.fc(y) + y

    result = bnrt.fold(Leak().eval(), (torch.randn(2, 4),))
    assert result.decisions[0].reason == (
        "input comes from 'relu': no fold rule; forward: output feeds 'add', not a layer it can fold into")


class TokenMLP(nn.Module):
    """Linear on (N, L, C); BatchNorm1d over C via flatten to (N*L, C) or transpose to (N, C, L)."""

    def __init__(self, mode: str, c_in: int = 6, c: int = 5):
        super().__init__()
        self.mode = mode
        self.fc = nn.Linear(c_in, c)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x):
        n, length, _ = x.shape
        y = self.fc(x)
        if self.mode == "flatten":
            return self.bn(y.reshape(n * length, -1)).view(n, length, -1)
        return self.bn(y.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("mode,through", [("flatten", ("reshape",)), ("transpose", ("transpose",))])
def test_linear_through_reshape_or_transpose_to_bn1d(mode, through):
    model = TokenMLP(mode).double()
    randomise_bn(model.bn, torch.Generator().manual_seed(0))
    result = assert_folds_exactly(model, torch.randn(3, 7, 6, dtype=torch.float64), 1)
    d = result.decisions[0]
    assert (d.rule, d.into, d.through, d.maps) == ("linear->bn", ("fc",), through, (None,))


@pytest.mark.parametrize("spatial,folds", [(1, True), (2, False)])
def test_conv_flatten_bn1d_only_when_the_channel_map_is_exact(spatial, folds):
    bn = nn.BatchNorm1d(4 * spatial * spatial)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), bn).double()
    randomise_bn(bn, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, spatial, spatial, dtype=torch.float64)
    if folds:
        assert assert_folds_exactly(model, x, 1).decisions[0].through == ("_1",)
        return
    result = bnrt.fold(model.eval(), (x,))
    assert result.decisions[0].reason.startswith(
        "channels of '0' do not map one-to-one onto BN channels through _1")


def test_one_layer_takes_a_forward_and_a_backward_fold_rounded_once():
    bn_in, bn_out = nn.BatchNorm1d(4), nn.BatchNorm1d(3)
    model = nn.Sequential(nn.ReLU(), bn_in, nn.Linear(4, 3), bn_out)
    gen = torch.Generator().manual_seed(0)
    randomise_bn(bn_in.double(), gen)
    randomise_bn(bn_out.double(), gen)
    model = model.float().eval()
    result = bnrt.fold(model, (torch.randn(2, 4),))
    assert [(d.rule, d.into) for d in result.decisions] == [("bn->linear", ("2",)), ("linear->bn", ("2",))]
    f64 = lambda t: t.detach().double()  # noqa: E731
    s_in = f64(bn_in.weight) / torch.sqrt(f64(bn_in.running_var) + bn_in.eps)
    t_in = f64(bn_in.bias) - f64(bn_in.running_mean) * s_in
    s_out = f64(bn_out.weight) / torch.sqrt(f64(bn_out.running_var) + bn_out.eps)
    t_out = f64(bn_out.bias) - f64(bn_out.running_mean) * s_out
    w, b = f64(model[2].weight), f64(model[2].bias)
    exact_w = s_out[:, None] * (w * s_in[None, :])
    exact_b = s_out * (b + w @ t_in) + t_out
    assert torch.equal(result.model[2].weight, exact_w.float())
    assert torch.equal(result.model[2].bias, exact_b.float())


def test_sync_batchnorm_in_eval_folds_like_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)).double()
    randomise_bn(model[1], torch.Generator().manual_seed(0))
    result = assert_folds_exactly(model, torch.randn(2, 3, 6, 6, dtype=torch.float64), 1)
    assert result.decisions[0].rule == "conv->bn"


def test_functional_batch_norm_is_folded_out_of_the_graph():
    torch.manual_seed(0)
    model = FunctionalBN().eval()
    x = torch.randn(2, 3, 6, 6)
    result = bnrt.fold(model, (x,))
    (d,) = result.decisions
    assert (d.bn, d.status, d.rule, d.into) == ("batch_norm (F.batch_norm)", "folded", "conv->bn", ("conv",))
    assert d.functional == {"node": "batch_norm", "eps": 1e-3, "mean": "mean", "var": "var",
                            "weight": "gamma", "bias": "beta"}
    assert isinstance(result.model, torch.fx.GraphModule)
    assert not any(n.op == "call_function" and "batch_norm" in str(n.target) for n in result.model.graph.nodes)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(result.model(x), ref, rtol=1e-6, atol=1e-6)
        # the user's structure keeps the call, with statistics that make it an exact identity
        assert torch.equal(result.structured(x), result.model(x))
    assert result.structure()["functional_identity"] == [
        {"eps": 1e-3, "mean": "mean", "var": "var", "weight": "gamma", "bias": "beta"}]


@pytest.mark.parametrize("kwargs,reason", [
    ({"training": True}, "called with training=True (or a traced flag): uses batch statistics"),
    ({"leak": "proxy"}, "running_mean 'mean' is also read elsewhere in forward"),
    ({"leak": "constant"}, "forward computes tensor '_tensor_constant0' at trace time, which may read the statistics: "
                     "resetting them could change it"),
])
def test_functional_batch_norm_refusals(kwargs, reason):
    model = FunctionalBN(**kwargs).eval()
    x = torch.randn(2, 3, 6, 6)
    result = bnrt.fold(model, (x,))
    assert result.decisions[0].status == "skipped" and result.decisions[0].reason == reason
    with torch.no_grad():
        assert torch.equal(result.model(x), model(x))


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 1e-1, 3e-5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_statistics_are_exact(eps, dtype):
    from bnrt.folding.structure import set_identity_statistics

    holder = nn.Module()
    holder.register_buffer("m", torch.randn(3, dtype=dtype))
    holder.register_buffer("v", torch.rand(3, dtype=dtype))
    set_identity_statistics(holder, {"mean": "m", "var": "v", "weight": None, "bias": None, "eps": eps})
    x = torch.randn(1000, 3, dtype=dtype) * 1e3
    assert torch.equal(nn.functional.batch_norm(x, holder.m, holder.v, None, None, False, 0.0, eps), x)


def test_folded_weights_beyond_fp16_range_are_reported():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(100.0)
        model[1].weight.fill_(1000.0)  # s = 1000 / sqrt(1 + 1e-5): weights 1e5 > 65504
    result = bnrt.fold(model, (torch.randn(2, 2),))
    assert list(result.fp16_overflow) == ["0"] and result.fp16_overflow["0"] == pytest.approx(1e5, rel=1e-4)


def test_sync_batchnorm_left_in_the_model_becomes_plain_batchnorm():
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.ReLU(), nn.SyncBatchNorm(3)).eval()
    randomise_bn(model[2].double(), torch.Generator().manual_seed(0))
    model[2].float()
    x = torch.randn(2, 2, 5)
    result = bnrt.fold(model, (x,))
    assert result.decisions[0].status == "skipped"
    assert type(result.model[2]) is nn.BatchNorm1d and type(model[2]) is nn.SyncBatchNorm
    with torch.no_grad():
        assert torch.equal(result.model(x), model(x))


def test_convert_sync_batchnorm_by_input_rank():
    from bnrt.folding.torchfold import convert_sync_batchnorm

    model = nn.Sequential(nn.SyncBatchNorm(3), nn.Unflatten(2, (2, 2)), nn.SyncBatchNorm(3)).eval()
    x = torch.randn(2, 3, 4)
    plain = convert_sync_batchnorm(model, (x,))
    assert [type(m) for m in plain] == [nn.BatchNorm1d, nn.Unflatten, nn.BatchNorm2d]
    assert [type(m) for m in model] == [nn.SyncBatchNorm, nn.Unflatten, nn.SyncBatchNorm]
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


class MetadataReads(nn.Module):
    """Conv output read for its shape, size, dtype and as reshape_as's template, then a BN."""

    def __init__(self, value_use: bool = False):
        super().__init__()
        self.conv, self.bn, self.value_use = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), value_use

    def forward(self, x):
        h = self.conv(x)
        n, c = h.shape[0], h.size(1)
        y = self.bn(h).reshape_as(h) + h.new_zeros(n, c, 1, 1).to(h.dtype)
        torch._assert(h.dim() == 4, "4-D")
        return y + h if self.value_use else y


@pytest.mark.parametrize("value_use", [False, True])
def test_metadata_reads_are_not_uses_of_the_values(value_use):
    model = MetadataReads(value_use).double()
    randomise_bn(model.bn, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    if not value_use:
        assert assert_folds_exactly(model, x, 1).decisions[0].rule == "conv->bn"
        return
    d = bnrt.fold(model.eval(), (x,)).decisions[0]
    assert d.codes[0] == "shared-output" and d.refusals[0].subject == "conv" and "'add_1'" in d.reason


class DropoutBetween(nn.Module):
    def __init__(self, functional_training: bool | None):
        super().__init__()
        self.bn, self.drop, self.fc, self.functional_training = nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3), \
            functional_training

    def forward(self, x):
        y = self.bn(torch.relu(x))
        if self.functional_training is None:
            return self.fc(self.drop(y))
        return self.fc(F.dropout(y, 0.5, self.functional_training))


@pytest.mark.parametrize("functional_training,folds", [(None, True), (False, True), (True, False)])
def test_dropout_in_eval_passes_through(functional_training, folds):
    model = DropoutBetween(functional_training).double()
    randomise_bn(model.bn, torch.Generator().manual_seed(0))
    x = torch.randn(4, 6, dtype=torch.float64)
    if folds:
        d = assert_folds_exactly(model, x, 1).decisions[0]
        assert (d.rule, d.through) == ("bn->linear", ("drop",) if functional_training is None else ("dropout",))
    else:
        assert bnrt.fold(model.eval(), (x,)).decisions[0].codes == ("no-layer-before", "no-layer-after")


def _random_frozen(c: int) -> nn.Module:
    """torchvision's FrozenBatchNorm2d form with random buffers."""
    from models.zoo import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(c)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(frozen, name).copy_(torch.randn(c))
        frozen.running_var.copy_(torch.rand(c) + 0.5)
    return frozen


def test_frozen_batchnorm_is_a_batchnorm_and_round_trips(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _random_frozen(4)).double()
    result = assert_folds_exactly(model, torch.randn(2, 3, 6, 6, dtype=torch.float64), 1)
    assert (result.decisions[0].bn, result.decisions[0].rule) == ("1", "conv->bn")
    assert isinstance(result.model[1], nn.Identity)


class DilatedRep(nn.Module):
    """A dilated 3x3 branch beside (optionally) a 1x1 branch and an identity BN: the dilated kernel
    does not line up with the others."""

    def __init__(self, one: bool = True):
        super().__init__()
        self.k = nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(4))
        self.one = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)) if one else None
        self.identity = nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(x)
        return self.k(x) + (self.one(x) if self.one is not None else 0) + self.identity(x)


def _dilated_rep(one: bool):
    model = DilatedRep(one).double()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        randomise_bn(bn, torch.Generator().manual_seed(0))
    return model.eval(), torch.randn(2, 4, 6, 6, dtype=torch.float64)


def test_rep_block_with_a_branch_that_does_not_line_up_merges_the_others_and_keeps_it(tmp_path):
    import onnx
    import onnxruntime as ort

    from bnrt.folding.onnxfold import fold_onnx
    from bnrt.io.export import count_ops

    model, x = _dilated_rep(one=True)
    result = bnrt.fold(model, (x,))
    assert [(d.bn, d.direction) for d in result.decisions] == [("k.1", "backward"), ("one.1", "backward"),
                                                               ("identity", "merge")]
    assert [m.to_json() for m in result.merges] == [{
        "into": "one.0", "convs": [], "bns": ["identity"], "inputs": 0, "scaled": False, "constant": False,
        "kept": [{"conv": "k.0", "reason": "'k.0' is dilated"}]}]
    with torch.no_grad():
        for folded in (result.model, result.structured):
            assert float((folded(x) - model(x)).abs().max()) <= 1e-12
    torch.onnx.export(model.float(), (x.float(),), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"])
    folded = fold_onnx(onnx.load(str(tmp_path / "m.onnx")))
    assert [len(m.kept) for m in folded.merges] == [1] and count_ops(folded.model, "BatchNormalization") == 0
    assert [count_ops(folded.model, op) for op in ("Conv", "Add")] == [2, 1]
    run = ort.InferenceSession(folded.model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert abs(run.run(None, {"x": x.float().numpy()})[0] - model(x.float()).numpy()).max() <= 1e-5


def test_rep_block_where_nothing_lines_up_keeps_its_identity_bn_with_a_coded_reason():
    model, x = _dilated_rep(one=False)
    result = bnrt.fold(model, (x,))
    assert [d.status for d in result.decisions] == ["folded", "skipped"]
    with torch.no_grad():
        assert float((result.model(x) - model(x)).abs().max()) <= 1e-12
    d = result.decisions[-1]
    assert (d.bn, d.codes) == ("identity", ("no-layer-before", "no-layer-after", "branch-mismatch"))
    assert d.refusals[2].direction == "merge" and d.refusals[2].subject == "k.0" and "is dilated" in d.reason
    assert result.merges == []


def test_merged_rep_blocks_round_trip_through_the_folded_checkpoint(tmp_path):
    from models.zoo import RepNet, build

    from ..conftest import save_checkpoint

    model = build("repnet", batches=1)
    save_checkpoint(tmp_path / "rep.pt", model, "models.zoo:RepNet", (1, 3, 32, 32))
    outcome = bnrt.fold_file(trusted(tmp_path / "rep.pt"), tmp_path / "out", exporter="torchscript")
    assert outcome.passed and outcome.onnx_batchnorm_nodes == 0
    assert outcome.report["summary"]["merged_blocks"] == 5 and len(outcome.report["merges"]) == 5
    import onnx
    from bnrt.io.export import count_ops

    exported = onnx.load(str(tmp_path / "out" / "rep.onnx"))
    assert (count_ops(exported, "Conv"), count_ops(exported, "Add")) == (5, 0)
    from ..conftest import run_cli

    proc = run_cli("fold", str(tmp_path / "rep.pt"), "-o", str(tmp_path / "cli"), "--no-check", "--exporter",
                   "torchscript")
    assert "merged into 'blocks.1.kxk.0.0': 'blocks.1.scale.0', identity BN 'blocks.1.identity'" in proc.stdout
    reloaded = bnrt.load_folded(RepNet(), tmp_path / "out" / "rep.folded.pt")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert float((reloaded(x) - model(x)).abs().max()) <= 1e-5 * float(model(x).abs().max())


def test_a_frozen_bn_exported_as_mul_and_add_after_a_conv_folds_in_onnx(tmp_path):
    """torchvision's FrozenBatchNorm2d exports (TorchScript) as per-channel Mul and Add after the conv:
    they merge into it, a scaled and shifted single conv."""
    import onnx
    import onnxruntime as ort

    from bnrt.io.export import count_ops
    from bnrt.folding.onnxfold import fold_onnx
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _random_frozen(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU()).eval()
    x = torch.randn(2, 3, 6, 6)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"], output_names=["y"])
    original = onnx.load(str(tmp_path / "m.onnx"))
    assert (count_ops(original, "Mul"), count_ops(original, "Add")) == (1, 1)  # the exporter leaves them
    folded = fold_onnx(original)
    assert [m.to_json() for m in folded.merges] == [
        {"into": folded.merges[0].target.name, "convs": [], "bns": [], "inputs": 0, "scaled": True, "constant": True}]
    assert [count_ops(folded.model, op) for op in ("Conv", "Mul", "Add", "Sub")] == [2, 0, 0, 0]
    run = ort.InferenceSession(folded.model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert abs(run.run(None, {"x": x.numpy()})[0] - model(x).numpy()).max() <= 1e-5


class ScaledLinear(nn.Module):
    """A per-channel scale and shift after a Linear on (N, C), and a scale after a Linear on
    (N, L, C), whose channels are the last axis."""

    def __init__(self):
        super().__init__()
        self.fc, self.seq = nn.Linear(5, 3), nn.Linear(5, 3)
        self.gamma, self.beta = nn.Parameter(torch.rand(3) + 0.5), nn.Parameter(torch.randn(3))

    def forward(self, x, t):
        return torch.relu(self.fc(x) * self.gamma + self.beta), self.seq(t) * 0.5


def test_a_scale_and_shift_after_a_linear_fold_into_it_in_torch_and_onnx(tmp_path):
    import onnx
    import onnxruntime as ort

    from bnrt.io.export import count_ops
    from bnrt.folding.onnxfold import fold_onnx

    model = ScaledLinear().eval()
    x, t = torch.randn(2, 5), torch.randn(2, 4, 5)
    result = bnrt.fold(model, (x, t))
    assert [m.to_json() for m in result.merges] == [
        {"into": "fc", "convs": [], "bns": [], "inputs": 0, "scaled": True, "constant": True},
        {"into": "seq", "convs": [], "bns": [], "inputs": 0, "scaled": True, "constant": False}]
    with torch.no_grad():
        for got, want in zip(result.model(x, t), model(x, t)):
            assert float((got - want).abs().max()) <= 1e-6
    torch.onnx.export(model, (x, t), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x", "t"],
                      output_names=["y", "z"])
    folded = fold_onnx(onnx.load(str(tmp_path / "m.onnx")))
    assert [m.to_json()["into"] for m in folded.merges] == ["/fc/Gemm", "/seq/MatMul"]
    assert [count_ops(folded.model, op) for op in ("Gemm", "MatMul", "Mul", "Add")] == [1, 1, 0, 1]  # seq's bias Add
    run = ort.InferenceSession(folded.model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for got, want in zip(run.run(None, {"x": x.numpy(), "t": t.numpy()}), model(x, t)):
            assert abs(got - want.numpy()).max() <= 1e-6


class SumOfItself(nn.Module):
    """conv -> BN, added to itself (found by the fold fuzzer): not a rep block of two branches."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y + y


def test_a_branch_added_to_itself_is_not_merged():
    model = SumOfItself().double()
    randomise_bn(model.bn, torch.Generator().manual_seed(0))
    result = assert_folds_exactly(model, torch.randn(2, 3, 5, 5, dtype=torch.float64), 1)
    assert result.merges == []


def _randomised(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with random statistics and affines in every BatchNorm2d (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomise_bn(m, gen)
    return model.eval()


def _rep_vgg_dw(bn: bool = True) -> nn.Module:
    from ..nets import RepVggDw

    return _randomised(RepVggDw(bn=bn))


def test_a_block_with_the_input_itself_merges_in_the_runnable_graph_and_its_bn_after_folds(tmp_path):
    import onnx

    from bnrt.io.export import count_ops

    from ..conftest import save_checkpoint

    model = _rep_vgg_dw()
    x = torch.randn(2, 4, 6, 6)
    result = bnrt.fold(model, (x,))
    assert [m.to_json() for m in result.merges] == [
        {"into": "conv.0", "convs": ["conv1"], "bns": [], "inputs": 1, "scaled": False, "constant": False}]
    assert [(d.bn, d.status, d.direction, d.into) for d in result.decisions] == [
        ("conv.1", "folded", "backward", ("conv.0",)), ("bn", "folded", "backward", ("conv.0",))]
    assert [n.op for n in result.model.graph.nodes] == ["placeholder", "call_function", "call_module", "call_module",
                                                        "output"]  # relu, the merged conv, bn (now Identity)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    # the user's forward still adds the input: its copy merges the convs only and keeps the BN after
    assert result.checkpoint_keeps == ["bn"] and isinstance(result.structured.bn, nn.BatchNorm2d)
    assert [d.status for d in result.structured_decisions] == ["folded", "skipped"]
    with torch.no_grad():
        for folded_model in (result.model, result.structured):
            assert float((folded_model(x) - model(x)).abs().max()) <= 1e-5
    save_checkpoint(tmp_path / "rep.pt", model, "tests.nets:RepVggDw", (1, 4, 6, 6))
    outcome = bnrt.fold_file(trusted(tmp_path / "rep.pt"), tmp_path / "out")
    assert outcome.passed and outcome.report["summary"]["checkpoint_keeps"] == ["bn"]
    exported = onnx.load(str(tmp_path / "out" / "rep.onnx"))
    assert [count_ops(exported, op) for op in ("Conv", "Add", "BatchNormalization")] == [1, 0, 0]
    from ..nets import RepVggDw

    reloaded = bnrt.load_folded(RepVggDw(), tmp_path / "out" / "rep.folded.pt")
    assert isinstance(reloaded.bn, nn.BatchNorm2d) and isinstance(reloaded.conv[1], nn.Identity)
    with torch.no_grad():
        assert float((reloaded(x) - model(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize("bn", [True, False])
def test_onnx_graphs_merge_the_input_itself_and_fold_the_bn_after(tmp_path, bn):
    import onnx
    import onnxruntime as ort

    from bnrt.io.export import count_ops
    from bnrt.folding.onnxfold import fold_onnx

    model = _rep_vgg_dw(bn)
    x = torch.randn(2, 4, 6, 6)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"], output_names=["y"],
                      do_constant_folding=False)  # keeps conv -> BN for bnrt, not the exporter, to fold
    original = onnx.load(str(tmp_path / "m.onnx"))
    assert count_ops(original, "BatchNormalization") == 1 + bn
    folded = fold_onnx(original)
    assert [m.to_json()["inputs"] for m in folded.merges] == [1]
    assert [d.direction for d in folded.decisions] == ["backward"] * (1 + bn)
    assert [count_ops(folded.model, op) for op in ("Conv", "Add", "BatchNormalization")] == [1, 0, 0]
    run = ort.InferenceSession(folded.model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert abs(run.run(None, {"x": x.numpy()})[0] - model(x).numpy()).max() <= 1e-5


class RepMixer(nn.Module):
    """FastViT's RepMixer, ``x + γ·(mixer(x) − norm(x))``: mixer a 3x3 depthwise conv+BN, a 1x1
    depthwise conv+BN and an identity BN summed; norm an identity BN (``0 + BN(x)``, as timm's
    MobileOneBlock writes it); γ a per-channel LayerScale; then a 1x1 conv scaled by another γ."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.identity, self.norm = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.mlp, self.gamma2 = nn.Conv2d(c, c, 1), nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        x = torch.relu(x)
        mixer = self.kxk(x) + self.one(x) + self.identity(x)
        x = x + self.gamma * (mixer - (0 + self.norm(x)))
        return x + self.mlp(torch.relu(x)) * self.gamma2.view(1, -1, 1, 1)  # timm's LayerScale2d


def test_a_rep_mixer_merges_into_one_conv_and_a_layer_scale_folds_into_the_conv_before(tmp_path):
    import onnx
    import onnxruntime as ort

    from bnrt.io.export import count_ops
    from bnrt.folding.onnxfold import fold_onnx

    model = _randomised(RepMixer())
    x = torch.randn(2, 4, 6, 6)
    result = bnrt.fold(model, (x,))
    assert [m.to_json() for m in result.merges] == [
        {"into": "kxk.0", "convs": ["one.0"], "bns": ["identity", "norm"], "inputs": 1, "scaled": True,
         "constant": False},
        {"into": "mlp", "convs": [], "bns": [], "inputs": 0, "scaled": True, "constant": False}]
    assert all(d.status == "folded" for d in result.decisions)
    ops = [(n.op, str(n.target)) for n in result.model.graph.nodes if n.op in ("call_function", "call_method")]
    assert [t for _, t in ops if "relu" not in t] == ["<built-in function add>"]  # only the residual of the MLP
    assert result.checkpoint_keeps == ["norm"]  # the user's forward still subtracts norm(x)
    with torch.no_grad():
        for folded_model in (result.model, result.structured):
            assert float((folded_model(x) - model(x)).abs().max()) <= 1e-5
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"], output_names=["y"],
                      do_constant_folding=False)
    folded = fold_onnx(onnx.load(str(tmp_path / "m.onnx")))
    assert [m.to_json()["scaled"] for m in folded.merges] == [True, True]
    ops = ("Conv", "Add", "Sub", "Mul", "BatchNormalization")
    assert [count_ops(folded.model, op) for op in ops] == [2, 1, 0, 0, 0]
    run = ort.InferenceSession(folded.model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert abs(run.run(None, {"x": x.numpy()})[0] - model(x).numpy()).max() <= 1e-5


class _RandomRep(nn.Module):
    """``kxk`` k×k conv+BN branches, an optional 1×1 conv+BN branch, an optional identity BN and
    optionally the input itself, on one input, summed, then optionally a BN (``after``); ``mismatch``
    breaks one alignment of the last k×k branch."""

    def __init__(self, groups, cin_g, k, stride, kxk, one, identity, mismatch, raw=False, after=False, sub=False,
                 gamma=False):
        super().__init__()
        c = groups * cin_g

        def branch(kernel, pad, dilation=1, s=stride):
            return nn.Sequential(nn.Conv2d(c, c, kernel, s, pad, dilation, groups, bias=False), nn.BatchNorm2d(c))

        self.kxk = nn.ModuleList(branch(k, k // 2) for _ in range(kxk))
        if mismatch == "dilation":
            self.kxk[-1] = branch(k, 2 * (k // 2), dilation=2)
        self.one = branch(1, 0) if one else None
        self.identity = nn.BatchNorm2d(c) if identity and stride == 1 else None
        self.raw = raw and stride == 1
        self.after = nn.BatchNorm2d(c) if after else None
        self.sub = sub and self.identity is not None  # the identity BN subtracted (FastViT's RepMixer)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5) if gamma else None  # a LayerScale of the block

    def forward(self, x):
        x = torch.relu(x)
        out = self.kxk[0](x)
        for b in self.kxk[1:]:
            out = out + b(x)
        if self.one is not None:
            out = out + self.one(x)
        if self.identity is not None:
            out = out - self.identity(x) if self.sub else out + self.identity(x)
        if self.gamma is not None:
            out = self.gamma * out
        if self.raw:
            out = out + x
        return out if self.after is None else self.after(out)


@given(groups=st.integers(1, 3), cin_g=st.integers(1, 3), k=st.sampled_from([3, 5]), stride=st.integers(1, 2),
       kxk=st.integers(1, 3), one=st.booleans(), identity=st.booleans(), raw=st.booleans(), after=st.booleans(),
       sub=st.booleans(), gamma=st.booleans(), mismatch=st.sampled_from([None, None, "dilation"]),
       seed=st.integers(0, 2**31 - 1))
def test_parallel_branches_merge_exactly_or_not_at_all(groups, cin_g, k, stride, kxk, one, identity, raw, after, sub,
                                                       gamma, mismatch, seed):
    model = _RandomRep(groups, cin_g, k, stride, kxk, one, identity, mismatch, raw, after, sub, gamma).double().eval()
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        randomise_bn(bn, gen)
    x = torch.randn(2, groups * cin_g, 7, 7, generator=gen, dtype=torch.float64)
    result = bnrt.fold(model, (x,))
    with torch.no_grad():
        scale = max(1.0, float(model(x).abs().max()))
        for folded_model in (result.model, result.structured):
            assert float((folded_model(x) - model(x)).abs().max()) <= 1e-10 * scale
    branches = kxk + one + (model.identity is not None) + model.raw
    if branches == 1 and not gamma:
        assert result.merges == [] and all(d.status == "folded" for d in result.decisions)
    elif mismatch is None:
        assert len(result.merges) == 1
        merge = result.merges[0]
        assert len(merge.convs) + 1 == kxk + one and len(merge.bns) == (model.identity is not None)
        assert merge.inputs == model.raw and merge.to_json()["scaled"] == (model.sub or gamma)
        assert all(d.status == "folded" for d in result.decisions)  # the BN after the block too
        # the user's forward still computes the input itself, the difference, the scale: its copy
        # keeps the subtracted identity BN and the BN after the block
        rewrites = model.raw or model.sub or gamma
        assert result.checkpoint_keeps == ["identity"] * model.sub + ["after"] * (rewrites and after)
    elif branches == 1:  # a scaled dilated conv: the scale folds into it, nothing needs aligning
        assert [m.target.name for m in result.merges] == ["kxk.0.0"] and not result.merges[0].convs
    else:  # the dilated branch stays beside the merged conv; the others merge when two or more are left
        dilated = "kxk.%d.0" % (kxk - 1)
        assert all(m.target.name != dilated and dilated not in [c.name for c in m.convs] for m in result.merges)
        left = kxk - 1 + one + (model.identity is not None) + model.raw
        merges = not gamma and kxk - 1 + one >= 1 and left >= 2
        assert [[(c.name, why) for c, why in m.kept] for m in result.merges] == (
            [[(dilated, f"'{dilated}' is dilated")]] if merges else [])
        if model.identity is not None:
            kept = next(d for d in result.decisions if d.bn == "identity")
            assert kept.folded == merges and (merges or "branch-mismatch" in kept.codes)
        if after:
            assert next(d for d in result.decisions if d.bn == "after").status == "skipped"


class EvalCache(nn.Module):
    """Caches a tensor derived from a parameter on its first eval forward, as timm's EfficientViT
    attention does with its biases: under a tracer the cache would hold a proxy."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.table = nn.Parameter(torch.randn(4))
        self.cache = {}

    def forward(self, x):
        if not self.training:
            if str(x.device) not in self.cache:
                self.cache[str(x.device)] = self.table * 2
            return self.bn(self.conv(x)) + self.cache[str(x.device)].view(1, -1, 1, 1)
        return self.bn(self.conv(x)) + (self.table * 2).view(1, -1, 1, 1)


def test_capture_leaves_the_models_own_state_as_it_was():
    model = EvalCache().double().eval()
    randomise_bn(model.bn, torch.Generator().manual_seed(0))
    model.tag = "kept"
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    result = bnrt.fold(model, (x,))
    assert model.cache == {} and model.tag == "kept"  # no proxy left behind, nothing removed
    assert [d.status for d in result.decisions] == ["folded"]
    again = copy.deepcopy(model)  # a proxy in the cache made deep copies of the model break
    with torch.no_grad():
        assert float((result.model(x) - again(x)).abs().max()) <= 1e-12
    assert bnrt.fold(model, (x,)).decisions[0].status == "folded"  # a second capture works too


class GhostRep(nn.Module):
    """RepGhost's module: a depthwise conv+BN branch and an identity BN reached through an
    ``nn.Identity`` ("fusion conv"), both on the primary conv's output, summed."""

    def __init__(self, c=6):
        super().__init__()
        self.primary = nn.Sequential(nn.Conv2d(3, c, 1, bias=False), nn.BatchNorm2d(c), nn.Identity())
        self.cheap = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.fusion_conv, self.fusion_bn = nn.ModuleList([nn.Identity()]), nn.ModuleList([nn.BatchNorm2d(c)])

    def forward(self, x):
        x1 = self.primary(x)
        x2 = self.cheap(x1)
        for conv, bn in zip(self.fusion_conv, self.fusion_bn):
            x2 = x2 + bn(conv(x1))
        return torch.relu(x2)


def test_branches_on_one_input_behind_an_identity_merge():
    model = GhostRep().double().eval()
    gen = torch.Generator().manual_seed(0)
    for bn in (model.primary[1], model.cheap[1], model.fusion_bn[0]):
        randomise_bn(bn, gen)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, generator=gen)
    result = bnrt.fold(model, (x,))
    assert [(d.bn, d.status, d.direction) for d in result.decisions] == [
        ("primary.1", "folded", "backward"), ("cheap.1", "folded", "backward"), ("fusion_bn.0", "folded", "merge")]
    assert [(m.target.name, [b.name for b in m.bns]) for m in result.merges] == [("cheap.0", ["fusion_bn.0"])]
    with torch.no_grad():
        assert float((result.model(x) - model(x)).abs().max()) <= 1e-12


class _Conv3DSimple(torch.nn.Conv3d):
    """As torchvision's video nets subclass Conv3d: another module, the same forward."""


def test_a_layer_subclass_keeping_its_forward_is_a_layer_not_code():
    model = torch.nn.Sequential(_Conv3DSimple(3, 4, 3, padding=1), torch.nn.BatchNorm3d(4)).eval()
    randomise_bn(model[1], torch.Generator().manual_seed(2))
    x = torch.randn(2, 3, 4, 6, 6)
    result = bnrt.fold(model, (x,))
    assert result.tracer == "torch.fx" and result.decisions[0].into == ("0",)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
