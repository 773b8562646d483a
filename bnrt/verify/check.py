"""The check, the one entry point for every comparison (``bnrt fold``'s check, ``bnrt check``,
``bnrt quantize``'s verification): ``side`` makes a side of any model (torch module, loaded
checkpoint, model file of either kind, ONNX bytes); ``check`` runs the reference and the
candidates on the same data, measures the noise floor, judges each output (``bnrt.verify.metrics``)
and the folded layers' outputs, each against its own floor (the per-layer comparison), and names
the first divergent module of each failed comparison (``bnrt.verify.localise``);
``check_files`` is ``bnrt check``: two model files, their inputs matched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from torch import nn

from bnrt.errors import first_line
from bnrt.io.data import DEFAULT_BATCH, Dataset, InputSpec, make_inputs, run_batched, save_dataset
from bnrt.io.export import output_names as numbered_outputs
from bnrt.io.load import load
from bnrt.io.save import refuse_overwrite
from bnrt.io.source import Loaded, ModelSource
from bnrt.progress import Steps, rate
from bnrt.session import check_tf32
from bnrt.verify.detections import compare_detections, detection_groups
from bnrt.verify.accuracy import paired
from bnrt.verify.layers import Recorded, localise, per_layer, recorders
from bnrt.verify.metrics import (DEFAULT_TOP_K, CheckReport, Comparison, OutputMetrics, Tolerances, accuracy,
                                 compare_output, floor_measured, truth_samples)
from bnrt.verify.onnxside import onnx_side
from bnrt.verify.sides import Candidate, Side, batching, merge_inputs, with_deployments
from bnrt.verify.torchside import TapRecorder, check_device, torch_side



@dataclass(frozen=True)
class CheckOptions:
    """How a check runs: its inputs, the ORT provider of ONNX sides, tolerances, top-k, batch size,
    whether a failed comparison is localised to its first divergent module, TF32 (CUDA only, off
    unless asked for), the ``device`` torch sides run on, and whether the folded layers' outputs
    are compared against their own noise floor too (``per_layer``; under the noise-aware
    criterion)."""

    inputs: InputSpec = InputSpec()
    provider: str = "cpu"
    tolerances: Tolerances = Tolerances()
    top_k: int = DEFAULT_TOP_K
    batch_size: int = DEFAULT_BATCH
    localise: bool = True
    tf32: bool | None = None  # CUDA only; None: off in checks (exact float32)
    device: str = "cpu"  # where torch sides run
    per_layer: bool = True  # every fold point's output judged against its own noise floor

    def __post_init__(self) -> None:
        check_device(self.device)
        check_tf32("cuda" if self.device == "cuda" else self.provider, self.tf32)


Model = Side | nn.Module | Loaded | ModelSource | bytes | onnx.ModelProto | str | os.PathLike


def side(model: Model, *, label: str | None = None, provider: str = "cpu", device: str = "cpu",
         tf32: bool | None = None, input_shapes: list[tuple[int, ...]] | None = None,
         folds: list[dict] | None = None) -> Side:
    """A check side for ``model``: a torch module or loaded checkpoint (run on ``device``, label
    "torch"), an ONNX model as bytes or proto, or a model file of either kind (``ModelSource.kind``;
    ONNX runs on ORT's ``provider``, label "onnx <provider>"). ``folds``: the folds bnrt made in a
    torch module (a loaded checkpoint and an ONNX file carry their own)."""
    if isinstance(model, Side):
        return model
    if isinstance(model, Loaded):
        return torch_side(model.model, label=label or "torch", input_shapes=input_shapes or model.input_shapes,
                          device=device, tf32=tf32, folds=(model.structure or {}).get("folds", []))
    if isinstance(model, nn.Module):
        return torch_side(model, label=label or "torch", input_shapes=input_shapes, device=device, tf32=tf32,
                          folds=folds)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    if isinstance(model, bytes):
        return onnx_side(label or f"onnx {provider}", model, provider, tf32)
    source = ModelSource.of(model)
    if source.kind == "onnx":
        return onnx_side(label or f"onnx {provider}", source.path, provider, tf32, input_shapes or source.input_shapes)
    return side(load(source), label=label, device=device, tf32=tf32, input_shapes=source.input_shapes)


def _noise_pairs(reference: Side, ref_out: list[np.ndarray], data: Dataset, names: list[str],
                 options: CheckOptions, note: Callable[[str], None],
                 recorder: TapRecorder | None = None) -> tuple[list | None, int, str | None]:
    """(anchor, noisy) per output on the first ``truth_samples`` samples, or None when fixed
    tolerances decide every output (or the noise run cannot run); that sample count; and why
    fixed tolerances decide where the noise floor would have (None: they do not, or were asked for).
    ``recorder`` catches the noise run's module outputs for the per-layer comparison."""
    truth = min(truth_samples(ref_out, data.size), data.first)
    if reference.fixed_batch:  # a graph with a fixed batch runs whole batches only
        truth = min(data.size, -(-truth // reference.fixed_batch) * reference.fixed_batch)
    noise = reference.noise
    if noise is None or all(options.tolerances.fixed(n) for n in names):
        return None, truth, None
    note(f"noise floor: {noise.kind} run on {truth} samples")
    try:  # in the check's batches: a graph with a fixed batch takes no other
        runner = noise.runner if recorder is None else noise.tapping(recorder)
        noise_out = run_batched(runner, Dataset([x[:truth] for x in data.inputs], None, data.source),
                                options.batch_size)
    except Exception as exc:  # e.g. a model whose own code cannot run in float64: fixed tolerances decide
        return None, truth, f"no noise floor ({first_line(exc) or type(exc).__name__})"
    if len(noise_out) != len(ref_out):
        return None, truth, "no noise floor (the noise run gave other outputs)"
    return list(zip(*noise.anchor_and_noisy([o[:truth] for o in ref_out], noise_out))), truth, None


def _unmeasured(names: list[str], pairs: list | None, tolerances: Tolerances) -> str | None:
    """The outputs the noise run left exactly unchanged (judged by fixed tolerances), as a reason."""
    if pairs is None:
        return None
    unmeasured = [(n, anchor, noisy) for n, (anchor, noisy) in zip(names, pairs)
                  if not tolerances.fixed(n) and np.size(anchor) and not floor_measured(anchor, noisy)]
    same = [repr(n) for n, a, b in unmeasured if (np.isfinite(a) & np.isfinite(b)).any()]
    nonfinite = [repr(n) for n, a, b in unmeasured if not (np.isfinite(a) & np.isfinite(b)).any()]
    reasons = ([f"the noise run left {', '.join(same)} unchanged (floor 0)"] if same else []) + (
        [f"the noise runs gave no finite value of {', '.join(nonfinite)} to measure a floor on"] if nonfinite else [])
    return "; ".join(reasons) or None


def _fed_its_dtypes(model: Side) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """The side's runner, float inputs cast to the float type its graph declares (a float16 graph
    takes the check's float32 data as a deployment would feed it); nothing else is converted."""
    def run(xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        dtypes = model.input_dtypes if len(model.input_dtypes) == len(xs) else [None] * len(xs)
        return model.runner([x.astype(d) if d is not None and x.dtype != d and np.issubdtype(x.dtype, np.floating)
                             and np.issubdtype(d, np.floating) else x for x, d in zip(xs, dtypes)])
    return run


def _compare(ref_out: list[np.ndarray], seen: "Observed", i: int, options: CheckOptions,
             errors: dict) -> Comparison:
    """Candidate ``i`` judged output by output against the reference (a head-only candidate on the
    noise-floor samples); its absolute errors go into ``errors``."""
    label, head_only, informational = seen.candidates[i]
    part = seen.truth if head_only and seen.truth < len(ref_out[0]) else None
    ref = ref_out if part is None else [o[:part] for o in ref_out]
    out, names, pairs = seen.outs[i], seen.names, seen.pairs
    if len(out) != len(ref):
        metrics = [compare_output("(outputs)", np.zeros(len(ref)), np.zeros(len(out)), 0.0, 0.0)]
    else:
        groups = list(detection_groups(names, ref).values())
        metrics = _judged(names, ref, out, pairs, options, groups)
        matched = {names[i] for group in groups for i in group.values()}
        errors.update({(label, n): np.abs(c.astype(np.float64) - r) for n, r, c in zip(names, ref, out)
                       if r.shape == c.shape and n not in matched})  # detections are not position by position
    return Comparison(seen.ref_label, label, metrics, samples=part, informational=informational)


def _judged(names: list[str], ref: list[np.ndarray], out: list[np.ndarray], pairs: list | None,
            options: CheckOptions, groups: list[dict[str, int]]) -> list[OutputMetrics]:
    """Each output's metrics: the detection ``groups`` (``boxes``/``scores``/``labels``, output
    indices by key) by matching, the rest position by position."""
    tol = options.tolerances
    judged: dict[int, OutputMetrics] = {}
    for group in groups:
        keyed = {key: names[i] for key, i in group.items()}
        noise = tuple({key: pairs[i][k] for key, i in group.items()} for k in (0, 1)) if pairs else None
        found = compare_detections(keyed, {key: ref[i] for key, i in group.items()},
                                   {key: out[i] for key, i in group.items()}, fixed=tol.fixed(keyed["boxes"]),
                                   noise=noise, factor=tol.factor)
        judged.update({names.index(m.name): m for m in found})
    return [judged.get(i) or compare_output(n, r, c, *(tol.fixed(n) or (None, None)), top_k=options.top_k,
                                            noise=pairs[i] if pairs else None, factor=tol.factor,
                                            allow_nonfinite=tol.allow_nonfinite)
            for i, (n, r, c) in enumerate(zip(names, ref, out))]


def _all_folds(reference: Side, candidates: list[Candidate], folds: list[dict] | None) -> list[dict]:
    """``folds``, by default every side's: the intended differences."""
    return folds if folds is not None else reference.folds + [f for c in candidates for f in c.side.folds]


@dataclass
class Observed:
    """What a check saw of its sides, all a judgement needs and no model: the reference's outputs
    and each candidate's (``candidates``: label, head-only, informational; a head-only candidate's
    on the noise-floor samples, the others' on every sample), the labels, the output names, the
    noise floor's (anchor, noisy) pairs on the first ``truth`` samples (None: fixed tolerances)
    and why fixed tolerances stand in for it (``fallback``)."""

    ref_label: str
    ref_out: list[np.ndarray]
    candidates: list[tuple[str, bool, bool]]
    outs: list[list[np.ndarray]]
    labels: np.ndarray | None
    names: list[str]
    pairs: list | None
    truth: int
    fallback: str | None
    noise: str | None  # the noise floor's kind when it decides
    recorded: Recorded | None = None  # module outputs caught on the way (not kept in a check's parts)


def observe(reference: Side, candidates: list[Candidate], data: Dataset, options: CheckOptions,
            output_names: list[str] | None, note: Callable[[str], None], folds: list[dict] | None = None) -> Observed:
    """Every side run on ``data``: the reference and the candidates that run on every sample take
    each batch in turn (an image folder is decoded once), then the noise floor and the head-only
    candidates on the first samples, catching the module outputs the per-layer comparison of
    ``folds`` (default: every side's) reads where they can (``_recorders``)."""
    together = [c for c in candidates if not c.head_only]
    note(f"{', '.join(s.label for s in [reference, *(c.side for c in together)])} on {data.size} samples")
    declared = list(reference.output_names)  # a file's; a torch side names its outputs when it runs
    ref_out, *outs = run_batched([reference.runner, *(_fed_its_dtypes(c.side) for c in together)], data,
                                 options.batch_size, rate(note, f"{1 + len(together)} model(s)"))
    ran = {id(c): out for c, out in zip(together, outs)}
    names = output_names or declared or next((c.side.output_names for c in candidates if c.side.output_names),
                                             reference.output_names or numbered_outputs(len(ref_out)))
    recorded = recorders(reference, candidates, _all_folds(reference, candidates, folds)) \
        if options.per_layer else None
    pairs, truth, fallback = _noise_pairs(reference, ref_out, data, names, options, note,
                                          recorded.noise if recorded is not None else None)
    head = Dataset([x[:truth] for x in data.inputs], None, data.source)
    for c in candidates:
        if c.head_only:
            note(f"{c.label} on {min(truth, data.size)} samples")
            caught = recorded.candidates.get(id(c)) if recorded is not None else None
            model = c.side if caught is None else replace(c.side, runner=c.side.tapping(caught))
            ran[id(c)] = run_batched(_fed_its_dtypes(model), head, options.batch_size, rate(note, c.label))
    return Observed(reference.label, ref_out, [(c.label, c.head_only, c.informational) for c in candidates],
                    [ran[id(c)] for c in candidates], data.labels, names, pairs, truth,
                    fallback or _unmeasured(names, pairs, options.tolerances), reference.noise.kind if pairs else None,
                    recorded)


def judge(seen: Observed, options: CheckOptions) -> tuple[list[Comparison], dict, dict, dict]:
    """The comparisons of what a check saw, the accuracy of each side and the paired statistics of
    each deciding candidate (with labels), and the absolute errors per (candidate, output)."""
    ref_out, labels = seen.ref_out, seen.labels
    acc = {seen.ref_label: accuracy(ref_out[0], labels)} if labels is not None else {}
    stats: dict[str, dict] = {}
    comparisons, errors = [], {}
    for i, (label, _, informational) in enumerate(seen.candidates):
        comparison = _compare(ref_out, seen, i, options, errors)
        comparisons.append(comparison)
        out = seen.outs[i]
        if labels is not None and out and comparison.samples is None and not informational:
            acc[label] = accuracy(out[0], labels)
            stats[label] = paired(ref_out[0], out[0], labels, options.top_k)
    return comparisons, acc, stats, errors


def sides(reference: Model, candidates: Sequence[Model | Candidate], options: CheckOptions
          ) -> tuple[Side, list[Candidate]]:
    """The check's sides (on ``options``' provider and device), each candidate followed by its
    deployed twin where it has one."""
    made = dict(provider=options.provider, device=options.device, tf32=options.tf32)
    return side(reference, **made), with_deployments([c if isinstance(c, Candidate) else Candidate(side(c, **made))
                                                       for c in candidates])


def check(reference: Model, candidates: Sequence[Model | Candidate], data: Dataset,
          options: CheckOptions = CheckOptions(), *, output_names: list[str] | None = None,
          folds: list[dict] | None = None, note: Callable[[str], None] | None = None) -> CheckReport:
    """Run ``reference`` and every candidate on ``data`` and compare their outputs (a model that is
    not a ``Side`` becomes one with ``side``, on ``options``' provider and device). Outputs
    without fixed tolerances are judged against the reference's noise floor on the first
    ``truth_samples`` samples (``bnrt.verify.metrics``). Each failed comparison names its first
    divergent module unless ``options.localise`` is False; ``folds`` (default: every side's) are
    the intended differences it skips. ``output_names``: default the reference file's (or the first
    candidate file's, or the torch reference's structure: dict keys, else numbered). ``note``
    hears which run starts."""
    note = note or (lambda text: None)
    reference, candidates = sides(reference, candidates, options)
    seen = observe(reference, candidates, data, options, output_names, note, folds)
    comparisons, acc, stats, errors = judge(seen, options)
    model_checks(reference, candidates, comparisons, data, folds, options, seen, note)
    return CheckReport(data.size, data.source, options.top_k, comparisons, acc, errors, seen.noise,
                       seen.truth if seen.pairs else None, noise_fallback=seen.fallback, accuracy_stats=stats,
                       preprocess=data.preprocess)


def model_checks(reference: Side, candidates: list[Candidate], comparisons: list[Comparison], data: Dataset,
                 folds: list[dict] | None, options: CheckOptions, seen: Observed, note: Callable[[str], None]) -> None:
    """What needs the models beyond their outputs, on the first samples: the per-layer comparison,
    then the first divergent module of each deciding comparison that failed. ``folds`` (default:
    every side's) are the intended differences."""
    folds = _all_folds(reference, candidates, folds)
    if seen.pairs is not None and options.per_layer:
        per_layer(reference, candidates, comparisons, data, folds, options.tolerances, seen.truth, note,
                  seen.recorded)
    seen.recorded = None  # the taps caught on the way are of no further use
    for comparison, candidate in zip(comparisons, candidates):
        if options.localise and not comparison.passed and not candidate.informational \
                and comparison.divergence is None:
            note(f"looking for the first divergent module of {candidate.label}")
            comparison.divergence = localise(reference, candidate.side, data, folds, options.tolerances,
                                             seen.pairs is not None)


def inputs_for(reference: Side, candidates: Sequence[Side], options: CheckOptions, where: str,
               paths: Sequence = ()) -> tuple[Dataset, int]:
    """The check's data for these sides (names, shapes and dtypes matched across them; ``paths``
    name the sides in errors) and the batch size their fixed batches allow."""
    names, shapes, dtypes = reference.input_names, reference.input_shapes, reference.input_dtypes
    for i, cand in enumerate(candidates):
        known = replace(reference, input_names=names, input_shapes=shapes, input_dtypes=dtypes)
        names, shapes, dtypes = merge_inputs(known, cand, *(paths[0], paths[i + 1]) if paths else
                                             (reference.label, cand.label))
    spec, batch_size = batching([reference, *candidates], options.inputs, options.batch_size)
    return make_inputs(spec, names, shapes, dtypes, where, reference.data_config), batch_size


def check_files(reference: ModelSource | str | os.PathLike, candidate: ModelSource | str | os.PathLike,
                options: CheckOptions = CheckOptions(), *, reference_provider: str = "cpu",
                save_inputs: str | os.PathLike | None = None, progress: bool = False, run: Callable = None):
    """Compare ``candidate`` with ``reference``; each a torch checkpoint or an ONNX file run on ORT
    (``options.provider`` for the candidate, ``reference_provider`` for the reference). When they
    differ, the report names the first module whose output diverges (``Comparison.divergence``).
    ``save_inputs`` writes the inputs used to an .npz (``verify.report.save_report`` the report and
    its plot); ``progress`` lists the steps on stderr. ``run``: what runs the sides on the data
    (default ``check``; a shard's ``verify.parts.check_part`` returns a part to merge instead)."""
    reference, candidate = ModelSource.of(reference), ModelSource.of(candidate)
    refuse_overwrite([save_inputs], [reference.path, candidate.path])
    with Steps(progress) as steps:
        with steps.step("load"):
            ref, cand = (side(s, label=f"{role} onnx {provider}" if s.kind == "onnx" else f"{role} torch",
                              provider=provider, device=options.device, tf32=options.tf32)
                         for s, role, provider in ((reference, "reference", reference_provider),
                                                   (candidate, "candidate", options.provider)))
            data, batch_size = inputs_for(ref, [cand], options, str(reference.path), (reference.path, candidate.path))
            if save_inputs is not None:
                save_dataset(data, ref.input_names, Path(save_inputs))
        with steps.step("check"):
            return (run or check)(ref, [cand], data, replace(options, batch_size=batch_size), note=steps.note)
