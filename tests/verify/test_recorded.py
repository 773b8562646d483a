"""The per-layer comparison's module outputs caught on runs the check makes anyway: the same
figures as runs of their own, fewer forward passes, within the values budget."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

import bnrt
from bnrt.verify import check as check_module
from bnrt.verify import torchside
from bnrt.verify.torchside import TapRecorder, torch_side, torch_taps

from ..conftest import EXAMPLE, trusted


class Shared(nn.Module):
    """conv -> relu -> the same conv again (called twice: no taps) -> conv."""

    def __init__(self):
        super().__init__()
        self.a, self.twice, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return self.b(self.twice(self.twice(torch.relu(self.a(x)))))


def test_a_recorder_keeps_what_torch_taps_gives_within_its_budget():
    torch.manual_seed(0)
    model = Shared().eval()
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    names = {"a", "twice", "b"}
    per_sample = 4 * 8 * 8 + 4 * 8 * 8 + 2 * 6 * 6  # every module's first call counts toward the budget
    recorder = TapRecorder(names, None, 2 * per_sample + 5)  # room for two rows
    run = torch_side(model).tapping(recorder)
    for i in range(0, 5, 2):  # batches of 2, 2, 1: the outputs are the model's own
        with torch.inference_mode():
            np.testing.assert_array_equal(run([x[i:i + 2]])[0], model(torch.from_numpy(x[i:i + 2])).numpy())
    taps = recorder.taps(2)
    expected = torch_taps(model, [x[:2]], names)
    assert sorted(taps) == sorted(expected) == ["a", "b"]  # the module called twice has none
    for name in expected:
        np.testing.assert_array_equal(taps[name], expected[name])
    assert recorder.taps(3) is None and len(recorder.taps(1)["a"]) == 1
    whole = TapRecorder(names, None, 2 * per_sample + 5, whole=True)  # a batch of 3 does not fit: nothing kept
    torch_side(model).tapping(whole)([x[:3]])
    assert whole.parts == {} and whole.taps(1) is None
    torch_side(model).tapping(whole := TapRecorder(names, None, 2 * per_sample + 5, whole=True))([x[:2]])
    np.testing.assert_array_equal(whole.taps(2)["b"], expected["b"])


class Frames(nn.Module):
    """A conv over a flattened batch (frames of each sample as rows of their own), then back."""

    def __init__(self):
        super().__init__()
        self.frames, self.head = nn.Conv2d(1, 2, 3), nn.Conv2d(6, 2, 1)

    def forward(self, x):  # (N, 3, H, W): three single-channel frames per sample
        n = x.shape[0]
        y = self.frames(x.reshape(n * 3, 1, *x.shape[2:]))
        return self.head(y.reshape(n, 6, *y.shape[2:]))


def test_outputs_that_are_not_one_row_per_sample_make_a_recorder_give_up():
    """A module on the flattened batch has 3 rows per sample: the recorder keeps nothing (the
    per-layer comparison then taps with a run of its own), as does one that a later run shows first."""
    torch.manual_seed(0)
    model = Frames().eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    recorder = TapRecorder({"frames", "head"}, None, 1 << 20)
    torch_side(model).tapping(recorder)([x])
    assert recorder.unusable and recorder.taps(1) is None and recorder.parts == {}
    later = TapRecorder({"a", "b"}, None, 1 << 20)
    plain = Shared().eval()
    later.run(plain, lambda: torch_side(plain).runner([x[:1]]), 1)
    assert later.taps(1) is not None
    later.sizes.pop("b")  # as if module b had not run in the first batch
    later.run(plain, lambda: torch_side(plain).runner([x[1:]]), 1)
    assert later.unusable and later.taps(1) is None


class Sometimes(nn.Module):
    """A conv, then a second one only on batches whose first value is positive."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 3), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) if float(x[0, 0, 0, 0]) > 0 else y


def test_rows_that_would_not_line_up_make_a_recorder_give_up():
    """A module that skips a batch in the middle; single-sample runs only (axis 0 never shown to be the
    samples: one row each is all they give)."""
    torch.manual_seed(0)
    model = Sometimes().eval()
    x = np.random.default_rng(0).standard_normal((3, 3, 6, 6)).astype(np.float32)
    x[0, 0, 0, 0], x[1, 0, 0, 0], x[2, 0, 0, 0] = 1.0, -1.0, 1.0
    recorder = TapRecorder({"a", "b"}, None, 1 << 20)
    run = torch_side(model).tapping(recorder)
    for i in range(3):
        run([x[i:i + 1]])
    assert recorder.unusable and recorder.taps(1) is None
    ones = TapRecorder({"a"}, None, 1 << 20)
    run = torch_side(model).tapping(ones)
    for i in range(3):
        run([x[i:i + 1]])
    np.testing.assert_array_equal(ones.taps(1)["a"], torch_taps(model, [x[:1]], {"a"})["a"])
    assert ones.taps(2) is None  # as if it were a module whose axis 0 is always 1


def test_a_hook_that_fails_leaves_the_run_alone():
    """An output numpy cannot hold (bfloat16): the model's run finishes, the recorder keeps nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3)).eval().to(torch.bfloat16)
    recorder = TapRecorder({"0"}, None, 1 << 20)
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = recorder.run(model, lambda: model(x), 2)
        np.testing.assert_array_equal(out.float().numpy(), model(x).float().numpy())
    assert recorder.unusable and recorder.taps(1) is None

def test_a_tf32_side_catches_no_taps():
    """Taps are exact float32: a CUDA side running under TF32 offers no tapping runner (its
    per-layer taps come from a run of their own, TF32 off)."""
    model = Shared().eval()
    assert torch_side(model).tapping is not None and torch_side(model, device="cuda").tapping is not None
    assert torch_side(model, device="cuda", tf32=True).tapping is None

def test_thinned_taps_are_caught_thinned():
    torch.manual_seed(0)
    model = Shared().eval()
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    recorder = TapRecorder({"a", "b"}, 4 * 64, 1 << 20)
    torch_side(model).tapping(recorder)([x])
    expected = torch_taps(model, [x], {"a", "b"}, 4 * 64)
    assert expected["a"].shape == (3, 4, 8, 8)  # thinned from 64x64
    for name in expected:
        np.testing.assert_array_equal(recorder.taps(3)[name], expected[name])


def test_the_check_gives_the_same_report_with_fewer_forward_passes(tmp_path, monkeypatch):
    """bnrt fold's check with the taps caught on the way, and with every tap run of its own: the
    same check section, number for number; the per-layer comparison then runs the model once more
    (the reference's taps) instead of four times."""
    calls = []
    real = torchside.torch_taps

    def counted(*args, **kwargs):
        calls.append(len(args[1][0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torchside, "torch_taps", counted)
    bnrt.fold_file(trusted(EXAMPLE), tmp_path / "caught")
    caught = list(calls)
    calls.clear()
    monkeypatch.setattr(check_module, "recorders", lambda *args: None)
    bnrt.fold_file(trusted(EXAMPLE), tmp_path / "own")
    reports = [json.loads((tmp_path / d / "digits_cnn.report.json").read_text())["check"] for d in ("caught", "own")]
    assert reports[0] == reports[1] and reports[0]["comparisons"][0]["layers"]["points"] == 6
    samples = reports[0]["comparisons"][0]["layers"]["samples"]
    assert caught == [samples] and calls == [1, samples, samples, samples]
