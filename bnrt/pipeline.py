"""The whole conversion, load -> capture -> plan -> fold -> export -> run -> verify, as one call
(``fold_file``, what ``bnrt fold`` runs), and the equivalence check of two model files
(``check_files``, what ``bnrt check`` runs). The CLI only parses flags and prints.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from torch import nn

from . import __version__
from .calibrate import CalibrationReport
from .capture import capture
from .data import Dataset, load_data, random_inputs
from .errors import InputError
from .export import DEFAULT_OPSET, count_ops, export_onnx, input_names, output_names
from .fold import FoldResult, apply
from .load import FOLDED_KEY, Loaded, file_sha256, load_model
from .onnxfold import fold_onnx, load_onnx
from .localise import FOLDS_KEY, first_divergence, folds_in, folds_of, onnx_taps, torch_taps
from .decision import Decision
from .torchgraph import plan
from .run import Session, resolve_provider
from .save import atomic_path, ensure_dir, publish, staging, write_json, write_torch
from .verify import DEFAULT_BATCH, DEFAULT_TOP_K, CheckReport, Runner, Tolerances, check, flatten_outputs, torch_runner

DEFAULT_SAMPLES = 64
LOCALISE_SAMPLES = 8


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


@dataclass
class Side:
    """One model taking part in a check: how to run it, what inputs it takes, its intermediate
    outputs ("taps", for localisation) and the folds bnrt recorded in it."""

    label: str
    runner: Runner
    input_names: list[str]
    input_shapes: list[tuple[int | None, ...] | None]
    input_dtypes: list[np.dtype]
    output_names: list[str]
    taps: Callable[[list[np.ndarray]], dict[str, np.ndarray]]
    folds: list[dict]
    fixed_batch: int | None = None


def required_inputs(model: nn.Module) -> int:
    """Number of positional ``forward`` parameters without a default (at least 1)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    return max(1, sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                      for p in params))


def torch_side(label: str, loaded: Loaded, input_shapes: list[tuple[int, ...]] | None = None) -> Side:
    model = loaded.model
    shapes = input_shapes or loaded.input_shapes
    count = len(shapes) if shapes else required_inputs(model)
    folds = (loaded.structure or {}).get("folds", [])
    return Side(label, torch_runner(model), input_names(model, count), list(shapes) if shapes else [None] * count,
                [np.dtype(np.float32)] * count, [], lambda xs: torch_taps(model, xs), folds)


def onnx_side(label: str, path: Path, provider: str) -> Side:
    session = Session(path, provider=provider)
    shapes = [spec.shape for spec in session.inputs]
    dtypes = [spec.dtype for spec in session.inputs]
    fixed = shapes[0][0] if shapes and shapes[0] else None
    return Side(label, session.run, session.input_names, shapes, dtypes, session.output_names,
                lambda xs: onnx_taps(path, xs, provider),
                folds_in(session.session.get_modelmeta().custom_metadata_map), fixed)


def batching(sides: list[Side], spec: "InputSpec", batch_size: int) -> tuple["InputSpec", int]:
    """Sample count and batch size that fit sides whose ONNX batch dimension is fixed."""
    fixed = {s.fixed_batch for s in sides if s.fixed_batch}
    if len(fixed) > 1:
        raise InputError(f"the models have different fixed batch sizes {sorted(fixed)}")
    if not fixed:
        return spec, batch_size
    batch = fixed.pop()
    return replace(spec, samples=max(batch, spec.samples // batch * batch)), batch


def open_side(path: str | os.PathLike, *, label: str, provider: str = "cpu", arch: str | None = None,
              trust_pickle: bool = False, input_shapes: list[tuple[int, ...]] | None = None) -> Side:
    """A torch checkpoint (original or folded) or, for ``.onnx`` files, an ORT session."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        return onnx_side(f"{label} onnx {provider}", path, provider)
    return torch_side(f"{label} torch", load_model(path, arch=arch, trust_pickle=trust_pickle), input_shapes)


def _merge_inputs(ref: Side, cand: Side, ref_path, cand_path) -> tuple[list[str], list[tuple | None], list[np.dtype]]:
    """The inputs both sides take; ``InputError`` when names, count or shapes disagree."""
    if len(ref.input_names) != len(cand.input_names):
        raise InputError(f"{cand_path}: takes {len(cand.input_names)} input(s) ({', '.join(cand.input_names)}), "
                         f"{ref_path} takes {len(ref.input_names)} ({', '.join(ref.input_names)})")
    if ref.input_names != cand.input_names:
        raise InputError(f"{cand_path}: input names {', '.join(cand.input_names)} differ from {ref_path}'s "
                         f"{', '.join(ref.input_names)}")
    shapes = []
    for name, a, b in zip(ref.input_names, ref.input_shapes, cand.input_shapes):
        if a is not None and b is not None:
            if len(a) != len(b) or any(x is not None and y is not None and x != y for x, y in zip(a[1:], b[1:])):
                raise InputError(f"{cand_path}: input {name!r} has shape {_fmt(b)}, {ref_path} expects {_fmt(a)}")
        known = a if a is not None and all(d is not None for d in a[1:]) else b
        shapes.append(known)
    dtypes = [b if a == np.float32 else a for a, b in zip(ref.input_dtypes, cand.input_dtypes)]
    return ref.input_names, shapes, dtypes


def _fmt(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


@dataclass(frozen=True)
class InputSpec:
    """How to make check inputs: a data file, or seeded random samples of a distribution."""

    data: str | os.PathLike | None = None
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    distribution: str = "normal"
    val_range: tuple[float, float] | None = None


def make_inputs(spec: InputSpec, names: list[str], shapes: list[tuple | None], dtypes: list[np.dtype] | None = None,
                where: str = "model") -> Dataset:
    """The check data: ``spec.data`` (validated against ``shapes``) or random samples."""
    if spec.data is not None:
        data = load_data(spec.data, names)
        for name, given, got in zip(names, shapes, data.shapes()):
            if given is not None and (len(given) != len(got) or any(
                    d is not None and d != g for d, g in zip(given[1:], got[1:]))):
                raise InputError(f"{spec.data}: input {name!r} has per-sample shape {tuple(got[1:])}, "
                                 f"but the input shape is {_fmt(given)}")
        return data
    missing = [n for n, s in zip(names, shapes) if s is None or any(d is None for d in s[1:])]
    if missing:
        raise InputError(f"{where}: no input shape for {', '.join(missing)}; pass --input-shape (e.g. 1,3,224,224) "
                         "or --data, or store 'input_shape' in the checkpoint")
    return random_inputs([tuple(s) for s in shapes], spec.samples, spec.seed, spec.distribution, spec.val_range,
                         dtypes)


def localise(reference: Side, candidate: Side, data: Dataset, folds: list[dict], tolerances: Tolerances):
    """First divergent module between two sides, on the first few samples."""
    head = [x[:LOCALISE_SAMPLES] for x in data.inputs]
    return first_divergence(reference.taps(head), candidate.taps(head), folds, *tolerances.of(""))


def compare_sides(reference: Side, candidates: list[Side], data: Dataset, output_names: list[str], folds: list[dict],
                  tolerances: Tolerances, top_k: int = DEFAULT_TOP_K, batch_size: int = DEFAULT_BATCH,
                  localisation: bool = True) -> CheckReport:
    """``check`` of the candidates against the reference; each failed comparison names its first
    divergent module."""
    report = check((reference.label, reference.runner), [(c.label, c.runner) for c in candidates], data,
                   output_names, tolerances=tolerances, top_k=top_k, batch_size=batch_size)
    for comparison, side in zip(report.comparisons, candidates):
        if localisation and not comparison.passed:
            comparison.divergence = localise(reference, side, data, folds, tolerances)
    return report


def _refuse_overwrite(src: Path, out: Path, names) -> None:
    for name in names:
        if (out / name).resolve() == src.resolve():
            raise InputError(f"{src}: output {out / name} would overwrite the input; choose another -o folder")


def check_files(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    *,
    provider: str = "cpu",
    reference_provider: str = "cpu",
    arch: str | None = None,
    trust_pickle: bool = False,
    input_shapes: list[tuple[int, ...]] | None = None,
    inputs: InputSpec = InputSpec(),
    tolerances: Tolerances = Tolerances(),
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_BATCH,
    save_inputs: str | os.PathLike | None = None,
    localisation: bool = True,
) -> CheckReport:
    """Compare ``candidate`` with ``reference``; each a torch checkpoint or an ONNX file run on ORT
    (``provider`` for the candidate, ``reference_provider`` for the reference). When they differ,
    the report names the first module whose output diverges (``Comparison.divergence``)."""
    ref = open_side(reference, label="reference", provider=reference_provider, arch=arch,
                    trust_pickle=trust_pickle, input_shapes=input_shapes)
    cand = open_side(candidate, label="candidate", provider=provider, arch=arch,
                     trust_pickle=trust_pickle, input_shapes=input_shapes)
    names, shapes, dtypes = _merge_inputs(ref, cand, reference, candidate)
    inputs, batch_size = batching([ref, cand], inputs, batch_size)
    data = make_inputs(inputs, names, shapes, dtypes, str(reference))
    if save_inputs is not None:
        save_dataset(data, names, Path(save_inputs))
    outs = ref.output_names or cand.output_names or output_names(len(ref.runner([x[:1] for x in data.inputs])))
    return compare_sides(ref, [cand], data, outs, ref.folds + cand.folds, tolerances, top_k, batch_size, localisation)


def save_dataset(data: Dataset, names: list[str], path: Path) -> None:
    arrays = dict(zip(names, data.inputs))
    if data.labels is not None:
        arrays["y"] = data.labels
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def fold_file(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    inputs: InputSpec = InputSpec(),
    provider: str = "cpu",
    run_check: bool = True,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    tolerances: Tolerances = Tolerances(),
    top_k: int = DEFAULT_TOP_K,
) -> FoldOutcome:
    """Fold the checkpoint at ``path`` and write ``<stem>.folded.pt``, ``<stem>.onnx`` and
    ``<stem>.report.json`` into ``out_dir`` (default: the checkpoint's folder). An ``.onnx`` file
    is folded as a graph instead (``<stem>.folded.onnx`` and the report; ``fold_onnx_file``).

    Unless ``run_check`` is False, the original torch model is compared with the folded torch model
    and with the ONNX file on ORT (``provider``), on ``inputs`` (a data file or seeded random
    samples). When the check fails only the report is written. Raises ``InputError`` (and
    subclasses) for bad input before anything is written.
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
    out = Path(out_dir) if out_dir is not None else src.parent
    if src.suffix.lower() == ".onnx":
        return fold_onnx_file(src, out, inputs=inputs, provider=provider, run_check=run_check,
                              tolerances=tolerances, top_k=top_k)
    loaded = load_model(src, arch=arch, trust_pickle=trust_pickle)
    stem = src.name.rsplit(".", 1)[0] if "." in src.name else src.name
    names = {"folded": f"{stem}.folded.pt", "onnx": f"{stem}.onnx", "report": f"{stem}.report.json"}
    _refuse_overwrite(src, out, names.values())
    original = torch_side("torch", loaded, input_shapes)
    dataset = make_inputs(inputs, original.input_names, original.input_shapes, where=str(src))
    in_names = original.input_names
    example = tuple(torch.from_numpy(x[:2].copy()) for x in dataset.inputs)
    lap("load")

    cap = capture(loaded.model, example)
    decisions = plan(cap)
    lap("capture+plan")
    result = apply(loaded.model, decisions, cap)
    result.tracer = cap.tracer
    lap("fold")
    folds = folds_of(decisions)
    with torch.no_grad():
        out_count = len(flatten_outputs(result.model(*example)))
    out_names = output_names(out_count)
    ensure_dir(out)
    with staging(out) as stage:
        summary = {"bn_total": len(decisions), "folded": len(result.folded), "skipped": len(result.skipped),
                   "fp16_overflow": result.fp16_overflow}
        metadata = {"bnrt_version": __version__, "source_sha256": loaded.sha256,
                    "bn_folded": str(summary["folded"]), "bn_total": str(summary["bn_total"]),
                    FOLDS_KEY: json.dumps(folds)}
        proto = export_onnx(result.model, example, stage / names["onnx"], names=(in_names, out_names),
                            opset=opset, metadata=metadata, exporter=exporter)
        summary["batchnorm_nodes_in_onnx"] = count_ops(proto, "BatchNormalization")
        lap("export")
        write_torch(stage / names["folded"], {
            FOLDED_KEY: {**result.structure(), "folds": folds},
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
            onnx_path = stage / names["onnx"]
            session = Session(onnx_path, provider=provider)
            folded_side = Side("torch folded", torch_runner(result.model), in_names, [], [], out_names,
                               lambda xs: torch_taps(result.model, xs), folds)
            onnx_run = Side(f"onnx {provider}", session.run, in_names, [], [], out_names,
                            lambda xs: onnx_taps(onnx_path, xs, provider), folds)
            report_check = compare_sides(original, [folded_side, onnx_run], dataset, out_names, folds, tolerances, top_k)
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


def fold_onnx_file(
    src: Path,
    out: Path,
    *,
    inputs: InputSpec,
    provider: str,
    run_check: bool,
    tolerances: Tolerances,
    top_k: int,
) -> FoldOutcome:
    """``fold_file`` for an ONNX input: ``<stem>.folded.onnx`` and ``<stem>.report.json``, the
    folded graph checked against the original, both on ORT."""
    clock = time.perf_counter()
    model = load_onnx(src)
    sha = file_sha256(src)
    result = fold_onnx(model, str(src))
    fold_s = time.perf_counter() - clock
    stem = src.name[: -len(".onnx")] if src.name.lower().endswith(".onnx") else src.name
    names = {"folded": f"{stem}.folded.onnx", "report": f"{stem}.report.json"}
    _refuse_overwrite(src, out, names.values())
    folds = folds_of(result.decisions)
    meta = {p.key: p for p in result.model.metadata_props}
    for key, value in {"bnrt_version": __version__, "source_sha256": sha, "bn_folded": str(len(result.folded)),
                       "bn_total": str(len(result.decisions)), FOLDS_KEY: json.dumps(folds)}.items():
        entry = meta.get(key) or result.model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(result.model, full_check=True)
    ensure_dir(out)
    with staging(out) as stage:
        with atomic_path(stage / names["folded"]) as tmp:
            onnx.save(result.model, str(tmp))
        report_check = None
        if run_check:
            original = onnx_side(f"onnx {provider}", src, provider)
            folded = onnx_side(f"onnx folded {provider}", stage / names["folded"], provider)
            spec, batch_size = batching([original], inputs, DEFAULT_BATCH)
            data = make_inputs(spec, original.input_names, original.input_shapes, original.input_dtypes, str(src))
            report_check = compare_sides(original, [folded], data, original.output_names, folds, tolerances, top_k,
                                         batch_size)
        summary = {"bn_total": len(result.decisions), "folded": len(result.folded), "skipped": len(result.skipped),
                   "fp16_overflow": result.fp16_overflow,
                   "batchnorm_nodes_in_onnx": count_ops(result.model, "BatchNormalization")}
        report = {
            "bnrt_version": __version__,
            "source": {"path": str(src), "sha256": sha, "format": "onnx", "arch": None},
            "input_names": [i.name for i in result.model.graph.input if i.name not in
                            {init.name for init in result.model.graph.initializer}],
            "output_names": [o.name for o in result.model.graph.output],
            "opset": next((o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")), None),
            "tracer": "onnx graph",
            "summary": summary,
            "decisions": [d.to_json() for d in result.decisions],
            "check": report_check.to_json() if report_check else None,
            "timings_s": {"fold": round(fold_s, 4), "total": round(time.perf_counter() - clock, 4)},
            "outputs": {k: str(out / v) for k, v in names.items()},
        }
        passed = report_check is None or report_check.passed
        write_json(stage / names["report"], report)
        written = publish(stage, list(names.values()) if passed else [names["report"]], out)
    return FoldOutcome(result, report_check, report, written if passed else [], out / names["report"],
                       summary["batchnorm_nodes_in_onnx"])


def inspect_file(
    path: str | os.PathLike,
    *,
    input_shapes: list[tuple[int, ...]] | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    data: str | os.PathLike | None = None,
) -> tuple[Loaded | None, list[Decision]]:
    """Load and plan only: the BatchNorm inventory with each decision. Writes nothing. For an
    ``.onnx`` file, the decisions of the graph folder (and no ``Loaded``)."""
    if Path(path).suffix.lower() == ".onnx":
        return None, fold_onnx(load_onnx(path), str(path)).decisions
    loaded = load_model(path, arch=arch, trust_pickle=trust_pickle)
    side = torch_side("torch", loaded, input_shapes)
    dataset = make_inputs(InputSpec(data=data, samples=2), side.input_names, side.input_shapes, where=str(path))
    return loaded, plan(capture(loaded.model, tuple(torch.from_numpy(x[:2].copy()) for x in dataset.inputs)))


@dataclass
class CalibrationOutcome:
    report: CalibrationReport
    residuals: dict[str, tuple[float, float]]
    written: Path | None
    rank: int = 0


def calibrate_file(
    path: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    mode: str = "fast",
    batch_size: int = 64,
    arch: str | None = None,
    trust_pickle: bool = False,
    progress=None,
    measure: bool = True,
) -> CalibrationOutcome:
    """Recalibrate the BatchNorm statistics of the checkpoint at ``path`` over ``data`` and write a
    checkpoint (state_dict, arch, arch_kwargs, input_shape, and a ``bnrt_calibration`` entry) to
    ``output``. Under torchrun (WORLD_SIZE > 1) each rank takes its shard of the data, the ranks
    pool their statistics over a gloo process group and rank 0 writes the file."""
    from .calibrate import batches_of, calibrate, residuals

    src, out = Path(path), Path(output)
    if out.resolve() == src.resolve():
        raise InputError(f"{src}: -o would overwrite the input; write the calibrated model elsewhere")
    if batch_size <= 0:
        raise InputError(f"--batch-size {batch_size}: must be positive")
    loaded = load_model(src, arch=arch, trust_pickle=trust_pickle)
    side = torch_side("torch", loaded)
    dataset = load_data(data, side.input_names)
    group, rank, world = _process_group()
    try:
        shard = np.array_split(np.arange(dataset.size), world)[rank]
        arrays = [x[shard] for x in dataset.inputs]
        batches = batches_of(arrays, batch_size)
        report = calibrate(loaded.model, batches, mode=mode, process_group=group, progress=progress, where=str(data))
        report.samples = dataset.size if group is not None else report.samples
        found = residuals(loaded.model, batches(), where=str(data)) if measure and group is None else {}
    finally:
        if group is not None:  # a gloo group left open aborts the process at exit
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    written = None
    if rank == 0:
        ensure_dir(out.parent if str(out.parent) else Path("."))
        write_torch(out, {
            "state_dict": loaded.model.state_dict(),
            "arch": loaded.arch,
            "arch_kwargs": loaded.arch_kwargs,
            "input_shape": [list(s) for s in dataset.shapes()],
            "bnrt_calibration": {"mode": mode, "samples": report.samples, "batch_size": batch_size,
                                 "data_sha256": file_sha256(Path(data)), "source_sha256": loaded.sha256,
                                 "world_size": world},
        })
        written = out
    return CalibrationOutcome(report, found, written, rank)


def _process_group():
    """(group, rank, world size): a gloo group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size()
