"""Verify stage: run a reference and candidates on the same inputs and compare their outputs.

Metrics per output: max abs error, max rel error (``|c - r| / max(|r|, 1e-3·max|r|)``: the floor
keeps near-zero references from dominating), mean abs error, and top-1 agreement for 2-D logits.
An output passes when every element satisfies ``|c - r| <= atol + rtol·|r|`` (numpy's allclose)
and no NaN/Inf appears in the candidate where the reference is finite.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .data import Dataset

Runner = Callable[[Sequence[np.ndarray]], list[np.ndarray]]

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
REL_FLOOR = 1e-3
DEFAULT_BATCH = 256


@dataclass
class OutputMetrics:
    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    top1_agreement: float | None
    passed: bool


@dataclass
class Comparison:
    reference: str
    candidate: str
    outputs: list[OutputMetrics]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)


@dataclass
class CheckReport:
    """Comparisons of each candidate against the reference, and accuracy per runner when the data
    has labels (of the first output, by argmax)."""

    samples: int
    source: str
    atol: float
    rtol: float
    comparisons: list[Comparison]
    accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def to_json(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        for comp, data in zip(self.comparisons, out["comparisons"]):
            data["passed"] = comp.passed
        return out


def flatten_outputs(out) -> list[torch.Tensor]:
    """A model's output (tensor, tuple/list or dict of them, nested) as a flat list of tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flatten_outputs(item)]
    raise TypeError(f"model output of type {type(out).__name__} is not a tensor or a collection of tensors")


def torch_runner(model: nn.Module) -> Runner:
    def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = model(*(torch.from_numpy(np.asarray(x)) for x in inputs))
        return [t.detach().cpu().numpy() for t in flatten_outputs(out)]
    return run


def run_batched(runner: Runner, data: Dataset, batch_size: int = DEFAULT_BATCH) -> list[np.ndarray]:
    """Outputs of ``runner`` over all of ``data``, in batches, concatenated along axis 0."""
    parts: list[list[np.ndarray]] = []
    for start in range(0, data.size, batch_size):
        parts.append(runner([x[start:start + batch_size] for x in data.inputs]))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def compare_output(name: str, ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float) -> OutputMetrics:
    """Metrics of ``cand`` against ``ref`` (computed in float64)."""
    if ref.shape != cand.shape:
        return OutputMetrics(name, float("inf"), float("inf"), float("inf"), None, False)
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    diff = np.abs(c - r)
    finite = np.isfinite(r)
    if r.size == 0:
        return OutputMetrics(name, 0.0, 0.0, 0.0, None, True)
    bad = finite & ~np.isfinite(c)
    diff = np.where(finite, diff, 0.0)
    scale = np.abs(np.where(finite, r, 0.0))
    floor = max(REL_FLOOR * float(scale.max()), np.finfo(np.float64).tiny)
    rel = diff / np.maximum(scale, floor)
    top1 = None
    if r.ndim == 2 and r.shape[1] > 1:
        top1 = float(np.mean(np.argmax(r, axis=1) == np.argmax(c, axis=1)))
    passed = bool(not bad.any() and np.all(diff <= atol + rtol * scale))
    if bad.any():
        return OutputMetrics(name, float("inf"), float("inf"), float("inf"), top1, False)
    return OutputMetrics(name, float(diff.max()), float(rel.max()), float(diff.mean()), top1, passed)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))


def check(
    reference: tuple[str, Runner],
    candidates: list[tuple[str, Runner]],
    data: Dataset,
    output_names: list[str],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    batch_size: int = DEFAULT_BATCH,
) -> CheckReport:
    """Run ``reference`` and every candidate (label, runner) on ``data`` and compare outputs."""
    ref_label, ref_runner = reference
    ref_out = run_batched(ref_runner, data, batch_size)
    comparisons, acc = [], {}
    if data.labels is not None:
        acc[ref_label] = accuracy(ref_out[0], data.labels)
    for label, runner in candidates:
        out = run_batched(runner, data, batch_size)
        if len(out) != len(ref_out):
            metrics = [OutputMetrics(f"({len(out)} outputs vs {len(ref_out)})", float("inf"),
                                     float("inf"), float("inf"), None, False)]
        else:
            metrics = [compare_output(n, r, c, atol, rtol) for n, r, c in zip(output_names, ref_out, out)]
        comparisons.append(Comparison(ref_label, label, metrics))
        if data.labels is not None and out:
            acc[label] = accuracy(out[0], data.labels)
    return CheckReport(data.size, data.source, atol, rtol, comparisons, acc)
