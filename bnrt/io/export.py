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
from bnrt.errors import ExportError, InputError, OptionError, first_line, raise_if_stopped
from bnrt.io.save import atomic_path, save_onnx
from bnrt.io.shapes import format_axes
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


def is_records(out) -> bool:
    """Whether ``out`` is one dict of tensors per sample, every dict with the same keys (torchvision's
    detections: ``boxes``, ``scores``, ``labels`` per image)."""
    return isinstance(out, (list, tuple)) and bool(out) and all(
        isinstance(d, dict) and d and list(d) == list(out[0]) and all(isinstance(v, torch.Tensor) for v in d.values())
        for d in out)


def stacked_records(out: list[dict]) -> dict[str, torch.Tensor]:
    """Per-sample records as one tensor per key with a sample axis: (samples, the most rows any
    sample has, ...), shorter ones padded with NaN (float) or -1 (integers)."""
    stacked = {}
    for key in out[0]:
        parts = [d[key] for d in out]
        if all(p.ndim for p in parts):
            rows = max(p.shape[0] for p in parts)
            fill = float("nan") if parts[0].is_floating_point() else -1
            parts = [torch.cat([p, p.new_full((rows - p.shape[0], *p.shape[1:]), fill)]) for p in parts]
        stacked[key] = torch.stack(parts)
    return stacked


def named_outputs(out, path: tuple = ()) -> list[tuple[tuple, torch.Tensor]]:
    """A model's output (tensor, tuple/list or dict of them, nested; a list of per-sample records
    as ``stacked_records``) as (path, tensor) pairs, a path holding list positions and dict keys."""
    if isinstance(out, torch.Tensor):
        return [(path, out)]
    if is_records(out):
        out = stacked_records(out)
    if isinstance(out, dict):
        return [pair for key, item in out.items() for pair in named_outputs(item, (*path, str(key)))]
    if isinstance(out, (list, tuple)):
        return [pair for i, item in enumerate(out) for pair in named_outputs(item, (*path, i))]
    raise TypeError(f"model output of type {type(out).__name__} is not a tensor or a collection of tensors")


def flatten_outputs(out) -> list[torch.Tensor]:
    """A model's output as a flat list of tensors, in the order ``names_of_outputs`` names them."""
    return [t for _, t in named_outputs(out)]


def names_of_outputs(out) -> list[str]:
    """Stable names of a model's flattened outputs: ``output`` / ``output_N`` (numbered) when it has
    no dict, else each tensor's path of positions and keys joined by dots (``boxes``, ``output_1.logits``)."""
    paths = [p for p, _ in named_outputs(out)]
    if not any(isinstance(k, str) for p in paths for k in p):
        return output_names(len(paths))
    return [".".join(f"output_{k}" if i == 0 and isinstance(k, int) else str(k) for i, k in enumerate(p)) for p in paths]


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
    dynamic: dict[str, tuple[int, ...]] | None = None,
    probe_inputs: list[tuple[torch.Tensor, ...]] | None = None,
    static_ok: bool = False,
) -> onnx.ModelProto:
    """Export ``model`` (eval mode) to ``path`` and return the written ModelProto.

    ``names`` is (input names, output names). ``dynamic``: the axes of each input left dynamic
    (default: axis 0, named ``batch``, of every input, unless ``dynamic_batch`` is False), verified
    in the file: each is symbolic, and the graph runs on each of ``probe_inputs`` (input tuples of
    other sizes on those axes; default: a batch of 3) giving the eager model's output shapes. When an exporter fails or
    specialises an axis, the next is tried (dynamo, then the TorchScript-based one); ``EXPORTER_KEY``
    in the metadata names the one used. When every exporter specialises an axis, ``static_ok``
    exports with those axes fixed at ``example_inputs``' size; otherwise ``ExportError`` names the axis
    and each exporter's problem. ``metadata`` goes into metadata_props. A model over
    ``bnrt.io.save.EXTERNAL_DATA_BYTES`` keeps its tensors in ``path``.data beside it.
    """
    check_exporter(exporter, opset)
    dynamic = ({n: (0,) for n in names[0][:len(example_inputs)]} if dynamic_batch else {}) if dynamic is None \
        else {n: tuple(sorted(a)) for n, a in dynamic.items() if a}
    probes = list(probe_inputs or []) or ([tuple(torch.cat([x[:1]] * 3) if 0 in dynamic.get(n, ()) else x
                                                 for n, x in zip(names[0], example_inputs))] if dynamic else [])
    path = Path(path)
    with atomic_path(path) as tmp, quiet():
        while True:
            args = _batch_of_two(example_inputs) if any(0 in a for a in dynamic.values()) else example_inputs
            try:
                proto, used = _export_trying(model, args, tmp, names, opset, dynamic, probes, exporter)
                break
            except Specialised as exc:
                if not static_ok or not any((n, a) in exc.fixed for n, axes in dynamic.items() for a in axes):
                    raise  # (fixing what is already fixed would not end)
                fixed = exc.fixed
            dynamic = {n: tuple(a for a in axes if (n, a) not in fixed) for n, axes in dynamic.items()}
            probes = [tuple(_resized(p, x, dynamic.get(n, ())) for n, p, x in zip(names[0], probe, example_inputs))
                      for probe in probes]
        for key, value in {**(metadata or {}), EXPORTER_KEY: used}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        save_onnx(proto, tmp, path.name)  # over 1 GiB: the tensors in ``path.name``.data beside it
    return proto


def _resized(probe: torch.Tensor, example: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """``probe`` cut or repeated to ``example``'s size on every axis not in ``axes``."""
    for axis in range(example.ndim):
        if axis not in axes and probe.shape[axis] != example.shape[axis]:
            index = torch.arange(example.shape[axis]) % probe.shape[axis]
            probe = probe.index_select(axis, index)
    return probe


def input_dims(proto: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Each graph input's dims: a size, or the name of a symbolic one."""
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in proto.graph.input}


def dynamic_axes_of(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """The axes of each graph input that the file leaves symbolic."""
    return {name: [a for a, d in enumerate(dims) if isinstance(d, str)] for name, dims in input_dims(proto).items()}


def _export_trying(model: nn.Module, args: tuple, tmp: Path, names: tuple[list[str], list[str]], opset: int,
                   dynamic: dict[str, tuple[int, ...]], probes: list[tuple],
                   exporter: str) -> tuple[onnx.ModelProto, str]:
    """The export and the exporter that made it: ``exporter``, and when the dynamo exporter fails or
    specialises an axis declared dynamic (its fallback strategies specialise what the model's
    code pins), the TorchScript-based one. ``ExportError`` naming each exporter's problem when
    none succeeded: ``Specialised`` when some exporter specialised an axis."""
    problems: list[str] = []
    fixed: set[tuple[str, int]] = set()
    wanted: list | None = None  # the eager model's output shapes on the probes, run once for every exporter
    for name in [exporter] + (["torchscript"] if exporter == "dynamo" and opset <= TORCHSCRIPT_MAX_OPSET else []):
        raise_if_stopped()  # an exporter strategy that swallowed Ctrl-C does not start the next one
        try:
            proto = _export_with(name, model, args, tmp, names, opset, dynamic)
        except InputError:
            raise
        except Exception as exc:
            while exc.__cause__ is not None:  # the dynamo exporter wraps the model's own error in its steps
                exc = exc.__cause__
            problems.append(f"the {name} exporter: {first_line(exc)}")
            continue
        dims = input_dims(proto)
        lost = [(n, a) for n, axes in dynamic.items() for a in axes
                if not (a < len(dims.get(n, ())) and isinstance(dims[n][a], str))]
        if lost:
            fixed |= set(lost)
            (n, a), kept = lost[0], dims.get(lost[0][0])
            problems.append(f"the {name} exporter fixed axis {a} of input {n!r} at {kept[a]}" if kept else
                            f"the {name} exporter left input {n!r} out of the graph")
            continue
        spatial = any(a for axes in dynamic.values() for a in axes)
        # the dynamo exporter's symbolic batch is its own (torch.export's guards); a trace's is declared only
        pinned = None
        if spatial or (dynamic and name == "torchscript"):
            wanted = _eager_shapes(model, probes) if wanted is None else wanted
            pinned = _pinned_inside(proto, probes, wanted)
        if pinned is None:
            return proto, name
        fixed |= {(n, a) for n, axes in dynamic.items() for a in axes if a}  # which one is unknown: all but batch
        problems.append(f"the {name} exporter's graph declares {format_axes(dynamic)} dynamic but runs only at the "
                        f"traced size ({pinned})")
    message = f"ONNX export ({exporter}) of {type(model).__name__} failed: {'; '.join(problems)}"
    if not fixed:
        raise ExportError(message)
    grouped: dict[str, tuple[int, ...]] = {}
    for name, axis in sorted(fixed):
        grouped[name] = (*grouped.get(name, ()), axis)
    raise Specialised(f"{message}; --static-ok exports {format_axes(grouped)} fixed at the example's size", fixed)


class Specialised(ExportError):
    """Every exporter failed and some specialised an axis declared dynamic: ``fixed`` holds the
    (input, axis) pairs."""

    def __init__(self, message: str, fixed: set[tuple[str, int]]):
        super().__init__(message)
        self.fixed = fixed


def _eager_shapes(model: nn.Module, probes: list[tuple]) -> list[list[tuple] | str]:
    """The eager model's output shapes on each probe (why it fails there, where it does)."""
    shapes: list[list[tuple] | str] = []
    for inputs in probes:
        try:
            with torch.no_grad():
                shapes.append([tuple(t.shape) for t in flatten_outputs(model(*inputs))])
        except Exception as exc:
            shapes.append(f"the eager model fails there too: {type(exc).__name__}: {first_line(exc)}")
    return shapes


def _pinned_inside(proto: onnx.ModelProto, probes: list[tuple], wanted: list[list[tuple] | str]) -> str | None:
    """Why the graph fails on one of the ``probes`` (a trace bakes the example's sizes into reshapes
    while the declared axes stay symbolic), or None when it runs on each and gives the eager model's
    output shapes (``wanted``, ``_eager_shapes``)."""
    for inputs, shapes in zip(probes, wanted):
        at = f"inputs of shape {', '.join(str(tuple(x.shape)) for x in inputs)}"
        try:
            outputs = list(probe(proto, [], [x.numpy() for x in inputs]).values())
        except Exception as exc:  # ORT's shape errors
            return f"{at}: {first_line(exc)}"
        if isinstance(shapes, str):
            return f"{at}: {shapes}"
        got = [tuple(o.shape) for o in outputs]
        if got != shapes:
            return f"{at} give outputs of shape {', '.join(map(str, got))}, the model {', '.join(map(str, shapes))}"
    return None


def _export_with(exporter: str, model: nn.Module, args: tuple, tmp: Path, names: tuple[list[str], list[str]],
                 opset: int, dynamic: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    in_names, out_names = names
    if exporter == "dynamo":
        dims = tuple({a: torch.export.Dim("batch") if a == 0 else torch.export.Dim.AUTO for a in dynamic.get(n, ())}
                     for n in in_names[:len(args)]) if dynamic else None
        return torch.onnx.export(model, args, dynamo=True, input_names=in_names, output_names=out_names,
                                 dynamic_shapes=dims, opset_version=opset, verbose=False, optimize=True).model_proto
    axes = {n: {a: "batch" if a == 0 else f"{n}_{a}" for a in dynamic.get(n, ())} for n in in_names}
    if any(0 in a for a in dynamic.values()):
        axes.update({n: {0: "batch"} for n in out_names})
    torch.onnx.export(model, args, str(tmp), dynamo=False, input_names=in_names, output_names=out_names,
                      dynamic_axes={n: a for n, a in axes.items() if a} or None, opset_version=opset)
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
