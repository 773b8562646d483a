"""What a model file is, decided once by its content (``ModelSource.kind``): every stage follows it,
whatever the file is called."""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import bnrt
from bnrt.errors import InputError
from bnrt.io.source import ModelSource, file_kind, looks_like_onnx

from ..conftest import EXAMPLE, bn_node, bn_params, onnx_graph, run_cli


def _conv_bn(path):
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    model = onnx_graph([helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn_node("h", "y")],
                       [w, *bn_params(4, rng)], ["N", 3, 8, 8])
    onnx.save(model, str(path))
    return path


def test_kinds_by_content_not_by_name(tmp_path):
    assert file_kind(_conv_bn(tmp_path / "model.pt")) == "onnx"  # an ONNX file named .pt
    (tmp_path / "ckpt.onnx").write_bytes(EXAMPLE.read_bytes())  # a torch zip named .onnx
    assert file_kind(tmp_path / "ckpt.onnx") == "torch"
    with open(tmp_path / "legacy.bin", "wb") as f:
        pickle.dump({"state_dict": {}}, f, protocol=2)  # torch.save's legacy format is a pickle
    assert file_kind(tmp_path / "legacy.bin") == "torch"
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    (tmp_path / "junk.pt").write_bytes(b"not a model at all")
    assert (file_kind(tmp_path / "junk.onnx"), file_kind(tmp_path / "junk.pt")) == ("onnx", "torch")


def test_an_onnx_header_is_recognised_only_when_it_parses_as_one():
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    assert looks_like_onnx(model.SerializeToString()[:16])
    assert not looks_like_onnx(b"\x08\x07")  # too short to tell
    assert not looks_like_onnx(b"\x08\x07\x00rest")  # ir_version then no field of ModelProto
    assert not looks_like_onnx(b"\x08\x80\x12")  # a multi-byte ir_version is not one onnx writes


def test_missing_or_folder_sources_are_refused_when_their_kind_is_asked(tmp_path):
    source = ModelSource(tmp_path / "nope.pt")
    with pytest.raises(InputError, match="nope.pt: no such file"):
        source.kind
    with pytest.raises(InputError, match="is a directory, expected a model file"):
        ModelSource(tmp_path).kind


def test_the_kind_is_read_once(tmp_path):
    path = _conv_bn(tmp_path / "m.onnx")
    source = ModelSource(path)
    assert source.kind == "onnx"
    path.write_bytes(EXAMPLE.read_bytes())  # changed behind its back: the source keeps what it read
    assert source.kind == "onnx" and file_kind(path) == "torch"


def test_an_onnx_model_named_like_a_checkpoint_is_folded_as_onnx(tmp_path):
    path = _conv_bn(tmp_path / "model.pt")
    outcome = bnrt.fold_file(path, tmp_path / "out")
    assert outcome.kind == "onnx" and outcome.passed
    assert sorted(p.name for p in outcome.written) == ["model.folded.onnx", "model.report.json"]
    assert outcome.report["source"]["format"] == "onnx" and outcome.onnx_batchnorm_nodes == 0
    proc = run_cli("inspect", str(path))
    assert proc.returncode == 0 and "1 BatchNorm: 1 folded" in proc.stdout


def test_torch_only_flags_are_refused_for_an_onnx_model_whatever_its_name(tmp_path):
    path = _conv_bn(tmp_path / "model.pt")
    proc = run_cli("fold", str(path), "--opset", "17", "-o", str(tmp_path / "out"), trust_code=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"bnrt: error: {path}: --opset applies to torch checkpoints only; "
                                   "an ONNX file is folded as it is")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_where_an_onnx_model_is_expected_reads_as_torch(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "weights.onnx")
    proc = run_cli("inspect", str(tmp_path / "weights.onnx"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == (f"bnrt: error: {tmp_path / 'weights.onnx'}: no state_dict found (looked for state_dict, "
                           "model_state_dict, model or a dict of tensors; entries: state_dict); name the entry with "
                           "--state-dict-key\n")
