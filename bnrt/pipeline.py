"""The whole conversion, load -> capture -> plan -> fold -> export -> run -> verify, as one call.

``fold_file`` is what ``bnrt fold`` runs; the CLI only parses flags and prints.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .capture import capture
from .data import Dataset, load_data, random_inputs
from .errors import InputError
from .export import DEFAULT_OPSET, count_ops, export_onnx, input_names, output_names
from .fold import FoldResult, apply
from .load import FOLDED_KEY, Loaded, load_model
from .plan import Decision, plan
from .run import Session, resolve_provider
from .save import ensure_dir, publish, staging, write_json, write_torch
from .verify import DEFAULT_ATOL, DEFAULT_RTOL, CheckReport, check, flatten_outputs, torch_runner

DEFAULT_SAMPLES = 64


@dataclass
class FoldOutcome:
    """What ``fold_file`` produced. ``written`` is empty when the check failed (only the report is
    written then) and lists the three artifacts otherwise."""

    result: FoldResult
    check: CheckReport | None
    report: dict[str, Any]
    written: list[Path] = field(default_factory=list)
    report_path: Path | None = None
    onnx_batchnorm_nodes: int = 0

    @property
    def passed(self) -> bool:
        return self.check is None or self.check.passed


def required_inputs(model: nn.Module) -> int:
    """Number of positional ``forward`` parameters without a default (at least 1)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    return max(1, sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                      for p in params))


def model_inputs(
    loaded: Loaded,
    input_shapes: list[tuple[int, ...]] | None,
    data_path: str | os.PathLike | None,
    samples: int,
    seed: int,
) -> tuple[Dataset, list[str]]:
    """The data to check on, and the model's input names. Shapes come from the command line, the
    checkpoint or the data file; the data must fit the shapes when both are given."""
    shapes = input_shapes or loaded.input_shapes
    count = len(shapes) if shapes else required_inputs(loaded.model)
    names = input_names(loaded.model, count)
    if data_path is not None:
        data = load_data(data_path, names)
        if shapes:
            for name, given, got in zip(names, shapes, data.shapes()):
                if tuple(given[1:]) != tuple(got[1:]):
                    raise InputError(f"{data_path}: input {name!r} has per-sample shape {tuple(got[1:])}, "
                                     f"but the input shape is {tuple(given)}")
        return data, names
    if not shapes:
        raise InputError(f"{loaded.path}: no input shape; pass --input-shape (e.g. 1,3,224,224) or --data, "
                         "or store 'input_shape' in the checkpoint")
    return random_inputs(shapes, samples, seed), names


def example_from(data: Dataset) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(x[:2].copy()) for x in data.inputs)


def fold_file(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    data: str | os.PathLike | None = None,
    provider: str = "cpu",
    run_check: bool = True,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> FoldOutcome:
    """Fold the checkpoint at ``path`` and write ``<stem>.folded.pt``, ``<stem>.onnx`` and
    ``<stem>.report.json`` into ``out_dir`` (default: the checkpoint's folder).

    Unless ``run_check`` is False, the original torch model is compared with the folded torch model
    and with the ONNX file on ORT (``provider``), on ``data`` or on ``samples`` seeded random inputs.
    When the check fails only the report is written. Raises ``InputError`` (and subclasses) for bad
    input before anything is written.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 4)
        clock = now

    src = Path(path)
    if run_check:
        resolve_provider(provider)
    loaded = load_model(src, arch=arch, trust_pickle=trust_pickle)
    out = Path(out_dir) if out_dir is not None else src.parent
    stem = src.name.rsplit(".", 1)[0] if "." in src.name else src.name
    names = {"folded": f"{stem}.folded.pt", "onnx": f"{stem}.onnx", "report": f"{stem}.report.json"}
    for name in names.values():
        if (out / name).resolve() == src.resolve():
            raise InputError(f"{src}: output {out / name} would overwrite the input; choose another -o folder")
    dataset, in_names = model_inputs(loaded, input_shapes, data, samples, seed)
    example = example_from(dataset)
    lap("load")

    cap = capture(loaded.model, example)
    decisions = plan(cap)
    lap("capture+plan")
    result = apply(loaded.model, decisions, cap)
    result.tracer = cap.tracer
    lap("fold")
    with torch.no_grad():
        out_count = len(flatten_outputs(result.model(*example)))
    out_names = output_names(out_count)
    ensure_dir(out)
    with staging(out) as stage:
        summary = {
            "bn_total": len(decisions),
            "folded": len(result.folded),
            "skipped": len(result.skipped),
            "fp16_overflow": result.fp16_overflow,
        }
        metadata = {"bnrt_version": __version__, "source_sha256": loaded.sha256,
                    "bn_folded": str(summary["folded"]), "bn_total": str(summary["bn_total"])}
        proto = export_onnx(result.model, example, stage / names["onnx"], names=(in_names, out_names),
                            opset=opset, metadata=metadata, exporter=exporter)
        summary["batchnorm_nodes_in_onnx"] = count_ops(proto, "BatchNormalization")
        lap("export")
        write_torch(stage / names["folded"], {
            FOLDED_KEY: result.structure(),
            "state_dict": result.structured.state_dict(),
            "arch": loaded.arch,
            "arch_kwargs": loaded.arch_kwargs,
            "input_shape": [list(s) for s in dataset.shapes()],
            "bnrt_version": __version__,
            "source_sha256": loaded.sha256,
        })
        lap("save")
        report_check = None
        if run_check:
            session = Session(stage / names["onnx"], provider=provider)
            report_check = check(
                ("torch", torch_runner(loaded.model)),
                [("torch folded", torch_runner(result.model)), (f"onnx {provider}", session.run)],
                dataset, out_names, atol=atol, rtol=rtol,
            )
            lap("check")
        report = {
            "bnrt_version": __version__,
            "source": {"path": str(src), "sha256": loaded.sha256, "format": loaded.source_format,
                       "arch": loaded.arch},
            "input_names": in_names,
            "output_names": out_names,
            "input_shapes": [list(s) for s in dataset.shapes()],
            "opset": opset,
            "exporter": exporter,
            "tracer": cap.tracer,
            "summary": summary,
            "decisions": [d.to_json() for d in decisions],
            "check": report_check.to_json() if report_check else None,
            "timings_s": timings,
            "outputs": {k: str(out / v) for k, v in names.items()},
        }
        passed = report_check is None or report_check.passed
        write_json(stage / names["report"], report)
        keep = [names["folded"], names["onnx"], names["report"]] if passed else [names["report"]]
        written = publish(stage, keep, out)
    return FoldOutcome(result, report_check, report, written if passed else [], out / names["report"],
                       summary["batchnorm_nodes_in_onnx"])


def inspect_file(
    path: str | os.PathLike,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    data: str | os.PathLike | None = None,
) -> tuple[Loaded, list[Decision]]:
    """Load and plan only: the BatchNorm inventory with each decision. Writes nothing."""
    loaded = load_model(path, arch=arch, trust_pickle=trust_pickle)
    dataset, _ = model_inputs(loaded, input_shapes, data, 2, 0)
    return loaded, plan(capture(loaded.model, example_from(dataset)))

