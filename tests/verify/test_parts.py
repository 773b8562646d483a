"""A check in parts: shards merged, and torchrun ranks, give the report of one process, number for number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnrt
from bnrt.io.data import InputSpec
from bnrt.io.shards import shard_rows
from bnrt.verify.check import CheckOptions, check_files
from bnrt.verify.parts import check_part, merge, read_part, write_part
from models.digits import digits_split

from ..conftest import EXAMPLE, ROOT, assert_one_line_error, run_cli, trusted

ARCH = ["--arch", "models.digits:DigitsNet", "--trust-code"]


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """The example's folded ONNX, the digits test split as an .npz and as PNG class folders, and an
    ONNX with one output channel of one layer scaled by 1.01 (a check that fails)."""
    from tools.digits_data import write_images

    out = tmp_path_factory.mktemp("parts")
    _, _, x, y = digits_split()
    np.savez(out / "digits.npz", x=x, y=y)
    write_images(x, y, out / "png")
    bnrt.fold_file(trusted(EXAMPLE), out / "f", check=None)
    model = onnx.load(str(out / "f" / "digits_cnn.onnx"))
    weight = next(t for t in model.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    array = numpy_helper.to_array(weight).copy()
    array[0] *= 1.01
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(out / "bad.onnx"))
    return out


def test_shard_rows_split_like_array_split():
    for size in (1, 7, 360):
        for count in (1, 2, 3, 8):
            want = [(r[0], r[-1] + 1) if len(r) else (None, None) for r in np.array_split(np.arange(size), count)]
            got = [(r.start, r.stop) if len(r) else (None, None) for r in (shard_rows(size, i, count)
                                                                         for i in range(count))]
            assert got == want


def _one_and_parts(folded, candidate, tmp_path):
    cmd = ["check", str(EXAMPLE), str(candidate), *ARCH, "--data", str(folded / "png")]
    one = run_cli(*cmd, "--json", str(tmp_path / "one.json"))
    parts = []
    for i, workers in ((0, "0"), (1, "1")):  # one shard decodes in a worker process, one in its own
        proc = run_cli(*cmd, "--shard", f"{i}/2", "--json", str(tmp_path / f"part{i}.json"), "--workers", workers)
        assert proc.returncode == 0, proc.stderr
        parts.append(tmp_path / f"part{i}.json")
    assert proc.stdout.strip().startswith("shard 1/2: samples 180-359 of 360; wrote ")
    merged = run_cli("check", "--merge", *map(str, parts[::-1]), "--json", str(tmp_path / "merged.json"))
    return one, merged, json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "merged.json").read_text())


def test_two_shards_merged_give_the_report_of_one_process(folded, tmp_path):
    one, merged, a, b = _one_and_parts(folded, folded / "f" / "digits_cnn.onnx", tmp_path)
    assert one.returncode == merged.returncode == 0 and a == b
    assert a["samples"] == 360 and a["source"] == str(folded / "png") and a["noise_samples"] == 8
    stats = a["accuracy_stats"]["candidate onnx cpu"]
    assert (stats["samples"], stats["reference_only"], stats["candidate_only"]) == (360, 0, 0)
    assert merged.stdout.splitlines()[-2:] == one.stdout.splitlines()[-2:]


def test_merged_parts_of_a_failing_check_name_the_same_divergence(folded, tmp_path):
    one, merged, a, b = _one_and_parts(folded, folded / "bad.onnx", tmp_path)
    assert one.returncode == merged.returncode == 1 and a == b
    assert a["comparisons"][0]["divergence"]["module"] is not None


def test_parts_in_process_any_count_equal_one_check(folded, tmp_path):
    options = CheckOptions(InputSpec(data=folded / "digits.npz"), batch_size=64)
    for candidate in (folded / "f" / "digits_cnn.onnx", folded / "bad.onnx"):
        one = check_files(trusted(EXAMPLE), candidate, options).to_json()
        parts = [check_files(trusted(EXAMPLE), candidate, options, run=partial(check_part, index=i, count=3))
                 for i in range(3)]
        assert merge(parts).to_json() == one
        for part in parts:
            write_part(part, tmp_path / f"p{part.index}.json")
        assert merge([read_part(tmp_path / f"p{i}.json") for i in (2, 0, 1)]).to_json() == one


def test_two_torchrun_ranks_give_the_report_of_one_process(folded, tmp_path):
    cmd = ["check", str(EXAMPLE), str(folded / "f" / "digits_cnn.onnx"), *ARCH, "--data", str(folded / "digits.npz")]
    run_cli(*cmd, "--json", str(tmp_path / "one.json"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "bnrt", *cmd, "--json", str(tmp_path / "ranks.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "ranks.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
    assert proc.stdout.count("check passed") == 1  # rank 0 reports


def test_parts_that_do_not_make_one_check_are_refused_in_one_line(folded, tmp_path):
    cmd = ["check", str(EXAMPLE), str(folded / "f" / "digits_cnn.onnx"), *ARCH]
    for i in (0, 1):
        run_cli(*cmd, "--data", str(folded / "digits.npz"), "--shard", f"{i}/2", "--json", str(tmp_path / f"a{i}.json"))
    run_cli(*cmd, "--data", str(folded / "png"), "--shard", "1/2", "--json", str(tmp_path / "b1.json"))
    assert_one_line_error(run_cli("check", "--merge", str(tmp_path / "a0.json")), "shards 0/2",
                          "needs each of 0/2 .. 1/2 once")
    assert_one_line_error(run_cli("check", "--merge", str(tmp_path / "a0.json"), str(tmp_path / "b1.json")),
                          "the parts differ in their data")
    assert_one_line_error(run_cli("check", "--merge", str(folded / "f" / "digits_cnn.report.json")),
                          "not a part of a check")
    with open(tmp_path / "a1.npz", "ab") as f:
        f.write(b"\0")
    assert_one_line_error(run_cli("check", "--merge", str(tmp_path / "a0.json"), str(tmp_path / "a1.json")),
                          "a1.json: its outputs", "not the ones it was written with")
    assert_one_line_error(run_cli(*cmd, "--shard", "2/2", "--json", str(tmp_path / "x.json")), "0 <= I < N")
    assert_one_line_error(run_cli(*cmd, "--shard", "0/2"), "writes its part with --json")
    assert_one_line_error(run_cli(*cmd, "--merge", str(tmp_path / "a0.json")), "takes parts only")
    data = tmp_path / "d.npz"
    data.write_bytes((folded / "digits.npz").read_bytes())
    assert_one_line_error(run_cli(*cmd, "--data", str(data), "--shard", "0/2", "--json", str(tmp_path / "d.json")),
                          "would overwrite the input")
    assert data.read_bytes() == (folded / "digits.npz").read_bytes() and not (tmp_path / "d.json").exists()


def test_parts_of_fewer_samples_than_the_first_ones_and_of_empty_shards_equal_one_check(folded):
    for samples, count in ((7, 1), (6, 2), (5, 8)):
        options = CheckOptions(InputSpec(samples=samples), batch_size=4)
        one = check_files(trusted(EXAMPLE), folded / "f" / "digits_cnn.onnx", options).to_json()
        parts = [check_files(trusted(EXAMPLE), folded / "f" / "digits_cnn.onnx", options,
                             run=partial(check_part, index=i, count=count)) for i in range(count)]
        assert merge(parts).to_json() == one, (samples, count)


def test_a_part_keeps_non_finite_numbers_and_a_fixed_batch_graph_is_refused(folded, tmp_path):
    import math

    from bnrt.errors import OptionError
    from bnrt.verify.metrics import Divergence, LayerCheck

    options = CheckOptions(InputSpec(samples=4))
    part = check_files(trusted(EXAMPLE), folded / "f" / "digits_cnn.onnx", options,
                       run=partial(check_part, index=0, count=1))
    part.divergences[0] = Divergence("stem.1", float("inf"), "stem.0")
    part.layers[0] = LayerCheck(6, 1, "stem.1", float("inf"), float("nan"), 1e-6, 4)
    write_part(part, tmp_path / "p.json")
    back = read_part(tmp_path / "p.json")
    assert back.divergences[0] == Divergence("stem.1", float("inf"), "stem.0")
    layers = back.layers[0]
    assert (layers.worst, layers.margin, math.isnan(layers.error), layers.floor) == ("stem.1", float("inf"), True, 1e-6)
    import torch

    fixed = tmp_path / "fixed.onnx"
    bnrt.export_onnx(bnrt.load_model(EXAMPLE, trust_code=True).model, (torch.randn(2, 1, 8, 8),), fixed,
                     names=(["x"], ["output"]), dynamic_batch=False, exporter="torchscript")
    with pytest.raises(OptionError, match="exactly 2 samples at a time cannot be checked in parts"):
        check_files(fixed, fixed, CheckOptions(InputSpec(samples=4)), run=partial(check_part, index=0, count=2))
