"""The torch fold's ONNX export and its checks at further input shapes: the file not written
when no exporter can export the folded model (``exported``), the inputs the export is verified on (``probes``), and the folded model and the file
checked again at each further shape (``check_further``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx
import torch

from bnrt.errors import ExportError, InputError, first_line
from bnrt.io.data import Dataset, InputSpec, random_inputs
from bnrt.io.export import EXPORTER_KEY, export_onnx
from bnrt.io.shapes import format_axes, format_shapes
from bnrt.progress import Steps
from bnrt.verify.check import CheckOptions, check as run_check, side
from bnrt.verify.metrics import CheckReport
from bnrt.verify.sides import Candidate, Side


FURTHER_SAMPLES = 4  # samples of the check at each further input shape
RECORDS_NOT_EXPORTED = ("the model returns one dict of tensors per image (torchvision's detections): an ONNX graph "
                        "of it would fix the batch size, and its post-processing (NMS, a data-dependent number of "
                        "detections) does not export with a dynamic batch")


def exported(records: bool, model: torch.nn.Module, example: tuple, path: Path,
             **options) -> tuple[onnx.ModelProto | None, str | None, str | None]:
    """``export_onnx(model, example, path, **options)`` and the exporter that wrote the file, or
    (None, None, why) when no exporter can export the folded model (``records``: it returns one dict
    per image): the folded checkpoint is still written, and checked."""
    if records:
        return None, None, RECORDS_NOT_EXPORTED
    try:
        proto = export_onnx(model, example, path, **options)
    except ExportError as exc:
        return None, None, str(exc)
    return proto, next((p.value for p in proto.metadata_props if p.key == EXPORTER_KEY), options["exporter"]), None


def _random_at(shapes: list[tuple[int, ...]], count: int, spec: InputSpec, dtypes: list) -> Dataset:
    """``count`` random samples of the check's distribution at further ``shapes``."""
    return random_inputs(shapes, count, spec.seed, spec.distribution, spec.val_range, dtypes)


def probes(model: torch.nn.Module, dataset: Dataset, dynamic: dict[str, tuple[int, ...]], further: list,
           where: Path, spec: InputSpec) -> list[tuple] | None:
    """Inputs the exported graph must run on, one tuple per further shape, a batch of 3 where the
    batch is dynamic (None: the exporter's default, a batch of 3 of the example). ``InputError``
    when the model itself cannot run at a further shape: its dynamic axes cannot take other sizes."""
    if not further:
        return None
    batch = 3 if any(0 in a for a in dynamic.values()) else len(dataset.inputs[0][:2])
    dtypes = [x.dtype for x in dataset.inputs]
    probes = []
    for shapes in further:
        inputs = tuple(torch.from_numpy(x) for x in _random_at(shapes, batch, spec, dtypes).inputs)
        try:
            with torch.no_grad():
                model(*inputs)
        except Exception as exc:
            raise InputError(f"{where}: the model fails at {format_shapes(shapes)} (dynamic axes "
                             f"{format_axes(dynamic)}): {type(exc).__name__}: "
                             f"{first_line(exc)}; pass --check-shapes with sizes it takes, or keep those axes "
                             "static") from exc
        probes.append(inputs)
    return probes


def check_further(report: CheckReport, original: Side, structured: torch.nn.Module, onnx_path: Path | None,
                   further: list[list[tuple[int, ...]]], out_names: list[str], check: CheckOptions, steps: Steps,
                   dtypes: list) -> None:
    """The folded model and the ONNX file checked again at each further input shape (random
    samples, at most ``FURTHER_SAMPLES``; outputs only), their comparisons added to ``report``
    labelled with the shape."""
    spec = check.inputs
    for shapes in further:
        data = _random_at(shapes, min(spec.samples, FURTHER_SAMPLES), spec, dtypes)
        at = format_shapes(shapes)
        sides = [side(structured, label="torch folded", device=check.device, tf32=check.tf32)]
        if onnx_path is not None:
            sides.append(side(onnx_path, provider=check.provider, tf32=check.tf32))
        found = run_check(original, [Candidate(s, per_layer=False) for s in sides], data,
                          replace(check, per_layer=False), output_names=out_names, note=steps.note)
        for comparison in found.comparisons:
            comparison.reference += f" @ {at}"
            comparison.candidate += f" @ {at}"
        report.comparisons.extend(found.comparisons)
