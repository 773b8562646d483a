"""Errors a user can cause. The CLI prints each as one line and exits with its ``exit_code``."""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from typing import Iterator


EXIT_NO_ONNX = 3  # bnrt fold: folded and checked, the folded checkpoint written, but no ONNX file (the reason printed)


class BnrtError(Exception):
    """Base of bnrt's user-facing errors; the message names the file, layer or field at fault."""

    exit_code = 2


class InputError(BnrtError):
    """A file, flag or model that bnrt cannot use (exit code 2)."""

    def about(self, where: str) -> "InputError":
        """The same error, its message starting with ``where`` (the file at fault)."""
        new = copy.copy(self)
        new.args = (f"{where}: {self}",)
        return new


class OptionError(InputError):
    """A bad value of an option of a library call. The message writes option names in backticks
    (``"`provider` 'x': choose one of cpu, cuda"``): the library's message shows the parameter
    name (``provider``), the CLI's the flag (``--provider``), so library errors never name flags."""

    _OPTION = re.compile(r"`(\w+)`")

    def __init__(self, template: str):
        self.template = template
        super().__init__(self._OPTION.sub(r"\1", template))

    def about(self, where: str) -> "OptionError":
        new = super().about(where)
        new.template = f"{where}: {self.template}"
        return new

    def as_flag(self) -> str:
        """The message with each option written as its command-line flag."""
        return self._OPTION.sub(lambda m: "--" + m.group(1).replace("_", "-"), self.template)


class CaptureError(InputError):
    """No graph could be captured from the model; the message carries the tracer's reason."""


class ExportError(InputError):
    """No exporter could write an ONNX graph of the (folded) model; the message says why each failed."""


class HealthError(InputError):
    """BatchNorm statistics that would produce a broken model; ``code`` says which
    (``nonfinite-statistics``, ``shape-mismatch``, ``negative-variance``, ``zero-variance``: see
    ``bnrt.folding.engine.health``; the default only serves ``copy``, which rebuilds it from its message)."""

    def __init__(self, message: str, code: str = "nonfinite-statistics"):
        super().__init__(message)
        self.code = code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's ``KeyboardInterrupt``: every cleanup on
    the way (temp files, staging folders, created output folders) runs before the process exits."""


_STOPS: list[KeyboardInterrupt] = []  # every Ctrl-C / SIGTERM the command line received


def stopped(exc: KeyboardInterrupt) -> KeyboardInterrupt:
    """``exc``, recorded: a library that swallows it (an exporter trying its next strategy) does
    not make the process forget it (``raise_if_stopped``)."""
    _STOPS.append(exc)
    return exc


def forget_stops() -> None:
    _STOPS.clear()


def raise_if_stopped() -> None:
    """Raise again an interrupt received earlier, where nothing may go on after one (before
    outputs are published, before a command reports success)."""
    if _STOPS:
        raise type(_STOPS[-1])()


def interruption(exc: BaseException) -> KeyboardInterrupt | None:
    """The ``KeyboardInterrupt`` (or ``Terminated``) behind ``exc``: libraries that wrap what they
    catch (an exporter reporting "export failed") must not turn Ctrl-C into an error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), for
    one-line error reports."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


@contextmanager
def about(path: object) -> Iterator[None]:
    """Within the block, an ``InputError`` whose message does not name ``path`` is re-raised with
    ``path`` in front: errors about a model (its statistics, the shapes it runs on) name its file."""
    try:
        yield
    except InputError as exc:
        if str(path) in str(exc):
            raise
        raise exc.about(str(path)) from exc
