"""The whole conversion, load -> capture -> plan -> fold -> export -> run -> verify, as one call
(``fold_file``, what ``bnrt fold`` runs, for torch checkpoints and ONNX files), and the BatchNorm
inventory (``inspect_file``, what ``bnrt inspect`` runs). The CLI only parses flags and prints; the
formats written are ``bnrt.artifacts``'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import torch

from bnrt.io.artifacts import (artifact_names, fold_report, folded_checkpoint, folds_of, onnx_metadata,
                        set_onnx_metadata)
from bnrt.folding.capture import capture
from bnrt.io.data import InputSpec, make_inputs
from bnrt.folding.decision import Decision, DecisionSet
from bnrt.errors import about
from bnrt.io.export import DEFAULT_OPSET, count_ops, export_onnx, output_names
from bnrt.folding.torchfold import FoldResult, apply
from bnrt.io.load import Loaded, ModelSource, file_sha256
from bnrt.check.localise import onnx_taps, torch_taps
from bnrt.folding.onnxfold import OnnxFoldResult, fold_onnx, load_onnx
from bnrt.progress import Steps
from bnrt.deploy.run import Session, resolve_provider
from bnrt.io.save import atomic_path, publish, refuse_overwrite, staging, write_json, write_torch
from bnrt.check.sides import CheckOptions, Side, batching, compare_sides, example_data, onnx_side, session_tf32, tf32_deployment, torch_side
from bnrt.folding.torchgraph import plan
from bnrt.check.metrics import CheckReport, flatten_outputs, torch_runner


@dataclass
class FoldOutcome:
    """What ``fold_file`` produced. ``written`` is empty when the check failed (only the report is
    written then) and lists every artifact otherwise."""

    result: FoldResult | OnnxFoldResult
    check: CheckReport | None
    report: dict[str, Any]
    written: list[Path] = field(default_factory=list)
    report_path: Path | None = None
    onnx_batchnorm_nodes: int = 0

    @property
    def passed(self) -> bool:
        return self.check is None or self.check.passed


def _finish(stage: Path, out: Path, names: dict[str, str], report: dict[str, Any], result: DecisionSet,
            check: CheckReport | None) -> FoldOutcome:
    """Write the report and publish the artifacts (only the report when the check failed)."""
    write_json(stage / names["report"], report)
    passed = check is None or check.passed
    written = publish(stage, list(names.values()) if passed else [names["report"]], out)
    return FoldOutcome(result, check, report, written if passed else [], out / names["report"],
                       report["summary"]["batchnorm_nodes_in_onnx"])


def fold_file(
    source: ModelSource | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    check: CheckOptions | None = CheckOptions(),
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    progress: bool = False,
) -> FoldOutcome:
    """Fold the checkpoint ``source`` and write ``<stem>.folded.pt``, ``<stem>.onnx`` and
    ``<stem>.report.json`` into ``out_dir`` (default: the checkpoint's folder). An ``.onnx`` file
    is folded as a graph instead (``<stem>.folded.onnx`` and the report; ``fold_onnx_file``).

    Unless ``check`` is None, the original torch model is compared with the folded torch model and
    with the ONNX file on ORT (``check.provider``), on ``check.inputs`` (a data file or seeded
    random samples). When the check fails only the report is written. Raises ``InputError`` (and
    subclasses) for bad input before anything is written. ``progress`` lists the steps on stderr
    as they run (``bnrt.progress``).
    """
    source = ModelSource.of(source)
    src = source.path
    if check is not None:
        resolve_provider(check.provider)
    out = Path(out_dir) if out_dir is not None else src.parent
    names = artifact_names(src)
    refuse_overwrite([out / n for n in names.values()], [src])
    if src.suffix.lower() == ".onnx":
        return fold_onnx_file(src, out, check, progress=progress)
    with Steps(progress) as steps:
        with steps.step("load"):
            loaded = source.load()
            device = check.device if check is not None else "cpu"
            original = torch_side("torch", loaded, source.input_shapes, device=device,
                                  tf32=check.tf32 if check is not None else None)
            inputs = check.inputs if check is not None else InputSpec(samples=2)
            dataset = make_inputs(inputs, original.input_names, original.input_shapes, where=str(src))
            in_names = original.input_names
            example = tuple(torch.from_numpy(x[:2].copy()) for x in dataset.inputs)
        with steps.step("capture+plan"), about(src):
            cap = capture(loaded.model, example)
            planned = plan(cap)
        decisions = planned.decisions
        with steps.step("fold"):
            result = apply(loaded.model, planned, cap)
            result.tracer = cap.tracer
            folds = folds_of(decisions)
            with torch.no_grad():
                out_names = output_names(len(flatten_outputs(result.model(*example))))
        with staging(out) as stage:
            with steps.step("export"):
                proto = export_onnx(result.model, example, stage / names["onnx"], names=(in_names, out_names),
                                    opset=opset, metadata=onnx_metadata(loaded.sha256, decisions), exporter=exporter)
            with steps.step("save"):
                write_torch(stage / names["folded"], folded_checkpoint(result, loaded, dataset.shapes()))
            report_check = None
            if check is not None:
                with steps.step("check"):
                    onnx_path, provider = stage / names["onnx"], check.provider
                    session = Session(onnx_path, provider=provider, tf32=session_tf32(provider, check.tf32))
                    # the ONNX file, exported from the folded model, runs on every sample; the folded
                    # torch model on the noise-floor samples: the same weights need no second full pass
                    folded_side = Side("torch folded" + (" cuda" if device == "cuda" else ""),
                                       torch_runner(result.model, device, bool(check.tf32)), in_names, [], [],
                                       out_names, lambda xs: torch_taps(result.model, xs), folds, head_only=True)
                    onnx_run = Side(f"onnx {provider}", session.run, in_names, [], [], out_names,
                                    lambda xs: onnx_taps(onnx_path, xs, provider), folds)
                    extra = tf32_deployment(onnx_path, onnx_run.label, provider, check.tf32)
                    report_check = compare_sides(original, [folded_side, onnx_run, *extra], dataset, out_names, folds,
                                                 check, note=steps.note)
            report = fold_report(
                source={"path": str(src), "sha256": loaded.sha256, "format": loaded.source_format, "arch": loaded.arch},
                input_names=in_names, output_names=out_names, input_shapes=dataset.shapes(), opset=opset,
                exporter=exporter, tracer=cap.tracer, decisions=decisions, merges=result.merges,
                fp16_overflow=result.fp16_overflow,
                batchnorm_nodes=count_ops(proto, "BatchNormalization"),
                check=report_check.to_json() if report_check else None, timings=steps.timings,
                outputs={k: str(out / v) for k, v in names.items()}, checkpoint_keeps=result.checkpoint_keeps)
            return _finish(stage, out, names, report, result, report_check)


def fold_onnx_file(src: Path, out: Path, check: CheckOptions | None = CheckOptions(), *,
                   progress: bool = False) -> FoldOutcome:
    """``fold_file`` for an ONNX input: ``<stem>.folded.onnx`` and ``<stem>.report.json``, the
    folded graph checked against the original, both on ORT."""
    with Steps(progress) as steps:
        with steps.step("load"):
            model = load_onnx(src)
            sha = file_sha256(src)
        with steps.step("fold"), about(src):
            result = fold_onnx(model, str(src))
            names = artifact_names(src)
            set_onnx_metadata(result.model, onnx_metadata(sha, result.decisions))
            onnx.checker.check_model(result.model, full_check=True)
        with staging(out) as stage:
            with steps.step("save"):
                with atomic_path(stage / names["folded"]) as tmp:
                    onnx.save(result.model, str(tmp))
            report_check = None
            provider = check.provider if check is not None else "cpu"
            tf32 = check.tf32 if check is not None else None
            original = onnx_side(f"onnx {provider}", src, provider, tf32)
            if check is not None:
                with steps.step("check"):
                    folded = onnx_side(f"onnx folded {provider}", stage / names["folded"], provider, tf32)
                    spec, batch_size = batching([original], check.inputs, check.batch_size)
                    data = make_inputs(spec, original.input_names, original.input_shapes, original.input_dtypes,
                                       str(src))
                    extra = tf32_deployment(stage / names["folded"], folded.label, provider, tf32)
                    report_check = compare_sides(original, [folded, *extra], data, original.output_names,
                                                 folds_of(result.decisions), replace(check, batch_size=batch_size),
                                                 note=steps.note)
            report = fold_report(
                source={"path": str(src), "sha256": sha, "format": "onnx", "arch": None},
                input_names=original.input_names, output_names=original.output_names,
                input_shapes=[list(s) if s is not None else [] for s in original.input_shapes],
                opset=next((o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")), None),
                exporter=None, tracer="onnx graph", decisions=result.decisions, merges=result.merges,
                fp16_overflow=result.fp16_overflow,
                batchnorm_nodes=count_ops(result.model, "BatchNormalization"),
                check=report_check.to_json() if report_check else None, timings=steps.timings,
                outputs={k: str(out / v) for k, v in names.items()})
            return _finish(stage, out, names, report, result, report_check)


def inspect_file(source: ModelSource | str | os.PathLike, *,
                 data: str | os.PathLike | None = None) -> tuple[Loaded | None, list[Decision]]:
    """Load and plan only: the BatchNorm inventory with each decision. Writes nothing. For an
    ``.onnx`` file, the decisions of the graph folder (and no ``Loaded``). ``data``: inputs to
    trace with (default: random ones of the input shapes)."""
    source = ModelSource.of(source)
    if source.path.suffix.lower() == ".onnx":
        with about(source.path):
            return None, fold_onnx(load_onnx(source.path), str(source.path)).decisions
    loaded = source.load()
    dataset = example_data(loaded, source.input_shapes, data, str(source.path))
    with about(source.path):
        return loaded, plan(capture(loaded.model, tuple(torch.from_numpy(x[:2].copy()) for x in dataset.inputs))).decisions


