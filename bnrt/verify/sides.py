"""The models a check compares ("sides"), as data: how to run one, the inputs it takes, its
intermediate outputs ("taps", for localisation), the folds bnrt recorded in it and its noise
reference; a ``Candidate`` says how a side takes part. Also how two sides' inputs are matched and
the batch size that sides with a fixed batch allow. Made by ``torchside.torch_side`` and
``onnxside.onnx_side``, or from any model by ``bnrt.verify.check.side``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from bnrt.errors import InputError
from bnrt.io.data import InputSpec, Runner, fmt_shape
from bnrt.verify.metrics import NoiseReference

Taps = Callable[..., dict[str, np.ndarray]]  # (inputs, names=None): module outputs (only ``names``, where given)


@dataclass(kw_only=True)
class Side:
    """One model taking part in a check. ``input_dtypes`` entries are None where any dtype goes (a
    torch model takes what it is given); ``fixed_batch``: the batch size an ONNX graph fixes;
    ``noise``: what the noise floor is measured with when this side is the reference; ``deployed``:
    the same model as a deployment would run it, where that differs from the exact float32 run the
    check judges (an ONNX file on CUDA under ORT's default TF32): the check reports it beside this
    side as an informational candidate."""

    label: str
    runner: Runner
    input_names: list[str]
    input_shapes: list[tuple[int | None, ...] | None]
    input_dtypes: list[np.dtype | None]
    output_names: list[str] = field(default_factory=list)
    taps: Taps | None = None
    tapping: Callable[[Any], Runner] | None = None  # a torch side's: a runner catching taps (``torchside.TapRecorder``)
    folds: list[dict] = field(default_factory=list)
    fixed_batch: int | None = None
    noise: NoiseReference | None = None
    deployed: Callable[[], "Side"] | None = None
    module_names: list[str] = field(default_factory=list)  # a torch model's, to resolve another side's scopes
    value_folds: Callable[[list[dict]], list[dict]] | None = None  # an ONNX graph's: fold records by value name
    digest: Callable[[], str] | None = None  # an ONNX graph's sha256 (its file's, or its bytes')
    origin: str | None = None  # the sha256 of the model bnrt folded this one from (ONNX metadata)
    data_config: dict | None = None  # a timm model's pretrained_cfg (--preprocess timm)


@dataclass(frozen=True)
class Candidate:
    """A side compared with the reference. ``head_only``: run on the noise-floor samples only (a
    second view of what another candidate checks on all of them); ``informational``: reported,
    never deciding the check (the TF32 deployment beside an exact float32 check); ``per_layer``:
    whether its module outputs are compared too (default: a deciding candidate run on all samples;
    ``bnrt fold`` compares the folded torch model's, whose weights its ONNX file holds)."""

    side: Side
    head_only: bool = False
    informational: bool = False
    per_layer: bool | None = None

    @property
    def layer_checked(self) -> bool:
        if self.informational:
            return False
        return (not self.head_only) if self.per_layer is None else self.per_layer

    @property
    def label(self) -> str:
        return self.side.label


def merge_inputs(ref: Side, cand: Side, ref_path, cand_path) -> tuple[list[str], list[tuple | None], list[np.dtype]]:
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


def batching(sides: list[Side], spec: InputSpec, batch_size: int) -> tuple[InputSpec, int]:
    """Sample count and batch size that fit sides whose ONNX batch dimension is fixed."""
    fixed = {s.fixed_batch for s in sides if s.fixed_batch}
    if len(fixed) > 1:
        raise InputError(f"the models have different fixed batch sizes {sorted(fixed)}")
    if not fixed:
        return spec, batch_size
    batch = fixed.pop()
    return replace(spec, samples=max(batch, spec.samples // batch * batch)), batch


def with_deployments(candidates: list[Candidate]) -> list[Candidate]:
    """Each candidate followed by its deployed twin where it has one (``Side.deployed``): reported
    on the noise-floor samples, deciding nothing."""
    out = []
    for candidate in candidates:
        out.append(candidate)
        if candidate.side.deployed is not None and not candidate.informational:
            out.append(Candidate(candidate.side.deployed(), head_only=True, informational=True))
    return out
