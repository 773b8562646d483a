"""The benchmark: structure of the report on a tiny model, the figures it prints are the ones it\nmeasured; no timing assertions."""

import json

import onnxruntime as ort
import torch
from torch import nn

from bnrt.pipeline.bench import BenchReport, Row, bench_model, bn_free, markdown

from ..conftest import EXAMPLE, run_cli

VARIANTS = ["torch eager", "torch eager, bnrt folded", "torch.fx fuse", "ORT, torch.onnx.export (cpu)",
            "ORT, bnrt (cpu)", "ORT, BN-free limit (cpu)"]
# what this machine adds: ORT's CUDA provider, torch on the GPU
CUDA_VARIANTS = (["ORT, torch.onnx.export (cuda)", "ORT, bnrt (cuda)", "ORT, BN-free limit (cuda)"]
                 if "CUDAExecutionProvider" in ort.get_available_providers() else []) + (
                ["torch eager (cuda)", "torch eager, bnrt folded (cuda)"] if torch.cuda.is_available() else [])


def test_bench_report_structure_on_a_tiny_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    report = bench_model(model.eval(), (1, 3, 6, 6), name="tiny", batch_sizes=(1, 4), repeats=1, iterations=2, cuda=False)
    assert [(r.variant, r.batch) for r in report.rows] == [(v, b) for b in (1, 4) for v in VARIANTS]
    for r in report.rows:
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.throughput > 0
    assert report.environment["threads"] == 1 and list(report.unavailable) == ["ORT, bnrt int8/fp16"]
    table = markdown(report)
    assert table.count("\n| ") == 2 + len(report.rows) - 1


def test_ratio_is_median_latency_over_median_latency():
    report = BenchReport("m", 1, [1, 8], rows=[Row("a", 1, 2.0, 3, 4, 500), Row("b", 1, 8.0, 9, 9, 125),
                                              Row("a", 8, 6.0, 7, 8, 1333), Row("b", 8, 3.0, 4, 5, 2666)])
    assert report.ratio("a", "b", 1) == 0.25 and report.ratio("a", "b", 8) == 2.0
    assert report.ratio("b", "a", 1) == 4.0


def test_bn_free_replaces_every_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    free = bn_free(model)
    assert [type(m) for m in free.modules()].count(nn.Identity) == 2
    assert isinstance(model[1], nn.BatchNorm2d)


def test_torch_fx_fuse_failure_is_reported_not_fatal():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False))
    report = bench_model(model.eval(), (1, 3), name="affine-free", batch_sizes=(2,), repeats=1, iterations=1, cuda=False)
    assert "torch.fx fuse" in report.unavailable
    assert "torch.fx fuse" not in {r.variant for r in report.rows}


def test_bench_cli_smoke(tmp_path):
    proc = run_cli("bench", str(EXAMPLE), "--batch-sizes", "1,2", "--repeats", "1", "--iterations", "2",
                   "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["model"] == "digits_cnn"
    assert data["unavailable"] == {"ORT, bnrt int8/fp16": "needs real inputs to calibrate on (--data)"}
    assert [(r["variant"], r["batch"]) for r in data["rows"]] == [(v, b) for b in (1, 2) for v in VARIANTS + CUDA_VARIANTS]
    assert "| ORT, bnrt (cpu) | 1 |" in proc.stdout


def test_tools_bench_regenerates_the_docs(tmp_path, monkeypatch):
    import sys

    from tools import bench

    monkeypatch.setattr(sys, "argv", ["bench", "--models", "tabular", "--batch-sizes", "1", "--repeats", "1",
                                      "--iterations", "1", "--docs", str(tmp_path),
                                      "--pipeline-model", "resnet", "--rounds", "1"])
    bench.main()
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert [r["model"] for r in data["reports"]] == ["tabular"]
    cost = data["pipeline_cost"]
    assert set(cost) == {"bnrt fold", "torch.fx fuse + torch.onnx.export"}
    text = (tmp_path / "BENCHMARKS.md").read_text()
    # the page quotes the figures it measured (the command lines ran to completion: tools.bench exits otherwise)
    b, a = cost["bnrt fold"], cost["torch.fx fuse + torch.onnx.export"]
    assert (f"- ratio: wall {b['wall_s'] / a['wall_s']:.2f}, peak memory {b['peak_mb'] / a['peak_mb']:.2f} "
            "(target ≤ 1.3 each)") in text
    assert f"{b['wall_s']:.2f} s, peak {b['peak_mb']:.0f} MB" in text
    assert "bnrt ONNX / BN-free limit" in text and "| tabular |" in text and "- ratio: wall " in text
    assert (tmp_path / "benchmarks.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_with_data_adds_int8_and_fp16(tmp_path):
    import numpy as np

    from models.digits import digits_split

    _, _, x, y = digits_split()
    np.savez(tmp_path / "d.npz", x=x[:64], y=y[:64])
    proc = run_cli("bench", str(EXAMPLE), "--batch-sizes", "1", "--repeats", "1", "--iterations", "2",
                   "--data", str(tmp_path / "d.npz"), "--json", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    rows = [r["variant"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]]
    assert rows[:len(VARIANTS)] == VARIANTS
    assert {"ORT, bnrt int8 (cpu)", "ORT, bnrt fp16 (cpu)"} <= set(rows)
