"""Capture stage: who feeds whom. A torch.fx trace of the model plus the facts the planner needs
(how often each module is called, which parameters are read directly, tensor shapes).

Refuses (``CaptureError``) a model torch.fx cannot trace, naming the tracer's reason, and
(``InputError``) example inputs the model cannot run on.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from .errors import CaptureError, InputError, first_line


SHAPE_KEY = "bnrt_shape"
VALUE_KEY = "bnrt_value"


def _is_plain(value) -> bool:
    if isinstance(value, (int, float, bool, str, type(None))):
        return True
    return isinstance(value, (tuple, list)) and all(_is_plain(v) for v in value)


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs the traced graph once and records in ``node.meta`` each tensor output's shape and each
    plain (int, tuple, torch.Size...) output's value, so that view ops can be replayed later."""

    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[SHAPE_KEY] = tuple(result.shape)
        elif _is_plain(result):
            n.meta[VALUE_KEY] = result
        return result


@dataclass
class Capture:
    graph: torch.fx.Graph
    modules: dict[str, nn.Module]
    call_counts: Counter
    direct_uses: Counter
    owners: dict[int, list[str]]
    tracer: str = "torch.fx"

    def module_of(self, node: torch.fx.Node) -> nn.Module | None:
        """The module a ``call_module`` node calls, else None."""
        return self.modules.get(node.target) if node.op == "call_module" else None

    @staticmethod
    def shape(node: torch.fx.Node) -> tuple[int, ...] | None:
        """Shape of the node's output on the example inputs (None if not a tensor)."""
        return node.meta.get(SHAPE_KEY)

    def shared_with(self, name: str) -> list[str]:
        """Other owners (module paths) of any parameter or buffer of module ``name``."""
        module = self.modules[name]
        others: set[str] = set()
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            others.update(o for o in self.owners.get(id(tensor), []) if o != name)
        return sorted(others)


def capture(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Capture:
    """Trace ``model`` with torch.fx and propagate shapes of ``example_inputs`` through it."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise CaptureError(f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {first_line(exc)}") from exc
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*example_inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
        raise InputError(f"model {type(model).__name__} fails on inputs of shape {shapes}: {first_line(exc)}") from exc

    calls: Counter = Counter()
    direct: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] += 1
        elif node.op == "get_attr":
            direct[str(node.target).rpartition(".")[0]] += 1
    owners: dict[int, list[str]] = defaultdict(list)
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if mod_name not in owners[id(tensor)]:
                owners[id(tensor)].append(mod_name)
    modules = dict(model.named_modules())
    return Capture(gm.graph, modules, calls, direct, dict(owners))
