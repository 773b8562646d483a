"""The architecture a checkpoint names, imported with the user's consent: ``resolve_arch`` turns
"package.module:Name" into a class (or, named on the command line, a factory), ``build`` calls it.

Code from a model's folder runs only with consent: an ``arch`` read from a file whose module would
be imported from the current directory or the checkpoint's folder (not from an installed package)
is imported only with ``trust_code``; an ``arch`` the caller names is consent. Those folders are
importable only while that module is imported (``importable``), never for the rest of the run. An
``arch`` read from a file may not name a ``__main__``, private or standard-library module.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from bnrt.errors import InputError, OptionError, first_line


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
