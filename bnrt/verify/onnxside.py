"""ONNX models in a check: an ONNX file (or bytes) on ORT as a side, its intermediate values
("taps", read by ``bnrt.session.probe``: by torch module, from the exporters' scopes, or by value
name, to compare two graphs) and its rounding-noise reference."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from bnrt.folding.onnxconst import Constants, weight_sources
from bnrt.folding.onnxgraph import LAYER_OPS, label as node_label
from bnrt.io.artifacts import folds_in
from bnrt.io.shapes import given_shapes
from bnrt.io.source import file_sha256
from bnrt.session import Session, probe
from bnrt.verify.localise import onnx_module_values
from bnrt.verify.metrics import NoiseReference, thinned
from bnrt.verify.sides import Side


def session_tf32(provider: str, tf32: bool | None) -> bool | None:
    """The ``tf32`` of a check's ORT session: on CUDA off unless asked for (exact float32); None
    (not applicable) elsewhere."""
    return bool(tf32) if provider == "cuda" else None


def _graph_and_bytes(model: onnx.ModelProto | Path | bytes) -> tuple[onnx.ModelProto, onnx.ModelProto | bytes]:
    """The parsed graph (for names) and what the probe runs: a file's or a message's bytes (one copy
    of the weights, ORT's), or the loaded message where weights live in external data files."""
    data = model.read_bytes() if isinstance(model, Path) else model
    graph = onnx.load_from_string(data) if isinstance(data, bytes) else model
    if isinstance(model, Path) and any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer):
        data = graph = onnx.load(str(model))
    return graph, data


def onnx_taps(model: onnx.ModelProto | Path | bytes, inputs: Sequence[np.ndarray], provider: str = "cpu",
              tf32: bool | None = None, names: Collection[str] | None = None, limit: int | None = None,
              by: str = "module") -> dict[str, np.ndarray]:
    """Intermediate values computed on ``inputs``. ``by="module"``: the values of
    ``onnx_module_values``, keyed by module path (TorchScript-exporter scopes, ``/a/b``, are
    resolved later and always kept); ``by="value"``: every node output of the main graph, keyed by
    its name. Only ``names``, where given; ``limit``: about that many values kept per sample
    (``metrics.thinned``); non-float values left out."""
    graph, data = _graph_and_bytes(model)
    if by == "value":
        values = {v: v for node in graph.graph.node for v in node.output if v and (names is None or v in names)}
    else:
        values = {scope: value for scope, value in onnx_module_values(graph).items()
                  if names is None or scope in names or scope.startswith("/")}
    outputs = [o.name for o in graph.graph.output]
    del graph
    got = probe(data, values.values(), inputs, provider=provider, tf32=tf32, outputs=outputs)
    kept = {value: array[thinned(array.shape, limit)].copy() for value, array in got.items()
            if np.issubdtype(array.dtype, np.floating)}
    return {key: kept[value] for key, value in values.items() if value in kept}  # one array per value


def _taps_of(model: onnx.ModelProto | Path | bytes, provider: str, tf32: bool | None):
    """A side's ``taps``: ``onnx_taps`` of ``model`` on ``provider``."""
    def taps(xs, names=None, limit=None, by="module"):
        return onnx_taps(model, xs, provider, tf32, names, limit, by)
    return taps


def value_folds(model: onnx.ModelProto | Path | bytes, folds: list[dict]) -> list[dict]:
    """Fold records (node labels, as bnrt's ONNX folder writes them) in terms of the values of
    ``model`` (the graph the folds were planned on), to compare it with its folded graph value by
    value. Backward: the BN's output is compared with the BN's input, which the folded graph's
    readers read (it holds what the BN output); forward: the layer's output (a MatMul's bias Add's),
    which keeps its value. The values in between (the layer's own outputs, the view ops') are
    skipped as ``through``."""
    graph = (model if isinstance(model, onnx.ModelProto) else _graph_and_bytes(model)[0]).graph
    nodes = {node_label(n): n for n in graph.node}
    readers: dict[str, list] = {}
    for n in graph.node:
        for v in n.input:
            readers.setdefault(v, []).append(n)

    def outputs(labels) -> list[str]:
        return [v for name in labels if name in nodes for v in nodes[name].output if v]

    constants = Constants(graph)

    def final(name: str) -> str:
        """A layer's output value: its only reader's when that adds a constant (its split bias)."""
        node = nodes.get(name)
        if node is None:
            return name
        after = readers.get(node.output[0], [])
        biased = node.op_type in LAYER_OPS and len(after) == 1 and after[0].op_type == "Add" and any(
            v != node.output[0] and constants.value(v) is not None for v in after[0].input)
        return after[0].output[0] if biased else node.output[0]

    records = []
    for f in folds:
        bn = nodes.get(f["bn"]) if f["bn"] is not None else None
        record = {**f, "bn": bn.output[0] if bn is not None else f["bn"], "functional": False}
        through = outputs(f.get("through", ()))
        if f["direction"] == "backward" and bn is not None:
            record.update(into=[bn.input[0]], through=through + outputs(f["into"]))
        elif f["direction"] == "forward":
            record.update(into=[final(n) for n in f["into"]],
                          through=through + [v for v in outputs(f["into"]) if v not in map(final, f["into"])])
        else:
            record.update(into=outputs(f["into"]), through=through)
        records.append(record)
    return records


class NothingToRound(ValueError):
    """A graph without a float32 weight to re-round: no rounding noise can be measured on it."""


def rounding_noise(model: onnx.ModelProto, label: str, provider: str, tf32: bool | None = None,
                   seed: int = 0) -> NoiseReference:
    """The graph with every float32 weight (``onnxconst.weight_sources``: initializers and
    Constant nodes read beside the data, shape-determining ones left alone) moved by one ULP on a
    random half of its elements: its difference from the graph is the float32 noise that
    re-rounding the weights (any fold) causes. ``NothingToRound`` when the graph has none."""
    rng = np.random.default_rng(seed)
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    inits = {i.name: i for i in noisy.graph.initializer}
    moved = 0
    for source in list(weight_sources(noisy.graph)):
        tensor = inits[source] if isinstance(source, str) else _constant_tensor(source)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(tensor)
        away = np.where(rng.random(w.shape) < 0.5, np.float32(np.inf), np.float32(-np.inf))
        rounded = np.where(rng.random(w.shape) < 0.5, np.nextafter(w, away), w).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(rounded, tensor.name))
        moved += w.size
    if not moved:
        raise NothingToRound("the graph holds no float32 weight to re-round")
    session = Session(f"{label} (weights re-rounded)", provider, model_bytes=noisy.SerializeToString(), tf32=tf32,
                      arena=False)
    return NoiseReference("rounding", session.run, _taps_of(noisy, provider, tf32))


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """A Constant node's value as a tensor it holds in place (``value``; ``value_floats`` turned
    into one), None for other forms (sparse values are left as they are)."""
    a = node.attribute[0]
    if a.name in ("value_float", "value_floats"):
        values = np.array(onnx.helper.get_attribute_value(a), dtype=np.float32)
        node.ClearField("attribute")
        node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(values)))
        a = node.attribute[0]
    return a.t if a.name == "value" else None


def onnx_side(label: str, model: Path | bytes, provider: str = "cpu", tf32: bool | None = None,
              input_shapes: list[tuple[int, ...]] | None = None) -> Side:
    """An ONNX file (or serialized model) on ORT, on CUDA with TF32 as asked (off by default); its
    noise reference (``rounding_noise``) is made on first use, its taps read the file each time. On CUDA
    with TF32 off, ``deployed`` makes the same model under ORT's default TF32. ``input_shapes``
    (``--input-shape``) give the symbolic dims of its inputs a size for the check's samples
    (``io.shapes.given_shapes``: a fixed dim they contradict is an error). Its sessions keep no memory
    arena: a check runs several sides' sessions batch by batch, each would keep its largest run's memory."""
    tf32 = session_tf32(provider, tf32)

    def session_with(tf32: bool | None) -> Session:
        if isinstance(model, bytes):
            return Session(label, provider, model_bytes=model, tf32=tf32, arena=False)
        return Session(model, provider=provider, tf32=tf32, arena=False)

    session = session_with(tf32)
    meta = session.session.get_modelmeta().custom_metadata_map
    declared = [spec.shape for spec in session.inputs]
    shapes = given_shapes(session.input_names, declared, input_shapes, str(label if isinstance(model, bytes) else model))
    noise = cache(lambda: rounding_noise(onnx.load_from_string(model) if isinstance(model, bytes)
                                         else onnx.load(str(model)), label, provider, tf32))

    def deployed() -> Side:  # what a deployment gets: ORT's CUDA default, TF32 on
        twin = session_with(True)
        return Side(label=f"{label} tf32 (ORT default)", runner=twin.run, input_names=twin.input_names,
                    input_shapes=[], input_dtypes=[])

    return Side(label=label, runner=session.run, input_names=session.input_names, input_shapes=shapes,
                input_dtypes=[spec.dtype for spec in session.inputs], output_names=session.output_names,
                taps=_taps_of(model, provider, tf32),
                folds=folds_in(meta),
                fixed_batch=declared[0][0] if declared and declared[0] else None,
                noise=NoiseReference("rounding", lambda xs: noise().runner(xs),
                                     lambda xs, *args, **kw: noise().taps(xs, *args, **kw)),
                deployed=deployed if provider == "cuda" and not tf32 else None,
                value_folds=lambda folds: value_folds(model, folds),
                digest=cache(lambda: hashlib.sha256(model).hexdigest() if isinstance(model, bytes)
                             else file_sha256(model)),
                origin=meta.get("source_sha256"))
