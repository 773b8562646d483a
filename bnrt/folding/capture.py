"""Capture stage: who feeds whom. A module-level graph of the model plus the facts the planner
needs (how often each module is called, which parameters are read directly, tensor shapes).

``torch.fx.symbolic_trace`` first. Where it fails (data- or shape-dependent Python control flow,
for example), ``torch.export.export(strict=False)``: its graph of aten ops is turned into the same
module-level form, each call of a conv / linear / BatchNorm module (found by the nodes'
``nn_module_stack``) becoming one ``call_module`` node, so one planner serves both. Where that
fails too (a list of images in, NMS, a list of dicts out: torchvision's detectors), one eager run
recorded (``bnrt.folding.record``, tracer ``RECORDED``) in the same form.

Refuses (``CaptureError``) a model none of the three can capture, naming each reason, and
(``InputError``) example inputs the model cannot run on.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter, defaultdict
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnrt.errors import CaptureError, InputError, first_line
from bnrt.folding.record import SHAPE_KEY, VALUE_KEY, record


RECORDED = "recorded run"  # the tracer name of a capture recorded from one eager run
OPS_KEY = "bnrt_collapsed"  # torch.export module call: (aten ops, parameters read, batch_norm training flags)


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
    constants: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors torch.fx made while tracing

    def module_with_constants(self, root: nn.Module, graph: torch.fx.Graph, class_name: str) -> torch.fx.GraphModule:
        """A GraphModule over ``root`` running ``graph``; the tensors the tracer made
        (``_tensor_constant0``: a ``torch.tensor(...)`` in forward), which the model does not keep,
        are put on ``root`` only while the GraphModule copies them."""
        added = [name for name in self.constants if not hasattr(root, name)]
        for name in added:
            setattr(root, name, self.constants[name])
        try:
            return torch.fx.GraphModule(root, graph, class_name=class_name)
        finally:
            for name in added:
                delattr(root, name)

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


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the warnings and log records torch's tracers and exporters print to stderr; bnrt
    reports what matters in one line of its own."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _fails_on(model: nn.Module, example_inputs, exc: Exception) -> InputError:
    shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
    return InputError(f"model {type(model).__name__} fails on inputs of shape {shapes}: {first_line(exc)}")


def is_frozen_batchnorm(module: nn.Module | None) -> bool:
    """A frozen BatchNorm (torchvision's ``FrozenBatchNorm2d``, detectron2's): per-channel
    ``weight``, ``bias``, ``running_mean``, ``running_var`` buffers and ``eps``, computing BatchNorm in
    eval, with no parameters."""
    if module is None or not type(module).__name__.endswith("FrozenBatchNorm2d"):
        return False
    buffers = dict(module.named_buffers(recurse=False))
    return (all(k in buffers for k in ("weight", "bias", "running_mean", "running_var"))
            and isinstance(getattr(module, "eps", None), float) and not list(module.parameters(recurse=False)))


_LAYER_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.Linear)


def _inherits_forward(module: nn.Module) -> bool:
    """A conv or linear subclass from outside torch.nn (torchvision's ``Conv3DSimple``) that keeps
    its base class's forward: the layer it is, not code to trace through."""
    return any(isinstance(module, base) and type(module).forward is base.forward for base in _LAYER_CLASSES)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with frozen BatchNorms, and conv / linear subclasses that keep their base's
    forward, kept as module calls (BNs and layers to fold, not arithmetic to trace through)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_frozen_batchnorm(m) or _inherits_forward(m) or super().is_leaf_module(m, qualname)


def _collapsible(module: nn.Module | None) -> bool:
    return isinstance(module, (_BatchNorm, nn.modules.conv._ConvNd, nn.Linear)) or is_frozen_batchnorm(module)


def _export_graph(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> torch.fx.Graph:
    """torch.export's graph with every call of a conv / linear / BatchNorm module collapsed into one
    ``call_module`` node and lifted parameters turned into ``get_attr`` nodes where other ops read
    them. Shapes and plain values come from the exporter's fake tensors."""
    program = torch.export.export(model, example_inputs, strict=False)
    sig = program.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
              **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    modules = dict(model.named_modules())
    groups: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if stack:
            key, (path, _) = list(stack.items())[-1]
            if _collapsible(modules.get(path)):
                groups[key].append(node)
    collapse: dict[torch.fx.Node, tuple] = {}  # group's last node -> (module, input, its nodes)
    members: set[torch.fx.Node] = set()
    for key, nodes in groups.items():
        inside = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside and a.name not in lifted}
        escaping = [n for n in nodes[:-1] if any(u not in inside for u in n.users)]
        if len(inputs) == 1 and not escaping:
            path = list(nodes[0].meta["nn_module_stack"].values())[-1][0]
            collapse[nodes[-1]] = (path, inputs.pop(), nodes)
            members |= inside

    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}

    def lookup(old: torch.fx.Node) -> torch.fx.Node:
        if old not in env and old.name in lifted:
            env[old] = graph.get_attr(lifted[old.name])
        return env[old]

    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in lifted:
            continue
        if node in collapse:
            path, source, nodes = collapse[node]
            new = graph.call_module(path, (lookup(source),))
            new.meta[OPS_KEY] = (tuple(n.target for n in nodes),
                                 tuple(lifted[a.name] for n in nodes for a in n.all_input_nodes if a.name in lifted),
                                 tuple(n.args[5] for n in nodes if n.target is torch.ops.aten.batch_norm.default))
        elif node in members:
            continue
        else:
            new = graph.node_copy(node, lookup)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            new.meta[SHAPE_KEY] = tuple(int(d) for d in val.shape)
        elif _is_plain(val):
            new.meta[VALUE_KEY] = val
        env[node] = new
    return graph


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Tracing runs the model's own Python code, and code that sets attributes or fills caches
    (timm's EfficientViT caches its attention biases in eval mode) would leave tracer proxies in
    the model: its next forward, or a deep copy, breaks. Every module's attributes, and the
    contents of its plain dict and list attributes, are put back as they were."""
    saved = []
    for module in model.modules():
        state = dict(module.__dict__)
        contents = {k: v.copy() for k, v in state.items() if type(v) in (dict, list) and not k.startswith("_")}
        saved.append((module, state, contents))
    try:
        yield
    finally:
        for module, state, contents in saved:
            for key in [k for k in module.__dict__ if k not in state]:
                del module.__dict__[key]
            module.__dict__.update(state)
            for key, content in contents.items():
                state[key].clear()
                (state[key].update if isinstance(content, dict) else state[key].extend)(content)


def capture(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Capture:
    """Trace ``model`` and record the shapes ``example_inputs`` take through it. The model is left
    as it was (``_untouched``)."""
    with _untouched(model):
        return _capture(model, example_inputs)


def _capture(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Capture:
    try:
        graph, tracer = _Tracer().trace(model), "torch.fx"
    except Exception as fx_exc:
        try:
            with torch.no_grad():
                model(*example_inputs)
        except Exception as exc:
            raise _fails_on(model, example_inputs, exc) from exc
        try:
            with quiet():
                graph, tracer = _export_graph(model, example_inputs), "torch.export"
        except Exception as export_exc:
            try:
                graph, tracer = record(model, example_inputs, _collapsible), RECORDED
            except Exception as exc:
                raise CaptureError(
                    f"cannot capture a graph of {type(model).__name__}: torch.fx: {type(fx_exc).__name__}: "
                    f"{first_line(fx_exc)}; torch.export: {type(export_exc).__name__}: {first_line(export_exc)}; "
                    f"a recorded run: {type(exc).__name__}: {first_line(exc)}") from exc
    else:
        try:
            with torch.no_grad():
                _ShapeRecorder(torch.fx.GraphModule(model, graph)).run(*example_inputs)
        except Exception as exc:
            raise _fails_on(model, example_inputs, exc) from exc

    constants = {n.target: getattr(model, n.target) for n in graph.nodes  # gone once _untouched restores the model
                 if n.op == "get_attr" and "." not in n.target and n.target.startswith("_tensor_constant")
                 and isinstance(getattr(model, n.target, None), torch.Tensor)}
    return facts(graph, model, tracer, constants)


def facts(graph: torch.fx.Graph, model: nn.Module, tracer: str,
          constants: dict[str, torch.Tensor] | None = None) -> Capture:
    """The capture of ``model`` as ``graph`` calls it: how often each module is called, which
    parameters are read directly, and who owns each parameter and buffer."""
    calls: Counter = Counter()
    direct: Counter = Counter()
    for node in graph.nodes:
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
    return Capture(graph, modules, calls, direct, dict(owners), tracer, dict(constants or {}))
