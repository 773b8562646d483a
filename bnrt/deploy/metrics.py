"""`bnrt serve`'s Prometheus metrics (``GET /metrics``), under Triton's names, help texts and labels
(``model``, ``version``), so dashboards and autoscaling rules written for Triton read them unchanged.

Written in the text exposition format here: the Prometheus client library names a counter
``<name>_total``, which Triton's counters do not carry. Counters are cumulative integers (durations
in microseconds) per model version; ``nv_inference_pending_request_count`` is a gauge.

The same counts feed Triton's statistics extension (``GET …/stats``, gRPC ``ModelStatistics``):
requests and nanoseconds by outcome and phase, each request of a run counted with the run's
compute time (as Triton counts it; a request run in parts once, with every part's time), and runs
by batch size (samples per run). Input and output copies are not timed apart: their phases stay 0.
"""

from __future__ import annotations

import time
from typing import Callable

# name -> (type, Triton's help text)
METRICS = {
    "nv_inference_request_success": ("counter", "Number of successful inference requests, all batch sizes"),
    "nv_inference_request_failure": ("counter", "Number of failed inference requests, all batch sizes"),
    "nv_inference_count": ("counter", "Number of inferences performed (does not include cached requests)"),
    "nv_inference_exec_count": ("counter", "Number of model executions performed (does not include cached requests)"),
    "nv_inference_request_duration_us": (
        "counter", "Cumulative inference request duration in microseconds (includes cached requests)"),
    "nv_inference_queue_duration_us": (
        "counter", "Cumulative inference queuing duration in microseconds (includes cached requests)"),
    "nv_inference_compute_infer_duration_us": (
        "counter", "Cumulative compute inference duration in microseconds (does not include cached requests)"),
    "nv_inference_pending_request_count": (
        "gauge", "Instantaneous number of pending requests awaiting execution per-model."),
}


# Triton's statistics extension (``ModelStatistics``): durations per outcome and per request, in ns
STATISTICS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class Metrics:
    """The counters of every served model version (``keys``: (name, version)); ``pending(key)``
    reads the gauge when the metrics are written. Beside them, Triton's statistics per version
    (``statistics``): each outcome's and each phase's request count and time, executions by batch size."""

    def __init__(self, keys: list[tuple[str, str]], pending: Callable[[tuple[str, str]], int]):
        self.keys, self.pending = [], pending
        self.values = {name: {} for name, (kind, _) in METRICS.items() if kind == "counter"}
        self.stats: dict[tuple[str, str], dict] = {}
        for key in keys:
            self.track(key)

    def track(self, key: tuple[str, str]) -> None:
        """Count ``key`` (a model version loaded later) from zero; its counts so far are kept."""
        if key not in self.keys:
            self.keys.append(key)
            for values in self.values.values():
                values.setdefault(key, 0)
            self.stats[key] = {"last": 0, "phases": {k: [0, 0] for k in STATISTICS}, "batches": {}}

    def request(self, key: tuple[str, str], success: bool, seconds: float) -> None:
        """A request answered (``success``) or refused, after ``seconds``."""
        self.add("nv_inference_request_success" if success else "nv_inference_request_failure", key)
        self.seconds("nv_inference_request_duration_us", key, seconds)
        self._phase(key, "success" if success else "fail", 1, seconds)

    def execution(self, key: tuple[str, str], sizes: list[int], waited: list[float], seconds: float,
                  first: list[bool]) -> None:
        """One ORT run of requests (or parts of requests: ``first`` marks a request's first part, so
        that a request in parts counts once) of ``sizes`` samples that waited ``waited`` s queued."""
        for wait, counted in zip(waited, first):
            self.seconds("nv_inference_queue_duration_us", key, wait)
            self._phase(key, "queue", int(counted), wait)
        self.seconds("nv_inference_compute_infer_duration_us", key, seconds)
        self.add("nv_inference_count", key, sum(sizes))
        self.add("nv_inference_exec_count", key)
        self._phase(key, "compute_infer", sum(first), seconds * len(sizes))  # each request's compute time
        batch = self.stats[key]["batches"].setdefault(sum(sizes), [0, 0])
        batch[0], batch[1] = batch[0] + 1, batch[1] + round(seconds * 1e9)
        self.stats[key]["last"] = int(time.time() * 1000)

    def _phase(self, key: tuple[str, str], phase: str, count: int, seconds: float) -> None:
        self.track(key)
        entry = self.stats[key]["phases"][phase]
        entry[0], entry[1] = entry[0] + count, entry[1] + round(seconds * 1e9)

    def statistics(self, key: tuple[str, str]) -> dict:
        """Triton's ``ModelStatistics`` of ``key`` as JSON (the statistics extension's shape)."""
        stats = self.stats[key]

        def duration(count=0, ns=0):
            return {"count": count, "ns": ns}
        return {"name": key[0], "version": key[1], "last_inference": stats["last"],
                "inference_count": self.values["nv_inference_count"][key],
                "execution_count": self.values["nv_inference_exec_count"][key],
                "inference_stats": {k: duration(*v) for k, v in stats["phases"].items()},
                "batch_stats": [{"batch_size": size, "compute_input": duration(), "compute_infer": duration(*v),
                                 "compute_output": duration()} for size, v in sorted(stats["batches"].items())]}

    def add(self, name: str, key: tuple[str, str], amount: float = 1) -> None:
        self.track(key)
        self.values[name][key] += int(round(amount))

    def seconds(self, name: str, key: tuple[str, str], seconds: float) -> None:
        """Add a duration to a ``…_duration_us`` counter."""
        self.add(name, key, seconds * 1e6)

    def text(self) -> str:
        lines = []
        for name, (kind, help_text) in METRICS.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for key in self.keys:
                value = self.pending(key) if kind == "gauge" else self.values[name][key]
                lines.append(f'{name}{{model="{_escaped(key[0])}",version="{_escaped(key[1])}"}} {value}')
        return "\n".join(lines) + "\n"


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
