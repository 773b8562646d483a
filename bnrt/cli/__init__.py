"""Command line: parses flags (``parser``, ``groups``), calls the library (``commands``), prints.
Exit codes: 0 ok, 1 check failed, 2 bad input or usage (one line on stderr; ``--debug`` shows the
traceback), 130/143 interrupted/terminated. The package imports everything below it; nothing
imports it."""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from typing import Sequence

from bnrt.cli.commands import COMMANDS
from bnrt.cli.parser import build_parser
from bnrt.errors import (BnrtError, OptionError, Terminated, first_line, forget_stops, interruption,
                         raise_if_stopped, stopped)
from bnrt.session import show_ort_logs


def _terminate(signum, frame) -> None:
    raise stopped(Terminated())


def _interrupt(signum, frame) -> None:
    raise stopped(KeyboardInterrupt())


def _interrupted(exc: KeyboardInterrupt) -> int:
    terminated = isinstance(exc, Terminated)
    print(f"bnrt: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    return 143 if terminated else 130


def _failed(exc: Exception, args) -> int:
    """One line on stderr for an error that reached the command line, and its exit code."""
    stop = interruption(exc)  # Ctrl-C or SIGTERM that a library wrapped in its own error
    if stop is not None:
        return _interrupted(stop)
    if args.debug:
        traceback.print_exc()
    if isinstance(exc, BnrtError):
        print(f"bnrt: error: {exc.as_flag() if isinstance(exc, OptionError) else exc}", file=sys.stderr)
        return exc.exit_code
    subject = getattr(args, "model", None) or getattr(args, "candidate", "")
    print(f"bnrt: error: {subject}: {type(exc).__name__}: {first_line(exc)} (--debug shows the traceback)",
          file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_ort_logs(args.debug)
    # SIGTERM unwinds like Ctrl-C, so temp files go; the server shuts down gracefully by itself.
    # Both are recorded: one a library swallowed still stops the command before it publishes.
    own = args.command != "serve" and threading.current_thread() is threading.main_thread()
    forget_stops()
    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, _terminate), (signal.SIGINT, _interrupt))} if own else {}
    try:
        code = COMMANDS[args.command](args)
        raise_if_stopped()
        return code
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except Exception as exc:  # a model's own code can raise anything; never show a bare traceback
        return _failed(exc, args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
