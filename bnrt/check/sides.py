"""The check's sides: a model taking part in an equivalence check (torch checkpoint or ONNX file on
ORT), how its inputs are matched with the other side's, and ``check_files`` (what ``bnrt check``
runs): both sides on the same inputs, the first divergent module named when they differ.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from bnrt.io.artifacts import folds_in
from bnrt.io.data import Dataset, InputSpec, fmt_shape, make_inputs, save_dataset
from bnrt.errors import InputError
from bnrt.io.export import model_input_names, output_names
from bnrt.io.load import Loaded, ModelSource
from bnrt.check.localise import first_divergence, onnx_taps, torch_taps
from bnrt.progress import Steps
from bnrt.deploy.run import Session, check_tf32
from bnrt.io.save import refuse_overwrite
from bnrt.check.metrics import (DEFAULT_ATOL, DEFAULT_BATCH, DEFAULT_RTOL, DEFAULT_TOP_K, CheckReport, NoiseReference, Runner, Tolerances,
                     check, check_device, torch_runner)

LOCALISE_SAMPLES = 8


@dataclass(frozen=True)
class CheckOptions:
    """How a check runs: its inputs, the ORT provider of ONNX candidates, tolerances, top-k, batch
    size, whether a failed comparison is localised to its first divergent module, TF32 (CUDA
    only, off unless asked for) and the ``device`` torch sides run on."""

    inputs: InputSpec = InputSpec()
    provider: str = "cpu"
    tolerances: Tolerances = Tolerances()
    top_k: int = DEFAULT_TOP_K
    batch_size: int = DEFAULT_BATCH
    localise: bool = True
    tf32: bool | None = None  # CUDA only; None: off in checks (exact float32)
    device: str = "cpu"  # where torch sides run

    def __post_init__(self) -> None:
        check_device(self.device)
        check_tf32("cuda" if self.device == "cuda" else self.provider, self.tf32)


def session_tf32(provider: str, tf32: bool | None) -> bool | None:
    """The ``tf32`` of a check's ORT session: on CUDA off unless asked for (exact float32); None
    (not applicable) elsewhere."""
    return bool(tf32) if provider == "cuda" else None


@dataclass
class Side:
    """One model taking part in a check: how to run it, what inputs it takes, its intermediate
    outputs ("taps", for localisation) and the folds bnrt recorded in it."""

    label: str
    runner: Runner
    input_names: list[str]
    input_shapes: list[tuple[int | None, ...] | None]
    input_dtypes: list[np.dtype | None]  # None: any (a torch model takes what it is given)
    output_names: list[str]
    taps: Callable[[list[np.ndarray]], dict[str, np.ndarray]]
    folds: list[dict]
    fixed_batch: int | None = None
    noise: NoiseReference | None = None
    head_only: bool = False  # as a candidate, run on the noise-floor samples only (verify.check)
    informational: bool = False  # as a candidate, reported but not deciding the check


def float64_noise(model: nn.Module) -> NoiseReference:
    """The float64 truth of a torch model: a float64 copy (made on first use) run on float64 inputs."""
    double: list[nn.Module] = []

    def inputs64(xs):
        if not double:
            double.append(copy.deepcopy(model).double())
        return double[0], [x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x for x in xs]

    def run(xs):
        m, xs = inputs64(xs)
        return torch_runner(m)(xs)  # where the model is: the reference ran first and placed it

    def taps(xs):
        m, xs = inputs64(xs)
        return torch_taps(m, xs)

    return NoiseReference("float64", run, taps)


def rounding_noise(model: onnx.ModelProto, label: str, provider: str, tf32: bool | None = None,
                   seed: int = 0) -> NoiseReference:
    """The graph with every float32 initializer moved by one ULP on a random half of its elements:
    its difference from the graph is the float32 noise that re-rounding the weights (any fold) causes."""
    rng = np.random.default_rng(seed)
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    for init in noisy.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(init)
        away = np.where(rng.random(w.shape) < 0.5, np.float32(np.inf), np.float32(-np.inf))
        moved = np.where(rng.random(w.shape) < 0.5, np.nextafter(w, away), w)
        init.CopyFrom(numpy_helper.from_array(moved.astype(np.float32), init.name))
    session = Session(f"{label} (weights re-rounded)", provider, model_bytes=noisy.SerializeToString(), tf32=tf32)
    return NoiseReference("rounding", session.run, lambda xs: onnx_taps(noisy, xs, provider))


def torch_side(label: str, loaded: Loaded, input_shapes: list[tuple[int, ...]] | None = None, *,
               device: str = "cpu", tf32: bool | None = None) -> Side:
    """A loaded torch model as a check side; on ``device`` (moved there at its first run) with TF32
    as ``tf32`` says (off by default: exact float32). Its noise reference is its float64 copy."""
    model = loaded.model
    shapes = input_shapes or loaded.input_shapes
    names = model_input_names(model, shapes)
    folds = (loaded.structure or {}).get("folds", [])
    return Side(label + (" cuda" if device == "cuda" else ""), torch_runner(model, device, bool(tf32)), names,
                list(shapes) if shapes else [None] * len(names), [None] * len(names), [],
                lambda xs: torch_taps(model, xs), folds, noise=float64_noise(model))


def example_data(loaded: Loaded, input_shapes: list[tuple[int, ...]] | None = None,
                 data: str | os.PathLike | None = None, where: str = "model") -> Dataset:
    """Two samples a loaded model runs on (from ``data``, else random of its input shapes), to trace
    or benchmark it."""
    side = torch_side("torch", loaded, input_shapes)
    return make_inputs(InputSpec(data=data, samples=2), side.input_names, side.input_shapes, where=where)


def onnx_side(label: str, path: Path, provider: str, tf32: bool | None = None) -> Side:
    """An ONNX file on ORT (on CUDA with TF32 as asked: off by default); its noise reference
    re-rounds its weights (``rounding_noise``), made on first use."""
    tf32 = session_tf32(provider, tf32)
    session = Session(path, provider=provider, tf32=tf32)
    shapes = [spec.shape for spec in session.inputs]
    dtypes = [spec.dtype for spec in session.inputs]
    fixed = shapes[0][0] if shapes and shapes[0] else None
    made: list[NoiseReference] = []

    def noise() -> NoiseReference:
        if not made:
            made.append(rounding_noise(onnx.load(str(path)), str(path), provider, tf32))
        return made[0]

    return Side(label, session.run, session.input_names, shapes, dtypes, session.output_names,
                lambda xs: onnx_taps(path, xs, provider),
                folds_in(session.session.get_modelmeta().custom_metadata_map), fixed,
                NoiseReference("rounding", lambda xs: noise().runner(xs), lambda xs: noise().taps(xs)))


def batching(sides: list[Side], spec: InputSpec, batch_size: int) -> tuple[InputSpec, int]:
    """Sample count and batch size that fit sides whose ONNX batch dimension is fixed."""
    fixed = {s.fixed_batch for s in sides if s.fixed_batch}
    if len(fixed) > 1:
        raise InputError(f"the models have different fixed batch sizes {sorted(fixed)}")
    if not fixed:
        return spec, batch_size
    batch = fixed.pop()
    return replace(spec, samples=max(batch, spec.samples // batch * batch)), batch


def tf32_deployment(path: Path, label: str, provider: str, tf32: bool | None) -> list[Side]:
    """On CUDA with the check in exact float32: the ONNX file under TF32 (ORT's CUDA default, what a
    deployment gets), an informational candidate on the noise-floor samples. Elsewhere: none."""
    if provider != "cuda" or tf32:
        return []
    session = Session(path, provider=provider, tf32=True)
    return [Side(f"{label} tf32 (ORT default)", session.run, [], [], [], [], lambda xs: {}, [], head_only=True,
                 informational=True)]


def open_side(source: ModelSource, *, label: str, provider: str = "cpu", tf32: bool | None = None,
              device: str = "cpu") -> Side:
    """A torch checkpoint (original or folded; on ``device``) or, for ``.onnx`` files, an ORT session."""
    path = source.path
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        return onnx_side(f"{label} onnx {provider}", path, provider, tf32)
    return torch_side(f"{label} torch", source.load(), source.input_shapes, device=device, tf32=tf32)


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
                raise InputError(f"{cand_path}: input {name!r} has shape {fmt_shape(b)}, {ref_path} expects {fmt_shape(a)}")
        known = a if a is not None and all(d is not None for d in a[1:]) else b
        shapes.append(known)
    dtypes = [b if a is None else a for a, b in zip(ref.input_dtypes, cand.input_dtypes)]
    return ref.input_names, shapes, dtypes


def localise(reference: Side, candidate: Side, data: Dataset, folds: list[dict], tolerances: Tolerances,
             noisy: bool):
    """First divergent module between two sides, on the first few samples; judged against the
    reference's noise floor per module when ``noisy`` (the check used it), else by tolerances."""
    head = [x[:LOCALISE_SAMPLES] for x in data.inputs]
    ref_taps, cand_taps = reference.taps(head), candidate.taps(head)
    if noisy and reference.noise is not None and reference.noise.taps is not None:
        noise = reference.noise.anchor_and_noisy(ref_taps, reference.noise.taps(head))
        return first_divergence(ref_taps, cand_taps, folds, None, noise, tolerances.factor, tolerances.allow_nonfinite)
    return first_divergence(ref_taps, cand_taps, folds, tolerances.fixed("") or (DEFAULT_ATOL, DEFAULT_RTOL),
                            allow_nonfinite=tolerances.allow_nonfinite)


def compare_sides(reference: Side, candidates: list[Side], data: Dataset, output_names: list[str], folds: list[dict],
                  options: CheckOptions = CheckOptions(), note: Callable[[str], None] | None = None) -> CheckReport:
    """``check`` of the candidates against the reference; each failed comparison names its first
    divergent module (unless ``options.localise`` is False). ``note`` hears what runs now."""
    report = check((reference.label, reference.runner),
                   [(c.label, c.runner, c.head_only, c.informational) for c in candidates], data,
                   output_names, tolerances=options.tolerances, top_k=options.top_k, batch_size=options.batch_size,
                   noise=reference.noise, note=note)
    for comparison, side in zip(report.comparisons, candidates):
        if options.localise and not comparison.passed and not comparison.informational:
            if note is not None:
                note(f"looking for the first divergent module of {side.label}")
            comparison.divergence = localise(reference, side, data, folds, options.tolerances,
                                             report.noise is not None)
    return report


def check_files(
    reference: ModelSource | str | os.PathLike,
    candidate: ModelSource | str | os.PathLike,
    options: CheckOptions = CheckOptions(),
    *,
    reference_provider: str = "cpu",
    save_inputs: str | os.PathLike | None = None,
    progress: bool = False,
) -> CheckReport:
    """Compare ``candidate`` with ``reference``; each a torch checkpoint or an ONNX file run on ORT
    (``options.provider`` for the candidate, ``reference_provider`` for the reference). When they
    differ, the report names the first module whose output diverges (``Comparison.divergence``).
    ``save_inputs`` writes the inputs used to an .npz; ``progress`` lists the steps on stderr."""
    reference, candidate = ModelSource.of(reference), ModelSource.of(candidate)
    refuse_overwrite([save_inputs], [reference.path, candidate.path])
    with Steps(progress) as steps:
        with steps.step("load"):
            ref = open_side(reference, label="reference", provider=reference_provider, tf32=options.tf32,
                            device=options.device)
            cand = open_side(candidate, label="candidate", provider=options.provider, tf32=options.tf32,
                             device=options.device)
            names, shapes, dtypes = _merge_inputs(ref, cand, reference.path, candidate.path)
            inputs, batch_size = batching([ref, cand], options.inputs, options.batch_size)
            data = make_inputs(inputs, names, shapes, dtypes, str(reference.path))
            if save_inputs is not None:
                save_dataset(data, names, Path(save_inputs))
        with steps.step("check"):
            outs = ref.output_names or cand.output_names or output_names(len(ref.runner([x[:1] for x in data.inputs])))
            extra = (tf32_deployment(candidate.path, cand.label, options.provider, options.tf32)
                     if candidate.path.suffix.lower() == ".onnx" else [])
            return compare_sides(ref, [cand, *extra], data, outs, ref.folds + cand.folds,
                                 replace(options, batch_size=batch_size), note=steps.note)
