"""Every zoo architecture: the expected BatchNorms fold, the rest are refused, outputs unchanged."""

import pytest
import torch

import bnrt
from models.zoo import ZOO, build

EXPECTED = {  # model: (BatchNorms, folded)
    "resnet": (20, 20), "mobilenetv2": (14, 14), "mobilenetv3": (14, 14), "unet": (7, 7), "generator": (3, 3),
    "tabular": (3, 3), "token_mlp": (2, 2), "reid": (4, 4), "preact": (7, 3), "audio1d": (5, 5), "volume3d": (4, 4),
    "timm_style": (4, 4), "repnet": (16, 16), "repmixnet": (13, 13), "shared_head": (3, 3),
}


def test_expected_table_covers_the_zoo():
    assert set(EXPECTED) == set(ZOO)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_folds_exactly(name):
    model = build(name, batches=1)
    x = torch.randn(4, *ZOO[name].input_shape[1:], generator=torch.Generator().manual_seed(0))
    result = bnrt.fold(model, (x[:2],), unshare=ZOO[name].unshare)
    assert (len(result.decisions), len(result.folded)) == EXPECTED[name]
    with torch.no_grad():
        ref, got = model(x), result.model(x)
    assert float((ref - got).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_preact_refusals_name_their_cause():
    result = bnrt.fold(build("preact", batches=1), (torch.randn(2, 3, 16, 16),))
    reasons = {d.bn: d.reason for d in result.skipped}
    assert reasons == {
        "blocks.0.bn1": "output of 'stem' also feeds 'add'; forward: output feeds 'relu', not a layer it can fold into",
        "blocks.1.bn1": "input comes from 'add': no fold rule; forward: output feeds 'relu_2', not a layer it can fold into",
        "blocks.2.bn1": "input comes from 'add_1': no fold rule; forward: output feeds 'relu_4', not a layer it can fold into",
        "final_bn": "input comes from 'add_2': no fold rule; forward: output feeds 'relu_6', not a layer it can fold into",
    }
    assert {d.bn: d.direction for d in result.folded} == {
        "blocks.0.bn2": "backward", "blocks.1.bn2": "backward", "blocks.2.bn2": "backward"}


def test_forward_and_through_reshape_placements_in_the_zoo():
    tab = bnrt.fold(build("tabular", batches=1), (torch.randn(2, 20),))
    assert [(d.bn, d.rule, d.direction) for d in tab.decisions] == [
        ("input_bn", "bn->linear", "forward"), ("body.1", "linear->bn", "backward"),
        ("body.5", "linear->bn", "backward")]
    tok = bnrt.fold(build("token_mlp", batches=1), (torch.randn(2, 16, 32),))
    assert [(d.bn, d.into, d.through) for d in tok.decisions] == [
        ("bn1", ("fc1",), ("reshape",)), ("bn2", ("fc2",), ("transpose",))]
    reid = bnrt.fold(build("reid", batches=1), (torch.randn(2, 3, 64, 32),))
    assert reid.decisions[-1].bn == "neck" and reid.decisions[-1].rule == "bn->linear"


def test_timm_and_torchvision_idioms_fold_with_one_decision_each():
    result = bnrt.fold(build("timm_style", batches=1), (torch.randn(2, 3, 16, 16),))
    assert [(d.bn, d.rule, d.into, d.direction, d.through, d.functional is not None) for d in result.decisions] == [
        ("stem_bn", "conv->bn", ("stem",), "backward", (), False),            # frozen BN
        ("bn_act", "conv->bn", ("conv",), "backward", (), True),              # BN subclass: its F.batch_norm call
        ("proj.bn", "linear->bn", ("proj.linear",), "backward", ("flatten_1",), False),  # reshape_as reads the shape
        ("head_bn", "bn->linear", ("head",), "forward", ("drop",), False),    # Dropout in eval passes through
    ]


def test_rep_blocks_merge_into_one_conv_each():
    model = build("repnet", batches=1)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = bnrt.fold(model, (x[:2],))
    plain = {"inputs": 0, "scaled": False, "constant": False}  # plain sums of the user's branches
    assert [m.to_json() for m in result.merges] == [
        {"into": "blocks.0.kxk.0.0", "convs": ["blocks.0.scale.0"], "bns": [], **plain},
        {"into": "blocks.1.kxk.0.0", "convs": ["blocks.1.scale.0"], "bns": ["blocks.1.identity"], **plain},
        {"into": "blocks.2.kxk.0.0", "convs": ["blocks.2.scale.0", "blocks.2.kxk.1.0"], "bns": [], **plain},
        {"into": "blocks.3.kxk.0.0", "convs": ["blocks.3.scale.0", "blocks.3.kxk.1.0", "blocks.3.kxk.2.0"],
         "bns": ["blocks.3.identity"], **plain},
        {"into": "blocks.4.kxk.0.0", "convs": ["blocks.4.scale.0"], "bns": ["blocks.4.identity"], **plain}]
    assert {d.bn: d.direction for d in result.decisions if d.direction == "merge"} == {
        "blocks.1.identity": "merge", "blocks.3.identity": "merge", "blocks.4.identity": "merge"}
    convs = [n.target for n in result.model.graph.nodes if n.op == "call_module"
             and isinstance(result.model.get_submodule(n.target), torch.nn.Conv2d)]
    assert convs == [f"blocks.{i}.kxk.0.0" for i in range(5)]
    with torch.no_grad():  # the merged graph and the user's structure (zeroed branches) compute the same
        ref = model(x)
        for folded in (result.model, result.structured):
            assert float((folded(x) - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_rep_mixers_merge_with_their_differences_scales_and_the_bn_after():
    model = build("repmixnet", batches=1)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = bnrt.fold(model, (x[:2],))
    assert [(m.target.name, m.inputs, m.to_json()["scaled"]) for m in result.merges] == [
        ("blocks.0.conv.0", 1, False), ("blocks.1.kxk.0", 1, True), ("blocks.1.mlp.1", 0, True),
        ("blocks.2.kxk.0", 1, True), ("blocks.2.mlp.1", 0, True)]
    assert result.checkpoint_keeps == ["blocks.0.bn", "blocks.1.norm", "blocks.2.norm"]
    convs = [n.target for n in result.model.graph.nodes if n.op == "call_module"
             and isinstance(result.model.get_submodule(n.target), torch.nn.Conv2d)]
    assert convs == ["stem.0", "blocks.0.conv.0", "blocks.1.kxk.0", "blocks.1.mlp.0.0", "blocks.1.mlp.1",
                     "blocks.2.kxk.0", "blocks.2.mlp.0.0", "blocks.2.mlp.1"]
    assert not any(n.op == "call_function" and "sub" in str(n.target) for n in result.model.graph.nodes)
    with torch.no_grad():
        ref = model(x)
        for folded in (result.model, result.structured):
            assert float((folded(x) - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
