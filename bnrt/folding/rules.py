"""The rule table: one ``Rule`` per fold placement (conv->bn, convtranspose->bn, linear->bn,
bn->linear, bn->conv), each a direction, a layer kind, the channel axis the layer shares with the
BN, the fold (``foldmath``) and a check that refuses with a code. The engine applies them; adding a
placement is adding a row (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from bnrt.folding import foldmath
from bnrt.folding.decision import NotFoldable
from bnrt.folding.view import Layer

Fold = Callable[[np.ndarray, "np.ndarray | None", np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]
Check = Callable[[Layer], None]


def _no_check(layer: Layer) -> None:
    return None


def _zero_padding(layer: Layer) -> None:
    if layer.zero_padded:
        raise NotFoldable("zero-padding", f"'{layer.name}' pads with zeros, which a BN folded into it would not see",
                          layer.name)


def _transposed_input(layer: Layer) -> None:
    if layer.transposed_input:
        raise NotFoldable("transposed-input", f"'{layer.name}' transposes its input (transA=1)", layer.name)


@dataclass(frozen=True)
class Rule:
    """One fold placement: a direction, a layer kind, the layer's channel axis in the activation
    it shares with the BN (its output backward, its input forward), the fold and a check."""

    direction: str
    kind: str
    channel_axis: int
    fold: Fold
    check: Check = _no_check

    def label(self, layer: Layer) -> str:
        return f"{layer.op}->bn" if self.direction == "backward" else f"bn->{layer.op}"


RULES: dict[tuple[str, str], Rule] = {(r.direction, r.kind): r for r in (
    Rule("backward", "conv", 1, lambda w, b, s, t, g: foldmath.fold_backward(w, b, s, t)),
    Rule("backward", "conv-transpose", 1, foldmath.fold_convtranspose_backward),
    Rule("backward", "linear", -1, lambda w, b, s, t, g: foldmath.fold_backward(w, b, s, t)),
    Rule("forward", "linear", -1, lambda w, b, s, t, g: foldmath.fold_forward_linear(w, b, s, t), _transposed_input),
    Rule("forward", "conv", 1, foldmath.fold_forward_conv, _zero_padding),
)}
