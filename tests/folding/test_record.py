"""The recorded capture: models neither torch.fx nor torch.export captures (a batch iterated,
value-dependent control flow, a list of dicts out) are planned on one recorded eager run."""

from __future__ import annotations

import pytest
import torch

import bnrt
from bnrt.folding.capture import RECORDED, capture
from bnrt.folding.record import SHAPE_KEY

from ..conftest import randomise_bn
from ..nets import DataDependent, IteratedConv, TinyDetector


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            randomise_bn(module, gen)
    return model.eval()


def _detector() -> TinyDetector:
    torch.manual_seed(0)
    return _randomised(TinyDetector())


def test_a_detector_is_recorded_and_folds_exactly():
    model, x = _detector(), torch.randn(2, 3, 16, 16)
    cap = capture(model, (x,))
    assert cap.tracer == RECORDED
    assert [n.target for n in cap.graph.nodes if n.op == "call_module"] == [
        "backbone.0", "backbone.1", "backbone.3", "backbone.4", "cls.0", "cls.1", "reg.0", "reg.1"]
    first_conv = next(n for n in cap.graph.nodes if n.target == "backbone.0")
    assert first_conv.meta[SHAPE_KEY] == (2, 8, 16, 16)
    iterated = [u.target for u in next(n for n in cap.graph.nodes if n.target == "cls.1").users]
    assert iterated == ["unbind"]  # zip() iterates the head's output: recorded as its reader
    result = bnrt.fold(model, (x,))
    assert result.tracer == RECORDED
    assert [d.into for d in result.decisions] == [("backbone.0",), ("backbone.3",), ("cls.0",), ("reg.0",)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in result.model.modules())
    with torch.no_grad():
        images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        for want, got in zip(model(images), result.model(images), strict=True):
            assert torch.equal(want["labels"], got["labels"]) and len(want["labels"]) > 0
            torch.testing.assert_close(got["boxes"], want["boxes"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-5, atol=1e-6)


def test_a_layer_called_once_per_image_is_reused_and_refused():
    class PerImage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2)

        def forward(self, images):
            outs = [self.bn(self.conv(image[None])) for image in images]
            return outs if float(outs[0].sum()) > -1e9 else outs[::-1]  # a value test: recorded

    result = bnrt.fold(_randomised(PerImage()), (torch.randn(2, 3, 4, 4),))
    assert result.tracer == RECORDED
    assert result.decisions[0].refusals[0].code == "reused-layer"


def test_a_conv_output_read_by_iteration_keeps_its_bn():
    model = _randomised(IteratedConv())
    cap = capture(model, (torch.randn(2, 3, 5, 5),))
    assert cap.tracer == RECORDED
    conv = next(n for n in cap.graph.nodes if n.target == "conv")
    readers = sorted(str(u.target) for u in conv.users)
    assert readers == ["bn", "unbind"]
    decision = bnrt.fold(model, (torch.randn(2, 3, 5, 5),)).decisions[0]
    assert decision.into != ("conv",)


def test_in_place_ops_and_operators_are_recorded_as_the_tensors_they_change():
    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(2, 2, 1), torch.nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            if float(y.abs().sum()) >= 0:  # a value read: neither torch.fx nor torch.export captures it
                y.add_(1)  # in place after the read: the BN reads the changed tensor
            return 3 + self.bn(y)

    model = InPlace().eval()
    cap = capture(model, (torch.randn(2, 2, 3, 3),))
    assert cap.tracer == RECORDED
    bn = next(n for n in cap.graph.nodes if n.target == "bn")
    assert (bn.args[0].op, bn.args[0].target) == ("call_method", "add_")
    add = next(iter(bn.users))  # 3 + t: torch calls t.add(3), 1 - t: operator.sub(1, t)
    assert (add.op, add.target, add.args) == ("call_method", "add", (bn, 3))
    assert bnrt.fold(model, (torch.randn(2, 2, 3, 3),)).decisions[0].into != ("conv",)


def test_a_model_that_cannot_run_names_each_capture():
    class Broken(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                raise ValueError("no")
            return x

    with pytest.raises(bnrt.errors.InputError, match="fails on inputs of shape"):
        capture(Broken(), (torch.ones(2, 3),))


def test_a_data_dependent_model_is_recorded_on_the_branch_it_took():
    model = DataDependent().eval()
    cap = capture(model, (torch.ones(2, 3, 4, 4),))
    assert cap.tracer == RECORDED
    assert [n.target for n in cap.graph.nodes if n.op == "call_module"] == ["conv", "bn"]


class _Recorded(torch.nn.Module):
    """conv -> BN, and the conv output read once more by ``reader``; a value test makes the model
    one only a recorded run captures."""

    def __init__(self, reader):
        super().__init__()
        self.conv, self.bn, self.conv2 = torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 3, 1)
        self.reader = reader

    def forward(self, x):
        y = self.conv(x)
        a = self.bn(y)
        if float(a.sum()) > -1e9:
            return a, self.reader(self, x, y)
        return a, y


def _keyword(model, x, y):
    return model.conv2(input=y)  # a module call's keyword input: still a reader of y


def _caught(model, x, y):
    try:
        model.conv2(x[:, :1])  # fails inside a recorded module call; the model goes on
    except RuntimeError:
        pass
    return y * 2


def _unseen(model, x, y):
    with torch._C.DisableTorchFunction():  # torch calls the recorder cannot see
        return y * 2


@pytest.mark.parametrize("reader", [_keyword, _caught])
def test_every_reader_of_a_conv_output_is_recorded(reader):
    model = _randomised(_Recorded(reader))
    x = torch.randn(2, 3, 4, 4)
    result = bnrt.fold(model, (x,))
    assert result.tracer == RECORDED
    assert result.decisions[0].into != ("conv",)
    with torch.no_grad():
        for want, got in zip(model(x), result.model(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_tensor_made_where_the_recorder_cannot_see_is_a_capture_error():
    with pytest.raises(bnrt.errors.CaptureError, match="a recorded run: CaptureError: a tensor of shape "
                                                        "\\(2, 3, 4, 4\\) appeared that no recorded torch call made"):
        capture(_randomised(_Recorded(_unseen)), (torch.randn(2, 3, 4, 4),))


def test_outputs_in_other_objects_are_a_capture_error():
    class Boxed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            if float(y.sum()) > -1e9:
                return self.bn(y), type("Result", (), {"features": y})()
            return self.bn(y), None

    with pytest.raises(bnrt.errors.CaptureError, match="the model returns a Result: bnrt reads tensors in tuples"):
        capture(Boxed().eval(), (torch.randn(2, 3, 4, 4),))

