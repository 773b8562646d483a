"""`bnrt serve`'s Prometheus metrics (``GET /metrics``), under Triton's names, help texts and labels
(``model``, ``version``), so dashboards and autoscaling rules written for Triton read them unchanged.

Written in the text exposition format here: the Prometheus client library names a counter
``<name>_total``, which Triton's counters do not carry. Counters are cumulative integers (durations
in microseconds) per model version; ``nv_inference_pending_request_count`` is a gauge.
"""

from __future__ import annotations

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


class Metrics:
    """The counters of every served model version (``keys``: (name, version)); ``pending(key)``
    reads the gauge when the metrics are written."""

    def __init__(self, keys: list[tuple[str, str]], pending: Callable[[tuple[str, str]], int]):
        self.keys, self.pending = [], pending
        self.values = {name: {} for name, (kind, _) in METRICS.items() if kind == "counter"}
        for key in keys:
            self.track(key)

    def track(self, key: tuple[str, str]) -> None:
        """Count ``key`` (a model version loaded later) from zero; its counts so far are kept."""
        if key not in self.keys:
            self.keys.append(key)
            for values in self.values.values():
                values.setdefault(key, 0)

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
