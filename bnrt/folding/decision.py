"""What the planner decides for each BatchNorm, as data: a fold target or a coded refusal per
direction. Both graph backends (torch, ONNX) produce these; reports, tables and tools read them.

A refusal is ``code`` (a stable identifier from ``CODES``), ``message`` (for people), and the nodes
involved (``subject``: where the check failed; ``other``: the node it points at, if any). Tools
and tests read codes, never messages. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Stable refusal codes. Adding one is an edit here (and in bnrt/schemas/fold-1.schema.json).
CODES: dict[str, str] = {
    "no-running-stats": "the BN normalises with batch statistics (no running_mean/running_var)",
    "training-mode": "the BN is in training mode",
    "not-called": "the BN module is never called in forward",
    "not-constant": "statistics, weights or biases are computed in the graph, not constants",
    "custom-forward": "a module overrides forward, has parametrizations or hooks",
    "reused-layer": "a module on the path is called more than once",
    "shared-parameters": "parameters are shared with another module or read directly in forward",
    "graph-input": "the BN's input is a graph input",
    "no-layer-before": "the BN's input comes from an op no rule folds into (a nonlinearity, an add, ...)",
    "no-layer-after": "a user of the BN's output is not a layer a rule folds into",
    "shared-output": "a value on the path has another user that reads its values",
    "concat-producer-shared": "a part of the concatenation the BN reads comes from a layer whose output also feeds another op",
    "weight-input": "the BN feeds a layer as its weight, not as its input",
    "transposed-input": "the layer transposes its input (Gemm transA=1)",
    "zero-padding": "the layer after the BN pads with zeros, which the BN's shift would not see",
    "channel-map": "the view ops on the path mix channels: no one-to-one channel map",
    "negative-scale-through-max": "a max-pooling on the path and a negative BN scale: max(s·x) is not s·max(x) for s < 0",
    "unknown-shape": "a shape or a shape argument on the path is unknown",
    "unused": "the BN's output is unused",
    "unsupported-bn": "a BN form bnrt does not fold (ONNX spatial=0, aten batch_norm in a torch.export capture)",
    "branch-mismatch": "parallel branches summed by Add do not line up (stride, groups, dilation, padding)",
    "in-subgraph": "the BN is inside an ONNX subgraph (an If branch, a Loop or Scan body); only the main graph folds",
}

@dataclass(frozen=True)
class Refusal:
    """Why a fold does not apply: ``direction`` None for refusals about the BN itself (tried no
    direction), else the direction that failed."""

    code: str
    message: str
    subject: str | None = None
    other: str | None = None
    direction: str | None = None

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown refusal code {self.code!r}")

    def to_json(self) -> dict[str, Any]:
        return {"direction": self.direction, "code": self.code, "subject": self.subject, "other": self.other,
                "message": self.message}


class NotFoldable(Exception):
    """A refusal, raised where it is found (engine or backend) and turned into a skipped decision."""

    def __init__(self, code: str, message: str, subject: str | None = None, other: str | None = None):
        super().__init__(message)
        self.refusal = Refusal(code, message, subject, other)


@dataclass(frozen=True)
class Target:
    """One layer a BN folds into: ``rule`` (e.g. ``conv->bn``), the layer's ``name`` and neutral
    ``kind``, its ``groups``, the view ops passed ``through`` (names), and ``channels``: per channel
    of the layer, the BN channel whose scale it takes (None: channel i takes BN channel i).
    ``handle`` is the backend's node, for applying the fold in the same session."""

    rule: str
    layer: str
    kind: str
    groups: int = 1
    through: tuple[str, ...] = ()
    channels: tuple[int, ...] | None = field(default=None, repr=False)
    handle: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Decision:
    """What happens to one BatchNorm: folded into ``targets`` in ``direction`` (backward: the layer
    runs before the BN; forward: after it; merge: an identity branch merged with the convs beside it
    into one conv, bnrt.folding.reparam), or skipped with ``refusals`` (one per direction tried, or one
    about the BN itself). ``functional`` is set for an ``F.batch_norm`` call: the graph
    node's name and the paths of its tensors."""

    bn: str
    status: str
    direction: str | None = None
    targets: tuple[Target, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    warnings: tuple[str, ...] = ()
    functional: dict | None = field(default=None, compare=False)

    @property
    def folded(self) -> bool:
        return self.status == "folded"

    @property
    def rule(self) -> str | None:
        return ",".join(dict.fromkeys(t.rule for t in self.targets)) or None

    @property
    def into(self) -> tuple[str, ...]:
        return tuple(t.layer for t in self.targets)

    @property
    def through(self) -> tuple[str, ...]:
        return tuple(n for t in self.targets for n in t.through)

    @property
    def maps(self) -> tuple[tuple[int, ...] | None, ...]:
        return tuple(t.channels for t in self.targets)

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(r.code for r in self.refusals)

    @property
    def reason(self) -> str | None:
        """The refusals as one sentence for people: ``<backward>; forward: <forward>``."""
        if not self.refusals:
            return None
        return "; ".join(f"{r.direction}: {r.message}" if i else r.message for i, r in enumerate(self.refusals))

    def to_json(self) -> dict[str, Any]:
        """The decision in the fold report (schema ``bnrt.fold/1``)."""
        return {"bn": self.bn, "kind": "functional" if self.functional else "module", "status": self.status,
                "rule": self.rule, "into": list(self.into), "direction": self.direction,
                "through": list(self.through), "reason": self.reason,
                "refusals": [r.to_json() for r in self.refusals], "warnings": list(self.warnings)}


def folded(bn: str, direction: str, targets: list[Target], warnings: tuple[str, ...] = (),
           functional: dict | None = None) -> Decision:
    return Decision(bn, "folded", direction, tuple(targets), (), warnings, functional)


def skipped(bn: str, refusals: list[Refusal], warnings: tuple[str, ...] = (),
            functional: dict | None = None) -> Decision:
    return Decision(bn, "skipped", None, (), tuple(refusals), warnings, functional)


class DecisionSet:
    """Mixin for results that hold ``decisions``: the folded and the skipped ones."""

    decisions: list[Decision]

    @property
    def folded(self) -> list[Decision]:
        return [d for d in self.decisions if d.folded]

    @property
    def skipped(self) -> list[Decision]:
        return [d for d in self.decisions if not d.folded]
