"""Quantize stage: a model folded by bnrt becomes an INT8 or FP16 ONNX graph, verified on the
user's data against the float32 folded graph, within a budget.

- INT8: ``onnxruntime.quantization.quantize_static``, QDQ format, per-channel symmetric int8
  weights, asymmetric uint8 activations (U8S8: the fast path of ORT's x86 CPU kernels, 2.7x on
  ResNet-50 where S8S8 gains ~1.1x) calibrated over the first ``calibration_samples`` samples of
  the data (min-max, entropy or percentile), after ORT's pre-processing (shape inference and graph
  optimisation).
  Folding first matters: ORT's quantizer leaves a standalone BatchNormalization in float32.
- FP16: ``onnxruntime.transformers.float16.convert_float_to_float16``, inputs and outputs kept
  float32 by default; every node whose float weights or whose activations (measured over the
  data) leave float16's range (65504) is kept in float32 and listed.
- Verification on all of the data: accuracy of both graphs (with labels), top-1 agreement, per
  output SQNR and max error. The budget: an accuracy drop of at most ``max_accuracy_drop`` points
  with labels, else at most ``max_disagreement`` of top-1 disagreement. Over budget: only the
  report is written (exit 1), and for INT8 it names the layers with the worst SQNR, to exclude.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bnrt.errors import InputError, OptionError
from bnrt.folding.onnxfold import load_onnx
from bnrt.folding.onnxscope import outer_reads, subgraphs
from bnrt.io.artifacts import artifact_names, stem_of
from bnrt.io.data import Dataset, InputSpec, make_inputs
from bnrt.io.save import atomic_path, publish, refuse_overwrite, staging, write_json
from bnrt.io.source import ModelSource
from bnrt.pipeline.convert import fold_file
from bnrt.progress import Steps
from bnrt.session import probe
from bnrt.verify.check import CheckOptions, check, side
from bnrt.verify.metrics import Tolerances, sqnr_db
from bnrt.verify.sides import Side

SCHEMA = "bnrt.quantize/1"
PRECISIONS = ("int8", "fp16")
CALIBRATIONS = ("minmax", "entropy", "percentile")
FP16_MAX = 65504.0
WORST_LAYERS = 5  # layers named when INT8 fails its budget
TAP_SAMPLES = 16  # samples the per-layer SQNR is measured on
_QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class QuantizeOptions:
    """``precision`` int8 or fp16; INT8 ``calibration`` method over the first
    ``calibration_samples`` samples and ``exclude`` (node names kept in float32); FP16
    ``keep_io_types`` (float32 inputs/outputs). The budget: ``max_accuracy_drop`` (points of
    top-1 accuracy, with labels) or ``max_disagreement`` (fraction of samples whose top-1 changes,
    without labels)."""

    precision: str = "int8"
    calibration: str = "minmax"
    calibration_samples: int = 256
    exclude: tuple[str, ...] = ()
    keep_io_types: bool = True
    max_accuracy_drop: float = 1.0
    max_disagreement: float = 0.01

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise OptionError(f"`precision` {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.calibration not in CALIBRATIONS:
            raise OptionError(f"`calibration` {self.calibration!r}: choose one of {', '.join(CALIBRATIONS)}")
        if self.calibration_samples <= 0:
            raise OptionError(f"`calibration_samples` {self.calibration_samples}: must be positive")
        if self.max_accuracy_drop < 0 or not 0 <= self.max_disagreement <= 1:
            raise OptionError("`max_accuracy_drop` must be >= 0 and `max_disagreement` within [0, 1]")


@dataclass
class QuantizeOutcome:
    report: dict[str, Any]
    report_path: Path
    written: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def quantized_name(source: Path, precision: str) -> str:
    return f"{stem_of(source)}.{precision}.onnx"


def report_name(source: Path, precision: str) -> str:
    """``<stem>.<precision>.quantize.json``: an INT8 and an FP16 run into one folder keep both reports."""
    return f"{stem_of(source)}.{precision}.quantize.json"


def _tensor_types(model: onnx.ModelProto) -> set[int]:
    kinds = {t.data_type for t in model.graph.initializer}
    kinds |= {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    return kinds


def folded_float_graph(source, work: Path) -> tuple[Path, list[dict], str]:
    """The float32 graph to quantize, folded by ``bnrt fold``'s pipeline without its check (the
    quantized graph is checked against this one): (path, kept BatchNorms [{bn, reason}], sha256 of
    the source). An ONNX model that already holds float16 tensors is refused."""
    source = ModelSource.of(source)
    if source.kind == "onnx" and onnx.TensorProto.FLOAT16 in _tensor_types(load_onnx(source.path)):
        raise InputError(f"{source.path}: already has float16 tensors; quantize its float32 original")
    outcome = fold_file(source, work, check=None)
    not_written = outcome.report["summary"].get("onnx_not_written")
    if not_written:
        raise InputError(f"{source.path}: no ONNX graph to quantize: {not_written}")
    path = work / artifact_names(source.path, source.kind)["folded" if source.kind == "onnx" else "onnx"]
    kept = [{"bn": d.bn, "reason": d.reason} for d in outcome.result.decisions if d.status != "folded"]
    return path, kept, outcome.report["source"]["sha256"]


class _Reader:
    """``CalibrationDataReader`` over the first samples, one sample per call."""

    def __init__(self, names: list[str], inputs: list[np.ndarray], count: int):
        self.feeds = iter([{n: x[i:i + 1] for n, x in zip(names, inputs)} for i in range(count)])

    def get_next(self):
        return next(self.feeds, None)


def _quiet_ort_logs():
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def to_int8(float_path: Path, out: Path, names: list[str], inputs: list[np.ndarray], options: QuantizeOptions,
            work: Path) -> dict[str, Any]:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _quiet_ort_logs()
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(names, inputs, min(options.calibration_samples,
                                                                                      len(inputs[0])))
    pre = work / "pre.onnx"
    quant_pre_process(str(float_path), str(pre))
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.calibration]
    known = {n.name for n in onnx.load(str(pre)).graph.node}
    unknown = [n for n in options.exclude if n not in known]
    if unknown:
        raise OptionError(f"`exclude` {unknown[0]!r}: no node of that name in the pre-processed graph "
                          f"(names: {', '.join(sorted(known)[:8])}{', …' if len(known) > 8 else ''})")
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    nodes_to_exclude=list(options.exclude) or None,
                    extra_options={"CalibTensorRangeSymmetric": False})
    return {"format": "QDQ", "activations": "uint8", "weights": "int8 per channel",
            "calibration": options.calibration,
            "calibration_samples": min(options.calibration_samples, len(inputs[0])),
            "excluded": list(options.exclude)}


def _values(model: onnx.ModelProto, names, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The values ``names`` (and the graph outputs) of ``model`` on ``inputs`` (ORT CPU, no graph
    optimisation: the values are the graph's own)."""
    return probe(model, names, inputs)


def _activation_ranges(model: onnx.ModelProto, inputs: list[np.ndarray]) -> dict[str, float]:
    """max |value| of every float tensor a node produces, over ``inputs``."""
    values = _values(model, [o for n in model.graph.node for o in n.output if o], inputs)
    return {name: float(np.nanmax(np.abs(v))) for name, v in values.items()
            if np.issubdtype(v.dtype, np.floating) and v.size}


def to_fp16(float_path: Path, out: Path, inputs: list[np.ndarray], options: QuantizeOptions) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _quiet_ort_logs()
    model = onnx.load(str(float_path))
    weights = {t.name: float(np.abs(numpy_helper.to_array(t)).max()) for t in model.graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT and numpy_helper.to_array(t).size}
    ranges = _activation_ranges(model, inputs)
    kept = []
    for node in model.graph.node:
        big_w = [i for i in node.input if weights.get(i, 0.0) > FP16_MAX]
        big_a = [o for o in node.output if ranges.get(o, 0.0) > FP16_MAX]
        if big_w or big_a:
            kept.append({"node": node.name, "op": node.op_type,
                         "why": ", ".join([f"weight {w} reaches {weights[w]:.3g}" for w in big_w]
                                          + [f"output {o} reaches {ranges[o]:.3g}" for o in big_a])})
    converted = _drop_round_trips(convert_float_to_float16(model, keep_io_types=options.keep_io_types,
                                                           node_block_list=[k["node"] for k in kept] or None))
    with atomic_path(out) as tmp:
        onnx.save(converted, str(tmp))
    return {"keep_io_types": options.keep_io_types, "kept_float32": kept}


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _drop_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """The converter casts a kept node's float32 output to float16 and back before the next kept
    node (or a float32 graph output) reads it: a round trip that turns the values beyond float16's
    range, the very ones the node was kept for, into Inf. Each Cast to float32 of a Cast to float16
    of a float32 value becomes an Identity of that value; Casts nobody reads any more go."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]})
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        first = producer.get(node.input[0]) if node.input else None
        if (_cast_to(node) == onnx.TensorProto.FLOAT and first is not None
                and _cast_to(first) == onnx.TensorProto.FLOAT16 and types.get(first.input[0]) == onnx.TensorProto.FLOAT):
            node.op_type, node.input[0] = "Identity", first.input[0]
            del node.attribute[:]
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    read |= {name for n in graph.node for _, body in subgraphs(n) for name in outer_reads(body)}
    dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in read for o in n.output)]
    for node in dead:
        graph.node.remove(node)
    return model


def _classify(outputs: list[np.ndarray], labels, where: str, samples: int) -> None:
    if labels is None and not (outputs and outputs[0].ndim == 2 and outputs[0].shape[1] > 1):
        shape = (samples, *outputs[0].shape[1:]) if outputs else ()
        raise InputError(f"{where}: no labels (y) in the data and the first output has shape {shape}, not "
                         "(N, classes) logits: top-1 agreement cannot be measured; add integer labels under 'y'")


def _worst_layers(float_path: Path, quant_path: Path, inputs: list[np.ndarray]) -> list[dict]:
    """SQNR of every Conv/Gemm/MatMul output of the quantized graph as the next layer sees it (after
    its QuantizeLinear -> DequantizeLinear pair, where it has one), against the same value in the
    pre-processed float graph it came from (whose node names ``exclude`` takes; the quantizer keeps
    value names, and where it absorbed a following Relu the node produces the Relu's value), worst
    first, on the first ``TAP_SAMPLES`` samples."""
    graphs = [onnx.load(str(p)) for p in (float_path, quant_path)]
    values_f = {o for n in graphs[0].graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graphs[1].graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def dequantized(value: str) -> str | None:
        for q in consumers.get(value, []):
            for d in consumers.get(q.output[0], []) if q.op_type == "QuantizeLinear" else []:
                if d.op_type == "DequantizeLinear":
                    return d.output[0]
        return None

    layers = []  # (node, op, value in the float graph, value in the quantized graph)
    for node in graphs[1].graph.node:
        if node.op_type in _QUANTIZED_OPS and node.output:
            out, deq = node.output[0], dequantized(node.output[0])
            ref = out if out in values_f else deq if deq in values_f else None
            if ref is not None:
                layers.append((node.name, node.op_type, ref, deq or out))
    if not layers:
        return []
    head = [x[:TAP_SAMPLES] for x in inputs]
    values = [_values(graphs[0], [r for _, _, r, _ in layers], head),
              _values(graphs[1], [q for _, _, _, q in layers], head)]
    rows = [{"node": node, "op": op, "output": ref, "sqnr_db": sqnr_db(values[0][ref], values[1][q])}
            for node, op, ref, q in layers]
    rows.sort(key=lambda row: float("inf") if row["sqnr_db"] is None else row["sqnr_db"])
    return rows[:WORST_LAYERS]


def _verify(reference: Side, quant_path: Path, dataset: Dataset, options: QuantizeOptions,
            steps: Steps) -> tuple[list[dict], float | None, dict | None, dict]:
    """The quantized graph against the float32 one on all of ``dataset`` (the check, every output
    measured, none judged by tolerance): per-output errors, top-1 agreement, accuracies with labels
    and the budget's measure."""
    everything = CheckOptions(tolerances=Tolerances(atol=np.inf, rtol=0.0), localise=False,
                              batch_size=reference.fixed_batch or max(1, dataset.size))
    verdict = check(reference, [side(quant_path, label=options.precision)], dataset, everything, note=steps.note)
    metrics = verdict.comparisons[0].outputs
    outputs = [{"name": m.name, "max_abs": m.max_abs, "mean_abs": m.mean_abs, "sqnr_db": m.sqnr_db,
                "top1_agreement": m.top1_agreement, "problem": m.problem} for m in metrics]
    agreement = metrics[0].top1_agreement
    if dataset.labels is None:  # no agreement: a non-finite or reshaped output, nothing agrees
        return outputs, agreement, None, {"kind": "top-1 disagreement", "limit": options.max_disagreement,
                                          "value": 1.0 - (agreement or 0.0)}
    accuracy = {"float32": verdict.accuracy[reference.label], options.precision: verdict.accuracy[options.precision]}
    drop = 100 * (accuracy["float32"] - accuracy[options.precision])
    return outputs, agreement, accuracy, {"kind": "accuracy drop (points)", "limit": options.max_accuracy_drop,
                                          "value": drop}


def quantize_file(source, data: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                  options: QuantizeOptions = QuantizeOptions(), *, progress: bool = False) -> QuantizeOutcome:
    """Fold ``source`` (a checkpoint, or an ``.onnx``) and quantize it to ``options.precision``,
    verified on ``data`` (an .npz with the inputs and, optionally, integer labels under ``y``).
    Writes ``<stem>.int8.onnx`` (or ``.fp16.onnx``) and ``<stem>.int8.quantize.json`` into ``out_dir``
    (default: the model's folder); over budget, only the report (``outcome.passed`` False)."""
    source = ModelSource.of(source)
    src = source.path
    out = Path(out_dir) if out_dir is not None else src.parent
    model_name, rep_name = quantized_name(src, options.precision), report_name(src, options.precision)
    refuse_overwrite([out / model_name, out / rep_name], [src, data])
    with Steps(progress) as steps, tempfile.TemporaryDirectory(prefix="bnrt-quantize-") as tmp:
        work = Path(tmp)
        with steps.step("fold"):
            float_path, kept_bns, sha = folded_float_graph(source, work)
        with steps.step("float32 run"):
            reference = side(float_path, label="float32")
            dataset = make_inputs(InputSpec(data=data), reference.input_names, reference.input_shapes,
                                  reference.input_dtypes, str(src))
            dataset.inputs = [np.asarray(x).astype(d) for x, d in zip(dataset.inputs, reference.input_dtypes)]
            _classify(reference.runner([x[:reference.fixed_batch or 1] for x in dataset.inputs]), dataset.labels,
                      str(data), dataset.size)
        quant_path = work / model_name
        with steps.step(f"{options.precision} conversion"):
            if options.precision == "int8":
                details = to_int8(float_path, quant_path, reference.input_names, dataset.inputs, options, work)
            else:
                details = to_fp16(float_path, quant_path, dataset.inputs, options)
        with steps.step("verify"):
            outputs, agreement, accuracy, budget = _verify(reference, quant_path, dataset, options, steps)
            passed = budget["value"] <= budget["limit"] + 1e-12 and not any(o["problem"] for o in outputs)
            worst = [] if passed or options.precision != "int8" else _worst_layers(
                work / "pre.onnx", quant_path, dataset.inputs)
        report = {
            "schema": SCHEMA, "source": {"path": str(src), "sha256": sha}, "data": str(data),
            "samples": dataset.size, "precision": options.precision, options.precision: details,
            "batchnorm_kept": kept_bns, "outputs": outputs, "top1_agreement": agreement, "accuracy": accuracy,
            "budget": budget, "passed": passed, "worst_layers": worst,
            "ops": sorted({n.op_type for n in onnx.load(str(quant_path)).graph.node}),
            "timings_s": steps.timings, "output": str(out / model_name),
        }
        with staging(out) as stage:
            write_json(stage / rep_name, report)
            if passed:
                with atomic_path(stage / model_name) as tmp_model:
                    tmp_model.write_bytes(quant_path.read_bytes())
            written = publish(stage, [rep_name, model_name] if passed else [rep_name], out)
    return QuantizeOutcome(report, out / rep_name, written if passed else [])
