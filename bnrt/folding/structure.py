"""Edits of a model's module structure shared by the fold stage and the loader: replacing a
submodule, adding biases, making a functional BatchNorm's statistics an exact identity. A folded
checkpoint records these edits (``structure`` entry) so that a fresh instance of the user's class
can take the folded weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bnrt.errors import InputError


def tensor_at(root: nn.Module, target: str) -> torch.Tensor:
    """The parameter or buffer at dotted path ``target`` (``"block.conv.weight"``)."""
    owner, _, attr = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, attr)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def output_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return layer.weight.shape[1] * layer.groups
    return layer.weight.shape[0]


def set_identity_statistics(root: nn.Module, stats: dict[str, Any]) -> None:
    """Make a functional ``F.batch_norm`` whose tensors are named in ``stats`` (``mean``, ``var``,
    ``weight``, ``bias``, ``eps``) compute exactly its input: mean 0, weight 1, bias 0 and
    var = 1 - eps rounded in the tensor's dtype (then var + eps rounds to 1)."""
    with torch.no_grad():
        tensor_at(root, stats["mean"]).zero_()
        var = tensor_at(root, stats["var"])
        var.copy_(torch.ones_like(var) - torch.tensor(stats["eps"], dtype=var.dtype))
        if stats.get("weight"):
            tensor_at(root, stats["weight"]).fill_(1)
        if stats.get("bias"):
            tensor_at(root, stats["bias"]).zero_()


def zero_affine(root: nn.Module, stats: dict[str, Any]) -> None:
    """Set a BN's ``weight`` and ``bias`` (paths in ``stats``) to zero: it then outputs exact zeros,
    as an identity branch merged into a conv must."""
    with torch.no_grad():
        for key in ("weight", "bias"):
            tensor_at(root, stats[key]).zero_()


def apply_folded_structure(model: nn.Module, structure: dict[str, Any], where: str = "model") -> nn.Module:
    """Make ``model`` take a bnrt-folded state_dict: folded BN modules become ``nn.Identity``, the
    layers that gained a bias get one, functional BNs get identity statistics. ``structure`` is
    the ``bnrt_folded`` entry of the checkpoint."""
    modules = dict(model.named_modules())
    for name in structure.get("identity", []):
        if name not in modules:
            raise InputError(f"{where}: folded checkpoint names module {name!r}, which the architecture lacks")
        set_submodule(model, name, nn.Identity())
    for name in structure.get("bias_added", []):
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "weight"):
            raise InputError(f"{where}: folded checkpoint adds a bias to {name!r}, which the architecture lacks")
        if getattr(layer, "bias", None) is None:
            layer.bias = nn.Parameter(torch.zeros(output_channels(layer), dtype=layer.weight.dtype))
    for stats in structure.get("functional_identity", []):
        try:
            set_identity_statistics(model, stats)
        except AttributeError as exc:
            raise InputError(f"{where}: folded checkpoint names statistics the architecture lacks ({exc})") from exc
    return model
