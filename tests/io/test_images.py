"""Image folders as check data: layouts, labels, preprocessing to exact numbers, one-line errors,
and the bundled digits model checked on its test split written as PNG files."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from bnrt.errors import InputError, OptionError
from bnrt.io.data import InputSpec, make_inputs
from bnrt.io.images import PRESETS, Images, Preprocess, decode, image_files, load_images, pixels, resolve

from ..conftest import EXAMPLE, assert_one_line_error, run_cli


def _png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_class_folders_are_labelled_in_sorted_order_and_a_flat_folder_is_not(tmp_path):
    for cls, n in (("cat", 2), ("ant", 1), ("dog", 3)):
        for i in range(n):
            _png(tmp_path / "tree" / cls / f"{i}.png", np.full((4, 4), i, np.uint8), "L")
    (tmp_path / "tree" / "dog" / "notes.txt").write_text("not an image")
    files, labels, classes = image_files(tmp_path / "tree")
    assert classes == ["ant", "cat", "dog"] and labels.tolist() == [0, 1, 1, 2, 2, 2]
    assert [f.relative_to(tmp_path / "tree").as_posix() for f in files][:3] == ["ant/0.png", "cat/0.png", "cat/1.png"]
    for i in range(2):
        _png(tmp_path / "flat" / f"{i}.jpg", np.zeros((4, 4, 3), np.uint8), "RGB")
    files, labels, _ = image_files(tmp_path / "flat")
    assert len(files) == 2 and labels is None


def test_preprocessing_gives_exact_numbers(tmp_path):
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    _png(tmp_path / "a.png", rgb, "RGB")
    p = resolve(Preprocess(mean=(0.5, 0.25, 0.0), std=(2.0, 4.0, 0.5), color="bgr"), (1, 3, 4, 4), "here")
    got = decode(tmp_path / "a.png", p)  # no resize needed: the 4x4 center of the 4x6 image
    want = rgb[:, 1:5].astype(np.float32).transpose(2, 0, 1)[::-1] / 255.0
    want = (want - np.float32([0.5, 0.25, 0.0]).reshape(3, 1, 1)) / np.float32([2.0, 4.0, 0.5]).reshape(3, 1, 1)
    assert got.shape == (3, 4, 4) and np.array_equal(got, want.astype(np.float32))
    gray = resolve(Preprocess(), (None, 1, 2, 3), "here")
    assert (gray.crop, gray.color) == ((2, 3), "gray")
    small = decode(tmp_path / "a.png", gray)  # resized to cover 2x3 (shorter side 4 -> 2), then cropped
    assert small.shape == (1, 2, 3) and small.dtype == np.float32 and 0 <= small.min() <= small.max() <= 1


@pytest.mark.parametrize("preprocess,shape,fragment", [
    (Preprocess(), (1, 3, None, None), "needs the model's input as (N, C, H, W) with C, H and W known"),
    (Preprocess(color="gray"), (1, 3, 8, 8), "the model takes 3 channels; images are read as gray"),
    (Preprocess(mean=(0.1, 0.2)), (1, 3, 8, 8), "--mean has 2 values for 3 channels"),
    (Preprocess(std=(0.0,)), (1, 1, 8, 8), "--std must not be 0"),
    (PRESETS["imagenet"], (1, 3, 32, 32), "images cropped to 224x224, but the model takes 32x32"),
])
def test_preprocessing_that_cannot_fit_the_model_is_refused(preprocess, shape, fragment):
    with pytest.raises(OptionError, match=".*" + fragment.replace("(", r"\(").replace(")", r"\)")):
        resolve(preprocess, shape, "here")


def test_bad_folders_and_images_name_the_file(tmp_path):
    _png(tmp_path / "mixed" / "a.png", np.zeros((2, 2), np.uint8), "L")
    (tmp_path / "mixed" / "cls").mkdir()
    with pytest.raises(InputError, match="mixed: holds both images and class folders"):
        image_files(tmp_path / "mixed")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(InputError, match="empty: no images"):
        image_files(tmp_path / "empty")
    (tmp_path / "bad" / "0").mkdir(parents=True)
    (tmp_path / "bad" / "0" / "x.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"x\.png: not a readable image"):
        load_images(tmp_path / "bad", (1, 1, 2, 2), Preprocess())
    with pytest.raises(OptionError, match="an image folder feeds one input; the model has 2"):
        make_inputs(InputSpec(tmp_path / "bad"), ["a", "b"], [(1, 1, 2, 2)] * 2)


def test_images_decode_only_what_is_read_in_this_process_or_in_workers(tmp_path, monkeypatch):
    import bnrt.io.images as module

    rng = np.random.default_rng(0)
    for i in range(7):
        _png(tmp_path / "imgs" / str(i % 2) / f"{i}.png", rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), "RGB")
    read = []
    monkeypatch.setattr(module, "pixels", lambda path, p: read.append(path.name) or pixels(path, p))
    images, labels, used = load_images(tmp_path / "imgs", (1, 3, 4, 4), Preprocess())
    assert (images.shape, images.dtype, len(images), labels.tolist()) == ((7, 3, 4, 4), np.float32, 7, [0] * 4 + [1] * 3)
    assert read == ["0.png"]  # the first image, to fail early on an unreadable folder
    every = np.stack([decode(f, used) for f in images.files])
    read.clear()
    assert np.array_equal(images[2:5], every[2:5]) and np.array_equal(images[3], every[3])
    assert np.array_equal(images[[6, 0]], every[[6, 0]]) and images[7:].shape == (0, 3, 4, 4)
    assert read == [images.files[i].name for i in (2, 3, 4, 3, 6, 0)]
    assert np.array_equal(np.asarray(images), every)
    monkeypatch.undo()  # workers are sent the decoding function
    pooled = Images(images.files, used, workers=2)
    try:  # a run of slices: the next one is decoded ahead while this one is used
        assert np.array_equal(pooled[:3], every[:3]) and pooled._ahead[0] == (3, 6)
        assert np.array_equal(pooled[3:6], every[3:6]) and pooled._ahead[0] == (6, 7)
        assert np.array_equal(pooled[6:9], every[6:]) and pooled._ahead is None
        assert np.array_equal(pooled[1:3], every[1:3]) and pooled._ahead[0] == (3, 5)
        assert np.array_equal(pooled[:], every) and pooled._ahead is None
    finally:
        pooled.close()


def test_bnrt_fold_on_a_png_folder_matches_the_npz_and_says_whether_accuracy_changed(tmp_path):
    from models.digits import digits_split
    from tools.digits_data import write_images

    _, _, x, y = digits_split()
    write_images(x, y, tmp_path / "png")
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    runs, stdout = {}, {}
    for name, data in (("png", tmp_path / "png"), ("npz", tmp_path / "digits.npz")):
        proc = run_cli("fold", str(EXAMPLE), "--arch", "models.digits:DigitsNet", "--data", str(data),
                       "-o", str(tmp_path / f"out_{name}"))
        assert proc.returncode == 0, proc.stderr
        stdout[name] = proc.stdout
        runs[name] = json.loads((tmp_path / f"out_{name}" / "digits_cnn.report.json").read_text())["check"]
    png, npz = runs["png"], runs["npz"]
    assert png["samples"] == npz["samples"] == len(y) == 360
    assert png["accuracy"] == npz["accuracy"]  # 8-bit PNG pixels change no prediction
    assert png["preprocess"] == {"resize": None, "crop": [8, 8], "mean": None, "std": None, "color": "gray",
                                 "interpolation": "bilinear"}
    stats = png["accuracy_stats"]["onnx cpu"]
    assert stats["top1"][0] == stats["top1"][1] == png["accuracy"]["torch"]
    assert (stats["reference_only"], stats["candidate_only"], stats["mcnemar_p"], stats["within_chance"]) == (
        0, 0, 1.0, True)
    assert ("right only in the reference 0, only in onnx cpu 0; McNemar p = 1; difference +0.00 pp "
            "(95% CI +0.00 to +0.00): within chance") in stdout["png"]
    assert "images: crop 8,8, color gray" in stdout["png"] and "images:" not in stdout["npz"]


def test_an_image_folder_for_a_model_of_another_size_is_one_line(tmp_path):
    _png(tmp_path / "png" / "0" / "a.png", np.zeros((8, 8), np.uint8), "L")
    proc = run_cli("fold", str(EXAMPLE), "--arch", "models.digits:DigitsNet", "--data", str(tmp_path / "png"),
                   "--preprocess", "imagenet", "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "png: images cropped to 224x224, but the model takes 8x8")
    assert not (tmp_path / "out").exists()


def test_decoding_workers_die_on_sigterm_whatever_handler_the_command_installed(tmp_path):
    import signal

    _png(tmp_path / "imgs" / "a.png", np.zeros((4, 4), np.uint8), "L")
    _png(tmp_path / "imgs" / "b.png", np.ones((4, 4), np.uint8), "L")
    files, _, _ = image_files(tmp_path / "imgs")

    def unwind(signum, frame):  # as the command line's handler does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, unwind)
    pooled = Images(files, resolve(Preprocess(), (1, 1, 4, 4), "imgs"), workers=1)
    try:
        assert pooled[:].shape == (2, 1, 4, 4)
        handlers = [pooled._pool.apply(signal.getsignal, (sig,)) for sig in (signal.SIGTERM, signal.SIGINT)]
        assert handlers == [signal.SIG_DFL, signal.SIG_IGN]  # a terminated pool's worker dies at once
    finally:
        signal.signal(signal.SIGTERM, previous)
        pooled.close()


def test_preprocess_timm_is_the_models_own_eval_transform(tmp_path):
    from bnrt.io.images import from_config

    config = {"input_size": (3, 6, 6), "crop_pct": 0.75, "interpolation": "bicubic", "mean": (0.5, 0.4, 0.3),
              "std": (0.2, 0.25, 0.3)}
    made = from_config(PRESETS["timm"], config, "m.pt")
    assert made == Preprocess(resize=8, crop=(6, 6), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                              interpolation="bicubic")
    assert from_config(replace(PRESETS["timm"], resize=7), config, "m.pt").resize == 7  # a flag overrides
    assert from_config(Preprocess(resize=9), None, "m.pt") == Preprocess(resize=9)  # no preset: no config read
    pixels = np.random.default_rng(0).integers(0, 256, (9, 12, 3), dtype=np.uint8)
    _png(tmp_path / "a.png", pixels, "RGB")
    used = resolve(made, (1, 3, 6, 6), "here")
    want = np.asarray(Image.fromarray(pixels).resize((11, 8), Image.Resampling.BICUBIC), np.float32)[1:7, 2:8] / 255
    want = (want - np.array([0.5, 0.4, 0.3], np.float32)) / np.array([0.2, 0.25, 0.3], np.float32)
    np.testing.assert_allclose(decode(tmp_path / "a.png", used), want.transpose(2, 0, 1), rtol=0, atol=1e-6)
    with pytest.raises(OptionError, match="m.pt: --preprocess timm needs a timm model"):
        from_config(PRESETS["timm"], None, "m.pt")
    with pytest.raises(OptionError, match="square center crops only"):
        from_config(PRESETS["timm"], {**config, "input_size": (3, 6, 8)}, "m.pt")


def test_bnrt_fold_preprocess_timm_reads_the_checkpoints_model(tmp_path):
    import torch

    from tests.nets import TimmConfigured

    from ..conftest import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", TimmConfigured().eval(), "tests.nets:TimmConfigured", (1, 3, 8, 8))
    rng = np.random.default_rng(1)
    for i in range(4):
        _png(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png", rng.integers(0, 256, (12, 14, 3), dtype=np.uint8), "RGB")
    proc = run_cli("fold", str(tmp_path / "m.pt"), "--data", str(tmp_path / "imgs"), "--preprocess", "timm",
                   "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "m.report.json").read_text())["check"]
    assert report["preprocess"] == {"resize": 10, "crop": [8, 8], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
                                    "color": "rgb", "interpolation": "bicubic"}
    assert_one_line_error(run_cli("fold", str(EXAMPLE), "--data", str(tmp_path / "imgs"), "--preprocess", "timm",
                                  "-o", str(tmp_path / "o2")), "--preprocess timm needs a timm model")
