"""`bnrt check` and the verify metrics as a product: numbers, tolerances, localisation, schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import bnrt
from bnrt.io.data import random_inputs
from bnrt.errors import InputError
from bnrt.io.export import count_ops
from bnrt.io.data import InputSpec
from bnrt.verify.check import CheckOptions, check_files
from bnrt.verify.metrics import Tolerances, compare_output
from models.digits import digits_split

from ..conftest import report_schema, EXAMPLE, assert_one_line_error, run_cli, save_checkpoint, trusted

SCHEMA = report_schema("check-3")


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """The example folded once with the dynamo exporter (its ONNX carries module name scopes)."""
    out = tmp_path_factory.mktemp("folded")
    _, _, x, y = digits_split()
    np.savez(out / "digits.npz", x=x, y=y)
    outcome = bnrt.fold_file(trusted(EXAMPLE), out, check=CheckOptions(InputSpec(data=out / "digits.npz")))
    assert outcome.passed
    return out


def test_cosine_sqnr_and_topk_by_hand():
    ref = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    cand = np.array([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    m = compare_output("y", ref, cand, atol=0.0, rtol=0.0, top_k=2)
    # dot = 9+2+2+0 + 14 = 27; |r| = |c| = sqrt(28)
    assert m.cosine == pytest.approx(27 / 28)
    # signal 28, noise 1 + 1 = 2
    assert m.sqnr_db == pytest.approx(10 * np.log10(28 / 2))
    assert m.top1_agreement == 1.0
    # sample 0: top2 {0,1} vs {0,2} -> 1/2; sample 1: {3,2} vs {3,2} -> 1
    assert m.topk_agreement == pytest.approx(0.75)
    assert m.shape == [2, 4] and not m.passed


def test_identical_outputs_have_no_sqnr_and_cosine_one():
    x = np.arange(6.0).reshape(2, 3)
    m = compare_output("y", x, x.copy(), 0.0, 0.0)
    assert (m.max_abs, m.cosine, m.sqnr_db, m.passed) == (0.0, 1.0, None, True)


def test_per_output_tolerances():
    tol = Tolerances(1e-4, 1e-3, {"logits": (1e-2, None), "emb": (None, 0.5)})
    assert tol.fixed("logits") == (1e-2, 1e-3)
    assert tol.fixed("emb") == (1e-4, 0.5)
    assert tol.fixed("other") == (1e-4, 1e-3)
    noise_default = Tolerances(per_output={"emb": (None, 0.5)})
    assert (noise_default.fixed("emb"), noise_default.fixed("logits"), noise_default.factor) == ((1e-4, 0.5), None, 8.0)


def test_random_input_distributions():
    u = random_inputs([(1, 1000)], 4, seed=1, distribution="uniform", val_range=(-2.0, 3.0)).inputs[0]
    assert u.min() >= -2.0 and u.max() < 3.0 and u.dtype == np.float32 and u.mean() == pytest.approx(0.5, abs=0.1)
    n = random_inputs([(1, 1000)], 4, seed=1, val_range=(0.0, 6.0)).inputs[0]
    assert n.min() >= 0.0 and n.max() <= 6.0 and n.mean() == pytest.approx(3.0, abs=0.1)
    i = random_inputs([(1, 50)], 4, seed=1, dtypes=[np.dtype(np.int64)], val_range=(2, 5)).inputs[0]
    assert i.dtype == np.int64 and set(np.unique(i)) == {2, 3, 4}
    with pytest.raises(InputError, match="the low end must be below the high end"):
        random_inputs([(1, 2)], 1, val_range=(1.0, 1.0))


def test_check_cli_passes_and_json_validates(tmp_path, folded):
    proc = run_cli("check", str(EXAMPLE), str(folded / "digits_cnn.onnx"), "--data", str(folded / "digits.npz"),
                   "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png"),
                   "--atol", "output:1e-3", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(report, SCHEMA)
    out = report["comparisons"][0]["outputs"][0]
    assert report["passed"] and report["samples"] == 360 and report["top_k"] == 3
    assert (out["atol"], out["rtol"]) == (1e-3, 1e-3)
    assert out["cosine"] > 0.999999 and out["sqnr_db"] > 100 and out["top1_agreement"] == 1.0
    assert report["accuracy"]["reference torch"] == report["accuracy"]["candidate onnx cpu"]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "check passed" in proc.stdout


def _corrupt_checkpoint(src: Path, dst: Path) -> None:
    ckpt = torch.load(src, weights_only=True)
    ckpt["state_dict"]["block.body.1.0.weight"][3] *= 1.01
    torch.save(ckpt, dst)


def _corrupt_onnx(src: Path, dst: Path) -> None:
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name == "block.body.1.0.weight":
            array = numpy_helper.to_array(init).copy()
            array[3] *= 1.01
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(dst))


@pytest.mark.parametrize("kind", ["torch", "onnx", "torchscript onnx"])
def test_corrupted_fold_is_caught_and_the_layer_named(tmp_path, folded, kind):
    if kind == "torch":
        bad = tmp_path / "bad.folded.pt"
        _corrupt_checkpoint(folded / "digits_cnn.folded.pt", bad)
    elif kind == "onnx":
        bad = tmp_path / "bad.onnx"
        _corrupt_onnx(folded / "digits_cnn.onnx", bad)
    else:  # node names like /block/body/body.1/body.1.0/Conv instead of name-scope metadata
        bnrt.fold_file(trusted(EXAMPLE), tmp_path / "ts", check=None, exporter="torchscript")
        bad = tmp_path / "bad.onnx"
        _corrupt_onnx(tmp_path / "ts" / "digits_cnn.onnx", bad)
    proc = run_cli("check", str(EXAMPLE), str(bad), "--data", str(folded / "digits.npz"), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 1, proc.stderr
    assert "first divergent module 'block.body.1.0' (seen at its folded BatchNorm 'block.body.1.1')" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["comparisons"][0]["divergence"]["layer"] == "block.body.1.0"
    assert report["passed"] is False


def test_torchscript_scope_names_resolve_to_module_paths():
    from bnrt.verify.localise import resolve_scope

    known = {"stem", "stem.0", "block", "block.body", "block.body.0", "block.body.0.0", "block.act", "fc"}
    assert resolve_scope("/stem/stem.0", known) == "stem.0"
    assert resolve_scope("/block/body/body.0/body.0.0", known) == "block.body.0.0"
    assert resolve_scope("/block/act", known) == "block.act"
    assert resolve_scope("/nope", known) is None
    assert resolve_scope("block.body", known) == "block.body"


def test_fold_names_the_layer_when_its_own_check_fails(tmp_path):
    proc = run_cli("fold", str(EXAMPLE), "-o", str(tmp_path), "--atol", "0", "--rtol", "0", "--exporter", "torchscript")
    assert proc.returncode == 1
    report = json.loads((tmp_path / "digits_cnn.report.json").read_text())
    jsonschema.validate(report["check"], SCHEMA)
    divergence = report["check"]["comparisons"][0]["divergence"]
    assert divergence is not None and divergence["module"] == "stem.1"  # first place float rounding shows


def test_save_inputs_reproduces_the_report(tmp_path, folded):
    first = check_files(trusted(EXAMPLE), trusted(folded / "digits_cnn.folded.pt"), CheckOptions(InputSpec(samples=16, seed=7)),
                        save_inputs=tmp_path / "in.npz")
    saved = np.load(tmp_path / "in.npz")
    assert saved.files == ["x"] and saved["x"].shape == (16, 1, 8, 8)
    again = check_files(trusted(EXAMPLE), trusted(folded / "digits_cnn.folded.pt"), CheckOptions(InputSpec(data=tmp_path / "in.npz")))
    assert again.comparisons[0].outputs[0].max_abs == first.comparisons[0].outputs[0].max_abs


def test_two_onnx_files_and_torch_vs_torch(folded, tmp_path):
    # the unfolded model exported with its BatchNorms against bnrt's folded ONNX: two different graphs
    unfolded = tmp_path / "unfolded.onnx"
    bnrt.export_onnx(bnrt.load_model(EXAMPLE, trust_code=True).model, (torch.randn(2, 1, 8, 8),), unfolded,
                     names=(["x"], ["output"]), exporter="torchscript")
    assert count_ops(onnx.load(str(unfolded)), "BatchNormalization") > 0  # the exporter folds some itself
    report = check_files(unfolded, folded / "digits_cnn.onnx", CheckOptions(InputSpec(samples=64)))
    out = report.comparisons[0].outputs[0]
    assert report.passed and report.noise == "rounding" and out.criterion == "noise"
    assert 0 < out.max_abs < 1e-4 and out.top1_agreement == 1.0 and out.error <= 8 * out.floor + 1e-5
    report = check_files(trusted(EXAMPLE), trusted(folded / "digits_cnn.folded.pt"), CheckOptions(InputSpec(samples=8, distribution="uniform")))
    assert report.passed and report.source == "random uniform, seed 0"


def _other_model_onnx(path: Path, channels: int, name: str = "x") -> Path:
    model = torch.nn.Sequential(torch.nn.Conv2d(channels, 2, 1), torch.nn.Flatten(), torch.nn.Linear(128, 10))
    bnrt.export_onnx(model.eval(), (torch.randn(2, channels, 8, 8),), path, names=([name], ["output"]),
                     exporter="torchscript")
    return path


@pytest.mark.parametrize("case", ["shape", "name", "data"])
def test_mismatched_sides_and_bad_data_are_one_line_exit_2(tmp_path, case):
    args = [str(EXAMPLE)]
    if case == "shape":
        args.append(str(_other_model_onnx(tmp_path / "c.onnx", 3)))
        fragment = "input 'x' has shape (N, 3, 8, 8), "
    elif case == "name":
        args.append(str(_other_model_onnx(tmp_path / "c.onnx", 1, "image")))
        fragment = "input names image differ from"
    else:
        (tmp_path / "d.npz").write_bytes(b"junk")
        args += [str(EXAMPLE), "--data", str(tmp_path / "d.npz")]
        fragment = "d.npz: not a readable .npz or .npy file"
    proc = run_cli("check", *args, "--json", str(tmp_path / "r.json"))
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "r.json").exists()


def test_report_json_never_holds_non_finite_numbers(tmp_path):
    from bnrt.io.save import write_json

    write_json(tmp_path / "r.json", {"a": float("inf"), "b": [float("nan"), 1.0]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "b": [None, 1.0]}


# --- the noise-aware criterion on a deep network with large activations ----------------------------

@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 24-layer network where nothing folds (tests/nets.py DeepNoFold), its checkpoint, and a copy
    with one conv's weights scaled by 1.01."""
    from ..nets import DeepNoFold

    tmp = tmp_path_factory.mktemp("deep")
    model = DeepNoFold().eval()
    good = save_checkpoint(tmp / "deep.pt", model, "tests.nets:DeepNoFold", (1, 3, 16, 16))
    with torch.no_grad():
        model.blocks[11][0].weight.mul_(1.01)
    bad = save_checkpoint(tmp / "bad.pt", model, "tests.nets:DeepNoFold", (1, 3, 16, 16))
    return tmp, good, bad


def test_deep_network_with_nothing_folded_passes_where_fixed_tolerances_raise_a_false_alarm(deep):
    tmp, good, _ = deep
    proc = run_cli("fold", str(good), "-o", str(tmp / "out"), "--exporter", "torchscript", "--samples", "16")
    assert proc.returncode == 0, "noise criterion: " + proc.stdout[-3000:] + proc.stderr
    report = json.loads((tmp / "out" / "deep.report.json").read_text())
    assert (report["summary"]["folded"], report["summary"]["skipped"]) == (0, 24)
    check = report["check"]
    jsonschema.validate(check, SCHEMA)
    assert check["noise"] == "float64"
    outputs = [o for c in check["comparisons"] for o in c["outputs"]]
    assert all(o["criterion"] == "noise" and o["floor"] > 0 and o["ratio"] <= 8 for o in outputs), outputs
    fixed = run_cli("fold", str(good), "-o", str(tmp / "fixed"), "--exporter", "torchscript", "--samples", "16",
                    "--atol", "1e-4", "--rtol", "1e-3")
    # the old default criterion fails a model bnrt did not change
    assert fixed.returncode == 1, "fixed tolerances: " + fixed.stdout[-3000:]


def test_one_conv_off_by_one_percent_fails_and_is_localised(deep):
    tmp, good, bad = deep
    proc = run_cli("check", str(good), str(bad), "--samples", "16", "--json", str(tmp / "r.json"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((tmp / "r.json").read_text())
    jsonschema.validate(report, SCHEMA)
    (out,) = report["comparisons"][0]["outputs"]
    assert out["criterion"] == "noise" and out["ratio"] > 100
    assert report["comparisons"][0]["divergence"]["module"].startswith("blocks.11")


def test_onnx_sources_use_the_rounding_floor(deep, tmp_path):
    tmp, good, bad = deep
    for name, ckpt in (("good", good), ("bad", bad)):
        assert run_cli("fold", str(ckpt), "-o", str(tmp_path / name), "--no-check", "--exporter",
                       "torchscript").returncode == 0
    good_onnx, bad_onnx = tmp_path / "good" / "deep.onnx", tmp_path / "bad" / "bad.onnx"
    same = run_cli("check", str(good_onnx), str(good_onnx), "--samples", "8", "--json", str(tmp_path / "same.json"))
    assert same.returncode == 0, same.stdout
    report = json.loads((tmp_path / "same.json").read_text())
    assert report["noise"] == "rounding" and report["comparisons"][0]["outputs"][0]["error"] == 0.0
    assert report["comparisons"][0]["outputs"][0]["floor"] > 0
    differ = run_cli("check", str(good_onnx), str(bad_onnx), "--samples", "8")
    assert differ.returncode == 1, differ.stdout


def test_nan_in_the_data_is_refused_and_when_allowed_cannot_hide_a_difference(folded, tmp_path):
    # two different models and data whose noise-floor samples hold a NaN: masking NaN positions used
    # to leave nothing to compare on those samples, and the check passed
    model = onnx.load(str(folded / "digits_cnn.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.05), init.name))
    onnx.save(model, str(tmp_path / "other.onnx"))
    x = np.load(folded / "digits.npz")["x"][:64].copy()
    x[:8, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    args = ["check", str(folded / "digits_cnn.onnx"), str(tmp_path / "other.onnx"), "--data", str(tmp_path / "nan.npz"),
            "--json", str(tmp_path / "r.json")]
    proc = run_cli(*args)
    assert_one_line_error(proc, "nan.npz: input 'x' holds NaN or Inf (8 values, first in sample 0)", "--allow-nonfinite")
    assert not (tmp_path / "r.json").exists()
    proc = run_cli(*args, "--allow-nonfinite")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (out,) = json.loads((tmp_path / "r.json").read_text())["comparisons"][0]["outputs"]
    assert not out["passed"] and out["max_abs"] > 1e-3


def test_a_model_that_outputs_nan_never_passes_its_own_check(tmp_path):
    # a BN with eps=0 and a zero variance: refused by the health check before anything is written
    model = bnrt.load_model(EXAMPLE, trust_code=True).model
    bn = model.fc_bn
    bn.eps = 0.0
    with torch.no_grad():
        bn.running_var[4] = -0.0
    path = tmp_path / "zero.pt"
    torch.save({"model": model, "input_shape": [1, 1, 8, 8]}, path)  # pickled: eps is not in a state_dict
    proc = run_cli("fold", str(path), "-o", str(tmp_path / "o"), "--trust-pickle")
    assert_one_line_error(proc, "zero.pt: BatchNorm 'fc_bn': running_var + eps (0) is 0 in 1 channel(s), e.g. channel 4")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    # the same model compared with itself: its outputs are NaN, a finding and not a pass
    proc = run_cli("check", str(path), str(path), "--json", str(tmp_path / "r.json"), "--trust-pickle")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (out,) = json.loads((tmp_path / "r.json").read_text())["comparisons"][0]["outputs"]
    assert not out["passed"] and out["problem"].startswith("the reference itself outputs NaN or Inf")


@pytest.mark.parametrize("n, threads, parts", [(3, 2, [(0, 2), (2, 3)]), (8, 2, [(0, 8)]), (1, 2, [(0, 1)]),
                                               (5, 4, [(0, 4), (4, 5)]), (3, 4, [(0, 1), (1, 2), (2, 3)]),
                                               (3, 1, [(0, 3)])])
def test_the_float64_truth_runs_whole_samples_per_thread(monkeypatch, n, threads, parts):
    """A float64 batch that does not split evenly over torch's threads runs as a multiple of them
    plus single samples; the outputs are the batch's own, row for row, to float64's rounding."""
    from bnrt.verify import torchside

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert [(p.start, p.stop) for p in torchside._thread_parts(n, model)] == parts
    x = np.random.default_rng(0).standard_normal((n, 3, 9, 9)).astype(np.float32)
    (out,) = torchside.float64_noise(model).runner([x])
    with torch.inference_mode():
        whole = copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()
    assert out.dtype == np.float64 and out.shape == whole.shape
    np.testing.assert_allclose(out, whole, rtol=1e-13, atol=1e-13)
