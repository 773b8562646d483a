"""The files users ship, each written by the library that writes it in their ecosystem: TorchScript
archives (torch.jit), ExportedPrograms (torch.export.save), safetensors (the safetensors package),
Lightning-style checkpoints (prefixed keys, written as Lightning lays them out), Ultralytics-style
``best.pt`` (a pickled float16 module under ``ema``), float16/bfloat16 state_dicts. Each folds to 0
BatchNormalization nodes with a passing check, and the ONNX agrees with the original at batch 1 and
batch 4 (run here, not only by the check)."""

from __future__ import annotations

import copy
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import bnrt
from bnrt.errors import InputError, OptionError
from bnrt.io.export import count_ops
from bnrt.io.source import ModelSource, file_kind
from bnrt.io.statedict import match_keys
from tests.conftest import assert_one_line_error, run_cli
from tests.nets import ShipNet

SHAPE = (3, 16, 16)


def _agrees_at_batch_1_and_4(onnx_path: Path, reference: nn.Module) -> None:
    """The written ONNX against ``reference`` (float32) at batch 1 and 4."""
    model = onnx.load(str(onnx_path))
    assert count_ops(model, "BatchNormalization") == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 4):
        x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = reference(x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        assert got.shape == expected.shape == (batch, 5)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _fold(path: Path, out: Path, **source) -> bnrt.pipeline.convert.FoldOutcome:
    outcome = bnrt.fold_file(ModelSource(path, **source), out)
    assert outcome.passed and outcome.check.certificate.passed
    assert outcome.onnx_batchnorm_nodes == 0
    return outcome


def test_a_traced_torchscript_archive_folds_through_its_onnx_graph(tmp_path):
    net = ShipNet().randomised()
    torch.jit.trace(net, torch.randn(2, *SHAPE)).save(str(tmp_path / "traced.pt"))
    source = ModelSource(tmp_path / "traced.pt", input_shapes=[(1, *SHAPE)])
    assert source.kind == "torchscript"
    outcome = _fold(source.path, tmp_path / "out", input_shapes=[(1, *SHAPE)])
    assert sorted(p.name for p in outcome.written) == ["traced.onnx", "traced.report.json"]
    assert [d.status for d in outcome.result.decisions] == ["folded", "folded"]
    assert outcome.report["source"]["format"] == "torchscript" and outcome.report["exporter"] == "torchscript"
    _agrees_at_batch_1_and_4(tmp_path / "out" / "traced.onnx", net)


def test_a_scripted_archive_takes_its_input_names_from_the_script(tmp_path):
    net = ShipNet().randomised()
    torch.jit.script(net).save(str(tmp_path / "scripted.pt"))
    outcome = _fold(tmp_path / "scripted.pt", tmp_path / "out", input_shapes=[(1, *SHAPE)])
    assert outcome.report["input_names"] == ["x"]
    _agrees_at_batch_1_and_4(tmp_path / "out" / "scripted.onnx", net)


def _exported(path: Path, net: nn.Module) -> Path:
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(net, (torch.randn(2, *SHAPE),), dynamic_shapes=({0: batch},)), str(path))
    return path


def test_an_exported_program_folds_keeping_its_dynamic_batch(tmp_path):
    net = ShipNet().randomised()
    path = _exported(tmp_path / "net.pt2", net)
    assert file_kind(path) == "exported"
    outcome = _fold(path, tmp_path / "out")
    assert outcome.report["source"]["format"] == "exported-program"
    assert outcome.report["input_shapes"] == [[2, *SHAPE]]  # the program's own example
    graph_input = onnx.load(str(tmp_path / "out" / "net.onnx")).graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(SHAPE)
    _agrees_at_batch_1_and_4(tmp_path / "out" / "net.onnx", net)


def test_an_exported_program_with_pickled_entries_needs_trust_pickle(tmp_path):
    real = _exported(tmp_path / "real.pt2", ShipNet().randomised())
    pickled = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(pickled, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    proc = run_cli("fold", str(pickled), "-o", str(tmp_path / "out"), trust_code=False)
    assert_one_line_error(proc, str(pickled), "an ExportedProgram holding pickled objects or code (",
                          "features.0.weight", "--trust-pickle")
    assert not (tmp_path / "out").exists()


def _lightning_checkpoint(path: Path, state: dict, **extra) -> Path:
    """The layout ``lightning.Trainer.save_checkpoint`` writes (the LightningModule's attribute
    names prefix every key), with plain hyper-parameters."""
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.5.0", "state_dict": state,
                "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 3}}}},
                "callbacks": {}, "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
                "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1, "classes": 5},
                **extra}, path)
    return path


def test_a_lightning_checkpoint_loads_with_its_attribute_prefix_stripped(tmp_path):
    net = ShipNet().randomised()
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    state["criterion.weight"] = torch.ones(5)  # a loss with a weight: a key outside the model
    path = _lightning_checkpoint(tmp_path / "epoch=3-step=120.ckpt", state)
    proc = run_cli("fold", str(path), "--arch", "tests.nets:ShipNet", "--input-shape", f"1,{','.join(map(str, SHAPE))}",
                   "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert (f"{path}: stripped the key prefix 'model.' from the state_dict ({len(net.state_dict())} keys; "
            "1 key(s) outside it ignored)") in proc.stdout
    _agrees_at_batch_1_and_4(tmp_path / "out" / "epoch=3-step=120.onnx", net)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.module.", "net._orig_mod."])
def test_prefixes_of_wrappers_and_compiled_modules_are_stripped(prefix):
    expected = ShipNet().state_dict()
    matched = match_keys({prefix + k: v for k, v in expected.items()}, expected, "ckpt")
    assert matched.prefix == prefix and list(matched.state) == list(expected) and matched.ignored == 0


def test_two_models_in_one_state_dict_are_ambiguous_until_a_prefix_is_named(tmp_path):
    net, ema = ShipNet().randomised(0), ShipNet().randomised(1)
    state = {**{f"model.{k}": v for k, v in net.state_dict().items()},
             **{f"ema.{k}": v for k, v in ema.state_dict().items()}}
    with pytest.raises(OptionError, match=r"several key prefixes \('ema\.', 'model\.'\); pick one with strip_prefix"):
        match_keys(state, net.state_dict(), "ckpt")
    path = _lightning_checkpoint(tmp_path / "two.ckpt", state)
    loaded = bnrt.load_model(path, arch="tests.nets:ShipNet", strip_prefix="ema")
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), ema.state_dict().values()))


def test_state_dict_key_picks_a_sub_dict(tmp_path):
    net, ema = ShipNet().randomised(0), ShipNet().randomised(1)
    torch.save({"state_dict": net.state_dict(), "state_dict_ema": ema.state_dict(), "arch": "tests.nets:ShipNet"},
               tmp_path / "timm.pth")
    loaded = bnrt.load_model(tmp_path / "timm.pth", trust_code=True, state_dict_key="state_dict_ema")
    assert torch.equal(loaded.model.features[1].running_mean, ema.features[1].running_mean)
    with pytest.raises(OptionError, match=r"no entry 'ema' for state_dict_key \(entries: arch, state_dict, "
                                          r"state_dict_ema\)"):
        bnrt.load_model(tmp_path / "timm.pth", trust_code=True, state_dict_key="ema")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_low_precision_state_dict_is_folded_in_float64_and_written_float32(tmp_path, dtype):
    net = ShipNet().randomised().to(dtype)
    torch.save({"state_dict": net.state_dict(), "arch": "tests.nets:ShipNet", "input_shape": [1, *SHAPE]},
               tmp_path / "half.pt")
    outcome = _fold(tmp_path / "half.pt", tmp_path / "out", trust_code=True)
    name = str(dtype).removeprefix("torch.")
    assert outcome.report["source"]["precision"] == name
    assert outcome.report["source"]["notes"] == [f"read {name} weights: folded in float64, written as float32 "
                                                 "(bnrt quantize --precision fp16 ships float16)"]
    model = onnx.load(str(tmp_path / "out" / "half.onnx"))
    floating = {t.data_type for t in model.graph.initializer} - {onnx.TensorProto.INT64}
    assert floating == {onnx.TensorProto.FLOAT}
    _agrees_at_batch_1_and_4(tmp_path / "out" / "half.onnx", net.float())


def test_an_ultralytics_style_best_pt_folds_its_float16_ema(tmp_path):
    """``best.pt`` as Ultralytics' trainer and ``strip_optimizer`` leave it: the float16 model
    pickled under ``ema`` (``model`` None or the same), the training resolution in ``train_args``."""
    net = ShipNet().randomised()
    torch.save({"epoch": -1, "best_fitness": None, "model": None, "ema": copy.deepcopy(net).half(),
                "updates": 10, "optimizer": None, "train_args": {"imgsz": SHAPE[-1], "epochs": 3},
                "train_metrics": {"metrics/mAP50(B)": 0.1}, "date": "2026-12-04T00:00:00", "version": "8.3.0"},
               tmp_path / "best.pt")
    proc = run_cli("fold", str(tmp_path / "best.pt"), "--trust-pickle", "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert f"{tmp_path / 'best.pt'}: took the model under 'ema' (the EMA weights, what Ultralytics exports)" in proc.stdout
    assert "precision: read float16, folded in float64, wrote float32" in proc.stdout
    report = json.loads((tmp_path / "out" / "best.report.json").read_text())
    assert report["input_shapes"] == [[1, *SHAPE]] and report["source"]["precision"] == "float16"
    _agrees_at_batch_1_and_4(tmp_path / "out" / "best.onnx", net.half().float())


def test_a_safetensors_file_folds_with_arch_and_is_refused_without(tmp_path):
    from safetensors.torch import save_file

    net = ShipNet().randomised()
    save_file(net.state_dict(), str(tmp_path / "model.safetensors"))
    assert file_kind(tmp_path / "model.safetensors") == "safetensors"
    outcome = _fold(tmp_path / "model.safetensors", tmp_path / "out", arch="tests.nets:ShipNet",
                    input_shapes=[(1, *SHAPE)])
    assert outcome.report["source"]["format"] == "safetensors"
    _agrees_at_batch_1_and_4(tmp_path / "out" / "model.onnx", net)
    proc = run_cli("fold", str(tmp_path / "model.safetensors"), "-o", str(tmp_path / "out2"))
    assert_one_line_error(proc, f"{tmp_path / 'model.safetensors'}: a safetensors file holds weights only; pass "
                                "--arch MODULE:NAME")


def test_bfloat16_safetensors_are_read_bit_for_bit(tmp_path):
    from safetensors.torch import save_file

    from bnrt.io.formats import read_safetensors

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "c": torch.randn(4).half(), "d": torch.zeros(0)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    read = read_safetensors(tmp_path / "t.safetensors")
    assert sorted(read) == sorted(tensors) and all(read[k].dtype == v.dtype and torch.equal(read[k], v)
                                                   for k, v in tensors.items())


def _optimizer_state(path: Path) -> Path:
    net = ShipNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, *SHAPE)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), path)
    return path


def _hugging_face_folder(path: Path) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text('{"model_type": "resnet"}')
    save_file(ShipNet().state_dict(), str(path / "model.safetensors"))
    return path


def _saved_model(path: Path) -> Path:
    path.mkdir()
    (path / "saved_model.pb").write_bytes(b"\x08\x01\x12\x00")
    (path / "variables").mkdir()
    return path


def _keras(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", '{"keras_version": "3.5.0"}')
        archive.writestr("config.json", '{"class_name": "Sequential"}')
        archive.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    return path


@pytest.mark.parametrize("make, what", [
    (_optimizer_state, "an optimizer's state_dict (state, param_groups), not a model; pass the checkpoint that holds"),
    (_hugging_face_folder, "a Hugging Face model folder; pass its weights file"),
    (_saved_model, "a TensorFlow SavedModel folder, not a PyTorch or ONNX model; convert it to ONNX first"),
    (_keras, "a Keras model, not a PyTorch or ONNX model; convert it to ONNX first (tf2onnx)"),
    (lambda p: (p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64)), p)[1],
     "an HDF5 file (Keras or TensorFlow weights), not a PyTorch or ONNX model"),
], ids=["optimizer", "hugging-face", "saved-model", "keras", "hdf5"])
def test_what_is_not_a_model_is_refused_in_one_line_saying_what_to_pass(tmp_path, make, what):
    path = make(tmp_path / "thing")
    proc = run_cli("fold", str(path), "-o", str(tmp_path / "out"), trust_code=False)
    assert_one_line_error(proc, f"{path}: {what}")
    assert not (tmp_path / "out").exists()


def test_flags_a_program_does_not_use_are_refused_and_commands_needing_modules_refuse_programs(tmp_path):
    torch.jit.trace(ShipNet().randomised(), torch.randn(2, *SHAPE)).save(str(tmp_path / "traced.pt"))
    proc = run_cli("fold", str(tmp_path / "traced.pt"), "--arch", "tests.nets:ShipNet", "-o", str(tmp_path / "out"),
                   trust_code=False)
    assert_one_line_error(proc, f"{tmp_path / 'traced.pt'}: --arch does not apply to a TorchScript archive, "
                                "which is run as it is")
    with pytest.raises(InputError, match="a TorchScript archive; bnrt calibrate needs the model's modules"):
        bnrt.io.load.load(ModelSource(tmp_path / "traced.pt"), needs_modules="bnrt calibrate")


def test_a_batch_axis_the_dynamo_exporter_pins_is_caught_and_the_torchscript_exporter_used(tmp_path):
    from tests.nets import PinsBatch

    net = PinsBatch()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    torch.save({"state_dict": net.state_dict(), "arch": "tests.nets:PinsBatch", "input_shape": [1, 3, 8, 8]},
               tmp_path / "pins.pt")
    proc = run_cli("fold", str(tmp_path / "pins.pt"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "exported by the torchscript exporter: the dynamo one failed or fixed the batch axis" in proc.stdout
    report = json.loads((tmp_path / "out" / "pins.report.json").read_text())
    assert report["exporter"] == "torchscript" and report["check"]["passed"]
    model = onnx.load(str(tmp_path / "out" / "pins.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {p.key: p.value for p in model.metadata_props}["bnrt_exporter"] == "torchscript"
    session = ort.InferenceSession(str(tmp_path / "out" / "pins.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], net.eval()(x).numpy(), rtol=1e-4,
                                       atol=1e-5)


def test_an_exported_program_whose_sample_inputs_only_unpickle_with_code_needs_trust_pickle(tmp_path):
    class Payload:  # what a full unpickling would call
        def __reduce__(self):
            return (print, ("ran",))

    real = _exported(tmp_path / "real.pt2", ShipNet().randomised())
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if "sample_inputs" in item.filename:
                buffer = io.BytesIO()
                torch.save(Payload(), buffer)
                data = buffer.getvalue()
            dst.writestr(item, data)
    from bnrt.io.formats import pickled_entries

    assert pickled_entries(real) == [] and pickled_entries(evil) == ["data/sample_inputs/model.pt"]
    with pytest.raises(InputError, match="holding pickled objects or code .data/sample_inputs/model.pt."):
        bnrt.io.load.load(ModelSource(evil))


def test_two_models_without_num_batches_tracked_are_still_ambiguous():
    expected = ShipNet().state_dict()
    plain = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    state = {**{f"student.{k}": v for k, v in plain.items()}, **{f"teacher.{k}": v for k, v in plain.items()}}
    with pytest.raises(OptionError, match="several key prefixes"):
        match_keys(state, expected, "ckpt")
    assert match_keys({f"model.{k}": v for k, v in plain.items()}, expected, "ckpt").prefix == "model."


def test_a_mixed_precision_pickle_is_read_as_float32_and_its_precision_counted_by_values(tmp_path):
    net = ShipNet().randomised()
    for conv in (net.features[0], net.features[3]):
        conv.half()  # convs in float16, BNs and head in float32 (fewer values than the convs)
    torch.save(net, tmp_path / "mixed.pt")
    loaded = bnrt.load_model(tmp_path / "mixed.pt", trust_pickle=True, trust_code=True)
    assert loaded.precision == "float16+float32"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert loaded.model(torch.randn(2, *SHAPE)).shape == (2, 5)


def test_a_half_program_is_refused_in_one_line(tmp_path):
    torch.jit.trace(ShipNet().randomised().half(), torch.randn(2, *SHAPE).half()).save(str(tmp_path / "half.pt"))
    with pytest.raises(InputError, match=r"half.pt: a TorchScript archive in float16; bnrt folds programs written "
                                         r"in float32: export it in float32"):
        bnrt.io.load.load(ModelSource(tmp_path / "half.pt"))


def test_a_trace_that_bakes_the_batch_into_a_reshape_is_not_passed_off_as_dynamic(tmp_path):
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4 * 14 * 14, 5)

        def forward(self, x):
            return self.head(self.conv(x).reshape(int(x.shape[0]), -1))

    from bnrt.io.export import export_onnx

    with pytest.raises(InputError, match=r"the dynamo exporter fixed axis 0 of input 'x' at 2; the torchscript "
                                         r"exporter's graph declares x:0 dynamic but runs only at the traced size "
                                         r"\(inputs of shape \(3, 3, 16, 16\): "):
        export_onnx(Flat().eval(), (torch.randn(1, *SHAPE),), tmp_path / "flat.onnx", names=(["x"], ["y"]))
    assert not (tmp_path / "flat.onnx").exists()


@pytest.mark.parametrize("header, problem", [
    ({"w": 1}, "tensor 'w': its header entry is not an object"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, "tensor 'w': data_offsets [-4, 0] do not hold shape [1]"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "tensor 'w': data_offsets [0, 16] do not hold shape [4] in 8"),
    ({"__metadata__": {"format": "pt"}}, None),
])
def test_a_safetensors_header_is_checked_against_its_data(tmp_path, header, problem):
    from bnrt.io.formats import read_safetensors

    text = json.dumps(header).encode()
    (tmp_path / "t.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + bytes(8))
    expected = f"not a readable safetensors file \\({re.escape(problem)}" if problem else "holds no tensors"
    with pytest.raises(InputError, match=expected):
        read_safetensors(tmp_path / "t.safetensors")
