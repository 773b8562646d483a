"""Outputs as the README promises them: never over a file the input reads (external data, links),
never over a device, FIFO, socket or folder, and nothing left behind by a failed or interrupted run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnrt.errors import InputError
from bnrt.io.save import atomic_path, refuse_overwrite
from bnrt.io.source import files_read
from tools import child_env

from ..nets import ExportTrap
from ..conftest import ROOT, assert_one_line_error, bn_node, bn_params, onnx_graph, run_cli, save_checkpoint


def _external_onnx(folder: Path, location: str) -> Path:
    """Conv -> BN with every tensor in the external file ``location``."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn_node("h", "y")]
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2, 1, 1)).astype(np.float32), "w"), *bn_params(3, rng)]
    model = onnx_graph(nodes, inits, [None, 2, 4, 4])
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return folder / "m.onnx"


def test_files_read_lists_external_data_and_nothing_for_other_files(tmp_path):
    path = _external_onnx(tmp_path, "weights.bin")
    assert files_read(path) == [path, tmp_path / "weights.bin"]
    np.save(tmp_path / "x.npy", np.zeros(3))
    assert files_read(tmp_path / "x.npy") == [tmp_path / "x.npy"]


@pytest.mark.parametrize("command", ["fold", "run"])
def test_the_inputs_external_data_is_never_overwritten(tmp_path, command):
    # the external data file carries the name of an output: m.report.json for fold, -o for run
    path = _external_onnx(tmp_path, "m.report.json" if command == "fold" else "m.onnx.data")
    data = tmp_path / ("m.report.json" if command == "fold" else "m.onnx.data")
    before = data.read_bytes()
    np.save(tmp_path / "x.npy", np.ones((2, 2, 4, 4), np.float32))
    argv = (["fold", str(path)] if command == "fold"
            else ["run", str(path), "--input", str(tmp_path / "x.npy"), "-o", str(data)])
    proc = run_cli(*argv)
    assert_one_line_error(proc, f"{data.name}: would overwrite the input {data}")
    assert data.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", data.name, "x.npy"])


def test_links_to_an_input_are_the_input(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3))
    os.symlink(tmp_path / "x.npy", tmp_path / "soft.npz")
    os.link(tmp_path / "x.npy", tmp_path / "hard.npz")
    for out in ("soft.npz", "hard.npz"):
        with pytest.raises(InputError, match="would overwrite the input"):
            refuse_overwrite([tmp_path / out], [tmp_path / "x.npy"])


def _special(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"special.{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("kind,what", [("fifo", "a FIFO"), ("socket", "a socket"), ("dir", "a directory")])
def test_outputs_never_replace_a_file_that_is_not_regular(tmp_path, kind, what):
    target = _special(tmp_path, kind)
    mode = os.stat(target).st_mode
    proc = run_cli("check", str(ROOT / "models" / "digits_cnn.pt"), str(ROOT / "models" / "digits_cnn.pt"),
                   "--json", str(target))
    assert_one_line_error(proc, f"{target.name}: is {what}; bnrt writes its outputs as regular files only")
    assert os.stat(target).st_mode == mode
    with pytest.raises(InputError, match=f"is {what}"):
        with atomic_path(target):
            raise AssertionError("atomic_path must refuse before the block runs")


def test_a_device_is_refused_before_anything_is_written():
    with pytest.raises(InputError, match="/dev/null: is a character device"):
        with atomic_path(Path("/dev/null")):
            raise AssertionError("atomic_path must refuse before the block runs")
    with pytest.raises(InputError, match="/dev/full: is a character device"):
        refuse_overwrite([Path("/dev/full")], [])


def test_a_failed_fold_removes_the_folders_it_created(tmp_path):
    # (an export no exporter can make is not a failure: the folded checkpoint is written, exit 3;
    # a fold stopped during its export, after the folders were made: test_an_interrupted_fold_...)
    save_checkpoint(tmp_path / "trap.pt", ExportTrap().eval(), "tests.nets:ExportTrap", (1, 1, 6, 6))
    proc = run_cli("fold", str(tmp_path / "trap.pt"), "--trust-code", "--opset", "17", "-o", str(tmp_path / "a" / "b"))
    assert_one_line_error(proc, "--opset 17: the dynamo exporter needs opset 18 or newer")
    assert [p.name for p in tmp_path.iterdir()] == ["trap.pt"]


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_an_interrupted_fold_leaves_nothing_behind(tmp_path, sig, code, word):
    marker = tmp_path / "exporting"
    save_checkpoint(tmp_path / "slow.pt", ExportTrap().eval(), "tests.nets:ExportTrap", (1, 1, 6, 6),
                    arch_kwargs={"marker": str(marker)})
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("a user's file")
    for out in ("new/deeper", "kept"):
        proc = subprocess.Popen([sys.executable, "-m", "bnrt", "fold", str(tmp_path / "slow.pt"), "--trust-code",
                                 "--no-check", "-o", str(tmp_path / out)], cwd=ROOT, env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.communicate()
        marker.unlink()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err
        assert err.strip().splitlines()[-1] == f"bnrt: {word}"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "kept", "kept/mine.txt", "slow.pt"]


def test_an_interrupt_a_library_swallowed_still_stops_publishing(tmp_path):
    """Ctrl-C inside an exporter that catches it and tries another strategy: the command line
    recorded it (``errors.stopped``), so nothing is published and the command ends interrupted."""
    from bnrt.errors import forget_stops, raise_if_stopped, stopped
    from bnrt.io.save import publish

    stage, out = tmp_path / "stage", tmp_path / "out"
    stage.mkdir(), out.mkdir()
    (stage / "m.onnx").write_text("folded")
    try:
        raise stopped(KeyboardInterrupt())
    except KeyboardInterrupt:
        pass  # what the library did with it
    with pytest.raises(KeyboardInterrupt):
        publish(stage, ["m.onnx"], out)
    assert list(out.iterdir()) == [] and (stage / "m.onnx").exists()
    forget_stops()
    raise_if_stopped()  # nothing recorded any more
    assert publish(stage, ["m.onnx"], out) == [out / "m.onnx"]


def test_a_model_over_the_external_data_limit_keeps_its_tensors_beside_it(tmp_path, monkeypatch):
    """Protobuf cannot hold 2 GiB: a larger ONNX file (here: any, the limit lowered) is written with
    its tensors in NAME.onnx.data, published beside it, checked, run from the output folder, and a
    folded ONNX source likewise; the report lists the data file."""
    import json

    import onnxruntime as ort

    import bnrt
    from bnrt.io import save

    from ..conftest import EXAMPLE, trusted

    monkeypatch.setattr(save, "EXTERNAL_DATA_BYTES", 10_000)
    outcome = bnrt.fold_file(trusted(EXAMPLE), tmp_path / "out", exporter="torchscript")
    folder = tmp_path / "out"
    assert outcome.passed and sorted(p.name for p in folder.iterdir()) == [
        "digits_cnn.folded.pt", "digits_cnn.onnx", "digits_cnn.onnx.data", "digits_cnn.report.json"]
    assert json.loads((folder / "digits_cnn.report.json").read_text())["outputs"]["onnx_data"] == str(
        folder / "digits_cnn.onnx.data")
    model = onnx.load(str(folder / "digits_cnn.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"digits_cnn.onnx.data"} and (folder / "digits_cnn.onnx").stat().st_size < 10_000
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    got = ort.InferenceSession(str(folder / "digits_cnn.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    monkeypatch.setattr(save, "EXTERNAL_DATA_BYTES", 1 << 30)
    again = bnrt.fold_file(trusted(EXAMPLE), tmp_path / "inline", exporter="torchscript", check=None)
    assert not (tmp_path / "inline" / "digits_cnn.onnx.data").exists() and again.onnx_batchnorm_nodes == 0
    np.testing.assert_array_equal(got[0], ort.InferenceSession(str(tmp_path / "inline" / "digits_cnn.onnx"),
                                                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    monkeypatch.setattr(save, "EXTERNAL_DATA_BYTES", 10_000)
    source = tmp_path / "inline" / "digits_cnn.onnx"  # an ONNX source folded to a large file
    (tmp_path / "src").mkdir()
    onnx.save(onnx.load(str(source)), str(tmp_path / "src" / "m.onnx"))
    folded = bnrt.fold_file(trusted(tmp_path / "src" / "m.onnx"), tmp_path / "onnx_out")
    assert folded.passed and sorted(p.name for p in (tmp_path / "onnx_out").iterdir()) == [
        "m.folded.onnx", "m.folded.onnx.data", "m.report.json"]


def test_tensor_bytes_counts_every_tensor_by_its_dims_and_type():
    """Initializers, a sparse initializer's values and a Constant node's tensor, by dims x element
    size (a string tensor counts 0); the encoded model is that plus its structure."""
    from bnrt.io.save import tensor_bytes

    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.arange(5, dtype=np.int64), "s"),
                                       numpy_helper.from_array(np.arange(5, dtype=np.int64), "s_i"), [10])
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.zeros(10, np.float16)))
    text = helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.array(["abc"], dtype=object)))
    graph = helper.make_graph([const, text, helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 4])],
                              [numpy_helper.from_array(np.ones((3, 4), np.float32), "w")], sparse_initializer=[sparse])
    model = helper.make_model(graph)
    assert tensor_bytes(model) == 3 * 4 * 4 + 5 * 8 + 10 * 2
    assert tensor_bytes(model) < model.ByteSize()


def test_a_model_whose_structure_takes_it_over_the_limit_keeps_its_tensors_beside_it(tmp_path, monkeypatch):
    """The tensors' bytes alone under the limit, the encoded model over it (node names): external data
    all the same, as the encoded size says."""
    from bnrt.io import save

    nodes = [helper.make_node("Identity", [f"v{i}"], [f"v{i + 1}"], name="n" * 200 + str(i)) for i in range(50)]
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["v0"]), *nodes], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [256])],
                              [helper.make_tensor_value_info("v50", onnx.TensorProto.FLOAT, [256])],
                              [numpy_helper.from_array(np.ones(256, np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert save.tensor_bytes(model) == 1024 and model.ByteSize() > 10_000
    monkeypatch.setattr(save, "EXTERNAL_DATA_BYTES", 5_000)
    with atomic_path(tmp_path / "m.onnx") as tmp:
        data = save.save_onnx(model, tmp, "m.onnx")
    assert data == tmp_path / "m.onnx.data" and data.stat().st_size == 1024
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), np.ones(256, np.float32))
