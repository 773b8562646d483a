"""A detector through ``bnrt fold``: captured by a recorded run, folded, checked by matching its
detections, the folded checkpoint written and the ONNX not (exit 3, the reason on stderr)."""

from __future__ import annotations

import json

import numpy as np
import torch

from ..conftest import assert_one_line_error, randomise_bn, run_cli, save_checkpoint
from ..nets import ExportTrap, TinyDetector


def _saved(tmp_path):
    torch.manual_seed(0)
    model = TinyDetector().eval()
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            randomise_bn(module, gen)
    return save_checkpoint(tmp_path / "det.pt", model, "tests.nets:TinyDetector", (1, 3, 16, 16)), model


def test_a_detector_folds_and_its_detections_are_matched(tmp_path):
    path, model = _saved(tmp_path)
    proc = run_cli("fold", str(path), "--trust-code", "-o", str(tmp_path / "out"), "--samples", "6")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"{path}: no ONNX written (the folded checkpoint is): the model returns one dict of tensors per image")
    assert "graph: recorded from one eager run" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["det.folded.pt", "det.report.json"]
    report = json.loads((tmp_path / "out" / "det.report.json").read_text())
    assert report["tracer"] == "recorded run" and report["output_names"] == ["boxes", "scores", "labels"]
    assert report["summary"]["folded"] == 4 and report["summary"]["batchnorm_nodes_in_onnx"] is None
    assert report["summary"]["onnx_not_written"].startswith("the model returns one dict of tensors per image")
    assert "onnx" not in report["outputs"]
    (comparison,) = report["check"]["comparisons"]
    assert comparison["candidate"] == "torch folded" and report["check"]["passed"]
    rows = {o["name"]: o for o in comparison["outputs"]}
    assert rows["boxes"]["shape"][0] == 6 and rows["boxes"]["shape"][2] == 4
    assert rows["boxes"]["criterion"] == "noise" and rows["boxes"]["passed"]
    assert 0 < rows["boxes"]["error"] <= 8 * rows["boxes"]["floor"] and rows["scores"]["passed"]
    folded = torch.load(tmp_path / "out" / "det.folded.pt", weights_only=True)
    assert not any(k.startswith("backbone.1.") for k in folded["state_dict"])
    # bnrt check of the two checkpoints names the outputs by their keys and matches the detections
    proc = run_cli("check", str(path), str(tmp_path / "out" / "det.folded.pt"), "--trust-code", "--json",
                   str(tmp_path / "check.json"))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "check.json").read_text())["comparisons"][0]["outputs"]
    assert [o["name"] for o in rows] == ["boxes", "scores", "labels"] and rows[2]["atol"] == 0


def test_a_model_no_exporter_can_export_is_folded_without_its_onnx(tmp_path):
    save_checkpoint(tmp_path / "trap.pt", ExportTrap().eval(), "tests.nets:ExportTrap", (1, 1, 6, 6),
                    arch_kwargs={"fail": True})
    proc = run_cli("fold", str(tmp_path / "trap.pt"), "--trust-code", "-o", str(tmp_path / "a" / "b"))
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"{tmp_path / 'trap.pt'}: no ONNX written (the folded checkpoint is): ONNX export (dynamo) of ExportTrap "
        "failed: the dynamo exporter: this model cannot be exported; the torchscript exporter: this model cannot be "
        "exported")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["trap.folded.pt", "trap.report.json"]
    report = json.loads((tmp_path / "a" / "b" / "trap.report.json").read_text())
    assert report["exporter"] is None and report["check"]["passed"]
    assert [c["candidate"] for c in report["check"]["comparisons"]] == ["torch folded"]


def test_quantize_says_a_detector_has_no_graph_to_quantize(tmp_path):
    path, _ = _saved(tmp_path)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((4, 3, 16, 16), dtype=np.float32))
    proc = run_cli("quantize", str(path), "--trust-code", "--precision", "fp16", "--data", str(tmp_path / "x.npz"),
                   "-o", str(tmp_path / "q"))
    assert_one_line_error(proc, f"{path}: no ONNX graph to quantize: the model returns one dict of tensors per image")
