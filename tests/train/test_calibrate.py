"""Recalibration of BatchNorm statistics: exact pooling, exact mode residuals, CLI, torchrun."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import bnrt
from bnrt.train.calibrate import batches_of, calibrate, execution_order, residuals
from bnrt.errors import InputError
from models.zoo import ZOO, build

from ..conftest import EXAMPLE, ROOT, assert_one_line_error, run_cli


def _data(name: str, n: int, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *ZOO[name].input_shape[1:], generator=gen) * 1.7 + 0.4).numpy()


def test_fast_pools_the_exact_variance_where_update_bn_averages_batch_variances():
    model = nn.Sequential(nn.Identity(), nn.BatchNorm1d(3)).eval()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((70, 3)) * [1.0, 5.0, 0.1] + [0.0, 100.0, -3.0]).astype(np.float32)
    batches = batches_of([x], 32)  # 32 + 32 + 6: ragged last batch
    fast = copy.deepcopy(model)
    calibrate(fast, batches, mode="fast")
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(fast[1].running_mean.numpy(), x64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(fast[1].running_var.numpy(), x64.var(0, ddof=1), rtol=1e-5)
    swa = copy.deepcopy(model)
    update_bn((b[0] for b in batches()), swa)
    off = np.abs(swa[1].running_var.numpy() / x64.var(0, ddof=1) - 1).max()
    assert off > 1e-3  # update_bn's average of batch variances is not the pooled variance


@pytest.mark.parametrize("name", ["resnet", "mobilenetv3", "tabular", "token_mlp", "unet"])
def test_exact_mode_leaves_standardised_inputs_at_mean_0_var_1(name):
    model = build(name, batches=1)
    batches = batches_of([_data(name, 96)], 40)
    report = calibrate(model, batches, mode="exact")
    assert report.passes == len(report.bn) and report.samples == 96 and report.batches == 3
    found = residuals(model, batches())
    assert set(found) == set(report.bn)
    assert max(v[0] for v in found.values()) < 1e-5
    assert max(v[1] for v in found.values()) < 1e-5


def test_fast_mode_first_bn_matches_the_reference_pooled_statistics():
    from bnrt.train import reference

    model = build("resnet", batches=1)
    x = _data("resnet", 50)
    first = execution_order(model, (torch.from_numpy(x[:2]),))[0]
    captured = []
    handle = model.get_submodule(first).register_forward_pre_hook(lambda m, a: captured.append(a[0].clone()))
    with torch.no_grad():
        model(torch.from_numpy(x))
    handle.remove()
    calibrate(model, batches_of([x], 16), mode="fast")
    count, mean, m2 = reference.moments(captured[0].numpy())
    bn = model.get_submodule(first)
    np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), m2 / (count - 1), rtol=1e-5)
    assert not model.training


def test_model_without_batchnorm_and_empty_data_are_refused():
    with pytest.raises(InputError, match="no BatchNorm with running statistics"):
        calibrate(nn.Linear(2, 2), [torch.ones(2, 2)])
    with pytest.raises(InputError, match="no batches to calibrate on"):
        calibrate(nn.BatchNorm1d(2), [])


def test_cli_calibrate_writes_a_loadable_checkpoint(tmp_path):
    from models.digits import digits_split

    _, _, x, y = digits_split()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    proc = run_cli("calibrate", str(EXAMPLE), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "c.pt"),
                   "--mode", "exact", "--batch-size", "100")
    assert proc.returncode == 0, proc.stderr
    assert "calibrated 6 BatchNorm (exact) on 360 samples in 4 batches, 6 pass(es)" in proc.stdout
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ckpt["bnrt_calibration"]["mode"] == "exact" and ckpt["input_shape"] == [[1, 1, 8, 8]]
    model = bnrt.load_model(tmp_path / "c.pt", trust_code=True).model
    found = residuals(model, batches_of([x], 100)())
    assert max(max(v) for v in found.values()) < 1e-5


def test_cli_calibrate_on_an_image_folder_equals_its_pixels_as_an_npz(tmp_path):
    from PIL import Image

    from bnrt.io.images import Preprocess, listing_sha256, load_images
    from models.digits import digits_split

    _, _, x, _ = digits_split()
    (tmp_path / "flat").mkdir()
    for i, image in enumerate(x):  # a flat folder: its sorted files are the samples in order
        Image.fromarray(np.round(image[0] * 255).astype(np.uint8), mode="L").save(tmp_path / "flat" / f"{i:04d}.png")
    pixels = np.asarray(load_images(tmp_path / "flat", (1, 1, 8, 8), Preprocess())[0])
    np.savez(tmp_path / "d.npz", x=pixels)
    for name, data, extra in (("folder", tmp_path / "flat", ["--workers", "1"]), ("npz", tmp_path / "d.npz", [])):
        proc = run_cli("calibrate", str(EXAMPLE), "--data", str(data), "-o", str(tmp_path / f"{name}.pt"),
                       "--batch-size", "64", *extra)
        assert proc.returncode == 0, proc.stderr
        assert "calibrated 6 BatchNorm (fast) on 360 samples in 6 batches" in proc.stdout
    folder, npz = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("folder", "npz"))
    assert folder["state_dict"].keys() == npz["state_dict"].keys()
    assert all(torch.equal(folder["state_dict"][k], npz["state_dict"][k]) for k in npz["state_dict"])
    assert folder["bnrt_calibration"]["preprocess"] == {"resize": None, "crop": [8, 8], "mean": None, "std": None,
                                                        "color": "gray", "interpolation": "bilinear"}
    assert folder["bnrt_calibration"]["data_sha256"] == listing_sha256(tmp_path / "flat")
    assert npz["bnrt_calibration"]["preprocess"] is None


def test_cli_calibrate_bad_data_is_one_line(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((4, 3, 8, 8), np.float32))
    proc = run_cli("calibrate", str(EXAMPLE), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "c.pt"))
    assert_one_line_error(proc, "d.npz: the model cannot run on a batch of shape (4, 3, 8, 8)")
    assert not (tmp_path / "c.pt").exists()
    src = tmp_path / "m.pt"
    shutil.copy(EXAMPLE, src)
    proc = run_cli("calibrate", str(src), "--data", str(tmp_path / "d.npz"), "-o", str(src))
    assert_one_line_error(proc, f"{src}: would overwrite the input {src}")
    assert src.read_bytes() == EXAMPLE.read_bytes()


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_two_processes_under_torchrun_equal_one_process(tmp_path, mode):
    # 96 samples in batches of 16: the two shards of 48 hold the same batches as one process (fast
    # mode normalises with batch statistics, so deeper BNs depend on how samples are batched)
    x = _data("resnet", 96, seed=3)
    np.savez(tmp_path / "d.npz", x=x)
    model = build("resnet", batches=1)
    torch.save({"state_dict": model.state_dict(), "arch": "models.zoo:ResNet", "input_shape": [1, 3, 32, 32]},
               tmp_path / "m.pt")
    args = ["calibrate", str(tmp_path / "m.pt"), "--data", str(tmp_path / "d.npz"), "--mode", mode,
            "--batch-size", "16"]
    single = run_cli(*args, "-o", str(tmp_path / "one.pt"))
    assert single.returncode == 0, single.stderr
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    # --standalone: the rendezvous store binds port 0 and the workers read the port back from it
    # (no port picked, freed and bound again)
    dist = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "bnrt", args[0], "--trust-code", *args[1:], "-o", str(tmp_path / "two.pt")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert dist.returncode == 0, dist.stderr
    one = torch.load(tmp_path / "one.pt", weights_only=True)["state_dict"]
    two = torch.load(tmp_path / "two.pt", weights_only=True)["state_dict"]
    keys = [k for k in one if "running" in k]
    assert len(keys) == 40
    worst = max(float(((one[k].double() - two[k].double()).abs() / one[k].double().abs().clamp_min(1)).max())
                for k in keys)
    assert worst < 1e-6
    assert torch.load(tmp_path / "two.pt", weights_only=True)["bnrt_calibration"]["world_size"] == 2
    assert all(torch.equal(one[k], two[k]) for k in one if k.endswith("num_batches_tracked"))
    assert "calibrated 20 BatchNorm" in dist.stdout and "on 96 samples in 6 batches" in dist.stdout
