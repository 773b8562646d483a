"""Export stage: a torch model to a checked ONNX file with a dynamic batch axis and bnrt metadata.

Two exporters: ``dynamo`` (torch.export based, the default of torch.onnx) and ``torchscript``
(the older tracer, faster to run). The file passes ``onnx.checker`` and strict shape inference
before it is renamed into place. ``export_program``: a TorchScript archive or an ExportedProgram
as an ONNX graph whose BatchNormalization nodes are kept, for bnrt's graph folder.
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import onnx
import torch
from torch import nn

from bnrt.folding.capture import quiet
from bnrt.errors import InputError, OptionError, first_line, raise_if_stopped
from bnrt.io.save import atomic_path
from bnrt.session import probe

DEFAULT_OPSET = 18  # ORT >= 1.14 runs it (Triton's ORT backends included); --opset raises it
EXPORTERS = ("dynamo", "torchscript")
EXPORTER_KEY = "bnrt_exporter"  # metadata: the exporter that wrote the file (the dynamo one may fall back)
TORCHSCRIPT_MAX_OPSET = 20  # the newest opset the TorchScript-based exporter writes
PROGRAM_EXPORTERS = {"torchscript": "torchscript", "exported": "dynamo"}  # the one exporter each program kind takes


def _script_parameters(model: nn.Module) -> list | None:
    """A TorchScript module's ``forward`` arguments after ``self`` (None for other modules)."""
    schema = getattr(getattr(model, "forward", None), "schema", None)
    return list(schema.arguments[1:]) if schema is not None else None


def input_names(model: nn.Module, count: int) -> list[str]:
    """Names of ``model.forward``'s first ``count`` positional parameters (``input_N`` if unnamed)."""
    scripted = _script_parameters(model)
    if scripted is not None and len(scripted) >= count:
        return [a.name for a in scripted[:count]]
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
    scripted = _script_parameters(model)
    if scripted is not None:
        return max(1, sum(not a.has_default_value() for a in scripted))
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


def check_exporter(exporter: str, opset: int) -> None:
    """``OptionError`` for an exporter bnrt does not know or an opset it cannot write."""
    if exporter not in EXPORTERS:
        raise OptionError(f"`exporter` {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise OptionError(f"`opset` {opset}: the installed onnx supports opsets 7 to {onnx.defs.onnx_opset_version()}")
    if exporter == "dynamo" and opset < 18:
        raise OptionError(f"`opset` {opset}: the dynamo exporter needs opset 18 or newer (use `exporter` torchscript)")


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
    and left dynamic unless ``dynamic_batch`` is False, and verified dynamic in the file: when the
    dynamo exporter fails or fixes it, the TorchScript-based exporter is tried (``EXPORTER_KEY`` in
    the metadata names the one used). ``metadata`` goes into metadata_props. Raises
    ``InputError`` for an opset the installed onnx does not know or when no exporter succeeds.
    """
    check_exporter(exporter, opset)
    args = _batch_of_two(example_inputs) if dynamic_batch else example_inputs
    path = Path(path)
    with atomic_path(path) as tmp, quiet():
        proto, used = _export_trying(model, args, tmp, names, opset, dynamic_batch, exporter)
        for key, value in {**(metadata or {}), EXPORTER_KEY: used}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return proto


def _export_trying(model: nn.Module, args: tuple, tmp: Path, names: tuple[list[str], list[str]], opset: int,
                   dynamic_batch: bool, exporter: str) -> tuple[onnx.ModelProto, str]:
    """The export and the exporter that made it: ``exporter``, and when the dynamo exporter fails or
    fixes a batch axis declared dynamic (its fallback strategies specialise what the model's code
    pins), the TorchScript-based one. ``InputError`` naming each exporter's problem otherwise."""
    problems = []
    for name in [exporter] + (["torchscript"] if exporter == "dynamo" and opset <= TORCHSCRIPT_MAX_OPSET else []):
        raise_if_stopped()  # an exporter strategy that swallowed Ctrl-C does not start the next one
        try:
            proto = _export_with(name, model, args, tmp, names, opset, dynamic_batch)
        except InputError:
            raise
        except Exception as exc:
            problems.append(f"{first_line(exc)}")
            continue
        fixed = [(i.name, i.type.tensor_type.shape.dim[0].dim_value) for i in proto.graph.input
                 if dynamic_batch and i.name in names[0] and i.type.tensor_type.shape.dim
                 and i.type.tensor_type.shape.dim[0].HasField("dim_value")]
        if fixed:
            problems.append(f"the batch axis of input {fixed[0][0]!r} came out fixed at {fixed[0][1]}")
            continue
        pinned = _pinned_inside(proto, args) if dynamic_batch and name == "torchscript" else None
        if pinned is None:
            return proto, name
        problems.append(f"the graph declares a dynamic batch but runs only at the traced one ({pinned})")
    tried = "; the torchscript exporter: ".join(problems)
    raise InputError(f"ONNX export ({exporter}) of {type(model).__name__} failed: {tried}")


def _pinned_inside(proto: onnx.ModelProto, args: tuple) -> str | None:
    """Why a traced graph fails at a batch of 3 (a trace bakes the example's batch into reshapes
    while the declared axis stays symbolic), or None when it runs and its outputs have that batch."""
    inputs = [torch.cat([x[:1]] * 3).numpy() for x in args]
    try:
        outputs = probe(proto, [], inputs)
    except Exception as exc:  # ORT's shape errors
        return f"batch 3: {first_line(exc)}"
    wrong = [k for k, v in outputs.items() if v.ndim and v.shape[0] != 3]
    return f"batch 3 gives output {wrong[0]!r} of batch {outputs[wrong[0]].shape[0]}" if wrong else None


def _export_with(exporter: str, model: nn.Module, args: tuple, tmp: Path, names: tuple[list[str], list[str]],
                 opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    in_names, out_names = names
    if exporter == "dynamo":
        dims = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic_batch else None
        return torch.onnx.export(model, args, dynamo=True, input_names=in_names, output_names=out_names,
                                 dynamic_shapes=dims, opset_version=opset, verbose=False, optimize=True).model_proto
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    torch.onnx.export(model, args, str(tmp), dynamo=False, input_names=in_names, output_names=out_names,
                      dynamic_axes=axes, opset_version=opset)
    return onnx.load(str(tmp))


def export_program(program, example_inputs: tuple[torch.Tensor, ...], *, kind: str, names: tuple[list[str], list[str]],
                   opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """A TorchScript module (``kind`` "torchscript": the TorchScript-based exporter, batch axis
    dynamic) or an ExportedProgram (``kind`` "exported": the dynamo exporter, the program's own
    dynamic dims) as an ONNX graph with its BatchNormalization nodes kept: neither exporter folds
    them here (training mode preserved, no graph optimisation), so bnrt's graph folder does it."""
    check_exporter(PROGRAM_EXPORTERS[kind], opset)
    in_names, out_names = names
    try:
        with quiet():
            if kind == "torchscript":
                buffer = io.BytesIO()
                axes = {n: {0: "batch"} for n in in_names + out_names}
                torch.onnx.export(program, _batch_of_two(example_inputs), buffer, dynamo=False, input_names=in_names,
                                  output_names=out_names, dynamic_axes=axes, opset_version=opset,
                                  training=torch.onnx.TrainingMode.PRESERVE)
                return onnx.load_model_from_string(buffer.getvalue())
            model = torch.onnx.export(program, dynamo=True, input_names=in_names, output_names=out_names,
                                      opset_version=opset, optimize=False, verbose=False).model_proto
            return optimized_keeping_batchnorm(model)
    except Exception as exc:
        what = "TorchScript archive" if kind == "torchscript" else "ExportedProgram"
        raise InputError(f"ONNX export of the {what} failed: {first_line(exc)}") from exc


def optimized_keeping_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """The dynamo exporter's own graph optimisation (onnxscript's constant folding, its default
    rewrite rules, dead nodes removed, constants lifted to initializers) without the rules that fuse
    BatchNormalization or an affine into a layer: bnrt folds those, with its checks and records."""
    import onnx_ir.passes.common as common
    from onnxscript import ir, optimizer, rewriter

    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES
             if not any(word in str(getattr(r, "name", "")) for word in ("BatchNorm", "Affine"))]
    graph = ir.serde.deserialize_model(model)
    for _ in range(2):
        optimizer.fold_constants(graph)
        rewriter.RewritePass(rules)(graph)
        common.RemoveUnusedNodesPass()(graph)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(graph)
    common.DeduplicateInitializersPass()(graph)
    return ir.serde.serialize_model(graph)


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
