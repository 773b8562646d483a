"""Fold safety under fuzz: random module graphs with reused modules, shared outputs and tied
weights; `bnrt.fold` must never change what the model computes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bnrt

from ..conftest import randomise_bn

C = 3


class RandomNet(nn.Module):
    """Runs ``ops`` over a growing list of values; every value has shape (N, C, H, W)."""

    def __init__(self, ops: list[tuple], seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ops = ops
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        for kind, *args in ops:
            if kind == "conv":
                k = args[2]
                conv = nn.Conv2d(C, C, k, padding=k // 2, bias=args[3], padding_mode=args[4])
                self.convs.append(conv)
            elif kind == "tied":
                conv = nn.Conv2d(C, C, 1, bias=False)
                if len(self.convs):
                    donor = self.convs[args[1] % len(self.convs)]
                    if donor.weight.shape == conv.weight.shape:
                        conv.weight = donor.weight
                self.convs.append(conv)
            elif kind == "bn":
                bn = nn.BatchNorm2d(C, affine=args[2])
                randomise_bn(bn.double(), gen)
                self.bns.append(bn.float())

    def forward(self, x):
        values = [x]
        conv_i = bn_i = 0
        for kind, *args in self.ops:
            src = values[-1 - args[0] % len(values)]  # mostly the latest value: chains form
            if kind in ("conv", "tied"):
                values.append(self.convs[conv_i](src))
                conv_i += 1
            elif kind == "reuse_conv" and conv_i:
                values.append(self.convs[args[1] % conv_i](src))
            elif kind == "bn":
                values.append(self.bns[bn_i](src))
                bn_i += 1
            elif kind == "reuse_bn" and bn_i:
                values.append(self.bns[args[1] % bn_i](src))
            elif kind == "relu":
                values.append(torch.relu(src))
            elif kind == "add":
                values.append(src + values[-1 - args[1] % len(values)])
        return values[-1] + 0.5 * values[len(values) // 2]


index = st.integers(0, 12)
near = st.sampled_from([0, 0, 0, 1, 2])
new_conv = st.tuples(st.just("conv"), near, index, st.sampled_from([1, 3]), st.booleans(),
                    st.sampled_from(["zeros", "reflect"]))
new_bn = st.tuples(st.just("bn"), near, st.just(0), st.booleans())
op = st.one_of(  # new layers drawn more often than reuse, so that folds happen as well as refusals
    new_conv, new_conv, new_bn, new_bn,
    st.tuples(st.just("tied"), near, index),
    st.tuples(st.just("reuse_conv"), near, index),
    st.tuples(st.just("reuse_bn"), near, index),
    st.tuples(st.just("relu"), near),
    st.tuples(st.just("add"), near, index),
)


@given(ops=st.lists(op, min_size=1, max_size=10), seed=st.integers(0, 2**31 - 1))
def test_fold_never_changes_outputs_of_random_graphs(ops, seed):
    torch.manual_seed(seed)
    model = RandomNet(ops, seed).double().eval()
    x = torch.randn(2, C, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    result = bnrt.fold(model, (x,))
    with torch.no_grad():
        ref, got = model(x), result.model(x)
    scale = max(1.0, float(ref.abs().max()))
    assert float((ref - got).abs().max()) <= 1e-9 * scale, [(d.bn, d.status, d.into, d.reason) for d in result.decisions]
    assert len(result.decisions) == len(model.bns)
    names = {d.bn for d in result.decisions}
    assert names == {f"bns.{i}" for i in range(len(model.bns))}
