"""Verify stage: run a reference and candidates on the same inputs and compare their outputs.

Metrics per output (all computed in float64):
- ``max_abs``: max |c − r|; ``mean_abs``: mean |c − r|;
- ``max_rel``: max |c − r| / max(|r|, 1e-3·max|r|) (the floor keeps near-zero references from
  dominating);
- ``cosine``: cosine similarity of the flattened outputs (1 when both are all zero);
- ``sqnr_db``: 10·log10(Σ r² / Σ (c − r)²), signal-to-quantisation-noise ratio (None: identical);
- ``top1_agreement`` / ``topk_agreement`` for 2-D logits (N, classes > 1): the fraction of samples
  whose argmax agrees, and the mean overlap |topk(r) ∩ topk(c)| / k.
An output passes when every element satisfies ``|c − r| <= atol + rtol·|r|`` (numpy's allclose)
and no NaN/Inf appears in the candidate where the reference is finite. With labels, accuracy
(argmax of the first output) is reported per runner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .data import Dataset

Runner = Callable[[Sequence[np.ndarray]], list[np.ndarray]]

SCHEMA = "bnrt.check/1"
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
DEFAULT_TOP_K = 5
REL_FLOOR = 1e-3
DEFAULT_BATCH = 256


@dataclass(frozen=True)
class Tolerances:
    """Default ``atol``/``rtol`` and per-output overrides ``{name: (atol or None, rtol or None)}``."""

    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    per_output: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    def of(self, name: str) -> tuple[float, float]:
        atol, rtol = self.per_output.get(name, (None, None))
        return (self.atol if atol is None else atol, self.rtol if rtol is None else rtol)


@dataclass
class OutputMetrics:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    sqnr_db: float | None
    top1_agreement: float | None
    topk_agreement: float | None
    atol: float
    rtol: float
    passed: bool
    problem: str | None = None


@dataclass
class Divergence:
    """The first module, in execution order, whose output differs beyond tolerance."""

    module: str
    max_abs: float
    layer: str | None = None


@dataclass
class Comparison:
    reference: str
    candidate: str
    outputs: list[OutputMetrics]
    divergence: Divergence | None = None

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)


@dataclass
class CheckReport:
    """Comparisons of each candidate against the reference, and accuracy per runner when the data
    has labels. ``to_json`` gives the documented, versioned schema (``bnrt.check/1``)."""

    samples: int
    source: str
    top_k: int
    comparisons: list[Comparison]
    accuracy: dict[str, float] = field(default_factory=dict)
    errors: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def to_json(self) -> dict:
        out = {"schema": SCHEMA, **asdict(self), "passed": self.passed}
        del out["errors"]
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


def _topk_overlap(r: np.ndarray, c: np.ndarray, k: int) -> float:
    k = min(k, r.shape[1])
    top_r = np.argsort(-r, axis=1, kind="stable")[:, :k]
    top_c = np.argsort(-c, axis=1, kind="stable")[:, :k]
    hits = (top_r[:, :, None] == top_c[:, None, :]).any(axis=2).sum(axis=1)
    return float(np.mean(hits / k))


def compare_output(name: str, ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float,
                   top_k: int = DEFAULT_TOP_K) -> OutputMetrics:
    """Metrics of ``cand`` against ``ref``."""
    def failed(problem: str) -> OutputMetrics:
        inf = float("inf")
        return OutputMetrics(name, list(ref.shape), inf, inf, inf, 0.0, None, None, None, atol, rtol, False, problem)

    if ref.shape != cand.shape:
        return failed(f"shape {list(cand.shape)} differs from the reference's {list(ref.shape)}")
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    finite = np.isfinite(r)
    if (finite & ~np.isfinite(c)).any():
        return failed("NaN or Inf where the reference is finite")
    r, c = np.where(finite, r, 0.0), np.where(finite, c, 0.0)
    diff = np.abs(c - r)
    scale = np.abs(r)
    if r.size == 0:
        return OutputMetrics(name, list(ref.shape), 0.0, 0.0, 0.0, 1.0, None, None, None, atol, rtol, True)
    floor = max(REL_FLOOR * float(scale.max()), np.finfo(np.float64).tiny)
    norm_r, norm_c = float(np.linalg.norm(r)), float(np.linalg.norm(c))
    if norm_r == 0.0 and norm_c == 0.0:
        cosine = 1.0
    elif norm_r == 0.0 or norm_c == 0.0:
        cosine = 0.0
    else:
        cosine = float(np.dot(r.ravel(), c.ravel()) / (norm_r * norm_c))
    noise = float(np.sum(diff ** 2))
    sqnr = None if noise == 0.0 else (10.0 * np.log10(float(np.sum(r ** 2)) / noise) if norm_r else float("-inf"))
    top1 = topk = None
    if r.ndim == 2 and r.shape[1] > 1:
        top1 = float(np.mean(np.argmax(r, axis=1) == np.argmax(c, axis=1)))
        topk = _topk_overlap(r, c, top_k)
    passed = bool(np.all(diff <= atol + rtol * scale))
    return OutputMetrics(name, list(ref.shape), float(diff.max()), float((diff / np.maximum(scale, floor)).max()),
                         float(diff.mean()), cosine, sqnr, top1, topk, atol, rtol, passed)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))


def check(
    reference: tuple[str, Runner],
    candidates: list[tuple[str, Runner]],
    data: Dataset,
    output_names: list[str],
    *,
    tolerances: Tolerances = Tolerances(),
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_BATCH,
) -> CheckReport:
    """Run ``reference`` and every candidate (label, runner) on ``data`` and compare outputs."""
    ref_label, ref_runner = reference
    ref_out = run_batched(ref_runner, data, batch_size)
    comparisons, acc, errors = [], {}, {}
    if data.labels is not None:
        acc[ref_label] = accuracy(ref_out[0], data.labels)
    for label, runner in candidates:
        out = run_batched(runner, data, batch_size)
        if len(out) != len(ref_out):
            metrics = [compare_output("(outputs)", np.zeros(len(ref_out)), np.zeros(len(out)), *tolerances.of(""))]
        else:
            metrics = [compare_output(n, r, c, *tolerances.of(n), top_k=top_k)
                       for n, r, c in zip(output_names, ref_out, out)]
            errors.update({(label, n): np.abs(c.astype(np.float64) - r) for n, r, c in zip(output_names, ref_out, out)
                           if r.shape == c.shape})
        comparisons.append(Comparison(ref_label, label, metrics))
        if data.labels is not None and out:
            acc[label] = accuracy(out[0], data.labels)
    return CheckReport(data.size, data.source, top_k, comparisons, acc, errors)
