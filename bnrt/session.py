"""The session layer: the only place bnrt makes an ``onnxruntime.InferenceSession`` (checks,
probes of intermediate values, ``bnrt run``, ``bnrt serve``, benchmarks). Imports nothing of bnrt
but its errors.

Providers are asked for by short name (``cpu``, ``cuda``). A provider that is not available, or a
session that silently fell back to another provider, is an error: bnrt never runs on the CPU when
CUDA was asked for. Inputs are validated against the model (name, dtype, shape) with errors that
name the input, what it expects and what it got. On CUDA, runs go through IO binding. ``probe``
reads a graph's intermediate values the same way (provider check, TF32 rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from bnrt.errors import InputError, OptionError, first_line

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


_LOG = {"severity": 4}  # ORT's own (coloured) log lines: fatal only, its errors reach the user as one line


def show_ort_logs(on: bool) -> None:
    """ORT's warning and error log lines on stderr (``--debug``), or only fatal ones (the default)."""
    _LOG["severity"] = 2 if on else 4
    ort.set_default_logger_severity(_LOG["severity"])


def check_tf32(provider: str, tf32: bool | None) -> None:
    """TF32 is a choice of the CUDA provider only."""
    if tf32 is not None and provider != "cuda":
        raise OptionError(f"`tf32` applies to the cuda provider only (provider is {provider})")


def resolve_provider(short: str) -> str:
    """ORT's provider name for ``short``; ``InputError`` if unknown or not available here."""
    if short not in PROVIDERS:
        raise OptionError(f"`provider` {short!r}: choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[short]
    if name not in ort.get_available_providers():
        raise OptionError(f"`provider` {short}: {name} is not available in this onnxruntime build (available: "
                          f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a CUDA machine")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, numpy dtype and shape (None for a symbolic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        dims = ", ".join("N" if d is None else str(d) for d in self.shape)
        return f"{self.dtype.name} ({dims})"


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in (arg.shape or []))
    return TensorSpec(arg.name, np.dtype(NUMPY_TYPES.get(arg.type, np.float32)), shape)


class Session:
    """An ORT session on exactly the requested provider.

    ``path``: an ONNX file. ``provider``: ``cpu`` or ``cuda``. ``threads``: intra-op threads and
    ``inter_threads``: inter-op threads (0 = ORT's default). ``optimization``: graph optimisation
    level (disable, basic, extended, all). ``spinning``: let idle ORT threads spin (lowest latency
    for back-to-back runs; a server turns it off). ``tf32``: the CUDA provider's ``use_tf32`` option
    (None: ORT's default, on); an ``OptionError`` with the CPU provider. ``model_bytes``: the model
    itself (``path`` then only names it). ``arena``: ORT's CPU memory arena (off: a run's activations
    are freed after it, for a caller holding several sessions at once). Raises ``InputError`` when the file cannot be loaded or
    the provider is unavailable or was not taken by the session.
    """

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int = 0, inter_threads: int = 0,
                 optimization: str = "all", spinning: bool = True, model_bytes: bytes | None = None,
                 tf32: bool | None = None, arena: bool = True) -> None:
        self.path = Path(path)
        self.provider = provider
        check_tf32(provider, tf32)
        self.tf32 = (True if tf32 is None else tf32) if provider == "cuda" else None
        wanted = resolve_provider(provider)
        if optimization not in OPTIMIZATION:
            raise InputError(f"optimization {optimization!r}: choose one of {', '.join(OPTIMIZATION)}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = inter_threads
        options.graph_optimization_level = OPTIMIZATION[optimization]
        options.log_severity_level = _LOG["severity"]
        options.enable_cpu_mem_arena = arena  # off: activations freed after each run (several sessions alive)
        if not spinning:  # idle ORT worker threads sleep instead of spinning: a server's CPU goes to requests
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        chain = [wanted] if wanted == PROVIDERS["cpu"] else [(wanted, {"use_tf32": str(int(self.tf32))}),
                                                             PROVIDERS["cpu"]]
        try:
            self.session = ort.InferenceSession(str(self.path) if model_bytes is None else model_bytes, options,
                                                providers=chain)
        except Exception as exc:
            raise InputError(f"{self.path}: onnxruntime cannot load it ({first_line(exc)})") from exc
        if self.session.get_providers()[0] != wanted:
            raise InputError(
                f"{self.path}: onnxruntime fell back to {self.session.get_providers()[0]} instead of {wanted}"
            )
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]
        self.input_names = [i.name for i in self.inputs]
        self.output_names = [o.name for o in self.outputs]

    def validate(self, feeds: dict[str, np.ndarray]) -> None:
        """``InputError`` naming the input when ``feeds`` lacks one, has an unknown one, or one has
        the wrong dtype or shape."""
        unknown = sorted(set(feeds) - set(self.input_names))
        if unknown:
            raise InputError(f"unknown input {unknown[0]!r}; the model's inputs are {', '.join(self.input_names)}")
        for spec in self.inputs:
            if spec.name not in feeds:
                raise InputError(f"missing input {spec.name!r}: expects {spec.describe()}")
            array = feeds[spec.name]
            if array.dtype != spec.dtype:
                raise InputError(f"input {spec.name!r} expects {spec.describe()}, got {array.dtype.name} {tuple(array.shape)}")
            if array.ndim != len(spec.shape) or any(d is not None and d != a for d, a in zip(spec.shape, array.shape)):
                raise InputError(f"input {spec.name!r} expects {spec.describe()}, got {array.dtype.name} {tuple(array.shape)}")

    def run_dict(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validated run: output name -> array."""
        self.validate(feeds)
        if self.provider == "cuda":
            return dict(zip(self.output_names, self._run_bound(feeds)))
        return dict(zip(self.output_names, self.session.run(None, feeds)))

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """IO binding: inputs copied to the device once, outputs allocated there and copied back."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0))
        for name in self.output_names:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs for positional ``inputs`` (in the order of the model's inputs)."""
        if len(inputs) != len(self.input_names):
            raise InputError(f"{self.path}: expects {len(self.input_names)} input(s) "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        feeds = dict(zip(self.input_names, inputs))
        if self.provider == "cuda":
            return self._run_bound(feeds)
        return self.session.run(None, feeds)


def probe(model: onnx.ModelProto | bytes, values: Iterable[str], inputs: Sequence[np.ndarray] | dict[str, np.ndarray],
          *, provider: str = "cpu", tf32: bool | None = None, outputs: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The values named ``values`` (and the graph outputs) of ``model`` on ``inputs`` (positional,
    in the model's input order, or by name): the graph with them added as outputs, run without
    graph optimisation (the values are the graph's own, not those of a fused rewrite) on
    ``provider``, TF32 off on CUDA unless ``tf32`` (exact float32). ``model`` is a ModelProto or
    its serialized bytes (a file's contents; ``outputs`` then names its graph outputs): the outputs
    are appended to the serialized model as a second message, which protobuf merges into the
    first, so the weights are never copied as a message. ``InputError`` when ORT cannot load it;
    ORT's own error when it cannot run it."""
    present = {o.name for o in model.graph.output} if isinstance(model, onnx.ModelProto) else set(outputs)
    extra = onnx.ModelProto()
    for name in dict.fromkeys(values):
        if name and name not in present:
            extra.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    data = (model.SerializeToString() if isinstance(model, onnx.ModelProto) else model) + extra.SerializeToString()
    session = Session("(graph probe)", provider, optimization="disable", model_bytes=data,
                      tf32=bool(tf32) if provider == "cuda" else None)
    del data
    feeds = inputs if isinstance(inputs, dict) else dict(zip(session.input_names, inputs))
    return dict(zip(session.output_names, session.session.run(None, feeds)))
