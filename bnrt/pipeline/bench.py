"""Speed of the deployment paths of one model, measured side by side in one run.

Variants: torch eager (unfolded), torch eager folded by bnrt, torch.fx ``fuse`` (the common
alternative), onnxruntime on the ONNX that ``torch.onnx.export`` gives without bnrt, onnxruntime on
bnrt's ONNX, and the BN-free limit: the same architecture with every BatchNorm replaced by
``nn.Identity``, exported and run the same way (what a network without BN would cost). Where CUDA
is present: the ORT runs on the CUDA provider too, and torch eager (unfolded and folded) on the GPU,
the fair GPU baseline (inputs copied to the device and synchronised inside the timed call, as ORT's
``run`` does).

Method: threads pinned (torch and ORT intra-op) and reported; a warm-up per variant; then
``repeats`` rounds, each timing ``iterations`` calls of every variant in turn (interleaved, so that
drift of the machine hits all variants alike); latency percentiles over all timed calls;
throughput = batch / median latency.
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnrt.errors import InputError
from bnrt.io.load import load
from bnrt.io.save import refuse_overwrite, write_json
from bnrt.io.source import ModelSource
from bnrt.pipeline.convert import example_data
from bnrt.version import __version__
from bnrt.folding.capture import quiet
from bnrt.io.export import export_onnx, input_names, output_names
from bnrt.folding.torchfold import fold
from bnrt.session import Session
from bnrt.folding.structure import set_submodule

Runner = Callable[[np.ndarray], object]


@dataclass
class Row:
    variant: str
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float


@dataclass
class BenchReport:
    model: str
    threads: int
    batch_sizes: list[int]
    rows: list[Row] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def ratio(self, a: str, b: str, batch: int) -> float:
        """Median latency of variant ``a`` over that of ``b`` at ``batch``."""
        lat = {(r.variant, r.batch): r.p50_ms for r in self.rows}
        return lat[(a, batch)] / lat[(b, batch)]


def environment(threads: int) -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "bnrt": __version__, "threads": threads, "cores": __import__("os").cpu_count(),
            "providers": ort.get_available_providers()}


def bn_free(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm replaced by ``nn.Identity`` (a copy)."""
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, _BatchNorm):
            set_submodule(out, name, nn.Identity())
    return out


def _torch_runner(model: nn.Module, device: str = "cpu") -> Runner:
    model = model.to(device)

    def run(x: np.ndarray):
        with torch.inference_mode():
            out = model(torch.from_numpy(x).to(device))
            if device == "cuda":
                torch.cuda.synchronize()
            return out
    return run


def variants(model: nn.Module, example: torch.Tensor, workdir: Path, threads: int,
             cuda: bool = False, unavailable: dict[str, str] | None = None,
             torch_cuda: bool = False, calibration: np.ndarray | None = None) -> dict[str, Runner]:
    """The runners to compare, built from ``model`` (eval mode): ``cuda`` adds ORT's CUDA provider,
    ``torch_cuda`` torch eager on the GPU, ``calibration`` (real inputs) bnrt's INT8 and FP16 graphs
    of the folded model (``bnrt.pipeline.quantize``; timed here, verified by ``bnrt quantize``). A variant
    whose tool fails on the model is left out, with the reason in ``unavailable``."""
    from torch.fx.experimental.optimization import fuse

    names = (input_names(model, 1), output_names(1))
    folded = fold(model, (example,)).model
    plain_onnx, bnrt_onnx, limit_onnx = workdir / "plain.onnx", workdir / "bnrt.onnx", workdir / "bnfree.onnx"
    with quiet():
        program = torch.onnx.export(model, (torch.cat([example[:1]] * 2),), dynamo=True, input_names=names[0],
                                    output_names=names[1], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verbose=False)
        program.save(str(plain_onnx))
    export_onnx(folded, (example,), bnrt_onnx, names=names)
    export_onnx(bn_free(model), (example,), limit_onnx, names=names)
    runners: dict[str, Runner] = {
        "torch eager": _torch_runner(model),
        "torch eager, bnrt folded": _torch_runner(folded),
    }
    try:
        runners["torch.fx fuse"] = _torch_runner(fuse(copy.deepcopy(model)))
    except Exception as exc:  # torch.fx fuse fails on some placements (e.g. BatchNorm1d(affine=False))
        if unavailable is not None:
            unavailable["torch.fx fuse"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    providers = ["cpu"] + (["cuda"] if cuda else [])
    for provider in providers:
        for label, path in (("ORT, torch.onnx.export", plain_onnx), ("ORT, bnrt", bnrt_onnx),
                            ("ORT, BN-free limit", limit_onnx)):
            session = Session(path, provider, threads=threads)
            runners[f"{label} ({provider})"] = lambda x, s=session: s.run([x])
    if calibration is not None:
        from bnrt.pipeline.quantize import QuantizeOptions, to_fp16, to_int8

        to_int8(bnrt_onnx, workdir / "int8.onnx", names[0], [calibration], QuantizeOptions(), workdir)
        to_fp16(bnrt_onnx, workdir / "fp16.onnx", [calibration], QuantizeOptions(precision="fp16"))
        runners["ORT, bnrt int8 (cpu)"] = lambda x, s=Session(workdir / "int8.onnx", "cpu", threads=threads): s.run([x])
        for provider in providers:
            session = Session(workdir / "fp16.onnx", provider, threads=threads)
            runners[f"ORT, bnrt fp16 ({provider})"] = lambda x, s=session: s.run([x])
    elif unavailable is not None:
        unavailable["ORT, bnrt int8/fp16"] = "needs real inputs to calibrate on (--data)"
    if torch_cuda:
        runners["torch eager (cuda)"] = _torch_runner(copy.deepcopy(model), "cuda")
        runners["torch eager, bnrt folded (cuda)"] = _torch_runner(copy.deepcopy(folded), "cuda")
    return runners


def measure(runners: dict[str, Runner], inputs: np.ndarray, repeats: int, iterations: int) -> dict[str, np.ndarray]:
    """Per-call latencies (seconds) of every runner, interleaved round by round."""
    for run in runners.values():
        for _ in range(3):
            run(inputs)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            for _ in range(iterations):
                start = time.perf_counter()
                run(inputs)
                times[name].append(time.perf_counter() - start)
    return {k: np.array(v) for k, v in times.items()}


def bench_model(model: nn.Module, input_shape: tuple[int, ...], *, name: str = "model",
                batch_sizes: tuple[int, ...] = (1, 8, 32), threads: int = 1, repeats: int = 5,
                iterations: int = 20, cuda: bool | None = None,
                calibration: np.ndarray | None = None) -> BenchReport:
    """Benchmark ``model`` (eval mode) on random inputs of ``input_shape`` (batch axis replaced).
    ``cuda``: add the GPU variants (default: where ORT's CUDA provider, or torch's CUDA, is present);
    ``calibration``: real inputs, to add INT8 and FP16 variants."""
    torch.set_num_threads(threads)
    ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and cuda is not False
    torch_cuda = torch.cuda.is_available() and cuda is not False
    report = BenchReport(name, threads, list(batch_sizes), environment=environment(threads))
    example = torch.randn(2, *input_shape[1:])
    with tempfile.TemporaryDirectory() as tmp:
        runners = variants(model.eval(), example, Path(tmp), threads, ort_cuda, report.unavailable, torch_cuda,
                           calibration)
        for batch in batch_sizes:
            x = np.random.default_rng(batch).standard_normal((batch, *input_shape[1:])).astype(np.float32)
            for variant, t in measure(runners, x, repeats, iterations).items():
                ms = t * 1000
                report.rows.append(Row(variant, batch, float(np.percentile(ms, 50)), float(np.percentile(ms, 90)),
                                       float(np.percentile(ms, 99)), batch / float(np.median(t))))
    return report


def bench_file(source: ModelSource | str | os.PathLike, *, data: str | os.PathLike | None = None,
               batch_sizes: tuple[int, ...] = (1, 8, 32), threads: int = 1, repeats: int = 5, iterations: int = 20,
               refuse: list[str | os.PathLike | None] = ()) -> BenchReport:
    """``bnrt bench``: ``bench_model`` on the checkpoint ``source`` (single-input models), on random
    inputs of its input shape, or with ``data`` (real inputs) INT8 and FP16 variants too,
    calibrated on up to 256 of them. ``refuse``: the paths the report will be saved to
    (``save_bench``), refused up front when they would overwrite the model."""
    source = ModelSource.of(source)
    refuse_overwrite(list(refuse), [source.path])
    loaded = load(source, needs_modules="bnrt bench")
    dataset = example_data(loaded, source.input_shapes, data, str(source.path))
    if len(dataset.inputs) != 1:
        raise InputError(f"{source.path}: bnrt bench handles single-input models")
    report = bench_model(loaded.model, dataset.shapes()[0], name=source.path.stem, batch_sizes=batch_sizes,
                         threads=threads, repeats=repeats, iterations=iterations,
                         calibration=dataset.inputs[0][:256] if data else None)
    return report


def save_bench(report: BenchReport, json_out: str | os.PathLike | None = None,
               plot_out: str | os.PathLike | None = None) -> None:
    """The report as JSON to ``json_out`` and as a latency chart to ``plot_out``, each when given."""
    if json_out is not None:
        write_json(Path(json_out), report.to_json())
    if plot_out is not None:
        plot([report], Path(plot_out))


def markdown(report: BenchReport) -> str:
    lines = [f"### {report.model} ({report.threads} thread{'s' if report.threads > 1 else ''})", "",
             "| variant | batch | p50 ms | p90 ms | p99 ms | samples/s | p50 / ORT, bnrt |", "|---|---|---|---|---|---|---|"]
    base = {r.batch: r.p50_ms for r in report.rows if r.variant == "ORT, bnrt (cpu)"}
    for r in report.rows:
        lines.append(f"| {r.variant} | {r.batch} | {r.p50_ms:.3f} | {r.p90_ms:.3f} | {r.p99_ms:.3f} | "
                     f"{r.throughput:.0f} | {r.p50_ms / base[r.batch]:.2f} |")
    lines += [f"\n{variant}: not run ({reason})" for variant, reason in report.unavailable.items()]
    return "\n".join(lines) + "\n"


def plot(reports: list[BenchReport], path: Path) -> None:
    """One panel per model: median latency per variant and batch size (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bnrt.io.save import atomic_path

    fig, axes = plt.subplots(len(reports), 1, figsize=(9, 3.2 * len(reports)), squeeze=False)
    for ax, rep in zip(axes[:, 0], reports):
        names = list(dict.fromkeys(r.variant for r in rep.rows))
        width = 0.8 / len(rep.batch_sizes)
        for i, batch in enumerate(rep.batch_sizes):
            values = [next(r.p50_ms for r in rep.rows if r.variant == v and r.batch == batch) for v in names]
            ax.barh(np.arange(len(names)) + i * width, values, width, label=f"batch {batch}")
        ax.set_yticks(np.arange(len(names)) + width * (len(rep.batch_sizes) - 1) / 2, names, fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("median latency, ms (log)")
        ax.set_title(rep.model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
