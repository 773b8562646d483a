"""--unshare: a layer called at several places, each call with a BN of its own (shared detection
heads), gets a copy per further call in the runnable graph and the ONNX file, and each BN folds into
its own copy; the folded checkpoint keeps the shared layer and those BNs. Exact in float64."""

from __future__ import annotations

import json

import onnx
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bnrt
from bnrt.io.export import count_ops

from ..conftest import assert_one_line_error, randomise_bn, run_cli, save_checkpoint


class _Shared(nn.Module):
    """``conv`` applied to ``levels`` inputs (the input pooled), each call followed by its own BN
    (``after``) or preceded by one (``before``: the BN folds forward into the call's copy)."""

    def __init__(self, levels, cin, cout, kernel, groups, stride, before, bias):
        super().__init__()
        self.before = before
        pad = 0 if before else kernel // 2  # a forward fold needs a reader that pads no zero
        self.conv = nn.Conv2d(cin * groups, cout * groups, kernel, stride, pad, groups=groups, bias=bias)
        self.bns = nn.ModuleList(nn.BatchNorm2d(cin * groups if before else cout * groups) for _ in range(levels))

    def forward(self, x):
        outs = []
        for i, bn in enumerate(self.bns):
            level = nn.functional.avg_pool2d(x, 2 ** i) if i else x
            outs.append((self.conv(bn(torch.relu(level))) if self.before else bn(self.conv(level))).flatten(1))
        return torch.cat(outs, 1)


@given(levels=st.integers(1, 4), cin=st.integers(1, 3), cout=st.integers(1, 3), kernel=st.sampled_from([1, 3]),
       groups=st.integers(1, 2), stride=st.integers(1, 2), before=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_each_call_of_a_shared_layer_folds_its_own_bn_into_its_own_copy(levels, cin, cout, kernel, groups, stride,
                                                                        before, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    model = _Shared(levels, cin, cout, kernel, groups, stride, before, bias).double().eval()
    for bn in model.bns:
        randomise_bn(bn, gen)
    x = torch.randn(2, cin * groups, 24, 24, generator=gen, dtype=torch.float64)
    kept = bnrt.fold(model, (x,))
    result = bnrt.fold(model, (x,), unshare=True)
    shared = levels > 1
    assert [d.folded for d in kept.decisions] == [not shared] * levels
    assert [d.folded for d in result.decisions] == [True] * levels
    per_copy = sum(p.numel() for p in model.conv.parameters())
    assert result.unshared == {f"conv_call{i}": "conv" for i in range(2, levels + 1)}
    assert result.unshared_parameters == per_copy * (levels - 1)
    assert sorted(t.layer for d in result.decisions for t in d.targets) == sorted(["conv", *result.unshared])
    assert result.checkpoint_keeps == ([f"bns.{i}" for i in range(levels)] if shared else [])
    with torch.no_grad():
        ref = model(x)
        scale = max(1.0, float(ref.abs().max()))
        for folded in (result.model, result.structured):
            assert float((folded(x) - ref).abs().max()) <= 1e-10 * scale
        assert [n for n, m in result.model.named_modules() if isinstance(m, nn.BatchNorm2d)] == []
    assert list(dict(model.named_modules())) == list(dict(result.structured.named_modules()))  # the user's structure


def test_a_shared_layer_with_no_bn_to_fold_is_not_copied():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()).eval()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return self.body(self.body(x))

    result = bnrt.fold(Twice(), (torch.randn(1, 2, 4, 4),), unshare=True)
    assert (result.unshared, result.unshared_parameters, type(result.model).__name__) == ({}, 0, "Twice")


def test_bnrt_fold_unshare_folds_a_shared_head_and_says_what_it_costs(tmp_path):
    from models.zoo import SharedHead

    model = SharedHead().eval()
    gen = torch.Generator().manual_seed(3)
    for bn in model.bns:
        randomise_bn(bn, gen)
    save_checkpoint(tmp_path / "head.pt", model, "models.zoo:SharedHead", (1, 3, 16, 16))
    plain = run_cli("fold", str(tmp_path / "head.pt"), "-o", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    assert "BatchNormalization nodes in ONNX: 3" in plain.stdout and "'conv' is called 3 times" in plain.stdout
    proc = run_cli("fold", str(tmp_path / "head.pt"), "-o", str(tmp_path / "out"), "--unshare")
    assert proc.returncode == 0, proc.stderr
    per_copy = 8 * 8 * 9
    before = sum(p.numel() for p in model.parameters())
    assert "BatchNormalization nodes in ONNX: 0" in proc.stdout and "check passed" in proc.stdout
    assert (f"unshared (a copy per further call, in the ONNX file): 'conv' x3; +{2 * per_copy:,} parameters "
            f"(+{100 * 2 * per_copy / before:.2f} % of {before:,})") in proc.stdout
    report = json.loads((tmp_path / "out" / "head.report.json").read_text())
    assert report["summary"]["unshared"] == {"copies": {"conv": ["conv_call2", "conv_call3"]},
                                             "parameters_added": 2 * per_copy, "parameters_before": before}
    assert report["summary"]["checkpoint_keeps"] == ["bns.0", "bns.1", "bns.2"]
    assert report["check"]["certificate"]["passed"]
    folded = onnx.load(str(tmp_path / "out" / "head.onnx"))
    assert count_ops(folded, "BatchNormalization") == 0 and count_ops(folded, "Conv") == 3 + 1 + 3


def test_unshare_on_an_onnx_file_is_one_line(tmp_path):
    torch.onnx.export(nn.Sequential(nn.Conv2d(2, 2, 1)).eval(), (torch.randn(1, 2, 4, 4),), str(tmp_path / "m.onnx"),
                      dynamo=False)
    proc = run_cli("fold", str(tmp_path / "m.onnx"), "--unshare")
    assert_one_line_error(proc, "m.onnx", "--unshare applies to torch checkpoints only")
    assert not (tmp_path / "m.folded.onnx").exists()


def test_unshared_model_is_the_graph_and_the_input_model_is_untouched():
    model = _Shared(2, 2, 2, 3, 1, 1, False, False).eval()
    names = list(dict(model.named_modules()))
    result = bnrt.fold(model, (torch.randn(1, 2, 8, 8),), unshare=True)
    assert isinstance(result.model, torch.fx.GraphModule) and list(dict(model.named_modules())) == names


class _SharedBlock(nn.Module):
    """A whole conv -> BN -> ReLU block called twice (the BN's reuse hides the conv's until the BN is
    copied), with a tensor made in forward (torch.fx keeps it as ``_tensor_constant0``)."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU())

    def forward(self, x):
        return self.seq(self.seq(x)) * torch.tensor(2.0)


def test_a_shared_conv_bn_block_unshares_both_in_rounds_and_keeps_tensors_made_in_forward():
    model = _SharedBlock().double().eval()
    randomise_bn(model.seq[1], torch.Generator().manual_seed(1))
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    result = bnrt.fold(model, (x,), unshare=True)
    assert result.unshared == {"seq.1_call2": "seq.1", "seq.0_call2": "seq.0"}
    assert result.unshared_parameters == 2 * 2 * 9 + 2 + 2 + 2  # a conv (weight, bias) and a BN (weight, bias)
    assert [(d.bn, d.folded, d.into) for d in result.decisions] == [
        ("seq.1", True, ("seq.0",)), ("seq.1_call2", True, ("seq.0_call2",))]
    assert result.checkpoint_keeps == ["seq.1"]  # by name: the copy is not in the checkpoint
    with torch.no_grad():
        for folded in (result.model, result.structured):
            assert float((folded(x) - model(x)).abs().max()) <= 1e-12


def test_unsharing_that_folds_nothing_more_copies_nothing():
    class Mixed(nn.Module):  # each call's BN reads the conv through a permute that mixes its channels
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 1)
            self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(2))

        def forward(self, x):
            return [bn(self.conv(x).permute(0, 2, 1, 3)) for bn in self.bns]

    model, x = Mixed().eval(), torch.randn(1, 2, 4, 4)
    assert {d.codes for d in bnrt.fold(model, (x,)).decisions} == {("reused-layer", "no-layer-after")}
    result = bnrt.fold(model, (x,), unshare=True)
    assert (result.unshared, result.unshared_parameters, type(result.model).__name__) == ({}, 0, "Mixed")
    assert {d.codes for d in result.decisions} == {("reused-layer", "no-layer-after")}
