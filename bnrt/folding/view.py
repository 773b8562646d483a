"""What the fold engine sees of a graph: the ``GraphView`` protocol a backend implements
(``torchgraph`` for torch captures, ``onnxgraph`` for ONNX graphs) and the neutral objects it
hands over: a BatchNorm (``BnSite``), its statistics (``BnStats``) and a layer a BN can fold into
(``Layer``). The engine never looks at torch or ONNX objects itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import numpy as np

from bnrt.folding import foldmath
from bnrt.folding.decision import NotFoldable


@dataclass(frozen=True)
class BnSite:
    """One BatchNorm of a graph: its display ``name``, its graph ``node`` (None when never called)
    and, for a functional call, the paths of its tensors (``functional``)."""

    name: str
    node: Any
    functional: dict | None = None
    module: Any = None


@dataclass(frozen=True)
class BnStats:
    """A BN's tensors as float64 arrays (weight/bias None: affine=False). ``label`` names the BN in
    health errors ("BatchNorm 'x'"), ``fields`` names each tensor as the backend calls it."""

    mean: np.ndarray
    var: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None
    eps: float
    label: str
    fields: tuple[str, str, str, str] = ("running_mean", "running_var", "weight", "bias")

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        return foldmath.bn_scale_shift(self.mean, self.var, self.eps, self.weight, self.bias)


@dataclass(frozen=True)
class Layer:
    """A node a rule can fold into, in neutral terms. ``node`` is the graph node whose output is
    the layer's output; ``kind`` is conv, conv-transpose or linear; ``op`` names it in rule labels
    (conv, convtranspose, linear, gemm, matmul); ``data`` is the backend's own."""

    node: Any
    name: str
    kind: str
    op: str
    groups: int = 1
    zero_padded: bool = False
    transposed_input: bool = False
    data: Any = field(default=None, repr=False, compare=False)
    # conv geometry, for merging parallel branches (bnrt.folding.reparam); padding None: asymmetric or implicit
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | None = ()
    dilation: tuple[int, ...] = ()
    pads_zeros: bool = True


class GraphView(Protocol):
    """What the engine asks of a graph backend. Nodes are the backend's own objects, compared by
    identity. ``keeps_structure``: the folded model keeps the user's modules and forward (torch)."""

    keeps_structure: bool

    def batchnorms(self) -> Iterable[BnSite]:
        """Every BatchNorm-like layer, once, in report order."""

    def bn_stats(self, bn: BnSite) -> BnStats:
        """The BN's statistics; ``NotFoldable`` when it has none usable (no running stats,
        not constants, training mode in ONNX)."""

    def check_bn(self, bn: BnSite) -> None:
        """``NotFoldable`` for a BN the backend cannot fold whatever its neighbours."""

    def input_of(self, node: Any) -> Any:
        """The node producing ``node``'s data input (its first input)."""

    def users(self, node: Any) -> list:
        """The nodes that read the values of ``node``'s output (metadata-only reads left out), a
        graph output counting as a user."""

    def is_graph_input(self, node: Any) -> bool: ...

    def concat(self, node: Any) -> tuple[list, int] | None:
        """``node`` as a concatenation: its tensor parts (the nodes producing them, in order) and
        the axis; None for any other node."""

    def is_passthrough(self, node: Any) -> bool:
        """A node whose output is its input rearranged (view ops, Identity, Dropout in eval, a
        BatchNorm already folded) or pooled per channel (average and max pooling, a mean or max
        over positions): the walker goes through it, ``replay`` maps its channels."""

    def takes_max(self, node: Any) -> bool:
        """A pass-through that takes a maximum over positions (max-pooling, amax): exact for a BN
        only where its scale is not negative."""

    def replay(self, node: Any, index: np.ndarray) -> np.ndarray:
        """``node``'s op applied to an int64 array shaped like its input."""

    def shape(self, node: Any) -> tuple[int, ...] | None:
        """Static shape of ``node``'s output on the example inputs."""

    def layer(self, node: Any) -> Layer | None:
        """``node`` as a foldable layer, None if it is none; ``NotFoldable`` for a layer whose
        weights cannot be folded (not constants)."""

    def check_layer(self, layer: Layer) -> None:
        """``NotFoldable`` for backend reasons (module called twice, shared parameters...)."""

    def name(self, node: Any) -> str:
        """Short name of a node in messages."""

    def describe(self, node: Any) -> str:
        """A node for people: "ReLU '1'", "a graph input", "the model output"."""

    def mark_folded(self, bn: BnSite) -> None:
        """From now on the BN's node is a pass-through (its fold is planned)."""

    def adds(self) -> list:
        """Nodes that combine tensors linearly (``terms`` is not None), in graph order
        (``bnrt.folding.reparam``'s candidate roots)."""

    def terms(self, node: Any) -> list[tuple[Any, Any]] | None:
        """``node`` as a linear combination of tensor operands of its shape, ``[(operand,
        coefficient)]``: a sum (coefficients 1, a literal zero operand left out), a difference (1,
        -1), a product with a constant (the constant's array); None for any other node."""

    def is_value_identity(self, node: Any) -> bool:
        """A pass-through whose output equals its input (Identity, Dropout in eval, a folded BN)."""


def pooled(index: np.ndarray, axes: tuple[int, ...], shape: tuple[int, ...] | None, name: str) -> np.ndarray:
    """A pooling or a reduction over ``axes`` (never the channels) replayed on a channel-index
    array: exact when the index is the same along those axes (every window holds one channel),
    which is what the channel maps need; ``shape``: the op's output shape."""
    kept = [d for a, d in enumerate(index.shape) if a not in axes]
    same_rank = shape is not None and len(shape) == index.ndim
    fits = shape is not None and (
        [d for a, d in enumerate(shape) if a not in axes] == kept if same_rank else list(shape) == kept)
    first = index[tuple(slice(0, 1) if a in axes else slice(None) for a in range(index.ndim))]
    if not fits or 1 in axes or not (np.broadcast_to(first, index.shape) == index).all():
        raise NotFoldable("channel-map", f"'{name}' pools over values of several BN channels", name)
    return np.broadcast_to(first, shape).copy() if same_rank else first.reshape(shape)
