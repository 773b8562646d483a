from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import bnrt
from bnrt.errors import InputError, OptionError
from bnrt.io.load import load_model, resolve_arch
from models.digits import DigitsNet

from ..conftest import assert_one_line_error, run_cli, save_checkpoint, trusted
from ..nets import FunctionalBN


class Marker:
    """Unpickling this creates a file: proof that code in a checkpoint ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))


def test_dict_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DigitsNet().eval()
    path = save_checkpoint(tmp_path / "m.pt", model, "models.digits:DigitsNet", (1, 1, 8, 8), arch_kwargs={})
    loaded = load_model(path, trust_code=True)
    assert loaded.input_shapes == [(1, 1, 8, 8)] and loaded.arch == "models.digits:DigitsNet"
    assert not loaded.model.training and len(loaded.sha256) == 64
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


@pytest.mark.parametrize("layout", ["model_state_dict", "model", "plain", "ddp"])
def test_state_dict_layouts(tmp_path, layout):
    model = DigitsNet().eval()
    sd = model.state_dict()
    if layout == "plain":
        ckpt = sd
    elif layout == "ddp":
        ckpt = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "arch": "models.digits:DigitsNet"}
    else:
        ckpt = {layout: sd, "arch": "models.digits:DigitsNet", "optimizer": {"lr": 0.1}}
    torch.save(ckpt, tmp_path / "m.pt")
    arch = "models.digits:DigitsNet" if layout == "plain" else None
    loaded = load_model(tmp_path / "m.pt", arch=arch, trust_code=True)
    assert all(torch.equal(v, sd[k]) for k, v in loaded.model.state_dict().items())


def test_plain_state_dict_without_arch_says_what_to_pass(tmp_path):
    torch.save(DigitsNet().state_dict(), tmp_path / "m.pt")
    with pytest.raises(InputError, match=r"m.pt: the checkpoint names no architecture; pass arch MODULE:NAME"):
        load_model(tmp_path / "m.pt")


def test_factory_accepted_from_command_line_only(tmp_path):
    torch.save({"state_dict": small_net().state_dict(), "arch": "tests.io.test_load:small_net"}, tmp_path / "m.pt")
    with pytest.raises(InputError, match=r"arch 'tests.io.test_load:small_net' is not an nn.Module subclass; refusing"):
        load_model(tmp_path / "m.pt", trust_code=True)
    assert isinstance(load_model(tmp_path / "m.pt", arch="tests.io.test_load:small_net").model, nn.Sequential)


@pytest.mark.parametrize("spec,message", [
    ("nocolon", "expected MODULE:NAME"),
    ("no_such_module_xyz:Net", "cannot import 'no_such_module_xyz' (ModuleNotFoundError"),
    ("models.digits:Nope", "'models.digits' has no attribute 'Nope'"),
    ("models.digits:INPUT_SHAPE", "neither an nn.Module subclass nor callable"),
])
def test_bad_arch_strings(spec, message):
    with pytest.raises(InputError) as err:
        resolve_arch(spec)
    assert message in str(err.value)


def test_arch_in_file_naming_a_function_is_refused(tmp_path):
    torch.save({"state_dict": small_net().state_dict(), "arch": "torch:zeros"}, tmp_path / "m.pt")
    with pytest.raises(InputError, match="is not an nn.Module subclass"):
        load_model(tmp_path / "m.pt")


def test_state_dict_mismatch_names_keys(tmp_path):
    sd = DigitsNet().state_dict()
    sd.pop("fc.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd, "arch": "models.digits:DigitsNet"}, tmp_path / "m.pt")
    with pytest.raises(InputError, match=r"does not match the architecture: missing fc.weight; unexpected extra.weight"):
        load_model(tmp_path / "m.pt", trust_code=True)


def test_pickled_module_needs_trust_flag(tmp_path):
    model = small_net().eval()
    torch.save(model, tmp_path / "m.pt")
    with pytest.raises(InputError) as err:
        load_model(tmp_path / "m.pt")
    assert "holds pickled Python objects (torch.nn.modules.container.Sequential)" in str(err.value)
    assert "--trust-pickle" in str(err.value)
    loaded = load_model(tmp_path / "m.pt", trust_pickle=True)
    assert loaded.source_format == "pickle" and loaded.arch == "torch.nn.modules.container:Sequential"


def test_code_in_a_pickle_never_runs_without_trust(tmp_path):
    marker = tmp_path / "ran"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Marker(marker)}, f)
    torch.save({"payload": Marker(marker)}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(InputError):
            load_model(tmp_path / name)
    assert not marker.exists()


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (b"hello, I am not a checkpoint\n", "not a torch checkpoint"),
    (bytes(range(256)) * 8, "not a torch checkpoint"),
])
def test_garbage_files(tmp_path, content, message):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(InputError) as err:
        load_model(tmp_path / "bad.pt")
    assert str(err.value).startswith(f"{tmp_path / 'bad.pt'}: {message}")


def test_truncated_checkpoint(tmp_path, example):
    data = example.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut.pt: truncated or corrupt torch checkpoint"):
        load_model(tmp_path / "cut.pt")


def test_missing_and_directory(tmp_path):
    with pytest.raises(InputError, match=r"nope.pt: no such file"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(InputError, match=r"is a directory"):
        load_model(tmp_path)


def test_load_folded_into_users_class(tmp_path, example):
    outcome = bnrt.fold_file(trusted(example), tmp_path, check=None, exporter="torchscript")
    original = load_model(example, trust_code=True).model
    model = bnrt.load_folded(DigitsNet(), tmp_path / "digits_cnn.folded.pt")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert outcome.result.bias_added == ["stem.0", "block.body.0.0", "block.body.1.0", "depthwise.0"]
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert float((model(x) - original(x)).abs().max()) < 1e-5
    again = load_model(tmp_path / "digits_cnn.folded.pt", trust_code=True)
    assert again.source_format == "folded" and again.input_shapes == [(1, 1, 8, 8)]
    with torch.no_grad():
        assert torch.equal(again.model(x), model(x))


def test_functional_batch_norm_round_trip_through_the_folded_checkpoint(tmp_path):
    from bnrt.io.export import count_ops

    torch.manual_seed(0)
    model = FunctionalBN().eval()
    save_checkpoint(tmp_path / "f.pt", model, "tests.nets:FunctionalBN", (1, 3, 6, 6))
    outcome = bnrt.fold_file(trusted(tmp_path / "f.pt"), tmp_path / "out", exporter="torchscript")
    assert outcome.passed and outcome.onnx_batchnorm_nodes == 0
    assert outcome.report["decisions"][0]["kind"] == "functional"
    reloaded = bnrt.load_folded(FunctionalBN(), tmp_path / "out" / "f.folded.pt")
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(reloaded(x), outcome.result.model(x))
        assert float((reloaded(x) - model(x)).abs().max()) < 1e-5
    assert count_ops(__import__("onnx").load(str(tmp_path / "out" / "f.onnx")), "BatchNormalization") == 0


def _code_folder(folder: Path, module: str) -> Path:
    """``folder/model.pt`` naming ``module:Net`` and ``folder/module.py``, which leaves a marker
    ``folder/MARKER`` when imported."""
    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(folder / 'MARKER')!r}).write_text('ran')\n"
        "from models.digits import DigitsNet as Net\n")
    torch.save({"state_dict": DigitsNet().state_dict(), "arch": f"{module}:Net", "input_shape": [1, 1, 8, 8]},
               folder / "model.pt")
    return folder / "model.pt"


def test_code_beside_the_checkpoint_is_imported_only_with_consent(tmp_path):
    path = _code_folder(tmp_path / "shared", "modeling_consent_lib")
    with pytest.raises(OptionError) as err:
        load_model(path)
    assert str(err.value) == (
        f"{path}: arch 'modeling_consent_lib:Net': importing 'modeling_consent_lib' would run "
        f"{path.parent / 'modeling_consent_lib.py'}, code from the current or the model's folder; "
        "pass trust_code to run it, or name the architecture with arch")
    assert err.value.as_flag().endswith("pass --trust-code to run it, or name the architecture with --arch")
    assert not (path.parent / "MARKER").exists()
    loaded = load_model(path, trust_code=True)
    assert (path.parent / "MARKER").read_text() == "ran"
    assert type(loaded.model).__name__ == "DigitsNet"


def test_code_in_the_current_folder_needs_consent_and_named_arch_is_consent(tmp_path):
    path = _code_folder(tmp_path, "modeling_consent_cwd")
    for command in (["inspect", path.name], ["fold", path.name, "--no-check", "--exporter", "torchscript"]):
        proc = run_cli(*command, cwd=tmp_path, trust_code=False)
        assert_one_line_error(proc, "model.pt: arch 'modeling_consent_cwd:Net'", "modeling_consent_cwd.py",
                              "--trust-code", "--arch")
        assert not (tmp_path / "MARKER").exists()
    proc = run_cli("inspect", path.name, "--arch", "modeling_consent_cwd:Net", cwd=tmp_path, trust_code=False)
    assert proc.returncode == 0 and "6 BatchNorm: 6 folded" in proc.stdout, proc.stderr
    assert (tmp_path / "MARKER").exists()
    (tmp_path / "MARKER").unlink()
    proc = run_cli("inspect", path.name, "--trust-code", cwd=tmp_path, trust_code=False)
    assert proc.returncode == 0 and "6 BatchNorm: 6 folded" in proc.stdout, proc.stderr
    assert (tmp_path / "MARKER").exists()


def test_installed_packages_need_no_consent(tmp_path):
    torch.save({"state_dict": nn.BatchNorm2d(3).state_dict(), "arch": "torch.nn:BatchNorm2d",
                "arch_kwargs": {"num_features": 3}}, tmp_path / "m.pt")
    assert isinstance(load_model(tmp_path / "m.pt").model, nn.BatchNorm2d)


def _shadowing_folder(tmp_path: Path) -> Path:
    """A working folder whose files shadow modules torch imports lazily (sympy during export) and
    an installed architecture named inside the checkpoint: no consent is given, none may run."""
    for name in ("sympy", "fractions", "decimal", "networkx", "statistics"):
        (tmp_path / f"{name}.py").write_text(f"import pathlib\npathlib.Path({str(tmp_path / ('RAN_' + name))!r}).touch()\n")
    torch.save({"state_dict": nn.Linear(4, 2).state_dict(), "arch": "torch.nn:Linear",
                "arch_kwargs": {"in_features": 4, "out_features": 2}, "input_shape": [1, 4]}, tmp_path / "m.pt")
    return tmp_path / "m.pt"


@pytest.mark.parametrize("launcher", ["console script", "python -m"])
def test_modules_in_the_working_folder_never_run_without_consent(tmp_path, launcher):
    import subprocess
    import sys

    from tools import child_env

    _shadowing_folder(tmp_path)
    argv = ["fold", "m.pt", "-o", "out", "--exporter", "dynamo"]
    if launcher == "console script":
        proc = subprocess.run([str(Path(sys.executable).parent / "bnrt"), *argv], cwd=tmp_path, env=child_env(),
                              capture_output=True, text=True, timeout=300)
    else:
        proc = run_cli(*argv, cwd=tmp_path, trust_code=False)
    assert proc.returncode == 0, proc.stderr
    assert "check passed" in proc.stdout
    assert sorted(p.name for p in tmp_path.glob("RAN_*")) == []


@pytest.mark.parametrize("arch,message", [
    ("venv.__main__:X", "names a __main__ or private module or attribute"),
    ("unittest.__main__:X", "names a __main__ or private module or attribute"),
    ("torch._tensor:Tensor", "names a __main__ or private module or attribute"),
    ("torch.nn:Linear.__subclasses__", "names a __main__ or private module or attribute"),
    ("this:X", "names the standard library module 'this'"),
    ("json.decoder:JSONDecoder", "names the standard library module 'json'"),
    ("torch nn:Linear", "not a MODULE:NAME of Python identifiers"),
])
def test_an_arch_inside_a_file_is_refused_before_anything_is_imported(tmp_path, arch, message):
    import sys

    top = arch.split(".")[0].split(":")[0]
    torch.save({"state_dict": {"w": torch.zeros(1)}, "arch": arch}, tmp_path / "m.pt")
    was_loaded = top in sys.modules
    proc = run_cli("inspect", str(tmp_path / "m.pt"), trust_code=False)
    assert_one_line_error(proc, f"m.pt: arch {arch!r}: {message}", "--arch")
    assert proc.stdout == ""  # 'this' prints its poem, unittest its summary, venv runs pip: none ran
    with pytest.raises(OptionError, match=message):
        load_model(tmp_path / "m.pt")
    assert (top in sys.modules) == was_loaded


@pytest.mark.parametrize("code", ["raise SystemExit(3)", "raise SystemExit('bye')", "import sys; sys.exit()"])
def test_an_arch_whose_import_exits_is_one_line(tmp_path, code):
    (tmp_path / "exiting_arch.py").write_text(code + "\n")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "input_shape": [1, 4]}, tmp_path / "m.pt")
    proc = run_cli("inspect", "m.pt", "--arch", "exiting_arch:Net", cwd=tmp_path, trust_code=False)
    assert_one_line_error(proc, "--arch 'exiting_arch:Net': cannot import 'exiting_arch' (SystemExit")


def test_the_models_folder_is_importable_only_while_the_arch_is_imported(tmp_path):
    import sys

    path = _code_folder(tmp_path / "shared", "modeling_consent_window")
    before = list(sys.path)
    assert type(load_model(path, trust_code=True).model).__name__ == "DigitsNet"
    assert sys.path == before and str(path.parent) not in sys.path
