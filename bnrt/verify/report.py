"""Human-readable tables for decisions and checks (the JSON report is built by the pipeline), and
the optional error histogram plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnrt.errors import OptionError
from bnrt.folding.decision import Decision
from bnrt.verify.accuracy import describe
from bnrt.verify.metrics import CheckReport, LayerCheck


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def decision_table(decisions: list[Decision]) -> str:
    """One row per BatchNorm: name, status, rule, layer folded into, reason and warnings."""
    rows = []
    for d in decisions:
        note = "; ".join(filter(None, [d.reason, *d.warnings]))
        rows.append([d.bn, d.status, d.rule or "-", ", ".join(d.into) or "-", note])
    folded = sum(d.folded for d in decisions)
    summary = f"{len(decisions)} BatchNorm: {folded} folded, {len(decisions) - folded} skipped"
    if not decisions:
        return summary
    return _table(["batchnorm", "status", "rule", "into", "reason"], rows) + "\n" + summary


def _num(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    if pct:
        return f"{100 * x:.2f}%"
    return f"{x:.3g}" if np.isfinite(x) else ("inf" if x > 0 else "-inf")


def check_table(report: CheckReport) -> str:
    """One row per compared output, the first divergent module of failed comparisons, then
    accuracy per runner when labels were given."""
    rows = []
    for comp in report.comparisons:
        for o in comp.outputs:
            rule = f"atol {o.atol:g} rtol {o.rtol:g}" if o.criterion == "fixed" else (
                f"{_num(o.error)} vs floor {_num(o.floor)} (x{_num(o.ratio)})")
            candidate = comp.candidate + (f" (first {comp.samples})" if comp.samples else "")
            rows.append([comp.reference, candidate, o.name, _num(o.max_abs), _num(o.max_rel), _num(o.mean_abs),
                         f"{o.cosine:.8f}", "identical" if o.sqnr_db is None else f"{o.sqnr_db:.1f}",
                         _num(o.top1_agreement, True), _num(o.topk_agreement, True), rule,
                         ("info: " if comp.informational else "")
                         + ("ok" if o.passed else f"{'beyond' if comp.informational else 'FAIL'}"
                                                   f"{': ' + o.problem if o.problem else ''}")])
    noise = {"float64": "error against the unfolded model in float64, floor: its float32 run's",
             "rounding": "error against the original graph, floor: the same graph with its weights re-rounded"}
    lines = [
        f"check on {report.source} ({report.samples} samples)"
        + (f"; {noise[report.noise]}, on the first {report.noise_samples}" if report.noise else ""),
        _table(["reference", "candidate", "output", "max_abs", "max_rel", "mean_abs", "cosine", "sqnr_db",
                "top1_agree", f"top{report.top_k}_agree", "criterion", "result"], rows),
    ]
    if report.noise_fallback:
        lines.append(f"fixed tolerances judge where the noise floor would: {report.noise_fallback}")
    for comp in report.comparisons:
        if comp.layers is not None:
            lines.append(f"{comp.candidate}: {layer_line(comp.layers)}")
        if comp.divergence is not None:
            d = comp.divergence
            where = f"'{d.layer}' (seen at its folded BatchNorm '{d.module}')" if d.layer else f"'{d.module}'"
            lines.append(f"{comp.candidate}: first divergent module {where}, max abs error {d.max_abs:.3g}")
        elif not comp.passed and not comp.informational:  # informational rows are not localised
            lines.append(f"{comp.candidate}: no single module diverges beyond tolerance on the first samples")
    if report.certificate is not None:
        lines.append(report.certificate.summary())
    if report.preprocess:
        p = report.preprocess
        lines.append("images: " + ", ".join(f"{k} {','.join(map(str, v)) if isinstance(v, list) else v}"
                                            for k, v in p.items() if v is not None))
    reference = next(iter(report.accuracy), "reference")
    for label, stats in report.accuracy_stats.items():
        lines.append(describe(label, reference, stats))
    if report.accuracy and not report.accuracy_stats:
        lines.append("accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in report.accuracy.items()))
    lines.append("check passed" if report.passed else f"check FAILED: {_failure(report)}")
    return "\n".join(lines)


def layer_line(layers: LayerCheck) -> str:
    """The per-layer comparison in one line."""
    if not layers.points:
        return "per-layer comparison: no layer output both models have"
    worst = (f"worst '{layers.worst}' at {_num(layers.margin)} of its allowance "
             f"({_num(layers.error)} vs floor {_num(layers.floor)})")
    head = f"per-layer comparison on {layers.samples} sample{'s' if layers.samples != 1 else ''}: "
    if layers.passed:
        return f"{head}{layers.points} layer outputs within noise, {worst}"
    return f"{head}{layers.failed} of {layers.points} layer outputs beyond noise, {worst}"


def _failure(report: CheckReport) -> str:
    """What failed, in a few words."""
    deciding = [c for c in report.comparisons if not c.informational]
    reasons = []
    if any(not all(o.passed for o in c.outputs) for c in deciding):
        reasons.append("outputs differ beyond tolerance")
    if any(c.layers is not None and not c.layers.passed for c in deciding):
        reasons.append("layer outputs differ beyond noise")
    if report.certificate is not None and not report.certificate.passed:
        reasons.append("folded weights are not the exact fold")
    return "; ".join(reasons) or "outputs differ beyond tolerance"


def plot_errors(report: CheckReport, errors: dict[tuple[str, str], np.ndarray], path: Path) -> None:
    """Histogram of log10 |candidate − reference| per compared output, one panel each, to ``path``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OptionError("`plot` needs matplotlib: pip install 'bnrt[plot]'") from exc
    from bnrt.io.save import atomic_path

    keys = list(errors)
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), squeeze=False)
    for ax, (candidate, output) in zip(axes[:, 0], keys):
        diff = errors[(candidate, output)].ravel()
        logs = np.log10(np.maximum(diff, 1e-12))
        ax.hist(logs, bins=60, color="#3b6ea8")
        ax.set_title(f"{candidate} vs reference: {output}")
        ax.set_xlabel("log10 |candidate − reference| (exact matches at −12)")
        ax.set_ylabel("elements")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def save_report(report: CheckReport, json_out: str | Path | None = None, plot_out: str | Path | None = None) -> None:
    """Write the report (schema ``bnrt.check/3``) to ``json_out`` and its error histograms to
    ``plot_out``, each when given (atomically; the caller refused overwrites up front)."""
    from bnrt.io.save import write_json

    if json_out is not None:
        write_json(Path(json_out), report.to_json())
    if plot_out is not None:
        plot_errors(report, report.errors, Path(plot_out))
