"""Load stage: a checkpoint file becomes an ``nn.Module`` in eval mode.

Formats:
- a dict checkpoint read with ``torch.load(weights_only=True)``: a state_dict under ``state_dict``
  (or ``model_state_dict`` / ``model``) or the dict itself, plus optional ``arch`` ("module:Class"),
  ``arch_kwargs`` and ``input_shape`` entries;
- a checkpoint written by ``bnrt fold`` (``bnrt_folded`` entry): the architecture is rebuilt, its
  folded BatchNorms replaced by ``nn.Identity``, then the weights are loaded;
- a pickled ``nn.Module``, only with ``trust_pickle=True``: unpickling runs code from the file.

Code from a model's folder runs only with consent: an ``arch`` read from a checkpoint whose module
would be imported from a file in the current directory or in the checkpoint's folder (not from an
installed package) is imported only with ``trust_code=True``; an ``arch`` the caller names is consent.
Those folders are importable only while the consented module (or trusted pickle) is imported, never
for the rest of the run. An ``arch`` read from a file may not name a ``__main__``, private or
standard-library module (refused before any import).

Refuses: an ``arch`` read from a file that is not an ``nn.Module`` subclass (a factory function is
accepted from the command line only), state_dicts that do not match the architecture, and files
that are missing, truncated or not torch checkpoints, each with an ``InputError`` naming the file.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import pickle
import re
import sys
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from bnrt.io.artifacts import FOLDED_KEY
from bnrt.errors import InputError, OptionError, first_line
from bnrt.io.source import Loaded, ModelSource, Shape, file_kind, file_sha256
from bnrt.folding.structure import apply_folded_structure

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def load(source: ModelSource) -> Loaded:
    """The torch model ``source`` names, as ``load_model`` reads it with the source's options."""
    return load_model(source.path, arch=source.arch, trust_pickle=source.trust_pickle, trust_code=source.trust_code)


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


def local_source(module_name: str, folders: list[Path]) -> Path | None:
    """The file (or package folder) that importing ``module_name`` would run, when it lies in one of
    ``folders`` and not in an installed environment; ``None`` otherwise. Finds without importing:
    only the top-level name is looked up (a package's submodules live where the package does), on
    ``sys.path`` and then in ``folders``."""
    top = module_name.split(".")[0]
    loaded = sys.modules.get(top)
    try:
        spec = loaded.__spec__ if loaded is not None else importlib.util.find_spec(top)
        if spec is None:
            spec = importlib.machinery.PathFinder.find_spec(top, [str(f) for f in folders])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    places = [spec.origin] if spec.origin and spec.has_location else []
    places += list(spec.submodule_search_locations or [])
    installed = {Path(p).resolve() for p in (sys.prefix, sys.exec_prefix, sys.base_prefix)}
    for place in places:
        path = Path(place).resolve()
        if any(path.is_relative_to(i) for i in installed) or {"site-packages", "dist-packages"} & set(path.parts):
            continue
        if any(path.is_relative_to(f) for f in folders):
            return path
    return None


@contextmanager
def importable(folders: list[Path]) -> Iterator[None]:
    """Within the block, ``folders`` are importable (after the installed packages, which keep
    precedence); afterwards they are gone from ``sys.path`` again: code from a model's folder runs
    only while the architecture the user consented to is imported."""
    added = [str(f) for f in dict.fromkeys(folders) if str(f) not in sys.path]
    sys.path.extend(added)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for entry in added:
            if entry in sys.path:
                sys.path.remove(entry)


def _refuse_file_arch(module_name: str, attr: str, where: str) -> None:
    """An ``arch`` read from a file names a class in an installed package, nothing else: importing
    a ``__main__`` module runs a program, a standard-library module is no architecture, and a
    private name is no published class. Checked before anything is imported."""
    parts = module_name.split(".")
    if not all(p.isidentifier() for p in parts) or not all(p.isidentifier() for p in attr.split(".")):
        raise OptionError(f"{where}: not a MODULE:NAME of Python identifiers; name the architecture with `arch`")
    if any(p == "__main__" or p.startswith("_") for p in [*parts, *attr.split(".")]):
        raise OptionError(f"{where}: names a __main__ or private module or attribute, which bnrt does not import "
                          "from a file's arch; name the architecture with `arch` if you trust it")
    if parts[0] in sys.stdlib_module_names:
        raise OptionError(f"{where}: names the standard library module {parts[0]!r}, not an architecture; name the "
                          "architecture with `arch`")


def _import(module_name: str, where: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # an import can fail in any way the imported code chooses, exiting included
        raise OptionError(f"{where}: cannot import {module_name!r} ({type(exc).__name__}: {first_line(exc)})") from exc


def resolve_arch(spec: str, *, from_file: str | None = None, trust_code: bool = False) -> Callable[..., nn.Module]:
    """Import ``"package.module:Name"`` and return the class (or, from the command line, a factory).

    Named by the caller (``from_file`` None), the current directory is importable while the module
    is imported, as with ``python -m``. ``from_file`` names the checkpoint the string came from:
    such a string must name an ``nn.Module`` subclass of an installed, non-standard-library module
    (no ``__main__`` or private names, refused before importing), and a module found in the current
    directory or the checkpoint's folder is imported only with ``trust_code``, those folders
    importable only during that import.
    """
    where = f"{from_file}: arch {spec!r}" if from_file else f"`arch` {spec!r}"
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise OptionError(f"{where}: expected MODULE:NAME, e.g. models.digits:DigitsNet")
    folders = [Path.cwd().resolve()]
    if from_file:
        _refuse_file_arch(module_name, attr, where)
        folders.append(Path(from_file).resolve().parent)
        local = local_source(module_name, folders)
        if local is not None and not trust_code:
            raise OptionError(
                f"{where}: importing {module_name!r} would run {local}, code from the current or the "
                "model's folder; pass `trust_code` to run it, or name the architecture with `arch`"
            )
        if not trust_code:
            folders = []
    with importable(folders):
        obj: Any = _import(module_name, where)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OptionError(f"{where}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    is_module_class = isinstance(obj, type) and issubclass(obj, nn.Module)
    if from_file and not is_module_class:
        raise OptionError(
            f"{where} is not an nn.Module subclass; refusing to call it "
            "(a factory function is accepted only when passed as `arch`)"
        )
    if not is_module_class and not callable(obj):
        raise OptionError(f"{where} is neither an nn.Module subclass nor callable")
    return obj


def build(arch: Callable[..., nn.Module], kwargs: dict[str, Any], where: str) -> nn.Module:
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise InputError(f"{where}: arch_kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}")
    try:
        model = arch(**kwargs)
    except Exception as exc:  # torch's C++ errors span many lines: the first one says it
        raise InputError(f"{where}: building the architecture failed ({type(exc).__name__}: {first_line(exc)})") from exc
    if not isinstance(model, nn.Module):
        raise InputError(f"{where}: the architecture returned {type(model).__name__}, not an nn.Module")
    return model


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
    _load_state(model, ckpt["state_dict"], str(path))
    return model.eval()


def _torch_load(path: Path, *, weights_only: bool, code_from: list[Path] = ()) -> Any:
    """``torch.load`` with one-line errors naming ``path``; ``code_from``: folders importable while
    a trusted pickle is read (its classes may live beside it)."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a checkpoint file")
    if file_kind(path) == "onnx":
        raise InputError(f"{path}: an ONNX file, where a PyTorch checkpoint is needed")
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


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the architecture"
              for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if shapes:
        raise InputError(f"{where}: state_dict does not match the architecture: shape of {_few(shapes)}")
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {_few(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {_few(result.unexpected_keys)}")
    if problems:
        raise InputError(f"{where}: state_dict does not match the architecture: {'; '.join(problems)}")


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
) -> Loaded:
    """Read ``path`` into a ``Loaded`` (model in eval mode). ``arch`` ("module:NAME", a class or a
    factory) overrides the checkpoint's own ``arch`` entry; ``arch_kwargs`` overrides its kwargs.
    ``trust_code`` allows importing the checkpoint's own ``arch`` from the current directory or the
    checkpoint's folder (see ``resolve_arch``)."""
    path = Path(path)
    code_from = [Path.cwd().resolve(), path.resolve().parent] if trust_pickle and trust_code else []
    ckpt = _torch_load(path, weights_only=not trust_pickle, code_from=code_from)
    sha = file_sha256(path)
    where = str(path)

    if isinstance(ckpt, nn.Module):
        return Loaded(ckpt.eval(), path, sha, None, _class_path(ckpt), {}, "pickle")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), nn.Module):
        shapes = parse_shapes(ckpt["input_shape"], where) if "input_shape" in ckpt else None
        return Loaded(ckpt["model"].eval(), path, sha, shapes, _class_path(ckpt["model"]), {}, "pickle")
    if not isinstance(ckpt, dict):
        raise InputError(f"{where}: expected a dict checkpoint or an nn.Module, found {type(ckpt).__name__}")

    state = next((ckpt[k] for k in _STATE_DICT_KEYS if _is_state_dict(ckpt.get(k))), None)
    if state is None:
        if not _is_state_dict(ckpt):
            raise InputError(
                f"{where}: no state_dict found (looked for {', '.join(_STATE_DICT_KEYS)} or a dict of tensors)"
            )
        state = ckpt
    file_arch = ckpt.get("arch") if state is not ckpt else None
    kwargs = ckpt.get("arch_kwargs") or {} if state is not ckpt else {}
    if arch_kwargs is not None:
        kwargs = arch_kwargs
    shapes = parse_shapes(ckpt["input_shape"], where) if state is not ckpt and "input_shape" in ckpt else None

    if arch is not None:
        factory = arch if callable(arch) else resolve_arch(arch)
        arch_name = arch if isinstance(arch, str) else _callable_path(arch)
    elif isinstance(file_arch, str):
        factory = resolve_arch(file_arch, from_file=where, trust_code=trust_code)
        arch_name = file_arch
    else:
        raise OptionError(f"{where}: the checkpoint names no architecture; pass `arch` MODULE:NAME")
    model = build(factory, kwargs, where)
    kwargs = dict(kwargs)
    folded = ckpt.get(FOLDED_KEY) if state is not ckpt else None
    if folded:
        apply_folded_structure(model, folded, where)
    _load_state(model, state, where)
    return Loaded(model.eval(), path, sha, shapes, arch_name, kwargs, "folded" if folded else "state_dict",
                  folded or None)


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


def _callable_path(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
