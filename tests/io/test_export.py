import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bnrt
from bnrt.errors import InputError
from bnrt.io.export import count_ops, export_onnx, input_names
from bnrt.session import Session
from models.digits import DigitsNet


@pytest.fixture(scope="module")
def folded_example():
    loaded = bnrt.load_model("models/digits_cnn.pt", trust_code=True)
    return loaded.model, bnrt.fold(loaded.model, (torch.rand(2, 1, 8, 8),)).model


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_is_bn_free_checked_and_batch_dynamic(tmp_path, folded_example, exporter):
    original, folded = folded_example
    path = tmp_path / "m.onnx"
    proto = export_onnx(folded, (torch.rand(1, 1, 8, 8),), path, names=(["x"], ["output"]),
                        metadata={"bnrt_version": bnrt.__version__, "bn_folded": "6"}, exporter=exporter)
    assert count_ops(proto, "BatchNormalization") == 0
    on_disk = onnx.load(str(path))
    onnx.checker.check_model(on_disk, full_check=True)
    assert {p.key: p.value for p in on_disk.metadata_props} == {"bnrt_version": bnrt.__version__, "bn_folded": "6",
                                                                 "bnrt_exporter": exporter}
    assert [i.name for i in on_disk.graph.input] == ["x"] and [o.name for o in on_disk.graph.output] == ["output"]
    dims = on_disk.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert on_disk.opset_import[0].version == 18
    session = Session(path)
    for batch in (1, 7):
        x = np.random.default_rng(batch).random((batch, 1, 8, 8), dtype=np.float32)
        (out,) = session.run([x])
        with torch.no_grad():
            ref = original(torch.from_numpy(x)).numpy()
        assert out.shape == (batch, 10) and float(np.abs(out - ref).max()) < 1e-4
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_skipped_bn_stays_as_batchnormalization_node(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    result = bnrt.fold(model, (torch.randn(2, 3, 8, 8),))
    proto = export_onnx(result.model, (torch.randn(2, 3, 8, 8),), tmp_path / "m.onnx", names=(["x"], ["y"]))
    assert count_ops(proto, "BatchNormalization") == 1


def test_bad_opset_and_exporter(tmp_path):
    model = nn.Linear(2, 2)
    args = (model, (torch.randn(2, 2),), tmp_path / "m.onnx")
    with pytest.raises(InputError, match=r"^opset 999: the installed onnx supports opsets 7 to"):
        export_onnx(*args, names=(["x"], ["y"]), opset=999)
    with pytest.raises(InputError, match="the dynamo exporter needs opset 18 or newer") as err:
        export_onnx(*args, names=(["x"], ["y"]), opset=13)
    assert err.value.as_flag().endswith("needs opset 18 or newer (use --exporter torchscript)")
    with pytest.raises(InputError, match="exporter 'tf': choose one of"):
        export_onnx(*args, names=(["x"], ["y"]), exporter="tf")
    assert not list(tmp_path.iterdir())


def test_input_names_from_forward_signature():
    assert input_names(DigitsNet(), 1) == ["x"]
    assert input_names(nn.Bilinear(2, 2, 2), 2) == ["input1", "input2"]
    assert input_names(nn.Sequential(nn.Linear(2, 2)), 1) == ["input"]
