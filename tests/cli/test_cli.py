"""The CLI end to end in a subprocess: outputs, exit codes, one-line errors, no partial files."""

from __future__ import annotations

import json
import pickle
import shutil

import onnx
import pytest
import torch

from bnrt.io.export import count_ops
from models.digits import DigitsNet

from ..conftest import EXAMPLE, assert_one_line_error, run_cli, save_checkpoint
from ..nets import DataDependent


def test_fold_example_end_to_end(tmp_path, digits_npz):
    src = tmp_path / "in" / "digits_cnn.pt"
    src.parent.mkdir()
    shutil.copy(EXAMPLE, src)
    before = src.read_bytes()
    proc = run_cli("fold", str(src), "-o", str(tmp_path / "out"), "--data", str(digits_npz))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "digits_cnn.folded.pt", "digits_cnn.onnx", "digits_cnn.report.json"]
    assert src.read_bytes() == before
    report = json.loads((tmp_path / "out" / "digits_cnn.report.json").read_text())
    assert report["summary"] == {"bn_total": 6, "folded": 6, "skipped": 0, "merged_blocks": 0, "fp16_overflow": {},
                                 "batchnorm_nodes_in_onnx": 0}
    assert report["tracer"] == "torch.fx"
    assert [d["status"] for d in report["decisions"]] == ["folded"] * 6
    check = report["check"]
    assert check["passed"] and check["samples"] == 360
    folded_vs_torch = check["comparisons"][0]["outputs"][0]
    # the folded torch model on the 8 noise-floor samples, the ONNX on all 360
    assert check["noise_samples"] == 8 and [(c["candidate"], c["samples"]) for c in check["comparisons"]] == [
        ("torch folded", 8), ("onnx cpu", None)]
    assert folded_vs_torch["max_abs"] < 1e-5 and folded_vs_torch["top1_agreement"] == 1.0
    assert check["comparisons"][1]["outputs"][0]["top1_agreement"] == 1.0
    assert set(check["accuracy"]) == {"torch", "onnx cpu"}
    assert len(set(check["accuracy"].values())) == 1 and check["accuracy"]["torch"] > 0.95
    proto = onnx.load(str(tmp_path / "out" / "digits_cnn.onnx"))
    assert count_ops(proto, "BatchNormalization") == 0
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["source_sha256"] == report["source"]["sha256"] and meta["bn_folded"] == "6"
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["batchnorm", "status", "rule", "into", "reason"]
    assert "6 BatchNorm: 6 folded, 0 skipped" in lines
    assert "check passed" in lines
    # the folded torch model compared layer by layer at the 6 fold points; the ONNX file's weights certified
    torch_folded, onnx_run = check["comparisons"]
    assert onnx_run["layers"] is None and torch_folded["layers"]["points"] == 6
    assert torch_folded["layers"]["failed"] == 0 and torch_folded["layers"]["samples"] == 8
    assert any(ln.startswith("torch folded: per-layer comparison on 8 samples: 6 layer outputs within noise, worst")
               for ln in lines)
    assert check["certificate"]["passed"] and check["certificate"]["layers"] == 6
    assert any(ln.startswith("weights: 6 folded layer(s) within 0.5 ULP of the exact fold (worst 0.50 ULP")
               for ln in lines)
    outputs_only = run_cli("fold", str(src), "-o", str(tmp_path / "plain"), "--data", str(digits_npz), "--no-per-layer")
    assert outputs_only.returncode == 0, outputs_only.stderr
    plain = json.loads((tmp_path / "plain" / "digits_cnn.report.json").read_text())["check"]
    assert [c["layers"] for c in plain["comparisons"]] == [None, None] and plain["certificate"]["passed"]
    assert "per-layer" not in outputs_only.stdout


def test_folding_a_folded_checkpoint_finds_no_batchnorm(tmp_path):
    assert run_cli("fold", str(EXAMPLE), "-o", str(tmp_path), "--exporter", "torchscript").returncode == 0
    proc = run_cli("fold", str(tmp_path / "digits_cnn.folded.pt"), "-o", str(tmp_path / "again"),
                   "--exporter", "torchscript")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "again" / "digits_cnn.folded.report.json").read_text())
    assert report["summary"]["bn_total"] == 0 and report["source"]["format"] == "folded"


def test_check_failure_exits_1_and_writes_only_the_report(tmp_path):
    proc = run_cli("fold", str(EXAMPLE), "-o", str(tmp_path), "--atol", "0", "--rtol", "0", "--exporter", "torchscript")
    assert proc.returncode == 1, proc.stderr
    assert "check FAILED" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["digits_cnn.report.json"]
    assert json.loads((tmp_path / "digits_cnn.report.json").read_text())["check"]["passed"] is False


def test_inspect_writes_nothing(tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "m.pt")
    proc = run_cli("inspect", str(tmp_path / "m.pt"))
    assert proc.returncode == 0, proc.stderr
    assert "6 BatchNorm: 6 folded, 0 skipped" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def _state_dict_no_shape(tmp_path):
    return save_checkpoint(tmp_path / "noshape.pt", DigitsNet(), "models.digits:DigitsNet")


def _pickled(tmp_path):
    torch.save(DigitsNet().eval(), tmp_path / "pickled.pt")
    return tmp_path / "pickled.pt"


def _truncated(tmp_path):
    data = EXAMPLE.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    return tmp_path / "cut.pt"


def _text(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    return tmp_path / "notes.pt"


def _marker_pickle(tmp_path):
    from ..io.test_load import Marker

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Marker(tmp_path / "ran"), f)
    return tmp_path / "evil.pt"


def test_a_graph_recorded_on_one_branch_is_caught_by_the_check(tmp_path):
    # neither torch.fx nor torch.export captures the value test: one eager run is recorded, the
    # exported graph holds the branch the example took, and the check runs samples taking the other
    save_checkpoint(tmp_path / "dd.pt", DataDependent(), "tests.nets:DataDependent", (1, 3, 4, 4))
    proc = run_cli("fold", str(tmp_path / "dd.pt"), "--trust-code", "-o", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr
    assert "graph: recorded from one eager run" in proc.stdout
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["dd.report.json"]
    report = json.loads((tmp_path / "out" / "dd.report.json").read_text())
    assert report["tracer"] == "recorded run"
    onnx_row = next(o for c in report["check"]["comparisons"] if c["candidate"] == "onnx cpu" for o in c["outputs"])
    assert not onnx_row["passed"] and onnx_row["max_abs"] > 1


BAD_INPUTS = [
    ("missing file", lambda p: p / "absent.pt", [], ["absent.pt: no such file"]),
    ("not a checkpoint", _text, [], ["notes.pt: not a torch checkpoint"]),
    ("truncated", _truncated, [], ["cut.pt: truncated or corrupt torch checkpoint"]),
    ("pickle without flag", _pickled, [], ["pickled.pt: holds pickled Python objects", "--trust-pickle"]),
    ("code in pickle", _marker_pickle, [], ["evil.pt: holds pickled Python objects (Unsupported operand 149)", "--trust-pickle"]),
    ("no input shape", _state_dict_no_shape, [], ["noshape.pt: no input shape for x; pass --input-shape"]),
    ("arch does not resolve", lambda p: EXAMPLE, ["--arch", "models.nowhere:Net"],
     ["--arch 'models.nowhere:Net': cannot import 'models.nowhere'"]),
    ("input shape mismatch", lambda p: EXAMPLE, ["--input-shape", "1,3,8,8"],
     ["model DigitsNet fails on inputs of shape (2, 3, 8, 8)"]),
    ("data shape mismatch", lambda p: EXAMPLE, ["--data", "{npz}"],
     ["digits_test.npz: input 'x' has per-sample shape (1, 8, 8), but the input shape is (1, 1, 8, 9)"]),
    ("cuda on a cpu machine", lambda p: EXAMPLE, ["--provider", "cuda"], ["--provider cuda: CUDAExecutionProvider"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, digits_npz, case):
    name, make, extra, fragments = case
    if name == "cuda on a cpu machine":
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            pytest.skip("CUDA is available here; the refusal needs a machine without it")
    model = make(tmp_path)
    if name == "data shape mismatch":
        extra = ["--data", str(digits_npz), "--input-shape", "1,1,8,9"]
    out = tmp_path / "out"
    proc = run_cli("fold", str(model), "-o", str(out), *extra)
    assert_one_line_error(proc, *fragments)
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "ran").exists()


def test_an_output_that_is_the_input_is_refused(tmp_path):
    # output names derive from the input's (m.pt -> m.folded.pt, m.onnx, m.report.json), so they
    # collide with the input only through a link: out/m.onnx pointing at the input
    src = tmp_path / "m.pt"
    shutil.copy(EXAMPLE, src)
    before = src.read_bytes()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "m.onnx").symlink_to(src)
    proc = run_cli("fold", str(src), "-o", str(tmp_path / "out"), "--exporter", "torchscript")
    assert_one_line_error(proc, f"{tmp_path / 'out' / 'm.onnx'}: would overwrite the input {src}")
    assert src.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx"]


def test_trust_pickle_loads_a_pickled_module(tmp_path):
    torch.save(DigitsNet().eval(), tmp_path / "pickled.pt")
    proc = run_cli("fold", str(tmp_path / "pickled.pt"), "--trust-pickle", "--input-shape", "1,1,8,8",
                   "-o", str(tmp_path / "out"), "--exporter", "torchscript")
    assert proc.returncode == 0, proc.stderr
    assert "6 BatchNorm: 6 folded, 0 skipped" in proc.stdout


def test_unwritable_output_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_cli("fold", str(EXAMPLE), "-o", str(tmp_path / "file" / "sub"), "--exporter", "torchscript")
    assert_one_line_error(proc, "cannot create output folder")


def test_option_errors_come_before_reading_the_model(tmp_path):
    """A bad option is reported as such even when the model path is wrong too: options are checked
    before any file is read."""
    proc = run_cli("fold", str(tmp_path / "missing.pt"), "--samples", "0")
    assert_one_line_error(proc, "--samples 0: must be positive")


def test_check_prints_its_table_before_a_report_file_that_cannot_be_written(tmp_path, digits_npz):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_cli("check", str(EXAMPLE), str(EXAMPLE), "--data", str(digits_npz), "--json", str(blocker / "r.json"))
    assert proc.returncode == 2
    assert proc.stdout.rstrip().endswith("check passed") and f"{blocker}: cannot write here" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
