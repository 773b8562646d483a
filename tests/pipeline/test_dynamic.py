"""--dynamic-axes through ``bnrt fold``: the ONNX file runs at every size the check tries, an axis
an exporter specialised is caught by bnrt (never by onnxruntime), and --static-ok fixes it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from bnrt.session import Session

from ..conftest import assert_one_line_error, run_cli, save_checkpoint
from ..nets import SizeBaked, TinySeg


def _dims(path):
    model = onnx.load(str(path))
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}


def test_a_segmentation_net_exported_with_dynamic_height_and_width(tmp_path):
    torch.manual_seed(0)
    model = TinySeg().eval()
    path = save_checkpoint(tmp_path / "seg.pt", model, "tests.nets:TinySeg", (1, 3, 32, 32))
    proc = run_cli("fold", str(path), "--trust-code", "--dynamic-axes", "0,2,3", "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "dynamic axes: x:0,2,3" in proc.stdout
    dims = _dims(tmp_path / "out" / "seg.onnx")
    assert all(isinstance(d, str) for d in (dims["x"][0], dims["x"][2], dims["x"][3])) and dims["x"][1] == 3
    report = json.loads((tmp_path / "out" / "seg.report.json").read_text())
    assert report["dynamic_axes"] == {"x": [0, 2, 3]}
    labels = [(c["reference"], c["candidate"]) for c in report["check"]["comparisons"]]
    assert labels == [("torch", "torch folded"), ("torch", "onnx cpu"),
                      ("torch @ 3x64x64", "torch folded @ 3x64x64"), ("torch @ 3x64x64", "onnx cpu @ 3x64x64"),
                      ("torch @ 3x32x64", "torch folded @ 3x32x64"), ("torch @ 3x32x64", "onnx cpu @ 3x32x64")]
    assert report["check"]["passed"]
    # the file agrees with the eager model at three resolutions, one not square, and two batch sizes
    session = Session(tmp_path / "out" / "seg.onnx", provider="cpu")
    for shape in [(1, 3, 32, 32), (4, 3, 48, 80), (2, 3, 96, 40)]:
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        (got,) = session.run([x])
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == want.shape == (shape[0], 3, *shape[2:])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_check_shapes_set_the_further_sizes(tmp_path):
    path = save_checkpoint(tmp_path / "seg.pt", TinySeg(), "tests.nets:TinySeg", (1, 3, 32, 32))
    proc = run_cli("fold", str(path), "--trust-code", "--dynamic-axes", "x:0,2,3", "--check-shapes", "3,40,24",
                   "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "seg.report.json").read_text())
    assert [c["candidate"] for c in report["check"]["comparisons"]][2:] == [
        "torch folded @ 3x40x24", "onnx cpu @ 3x40x24"]
    onnx_file = tmp_path / "out" / "seg.onnx"
    proc = run_cli("fold", str(onnx_file), "--dynamic-axes", "0,2,3", "--static-ok", "-o", str(tmp_path / "again"))
    assert_one_line_error(proc, f"{onnx_file}: --dynamic-axes, --static-ok apply to torch checkpoints only")


def test_an_axis_the_exporters_specialise_is_caught_before_onnxruntime_sees_it(tmp_path):
    path = save_checkpoint(tmp_path / "baked.pt", SizeBaked(), "tests.nets:SizeBaked", (1, 3, 8, 8))
    proc = run_cli("fold", str(path), "--trust-code", "--dynamic-axes", "0,2,3", "-o", str(tmp_path / "out"))
    assert proc.returncode == 3, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{path}: no ONNX written (the folded checkpoint is): ONNX export (dynamo) of SizeBaked "
                           "failed: the dynamo exporter's graph declares x:0,2,3 dynamic but runs only at the traced "
                           "size (inputs of shape (3, 3, 16, 16) give outputs of shape (12, 4), the model (3, 4)); "
                           "the torchscript exporter's graph declares x:0,2,3 dynamic but runs only at the traced size")
    assert line.endswith("; --static-ok exports x:2,3 fixed at the example's size")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["baked.folded.pt", "baked.report.json"]

    proc = run_cli("fold", str(path), "--trust-code", "--dynamic-axes", "0,2,3", "--static-ok", "-o",
                   str(tmp_path / "fixed"))
    assert proc.returncode == 0, proc.stderr
    assert "fixed at the example's size (--static-ok; no exporter kept it dynamic): axis 2 of 'x', axis 3 of 'x'" \
        in proc.stdout
    assert _dims(tmp_path / "fixed" / "baked.onnx")["x"][1:] == [3, 8, 8]
    report = json.loads((tmp_path / "fixed" / "baked.report.json").read_text())
    assert report["dynamic_axes"] == {"x": [0]} and report["check"]["passed"]
    assert len(report["check"]["comparisons"]) == 2  # no further shapes: the axes are fixed


@pytest.mark.parametrize("flags,fragments", [
    (["--dynamic-axes", "0,4"], ["--dynamic-axes x:0,4: input 'x' has 4 axes"]),
    (["--dynamic-axes", "y:0,2"], ["--dynamic-axes y: the model has no input 'y' (its inputs: x)"]),
    (["--dynamic-axes", "a,b"], ["--dynamic-axes 'a,b': axes like 0,2,3 (every input) or NAME:0,2,3"]),
    (["--check-shapes", "3,40,24"], ["--check-shapes 3,40,24: input 'x' has shape (3, 32, 32) and dynamic axes 0"]),
])
def test_bad_dynamic_axes_are_one_line_errors(tmp_path, flags, fragments):
    path = save_checkpoint(tmp_path / "seg.pt", TinySeg(), "tests.nets:TinySeg", (1, 3, 32, 32))
    proc = run_cli("fold", str(path), "--trust-code", *flags, "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_take_other_sizes_is_told_so(tmp_path):
    path = save_checkpoint(tmp_path / "baked.pt", SizeBaked(), "tests.nets:SizeBaked", (1, 3, 8, 8))
    proc = run_cli("fold", str(path), "--trust-code", "--dynamic-axes", "0,1", "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, f"{path}: the model fails at 4x8x8 (dynamic axes x:0,1): RuntimeError: Given groups=1",
                          "pass --check-shapes with sizes it takes, or keep those axes static")
    assert not (tmp_path / "out").exists()
