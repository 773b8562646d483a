"""Artifact formats: the fold report validates against bnrt.fold/1 for torch and ONNX sources, every
kept BatchNorm carries coded refusals, and fold records survive the ONNX metadata round trip."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
from onnx import helper, numpy_helper

import bnrt
from bnrt.io.artifacts import FOLDS_KEY, artifact_names, folds_in, folds_of, onnx_metadata
from bnrt.folding.decision import CODES
from bnrt.folding.onnxfold import fold_onnx

from ..conftest import report_schema, EXAMPLE, bn_node, bn_params, onnx_graph, trusted

SCHEMA = report_schema("fold-1")


def test_schema_lists_exactly_the_refusal_codes():
    assert SCHEMA["$defs"]["refusal"]["properties"]["code"]["enum"] == sorted(CODES)


def test_artifact_names():
    assert artifact_names(Path("a/m.v2.pt"), "torch") == {"folded": "m.v2.folded.pt", "onnx": "m.v2.onnx",
                                                "report": "m.v2.report.json"}
    assert artifact_names(Path("g.ONNX"), "onnx") == {"folded": "g.folded.onnx", "report": "g.report.json"}


def test_torch_fold_report_is_schema_valid(tmp_path):
    outcome = bnrt.fold_file(trusted(EXAMPLE), tmp_path, check=None, exporter="torchscript")
    report = json.loads((tmp_path / "digits_cnn.report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report == json.loads(json.dumps(outcome.report))
    assert (report["schema"], report["summary"]["bn_total"], report["summary"]["folded"]) == ("bnrt.fold/1", 6, 6)
    assert all(d["refusals"] == [] and d["into"] for d in report["decisions"])
    # each step's time, and the process's peak memory when it ended (at least what torch takes)
    peaks = report["peak_rss_mb"]
    assert list(peaks) == list(report["timings_s"]) == ["load", "capture+plan", "fold", "export", "save"]
    assert all(100 < v < 1 << 20 for v in peaks.values())


def _partly_foldable_onnx(path: Path) -> Path:
    """x -> Conv -> bn1 (folds) -> Relu -> bn2 (kept: a nonlinearity before, a graph output after)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
             *bn_params(4, rng, "bn1"), *bn_params(4, rng, "bn2")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn_node("h", "h1", "bn1"),
             helper.make_node("Relu", ["h1"], ["r"], name="relu"), bn_node("r", "y", "bn2")]
    onnx.save(onnx_graph(nodes, inits, [2, 3, 4, 4]), str(path))
    return path


def test_onnx_fold_report_is_schema_valid_and_codes_each_direction(tmp_path):
    src = _partly_foldable_onnx(tmp_path / "g.onnx")
    outcome = bnrt.fold_file(trusted(src), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "g.report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert outcome.passed and report["summary"]["batchnorm_nodes_in_onnx"] == 1
    kept = [d for d in report["decisions"] if d["status"] == "skipped"]
    assert [(d["bn"], [(r["direction"], r["code"], r["subject"]) for r in d["refusals"]]) for d in kept] == [
        ("bn2", [("backward", "no-layer-before", "relu"), ("forward", "no-layer-after", "the model output")])]
    folded = onnx.load(str(tmp_path / "out" / "g.folded.onnx"))
    meta = {p.key: p.value for p in folded.metadata_props}
    assert folds_in(meta) == [{"bn": "bn1", "into": ["conv"], "direction": "backward", "through": [],
                               "functional": False}]
    assert (meta["bn_folded"], meta["bn_total"]) == ("1", "2")


def test_fold_records_round_trip_through_onnx_metadata(tmp_path):
    decisions = fold_onnx(onnx.load(str(_partly_foldable_onnx(tmp_path / "g.onnx")))).decisions
    meta = onnx_metadata("0" * 64, decisions)
    assert set(meta) == {"bnrt_version", "source_sha256", "bn_folded", "bn_total", FOLDS_KEY}
    assert folds_in(meta) == folds_of(decisions) == [{"bn": "bn1", "into": ["conv"], "direction": "backward",
                                                      "through": [], "functional": False}]
    assert folds_in({}) == []
