"""A corpus of bad inputs across every command: each gets exit code 2, one line on stderr naming
the file and the problem, no traceback, and leaves no output file behind."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import bnrt

from ..conftest import EXAMPLE, assert_one_line_error, run_cli, trusted


def _state(tmp: Path, name: str, mutate) -> Path:
    ckpt = torch.load(EXAMPLE, weights_only=True)
    mutate(ckpt)
    torch.save(ckpt, tmp / name)
    return tmp / name


def _cycle_onnx(tmp: Path) -> Path:
    nodes = [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["x", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(tmp / "cycle.onnx"))
    return tmp / "cycle.onnx"


def _missing_initializer_onnx(tmp: Path) -> Path:
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]),
             helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"])]
    inits = [numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")] + [
        numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("s", "b", "m")]  # "v" is missing
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp / "noinit.onnx"))
    return tmp / "noinit.onnx"


def _folded_onnx(tmp: Path) -> Path:
    bnrt.fold_file(trusted(EXAMPLE), tmp / "good", check=None, exporter="torchscript")
    return tmp / "good" / "digits_cnn.onnx"


def _copy(tmp: Path, src: Path, name: str) -> Path:
    (tmp / name).write_bytes(src.read_bytes())
    return tmp / name


def _truncated(tmp: Path, src: Path, name: str) -> Path:
    data = src.read_bytes()
    (tmp / name).write_bytes(data[: len(data) // 2])
    return tmp / name


def _zip(tmp: Path) -> Path:
    with zipfile.ZipFile(tmp / "notes.pt", "w") as z:
        z.writestr("readme.txt", "not a model")
    return tmp / "notes.pt"


def _npz(tmp: Path, name: str, **arrays) -> Path:
    np.savez(tmp / name, **arrays)
    return tmp / name


def _file(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def _pickled_function_arch(tmp: Path, arch: str) -> Path:
    torch.save({"state_dict": torch.load(EXAMPLE, weights_only=True)["state_dict"], "arch": arch,
                "input_shape": [1, 1, 8, 8]}, tmp / "arch.pt")
    return tmp / "arch.pt"


def _pickled_module(tmp: Path) -> Path:
    torch.save(bnrt.load_model(EXAMPLE, trust_code=True).model, tmp / "module.pt")
    return tmp / "module.pt"


def _beside_code(tmp: Path) -> Path:
    """A model shared as a weights file beside its modeling code, which leaves a marker on import."""
    folder = tmp / "shared"
    folder.mkdir()
    (folder / "modeling_bnrt_corpus.py").write_text(
        f"import pathlib\npathlib.Path({str(tmp / 'MARKER')!r}).write_text('ran')\n"
        "from models.digits import DigitsNet as Net\n")
    torch.save({"state_dict": torch.load(EXAMPLE, weights_only=True)["state_dict"],
                "arch": "modeling_bnrt_corpus:Net", "input_shape": [1, 1, 8, 8]}, folder / "model.pt")
    return folder / "model.pt"


def _bn_onnx(tmp: Path, name: str, var: list[float], epsilon: float = 1e-5) -> Path:
    """Conv -> BatchNormalization with the given variance and epsilon."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2, 1, 1)).astype(np.float32), "w")] + [
        numpy_helper.from_array(np.asarray(v, np.float32), n)
        for n, v in (("s", [1, 1, 1]), ("b", [0, 0, 0]), ("m", [0, 0, 0]), ("v", var))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]),
             helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"], name="bn", epsilon=epsilon)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3, 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp / name))
    return tmp / name


def _linear_ckpt(tmp: Path, name: str, **arch_kwargs) -> Path:
    torch.save({"state_dict": torch.nn.Linear(4, 2).state_dict(), "arch": "torch.nn:Linear",
                "arch_kwargs": {"in_features": 4, "out_features": 2, **arch_kwargs}, "input_shape": [1, 4]}, tmp / name)
    return tmp / name


def _fifo(tmp: Path, name: str) -> Path:
    os.mkfifo(tmp / name)
    return tmp / name


def _digits_npz(tmp: Path) -> Path:
    return _npz(tmp, "digits.npz", x=np.zeros((4, 1, 8, 8), np.float32))


# (id, argv builder, fragments of the one error line, paths that must not exist afterwards)
CORPUS = [
    ("fold truncated checkpoint", lambda t: ["fold", _truncated(t, EXAMPLE, "cut.pt"), "-o", t / "o"],
     ["cut.pt: truncated or corrupt torch checkpoint"], ["o"]),
    ("fold random bytes", lambda t: ["fold", _file(t, "rand.pt", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))), "-o", t / "o"],
     ["rand.pt: not a torch checkpoint"], ["o"]),
    ("fold zip that is not a torch archive", lambda t: ["fold", _zip(t), "-o", t / "o"],
     ["notes.pt: a zip archive but not a torch checkpoint"], ["o"]),
    ("fold NaN running_var", lambda t: ["fold", _state(t, "nan.pt", lambda c: c["state_dict"]["stem.1.running_var"].__setitem__(0, float("nan"))), "-o", t / "o"],
     ["nan.pt: BatchNorm 'stem.1': running_var holds NaN or Inf"], ["o"]),
    ("fold Inf running_mean", lambda t: ["fold", _state(t, "inf.pt", lambda c: c["state_dict"]["fc_bn.running_mean"].__setitem__(3, float("inf"))), "-o", t / "o"],
     ["inf.pt: BatchNorm 'fc_bn': running_mean holds NaN or Inf"], ["o"]),
    ("fold negative running_var", lambda t: ["fold", _state(t, "neg.pt", lambda c: c["state_dict"]["depthwise.1.running_var"].__setitem__(2, -1.0)), "-o", t / "o"],
     ["neg.pt: BatchNorm 'depthwise.1': running_var is negative"], ["o"]),
    ("fold mismatched --input-shape", lambda t: ["fold", EXAMPLE, "--input-shape", "1,2,8,8", "-o", t / "o"],
     ["digits_cnn.pt: model DigitsNet fails on inputs of shape (2, 2, 8, 8)"], ["o"]),
    ("fold unwritable output folder", lambda t: ["fold", EXAMPLE, "-o", _file(t, "plain", b"x") / "sub"],
     ["cannot create output folder"], []),
    ("fold pickled module without --trust-pickle", lambda t: ["fold", _pickled_module(t), "-o", t / "o"],
     ["module.pt: holds pickled Python objects", "--trust-pickle"], ["o"]),
    ("fold code beside the checkpoint", lambda t: ["fold", _beside_code(t), "-o", t / "o"],
     ["model.pt: arch 'modeling_bnrt_corpus:Net'", "modeling_bnrt_corpus.py", "--trust-code"], ["o", "MARKER"]),
    ("inspect code beside the checkpoint", lambda t: ["inspect", _beside_code(t)],
     ["model.pt: arch 'modeling_bnrt_corpus:Net'", "modeling_bnrt_corpus.py", "--trust-code"], ["MARKER"]),
    ("check code beside the checkpoint", lambda t: ["check", _beside_code(t), EXAMPLE, "--json", t / "r.json"],
     ["model.pt: arch 'modeling_bnrt_corpus:Net'", "--trust-code"], ["r.json", "MARKER"]),
    ("calibrate code beside the checkpoint", lambda t: ["calibrate", _beside_code(t), "--data", _digits_npz(t), "-o", t / "c.pt"],
     ["model.pt: arch 'modeling_bnrt_corpus:Net'", "--trust-code"], ["c.pt", "MARKER"]),
    ("bench code beside the checkpoint", lambda t: ["bench", _beside_code(t), "--json", t / "b.json"],
     ["model.pt: arch 'modeling_bnrt_corpus:Net'", "--trust-code"], ["b.json", "MARKER"]),
    ("fold arch naming a function", lambda t: ["fold", _pickled_function_arch(t, "torch:zeros"), "-o", t / "o"],
     ["arch 'torch:zeros' is not an nn.Module subclass"], ["o"]),
    ("fold arch naming a non-Module class", lambda t: ["fold", _pickled_function_arch(t, "torch:Tensor"), "-o", t / "o"],
     ["arch 'torch:Tensor' is not an nn.Module subclass"], ["o"]),
    ("fold ONNX with a cycle", lambda t: ["fold", _cycle_onnx(t), "-o", t / "o"],
     ["cycle.onnx: invalid ONNX graph"], ["o"]),
    ("fold ONNX with a missing initializer", lambda t: ["fold", _missing_initializer_onnx(t), "-o", t / "o"],
     ["noinit.onnx: invalid ONNX graph"], ["o"]),
    ("inspect a directory", lambda t: ["inspect", t], ["is a directory, expected a model file"], []),
    ("inspect data with strings", lambda t: ["inspect", EXAMPLE, "--data", _npz(t, "s.npz", x=np.array(["a", "b"]))],
     ["s.npz: array 'x' has dtype <U1, expected numbers"], []),
    ("check data of the wrong shape", lambda t: ["check", EXAMPLE, EXAMPLE, "--data", _npz(t, "w.npz", x=np.zeros((2, 1, 4, 4), np.float32)), "--json", t / "r.json"],
     ["w.npz: input 'x' has per-sample shape (1, 4, 4)"], ["r.json"]),
    ("check a missing candidate", lambda t: ["check", EXAMPLE, t / "absent.onnx", "--json", t / "r.json"],
     ["absent.onnx: no such file"], ["r.json"]),
    ("check a truncated ONNX", lambda t: ["check", EXAMPLE, _truncated(t, _folded_onnx(t), "cut.onnx"), "--json", t / "r.json"],
     ["cut.onnx: onnxruntime cannot load it"], ["r.json"]),
    ("calibrate data that does not fit", lambda t: ["calibrate", EXAMPLE, "--data", _npz(t, "c.npz", x=np.zeros((3, 8, 8), np.float32)), "-o", t / "c.pt"],
     ["c.npz: the model cannot run on a batch of shape (3, 8, 8)"], ["c.pt"]),
    ("calibrate output equal to the input", lambda t: ["calibrate", _copy(t, EXAMPLE, "m.pt"), "--data", _digits_npz(t), "-o", t / "m.pt"],
     ["m.pt: would overwrite the input"], []),
    ("calibrate a data file that is not numpy", lambda t: ["calibrate", EXAMPLE, "--data", _file(t, "d.npz", b"text"), "-o", t / "c.pt"],
     ["d.npz: not a readable .npz or .npy file"], ["c.pt"]),
    ("run integer data on a float model", lambda t: ["run", _folded_onnx(t), "--input", _npz(t, "i.npz", x=np.zeros((2, 1, 8, 8), np.int64)), "-o", t / "out.npz"],
     ["i.npz: input 'x' expects float32 (N, 1, 8, 8), got int64 (2, 1, 8, 8)"], ["out.npz"]),
    ("run output equal to the input", lambda t: ["run", _folded_onnx(t), "--input", _digits_npz(t), "-o", t / "digits.npz"],
     ["digits.npz: would overwrite the input"], []),
    ("run a truncated ONNX", lambda t: ["run", _truncated(t, _folded_onnx(t), "cut.onnx"), "--input", _digits_npz(t), "-o", t / "out.npz"],
     ["cut.onnx: onnxruntime cannot load it"], ["out.npz"]),
    ("fold an empty ONNX file", lambda t: ["fold", _file(t, "empty.onnx", b""), "-o", t / "o"],
     ["empty.onnx: empty file, not an ONNX model"], ["o"]),
    ("inspect an ONNX file of other protobuf bytes", lambda t: ["inspect", _file(t, "other.onnx", b"\x08\x07")],
     ["other.onnx: not an ONNX model (it declares no opset)"], []),
    ("fold ONNX with a NaN variance", lambda t: ["fold", _bn_onnx(t, "nanvar.onnx", [1, float("nan"), 1]), "-o", t / "o"],
     ["nanvar.onnx: BatchNormalization 'bn': var holds NaN or Inf"], ["o"]),
    ("fold ONNX with a zero variance and epsilon 0", lambda t: ["fold", _bn_onnx(t, "zero.onnx", [1, 0, 1], 0.0), "-o", t / "o"],
     ["zero.onnx: BatchNormalization 'bn': var + eps (0) is 0 in 1 channel(s), e.g. channel 1"], ["o"]),
    ("inspect ONNX with a variance of -0.0 and epsilon 0", lambda t: ["inspect", _bn_onnx(t, "negzero.onnx", [1, 1, -0.0], 0.0)],
     ["negzero.onnx: BatchNormalization 'bn': var + eps (0) is 0 in 1 channel(s), e.g. channel 2"], []),
    ("fold arch_kwargs too large to build", lambda t: ["fold", _linear_ckpt(t, "huge.pt", in_features=10**30), "-o", t / "o"],
     ["huge.pt: building the architecture failed (TypeError: "], ["o"]),
    ("fold state_dict of another shape", lambda t: ["fold", _linear_ckpt(t, "wide.pt", in_features=5), "-o", t / "o"],
     ["wide.pt: state_dict does not match the architecture: shape of weight (2, 4) in the file, (2, 5) in the architecture"], ["o"]),
    ("check int8 data on a float ONNX model", lambda t: ["check", EXAMPLE, _folded_onnx(t), "--data", _npz(t, "i8.npz", x=np.zeros((2, 1, 8, 8), np.int8)), "--json", t / "r.json"],
     ["i8.npz: input 'x' holds int8 values, the model expects float32"], ["r.json"]),
    ("check data holding NaN", lambda t: ["check", EXAMPLE, EXAMPLE, "--data", _npz(t, "nan.npz", x=np.full((2, 1, 8, 8), np.nan, np.float32)), "--json", t / "r.json"],
     ["nan.npz: input 'x' holds NaN or Inf (128 values, first in sample 0)", "--allow-nonfinite"], ["r.json"]),
    ("calibrate data holding Inf", lambda t: ["calibrate", EXAMPLE, "--data", _npz(t, "inf.npz", x=np.full((2, 1, 8, 8), np.inf, np.float32)), "-o", t / "c.pt"],
     ["inf.npz: input 'x' holds NaN or Inf"], ["c.pt"]),
    ("run onto a FIFO", lambda t: ["run", _folded_onnx(t), "--input", _digits_npz(t), "-o", _fifo(t, "out.npz")],
     ["out.npz: is a FIFO; bnrt writes its outputs as regular files only"], []),
    ("serve a missing path", lambda t: ["serve", t / "nothing", "--port", "0"], ["nothing: no such ONNX file or model repository"], []),
    ("serve an empty repository", lambda t: ["serve", t, "--port", "0"], ["no models found (expected REPO/NAME/VERSION/model.onnx)"], []),
    ("serve random bytes", lambda t: ["serve", _file(t, "r.onnx", b"\x00garbage" * 50), "--port", "0"], ["r.onnx: onnxruntime cannot load it"], []),
    ("triton on a file that is not ONNX", lambda t: ["triton", _file(t, "n.onnx", b"nope"), "-o", t / "repo"], ["n.onnx: onnxruntime cannot load it"], ["repo"]),
    ("triton into a path under a file", lambda t: ["triton", _folded_onnx(t), "-o", _file(t, "f", b"x") / "repo"], ["repo: cannot create output folder"], []),
]


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input(tmp_path, case):
    name, argv, fragments, absent = case
    paths = argv(tmp_path)
    args = [str(a) for a in paths]
    before = {p for p in tmp_path.rglob("*")}
    proc = run_cli(*args, trust_code="code beside" not in name)
    assert_one_line_error(proc, *fragments)
    line = proc.stderr.strip()
    assert any(p.name in line for p in paths if isinstance(p, Path)), f"names no file: {line}"
    for name in absent:
        assert not (tmp_path / name).exists() or (tmp_path / name).is_dir() and not any((tmp_path / name).iterdir())
    leftovers = {p for p in tmp_path.rglob("*") if p not in before}
    assert not [p for p in leftovers if p.name.startswith(".")], leftovers  # no temp files left behind


def test_corpus_covers_every_command():
    assert len(CORPUS) == 45
    commands = {c[0].split()[0] for c in CORPUS}
    assert commands == {"fold", "inspect", "check", "calibrate", "run", "serve", "triton", "bench"}


def test_unpickling_code_never_runs_without_trust(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name, payload in (("a.pt", {"state_dict": Evil()}), ("b.pt", Evil())):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(payload, f)
        for command in (["fold", str(tmp_path / name)], ["inspect", str(tmp_path / name)],
                        ["check", str(tmp_path / name), str(tmp_path / name)]):
            proc = run_cli(*command)
            assert_one_line_error(proc, f"{name}: holds pickled Python objects", "--trust-pickle")
    assert not marker.exists()
