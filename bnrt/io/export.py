"""Export stage: a torch model to a checked ONNX file with a dynamic batch axis and bnrt metadata.

Two exporters: ``dynamo`` (torch.export based, the default of torch.onnx) and ``torchscript``
(the older tracer, faster to run). The file passes ``onnx.checker`` and strict shape inference
before it is renamed into place.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import onnx
import torch
from torch import nn

from bnrt.folding.capture import quiet
from bnrt.errors import InputError, OptionError, first_line
from bnrt.io.save import atomic_path

DEFAULT_OPSET = 18  # ORT >= 1.14 runs it (Triton's ORT backends included); --opset raises it
EXPORTERS = ("dynamo", "torchscript")


def input_names(model: nn.Module, count: int) -> list[str]:
    """Names of ``model.forward``'s first ``count`` positional parameters (``input_N`` if unnamed)."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) < count:
        params = [f"input_{i}" for i in range(count)]
    return params[:count]


def required_inputs(model: nn.Module) -> int:
    """Number of positional ``forward`` parameters without a default (at least 1)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    return max(1, sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                      for p in params))


def model_input_names(model: nn.Module, shapes: list | None = None) -> list[str]:
    """Names of the inputs ``model`` takes: one per shape in ``shapes``, else one per required
    ``forward`` parameter."""
    return input_names(model, len(shapes) if shapes else required_inputs(model))


def output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def flatten_outputs(out) -> list[torch.Tensor]:
    """A model's output (tensor, tuple/list or dict of them, nested) as a flat list of tensors, in
    the order ``output_names`` numbers them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flatten_outputs(item)]
    raise TypeError(f"model output of type {type(out).__name__} is not a tensor or a collection of tensors")


def _batch_of_two(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    # torch.export specialises a dimension of size 1, so the traced batch must be >= 2.
    return tuple(torch.cat([x[:1], x[:1]]) if x.shape[0] < 2 else x[:2] for x in inputs)


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    names: tuple[list[str], list[str]],
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    metadata: dict[str, str] | None = None,
    exporter: str = "dynamo",
) -> onnx.ModelProto:
    """Export ``model`` (eval mode) to ``path`` and return the written ModelProto.

    ``names`` is (input names, output names). Axis 0 of every input and output is named ``batch``
    and left dynamic unless ``dynamic_batch`` is False. ``metadata`` goes into metadata_props.
    Raises ``InputError`` for an opset the installed onnx does not know or an exporter failure.
    """
    if exporter not in EXPORTERS:
        raise OptionError(f"`exporter` {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise OptionError(f"`opset` {opset}: the installed onnx supports opsets 7 to {onnx.defs.onnx_opset_version()}")
    if exporter == "dynamo" and opset < 18:
        raise OptionError(f"`opset` {opset}: the dynamo exporter needs opset 18 or newer (use `exporter` torchscript)")
    in_names, out_names = names
    args = _batch_of_two(example_inputs) if dynamic_batch else example_inputs
    path = Path(path)
    with atomic_path(path) as tmp, quiet():
        try:
            if exporter == "dynamo":
                dims = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic_batch else None
                program = torch.onnx.export(
                    model, args, dynamo=True, input_names=in_names, output_names=out_names,
                    dynamic_shapes=dims, opset_version=opset, verbose=False, optimize=True,
                )
                proto = program.model_proto
            else:
                axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
                torch.onnx.export(model, args, str(tmp), dynamo=False, input_names=in_names,
                                  output_names=out_names, dynamic_axes=axes, opset_version=opset)
                proto = onnx.load(str(tmp))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"ONNX export ({exporter}) of {type(model).__name__} failed: {first_line(exc)}") from exc
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return proto


def count_ops(proto: onnx.ModelProto, op_type: str) -> int:
    """Number of ``op_type`` nodes in the main graph and every subgraph."""
    def walk(graph: onnx.GraphProto) -> int:
        total = 0
        for node in graph.node:
            total += node.op_type == op_type
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    total += walk(attr.g)
                total += sum(walk(g) for g in attr.graphs)
        return total
    return walk(proto.graph)
