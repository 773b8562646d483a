"""The whole conversion, load -> capture -> plan -> fold -> export -> check, as one call
(``fold_file``, what ``bnrt fold`` runs, for torch checkpoints and ONNX files alike, told apart by
``ModelSource.kind``), and the BatchNorm inventory (``inspect_file``, what ``bnrt inspect`` runs).
The file names and formats are ``bnrt.io.artifacts``'; the check is ``bnrt.verify.check``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import numpy_helper

from bnrt.errors import OptionError, about
from bnrt.folding.capture import capture
from bnrt.folding.decision import Decision
from bnrt.folding.engine import Plan
from bnrt.folding.onnxfold import OnnxFoldResult, check_model, fold_onnx, load_onnx
from bnrt.folding.onnxshapes import declared_shapes
from bnrt.folding.torchfold import FoldResult, fold_captured, layer_weights, stored_weights
from bnrt.folding.torchgraph import plan
from bnrt.folding.torchops import statistics
from bnrt.io.artifacts import (artifact_names, fold_report, folded_checkpoint, folds_of, onnx_metadata,
                               set_onnx_metadata)
from bnrt.io.data import Dataset, InputSpec, make_inputs
from bnrt.io.export import DEFAULT_OPSET, PROGRAM_EXPORTERS, count_ops, dynamic_axes_of, export_program, is_records, names_of_outputs
from bnrt.io.load import load
from bnrt.io.save import (atomic_path, data_file, publish, refuse_overwrite, save_onnx, staging, write_json,
                           write_torch)
from bnrt.io.shapes import ShapeOptions, filled, further_shapes, given_shapes, resolve_dynamic, within
from bnrt.io.source import KIND_NAMES, PROGRAMS, Loaded, ModelSource, file_sha256
from bnrt.pipeline.exporting import check_further, exported, probes
from bnrt.progress import Steps
from bnrt.session import resolve_provider
from bnrt.verify.certify import Certificate, certify
from bnrt.verify.check import CheckOptions, check as run_check, inputs_for, side
from bnrt.verify.metrics import CheckReport
from bnrt.verify.sides import Candidate, Side


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
    kind: str = "torch"

    @property
    def passed(self) -> bool:
        return self.check is None or self.check.passed


def _finish(stage: Path, out: Path, names: dict[str, str], report: dict[str, Any], result, check: CheckReport | None,
            kind: str) -> FoldOutcome:
    """Write the report and publish the artifacts (only the report when the check failed)."""
    write_json(stage / names["report"], report)
    passed = check is None or check.passed
    written = publish(stage, list(names.values()) if passed else [names["report"]], out)
    return FoldOutcome(result, check, report, written if passed else [], out / names["report"],
                       report["summary"]["batchnorm_nodes_in_onnx"], kind)


def fold_file(source: ModelSource | str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
              check: CheckOptions | None = CheckOptions(), opset: int = DEFAULT_OPSET, exporter: str = "dynamo",
              progress: bool = False, shapes: ShapeOptions = ShapeOptions(), unshare: bool = False) -> FoldOutcome:
    """Fold the model ``source`` names and write its artifacts into ``out_dir`` (default: the
    model's folder): for a torch checkpoint ``<stem>.folded.pt``, ``<stem>.onnx`` and
    ``<stem>.report.json``; for an ONNX model ``<stem>.folded.onnx`` and the report.

    Unless ``check`` is None, the folded model is checked against the original: a torch
    checkpoint's original torch model against the folded torch model and the ONNX file on ORT
    (``check.provider``), an ONNX model against its folded graph, on ``check.inputs`` (a data file
    or seeded random samples). When the check fails only the report is written. Raises
    ``InputError`` (and subclasses) for bad input before anything is written. ``progress`` lists
    the steps on stderr as they run (``bnrt.progress``). ``shapes``: the ONNX file's dynamic axes
    and the further shapes they are checked at (torch checkpoints; ``bnrt.io.shapes``). ``unshare``:
    a layer called at several places gets a copy per call in the ONNX file, so that each call's BN
    folds into its own copy (torch checkpoints; ``bnrt.folding.unshare``).
    """
    source = ModelSource.of(source)
    if check is not None:
        resolve_provider(check.provider)
    out = Path(out_dir) if out_dir is not None else source.path.parent
    names = artifact_names(source.path, source.kind)
    onnx_outputs = [names[k] for k in ("onnx", "folded") if k in names and (k == "onnx" or source.kind == "onnx")]
    refuse_overwrite([out / n for n in [*names.values(), *map(data_file, onnx_outputs)]], [source.path])
    if shapes.given and source.kind != "torch":
        raise OptionError(f"{source.path}: dynamic axes and check shapes apply to torch checkpoints only (the "
                          f"{KIND_NAMES[source.kind]} keeps its own)")
    with Steps(progress) as steps:
        if source.kind == "onnx":
            return _fold_onnx(source, out, names, check, steps)
        if source.kind in PROGRAMS:
            return _fold_program(source, out, names, check, opset, steps)
        return _fold_torch(source, out, names, check, opset, exporter, shapes, steps, unshare)


def _with_data(names: dict[str, str], key: str, stage: Path) -> dict[str, str]:
    """``names`` and, when the ONNX file ``names[key]`` keeps its tensors beside it (a model over
    1 GiB, ``save_onnx``), that data file as ``KEY_data``: published and reported with it."""
    data = data_file(names[key])
    return {**names, f"{key}_data": data} if (stage / data).exists() else names


def _example(dataset: Dataset) -> tuple[torch.Tensor, ...]:
    """Two samples to trace and export with."""
    return tuple(torch.from_numpy(x[:2].copy()) for x in dataset.inputs)


def _fold_torch(source: ModelSource, out: Path, names: dict[str, str], check: CheckOptions | None, opset: int,
                exporter: str, shapes: ShapeOptions, steps: Steps, unshare: bool = False) -> FoldOutcome:
    with steps.step("load"):
        loaded = load(source)
        options = check or CheckOptions(InputSpec(samples=2))
        original = side(loaded, device=options.device, tf32=options.tf32, input_shapes=source.input_shapes)
        dataset = make_inputs(options.inputs, original.input_names, original.input_shapes, where=str(source.path),
                              config=original.data_config)
        example = _example(dataset)
        dynamic = resolve_dynamic(shapes.dynamic, original.input_names, dataset.shapes())
        further = further_shapes(dynamic, dataset.shapes(), shapes.check)
    with steps.step("capture+plan"), about(source.path):
        cap = capture(loaded.model, example)
        planned = plan(cap)
    with steps.step("fold"):
        result, planned, planned_on = fold_captured(loaded.model, cap, planned, unshare)
        result.tracer = cap.tracer
        with torch.no_grad():
            sample = result.model(*example)
            out_names = names_of_outputs(sample)
    with staging(out) as stage:
        with steps.step("export"):
            proto, exporter, not_written = exported(
                is_records(sample), result.model, example, stage / names["onnx"],
                names=(original.input_names, out_names), opset=opset, exporter=exporter,
                metadata=onnx_metadata(loaded.sha256, planned.decisions, planned.merges), dynamic=dynamic,
                probe_inputs=probes(loaded.model, dataset, dynamic, further, source.path, options.inputs),
                static_ok=shapes.static_ok)
            del sample
            names = {k: v for k, v in names.items() if k != "onnx"} if proto is None else _with_data(names, "onnx", stage)
            batchnorm_nodes = None if proto is None else count_ops(proto, "BatchNormalization")
            held = dynamic_axes_of(proto) if proto is not None else dynamic
            further = within(further, held, original.input_names, dataset.shapes())  # --static-ok may have fixed some axes
        with steps.step("save"):
            write_torch(stage / names["folded"], folded_checkpoint(result, loaded, dataset.shapes()))
        report_check = None
        if check is not None:
            with steps.step("check"):
                certificate = torch_certificate(planned, planned_on, proto, result.model)
                del proto  # the check reads the file; its weights need not stay in memory twice
                report_check = _check_torch(original, result.structured, names.get("onnx") and stage / names["onnx"],
                                            dataset, out_names, check, steps, folds_of(planned.decisions, planned.merges))
                check_further(report_check, original, result.structured, names.get("onnx") and stage / names["onnx"],
                              further, out_names, check, steps, [x.dtype for x in dataset.inputs])
                report_check.certificate = certificate
        report = fold_report(
            source={"path": str(source.path), "sha256": loaded.sha256, "format": loaded.source_format,
                    "arch": loaded.arch, "precision": loaded.precision, **({"notes": loaded.notes} if loaded.notes else {})},
            input_names=original.input_names, output_names=out_names, input_shapes=dataset.shapes(), opset=opset,
            exporter=exporter, tracer=cap.tracer, decisions=planned.decisions, merges=result.merges,
            fp16_overflow=result.fp16_overflow, batchnorm_nodes=batchnorm_nodes,
            check=report_check.to_json() if report_check else None, timings=steps.timings, peaks=steps.peaks,
            outputs={k: str(out / v) for k, v in names.items()}, checkpoint_keeps=result.checkpoint_keeps,
            unshared=unshared_summary(result, loaded.model))
        if not_written:
            report["summary"]["onnx_not_written"] = not_written
        else:
            report["dynamic_axes"] = {n: list(a) for n, a in held.items()}
        return _finish(stage, out, names, report, result, report_check, "torch")


def unshared_summary(result: FoldResult, model: torch.nn.Module) -> dict[str, Any] | None:
    """The report's account of ``--unshare``: each shared layer's copies and the parameters they add
    to the model's; None when nothing was unshared."""
    if not result.unshared:
        return None
    copies: dict[str, list[str]] = {}
    for copy_path, layer in result.unshared.items():
        copies.setdefault(layer, []).append(copy_path)
    return {"copies": copies, "parameters_added": result.unshared_parameters,
            "parameters_before": sum(p.numel() for p in model.parameters())}


def _check_torch(original: Side, structured: torch.nn.Module, onnx_path: Path | None, dataset: Dataset,
                 out_names: list[str], check: CheckOptions, steps: Steps, folds: list[dict]) -> CheckReport:
    """The original torch model against the folded one and the exported ONNX file: the ONNX file,
    exported from the folded model, runs on every sample; the folded model in the user's structure
    (the folded checkpoint's: its modules run, BNs as Identity or with identity statistics) on the
    noise-floor samples, and it is the one compared layer by layer (module outputs by hooks, no
    second ORT session; the ONNX file's weights are the certificate's). ``folds``: the ONNX
    file's, for localising it."""
    folded = side(structured, label="torch folded", device=check.device, tf32=check.tf32)
    if onnx_path is None:  # no ONNX file: the folded model is the one deployed, run on every sample
        return run_check(original, [Candidate(folded, per_layer=True)], dataset, check, output_names=out_names,
                         folds=folds, note=steps.note)
    onnx_run = side(onnx_path, provider=check.provider, tf32=check.tf32)
    return run_check(original, [Candidate(folded, head_only=True, per_layer=True), Candidate(onnx_run, per_layer=False)],
                     dataset, check, output_names=out_names, folds=folds, note=steps.note)


def torch_certificate(planned: Plan, original: torch.nn.Module, proto: onnx.ModelProto | None,
                      folded: torch.nn.Module) -> Certificate:
    """The weight certificate of a torch fold: each folded layer as the ONNX file stores it (the
    exporter keeps the parameter names: ``<layer>.weight``, ``<layer>.bias``), else as the folded
    model holds it, against the exact fold of ``original``'s parameters and statistics."""
    tensors = {t.name: t for t in proto.graph.initializer} if proto is not None else {}

    def stored(layer):
        held = stored_weights(folded, layer)
        names = (f"{layer.name}.weight", f"{layer.name}.bias")
        if held is not None and all(n in tensors for n in names):
            exported = tuple(numpy_helper.to_array(tensors[n]) for n in names)
            if all(a.shape == b.shape for a, b in zip(exported, held)):
                return exported
        return held

    return certify(planned, lambda layer: layer_weights(original, layer), lambda d: statistics(original, d), stored)


@dataclass
class _Graph:
    """An ONNX graph to fold and what its report says about where it came from: the file's
    sha256 and format, the reference side the folded graph is checked against, the artifact key
    the folded graph is written under, the exporter that wrote the graph (None: the user's file)."""

    model: onnx.ModelProto
    sha256: str
    source: dict[str, Any]
    original: Side
    key: str
    exporter: str | None = None
    shapes: dict[str, tuple] | None = None  # input shapes for planning (symbolic dims)
    data: tuple[Dataset, int] | None = None  # the check's data and batch size, when made before folding


def _fold_onnx(source: ModelSource, out: Path, names: dict[str, str], check: CheckOptions | None,
               steps: Steps) -> FoldOutcome:
    """``fold_file`` for an ONNX model: the folded graph checked against the original, both on ORT.
    Symbolic dims take the check data's sizes (``--input-shape``, or the data file's) where
    planning needs shapes."""
    with steps.step("load"):
        model = load_onnx(source.path)
        sha = file_sha256(source.path)
        check_model(model, str(source.path))
        options = check or CheckOptions()
        original = side(source, provider=options.provider, tf32=options.tf32)
        data = inputs_for(original, [], check, str(source.path)) if check is not None else None
    shapes = filled(original.input_shapes, data[0].shapes()) if data is not None \
        else original.input_shapes if source.input_shapes else None
    graph = _Graph(model, sha, {"format": "onnx", "arch": None}, original, "folded",
                   shapes=dict(zip(original.input_names, shapes)) if shapes else None, data=data)
    return _fold_graph(graph, source, out, names, check, steps)


def _program_graph(source: ModelSource, inputs: InputSpec, opset: int, device: str = "cpu",
                   tf32: bool | None = None) -> tuple[Loaded, Side, onnx.ModelProto]:
    """A TorchScript archive or an ExportedProgram read, made a check side (its outputs named) and
    exported to ONNX with its BatchNorms kept, on two samples of ``inputs``."""
    loaded = load(source)
    original = side(loaded, label=source.kind, device=device, tf32=tf32)
    example = _example(make_inputs(inputs, original.input_names, original.input_shapes, where=str(source.path)))
    with torch.no_grad(), about(source.path):
        original.output_names = names_of_outputs(loaded.model(*example))
        model = export_program(loaded.program, example, kind=source.kind,
                               names=(original.input_names, original.output_names), opset=opset)
    return loaded, original, model


def _fold_program(source: ModelSource, out: Path, names: dict[str, str], check: CheckOptions | None, opset: int,
                  steps: Steps) -> FoldOutcome:
    """``fold_file`` for a TorchScript archive or an ExportedProgram: exported to ONNX with its
    BatchNorms kept, the graph folded by bnrt, the folded ONNX checked against the program itself."""
    with steps.step("load+export"):
        options = check or CheckOptions(InputSpec(samples=2))
        loaded, original, model = _program_graph(source, options.inputs, opset, options.device, options.tf32)
    graph = _Graph(model, loaded.sha256, {"format": loaded.source_format, "arch": None, "precision": loaded.precision},
                   original, "onnx", PROGRAM_EXPORTERS[source.kind])
    return _fold_graph(graph, source, out, names, check, steps)


def _fold_graph(graph: _Graph, source: ModelSource, out: Path, names: dict[str, str], check: CheckOptions | None,
                steps: Steps) -> FoldOutcome:
    """Fold ``graph`` with bnrt's graph folder, write it and check it against ``graph.original``
    (outputs, and the weight certificate); the report says where the graph came from."""
    src = source.path
    with steps.step("fold"), about(src):
        result = fold_onnx(graph.model, str(src), graph.shapes)
        set_onnx_metadata(result.model, onnx_metadata(graph.sha256, result.decisions, result.merges))
    original = graph.original
    with staging(out) as stage:
        with steps.step("save"):
            with atomic_path(stage / names[graph.key]) as tmp:  # onnx's full check first
                save_onnx(result.model, tmp, names[graph.key])
            names = _with_data(names, graph.key, stage)
        report_check = None
        if check is not None:
            with steps.step("check"):
                folded = side(stage / names[graph.key], label=f"onnx folded {check.provider}", provider=check.provider,
                              tf32=check.tf32)
                data, batch_size = graph.data or inputs_for(original, [folded], check, str(src))
                report_check = run_check(original, [Candidate(folded, per_layer=False if graph.exporter else None)],
                                         data, replace(check, batch_size=batch_size),
                                         output_names=original.output_names,
                                         folds=folds_of(result.decisions, result.merges), note=steps.note)
                report_check.certificate = certify(result.plan, lambda layer: (layer.data.weight, layer.data.bias),
                                                   lambda d: result.statistics[id(d)], result.stored)
        report = fold_report(
            source={"path": str(src), "sha256": graph.sha256, **graph.source},
            input_names=original.input_names, output_names=original.output_names,
            input_shapes=[list(s) if s is not None else [] for s in original.input_shapes],
            opset=next((o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")), None),
            exporter=graph.exporter, tracer="onnx graph", decisions=result.decisions, merges=result.merges,
            fp16_overflow=result.fp16_overflow, batchnorm_nodes=count_ops(result.model, "BatchNormalization"),
            check=report_check.to_json() if report_check else None, timings=steps.timings, peaks=steps.peaks,
            outputs={k: str(out / v) for k, v in names.items()})
        return _finish(stage, out, names, report, result, report_check, source.kind)


def example_data(loaded: Loaded, input_shapes: list[tuple[int, ...]] | None = None,
                 data: str | os.PathLike | None = None, where: str = "model") -> Dataset:
    """Two samples a loaded model runs on (from ``data``, else random of its input shapes), to trace
    or benchmark it."""
    model = side(loaded, input_shapes=input_shapes)
    return make_inputs(InputSpec(data=data, samples=2), model.input_names, model.input_shapes, where=where)


def inspect_file(source: ModelSource | str | os.PathLike, *,
                 data: str | os.PathLike | None = None) -> tuple[Loaded | None, list[Decision]]:
    """Load and plan only: the BatchNorm inventory with each decision. Writes nothing. For an ONNX
    model, the decisions of the graph folder (and no ``Loaded``). ``data``: inputs to trace with
    (default: random ones of the input shapes)."""
    source = ModelSource.of(source)
    if source.kind == "onnx":
        model = load_onnx(source.path)
        declared = declared_shapes(model)
        shapes = given_shapes(list(declared), list(declared.values()), source.input_shapes, str(source.path))
        with about(source.path):
            return None, fold_onnx(model, str(source.path),
                                   dict(zip(declared, shapes)) if source.input_shapes else None).decisions
    if source.kind in PROGRAMS:
        loaded, _, model = _program_graph(source, InputSpec(data=data, samples=2), DEFAULT_OPSET)
        with about(source.path):
            return loaded, fold_onnx(model, str(source.path)).decisions
    loaded = load(source)
    dataset = example_data(loaded, source.input_shapes, data, str(source.path))
    with about(source.path):
        return loaded, plan(capture(loaded.model, _example(dataset))).decisions
