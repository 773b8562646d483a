"""Steps of a long job: each step is timed (for the report) and, when shown, listed on stderr with
a spinner and its elapsed time while it runs (rich). Shown only where the caller asks, which the
CLI does when stderr is a terminal and ``--quiet`` is not given: logs and pipes stay clean."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import IO, Callable, Iterator


class Steps:
    """``with steps.step("export"): …`` times the block under that name; ``steps.note(text)``
    says what the running step is doing now. ``timings`` maps step names to seconds, ``peaks`` to
    the process's peak resident memory so far when the step ended (a step that raised it shows)."""

    def __init__(self, show: bool = False, file: IO[str] | None = None):
        self.timings: dict[str, float] = {}
        self.peaks: dict[str, float] = {}  # the process's peak resident memory (MB) when each step ended
        self._progress = None
        self._task = None
        self._name = ""
        if show:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            console = Console(file=file, stderr=file is None, force_terminal=file is not None or None)
            self._progress = Progress(SpinnerColumn(finished_text="done"), TextColumn("{task.description}"),
                                      TimeElapsedColumn(), console=console)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if self._progress is not None:
            if not self._progress.live.is_started:
                self._progress.start()
            self._task, self._name = self._progress.add_task(name, total=1), name
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 4)
            peak = peak_rss_mb()
            if peak is not None:
                self.peaks[name] = peak
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, description=name, completed=1)
                self._task = None

    def note(self, text: str) -> None:
        """What the running step does now (shown after its name)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self._name}: {text}")

    def close(self) -> None:
        if self._progress is not None and self._progress.live.is_started:
            self._progress.stop()

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far, in MiB (Linux counts kB, macOS bytes); None where
    there is no ``resource`` module (Windows)."""
    import sys

    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)


def rate(note: Callable[[str], None], label: str) -> Callable[[int, int], None]:
    """A ``run_batched`` progress callback saying samples done, samples/s and the time left."""
    start = time.perf_counter()

    def update(done: int, total: int) -> None:
        speed = done / max(time.perf_counter() - start, 1e-9)
        note(f"{label}: {done}/{total} samples, {speed:.0f}/s, {(total - done) / speed:.0f} s left")

    return update
