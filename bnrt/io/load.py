"""Load stage: a model file becomes an ``nn.Module`` in eval mode, float32.

Formats (``ModelSource.kind``):
- a dict checkpoint read with ``torch.load(weights_only=True)``: a state_dict under ``state_dict``
  (or ``model_state_dict`` / ``model``, or the entry ``state_dict_key`` names) or the dict itself,
  plus optional ``arch`` ("module:Class"), ``arch_kwargs`` and ``input_shape`` entries; a key prefix
  the saving framework added (Lightning's ``model.``, ``module.``, ``_orig_mod.``) is stripped when
  that makes the keys match (``bnrt.io.statedict``);
- a safetensors file: a state_dict, the architecture from ``arch``;
- a checkpoint written by ``bnrt fold`` (``bnrt_folded`` entry): the architecture is rebuilt, its
  folded BatchNorms replaced by ``nn.Identity``, then the weights are loaded;
- a pickled ``nn.Module``, or a dict holding one under ``ema`` (preferred) or ``model`` as
  Ultralytics' ``best.pt`` does, only with ``trust_pickle=True``: unpickling runs code from the file;
- TorchScript archives and ExportedPrograms (``load_program``): the program, run as it is.
A checkpoint's weights stored in float16, bfloat16 (exactly: every such value is a float32 one),
float64 or a mix are read into a float32 model and the precision read is recorded; a program not in
float32 is refused.

Code from a model's folder runs only with consent (``bnrt.io.arch``): an ``arch`` read from a
checkpoint is imported from the current or the checkpoint's folder only with ``trust_code``; those
folders are importable only while the consented module (or a trusted pickle) is imported.

Refuses: an ``arch`` read from a file that is not an ``nn.Module`` subclass (a factory function is
accepted from the command line only), state_dicts that do not match the architecture, an
optimizer's state, and files that are missing, truncated or not torch checkpoints, each with an
``InputError`` naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnrt.io.arch import build, importable, resolve_arch
from bnrt.io.artifacts import FOLDED_KEY
from bnrt.errors import InputError, OptionError, first_line
from bnrt.io.formats import program_shapes, read_exported, read_safetensors, read_torchscript
from bnrt.io.source import KIND_NAMES, PROGRAMS, Loaded, ModelSource, Shape, file_kind, file_sha256
from bnrt.io.statedict import load_state, pick_state, precision_of
from bnrt.folding.structure import apply_folded_structure


def load(source: ModelSource, *, needs_modules: str | None = None) -> Loaded:
    """The torch model ``source`` names, read with the source's options (``load_model``, or
    ``load_program`` for a TorchScript archive or an ExportedProgram). ``needs_modules``: the
    command that needs the model's own modules (recalibration, benchmarking), which refuses a
    program with that name."""
    if source.kind in PROGRAMS:
        if needs_modules:
            raise InputError(f"{source.path}: {KIND_NAMES[source.kind]}; {needs_modules} needs the model's modules: "
                             "pass a checkpoint (a state_dict with --arch, or a pickled module with --trust-pickle)")
        return load_program(source)
    return load_model(source.path, arch=source.arch, trust_pickle=source.trust_pickle, trust_code=source.trust_code,
                      state_dict_key=source.state_dict_key, strip_prefix=source.strip_prefix, kind=source.kind)


def load_program(source: ModelSource) -> Loaded:
    """A TorchScript archive (``torch.jit.load``) or an ExportedProgram (``torch.export.load``,
    run through its ``module()``): ``Loaded.program`` is what was read, ``Loaded.model`` runs it.
    An ExportedProgram's input shapes are its own example's (``input_shapes`` overrides them); a
    TorchScript archive records none. A program not in float32 is refused (its code
    may fix dtypes, so it is not converted)."""
    path = source.path
    if source.kind == "torchscript":
        program = model = read_torchscript(path)
        shapes = source.input_shapes
    else:
        program = read_exported(path, source.trust_pickle)
        example = program_shapes(program, str(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = program.module()
        known = all(d is not None for shape in example for d in shape)
        shapes = source.input_shapes or (list(example) if known else None)
    precision = precision_of([*model.parameters(), *model.buffers()])
    if precision != "float32":  # a program's code may fix its dtypes: it is not converted
        raise InputError(f"{path}: {KIND_NAMES[source.kind]} in {precision}; bnrt folds programs written in float32: "
                         "export it in float32 (Ultralytics: half=False), or pass the checkpoint")
    return Loaded(model, path, file_sha256(path), shapes, None, {},
                  "torchscript" if source.kind == "torchscript" else "exported-program",
                  precision=precision, program=program)


def parse_shapes(value: Any, where: str) -> list[Shape]:
    """``[1, 3, 8, 8]`` or ``[[1, 3, 8, 8], [1, 10]]`` (one shape per model input) as tuples."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        value = [value]
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(
            isinstance(s, (list, tuple)) and s and all(isinstance(d, int) and d > 0 for d in s)
            for s in value
        )
    ):
        raise InputError(f"{where}: input_shape must be positive integers like [1, 3, 224, 224], got {value!r}")
    return [tuple(int(d) for d in s) for s in value]


def load_folded(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a ``*.folded.pt`` written by ``bnrt fold`` into a fresh instance of the user's class.

    ``model`` must be built with the same arguments as the original; it is changed in place (folded
    BNs become ``nn.Identity``, biases are added), loaded with the folded weights, set to eval and
    returned. No unpickling of code is involved.
    """
    path = Path(path)
    ckpt = _torch_load(path, weights_only=True)
    if not isinstance(ckpt, dict) or FOLDED_KEY not in ckpt:
        raise InputError(f"{path}: not a checkpoint written by bnrt fold (no {FOLDED_KEY!r} entry)")
    apply_folded_structure(model, ckpt[FOLDED_KEY], str(path))
    load_state(model, ckpt["state_dict"], str(path))
    return model.eval()


def _torch_load(path: Path, *, weights_only: bool, code_from: list[Path] = ()) -> Any:
    """``torch.load`` with one-line errors naming ``path``; ``code_from``: folders importable while
    a trusted pickle is read (its classes may live beside it)."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a checkpoint file")
    kind = file_kind(path)
    if kind != "torch":
        raise InputError(f"{path}: {KIND_NAMES[kind]}, where a torch checkpoint is needed")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file, not a torch checkpoint")
    is_zip = is_pickle = False
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        is_zip, is_pickle = magic == b"PK\x03\x04", magic[:1] == b"\x80"
        with warnings.catch_warnings(), importable(list(code_from)):
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except PermissionError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
    except ImportError as exc:  # a trusted pickle whose classes are not importable here
        raise OptionError(f"{path}: the pickled model needs module {exc.name or first_line(exc)!r}, which is not "
                          "importable here; install it, or pass `trust_code` to import it from the current or the "
                          "model's folder") from exc
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL (\S+)", text)
        if weights_only and "Weights only load failed" in text and (found or is_pickle):
            detail = found.group(1) if found else _after(text, "WeightsUnpickler error:")
            raise InputError(
                f"{path}: holds pickled Python objects ({detail}); unpickling runs code from the "
                "file, so bnrt loads it only with --trust-pickle (use it only for files you trust), or save "
                "a state_dict checkpoint instead"
            ) from exc
        raise InputError(f"{path}: not a torch checkpoint ({first_line(exc)})") from exc
    except Exception as exc:  # torch.load surfaces many error types for corrupt archives
        what = "truncated or corrupt torch checkpoint" if is_zip or isinstance(exc, EOFError) else "not a torch checkpoint"
        if is_zip and _readable_zip(path):
            what = "a zip archive but not a torch checkpoint"
        raise InputError(f"{path}: {what} ({type(exc).__name__}: {first_line(exc)})") from exc


def _readable_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _after(text: str, marker: str) -> str:
    tail = text.split(marker, 1)[-1]
    return next((ln.strip() for ln in tail.splitlines() if ln.strip()), "unsupported content")[:200]


def _pickled_model(ckpt: Any) -> tuple[nn.Module | None, str | None]:
    """The pickled ``nn.Module`` a file holds, and a note on where it was found: the file itself,
    a dict's ``ema`` (Ultralytics' averaged weights, what it exports) or ``model``; Ultralytics'
    ``YOLO`` wrapper is unwrapped to the network it holds."""
    module, note = (ckpt, None) if isinstance(ckpt, nn.Module) else (None, None)
    if isinstance(ckpt, dict):
        key = next((k for k in ("ema", "model") if isinstance(ckpt.get(k), nn.Module)), None)
        if key is not None:
            module = ckpt[key]
            note = f"took the model under {key!r}" + (" (the EMA weights, what Ultralytics exports)" if key == "ema" else "")
    wrapper = module is not None and any(c.__module__ == "ultralytics.engine.model" and c.__name__ == "Model"
                                         for c in type(module).__mro__)
    if wrapper and isinstance(getattr(module, "model", None), nn.Module):
        module, note = module.model, f"took the network from the {type(module).__name__} wrapper"
    return module, note


def _float32(model: nn.Module, precision: str, notes: list[str]) -> None:
    """A model stored in any floating precision but float32 (float16, bfloat16, float64, mixed) as
    float32, with a note saying so (exact for float16 and bfloat16)."""
    if precision != "float32":
        model.float()
        for module in model.modules():  # tensors kept as plain attributes (Ultralytics' anchor cache)
            for name, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
                    setattr(module, name, value.float())
        notes.append(f"read {precision} weights: folded in float64, written as float32"
                     + (" (bnrt quantize --precision fp16 ships float16)" if "float64" not in precision else ""))


def _ultralytics_shapes(ckpt: dict, model: nn.Module) -> list[Shape] | None:
    """The input shape Ultralytics trained at (``train_args['imgsz']``, the model's ``ch``)."""
    args = ckpt.get("train_args")
    size = args.get("imgsz") if isinstance(args, dict) else None
    channels = getattr(model, "yaml", {}).get("ch", 3) if isinstance(getattr(model, "yaml", None), dict) else 3
    if isinstance(size, int) and size > 0 and isinstance(channels, int):
        return [(1, channels, size, size)]
    return None


def _from_pickle(ckpt: Any, path: Path, sha: str) -> Loaded | None:
    model, note = _pickled_model(ckpt)
    if model is None:
        return None
    where = str(path)
    shapes = parse_shapes(ckpt["input_shape"], where) if isinstance(ckpt, dict) and "input_shape" in ckpt else None
    if shapes is None and isinstance(ckpt, dict):
        shapes = _ultralytics_shapes(ckpt, model)
    precision = precision_of([*model.parameters(), *model.buffers()])
    notes = [note] if note else []
    _float32(model, precision, notes)
    return Loaded(model.eval(), path, sha, shapes, _class_path(model), {}, "pickle", precision=precision, notes=notes)


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    state_dict_key: str | None = None,
    strip_prefix: str | None = None,
    kind: str = "torch",
) -> Loaded:
    """Read ``path`` into a ``Loaded`` (model in eval mode, float32). ``arch`` ("module:NAME", a
    class or a factory) overrides the checkpoint's own ``arch`` entry; ``arch_kwargs`` overrides
    its kwargs. ``trust_code`` allows importing the checkpoint's own ``arch`` from the current
    directory or the checkpoint's folder (see ``resolve_arch``). ``state_dict_key`` and
    ``strip_prefix``: ``bnrt.io.statedict``. ``kind``: ``torch`` or ``safetensors``."""
    path = Path(path)
    where = str(path)
    if kind == "safetensors":
        if arch is None:
            raise OptionError(f"{where}: a safetensors file holds weights only; pass `arch` MODULE:NAME, the class or "
                              "factory that builds the model they belong to")
        ckpt: Any = read_safetensors(path)
    else:
        code_from = [Path.cwd().resolve(), path.resolve().parent] if trust_pickle and trust_code else []
        ckpt = _torch_load(path, weights_only=not trust_pickle, code_from=code_from)
    sha = file_sha256(path)
    pickled = _from_pickle(ckpt, path, sha)
    if pickled is not None:
        return pickled
    if not isinstance(ckpt, dict):
        raise InputError(f"{where}: expected a dict checkpoint or an nn.Module, found {type(ckpt).__name__}")

    state = pick_state(ckpt, state_dict_key, where)
    own = state is not ckpt  # the dict holds the state_dict beside its own entries
    file_arch = ckpt.get("arch") if own else None
    kwargs = ckpt.get("arch_kwargs") or {} if own else {}
    if arch_kwargs is not None:
        kwargs = arch_kwargs
    shapes = parse_shapes(ckpt["input_shape"], where) if own and "input_shape" in ckpt else None

    if arch is not None:
        factory = arch if callable(arch) else resolve_arch(arch)
        arch_name = arch if isinstance(arch, str) else _callable_path(arch)
    elif isinstance(file_arch, str):
        factory = resolve_arch(file_arch, from_file=where, trust_code=trust_code)
        arch_name = file_arch
    else:
        raise OptionError(f"{where}: the checkpoint names no architecture; pass `arch` MODULE:NAME")
    model = build(factory, kwargs, where)
    folded = ckpt.get(FOLDED_KEY) if own else None
    if folded:
        apply_folded_structure(model, folded, where)
    matched = load_state(model, state, where, strip_prefix)
    precision = precision_of(matched.state.values())
    notes = [matched.note] if matched.note else []
    _float32(model, precision, notes)
    source_format = "folded" if folded else "safetensors" if kind == "safetensors" else "state_dict"
    return Loaded(model.eval(), path, sha, shapes, arch_name, dict(kwargs), source_format, folded or None,
                  precision=precision, notes=notes)


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


def _callable_path(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
