"""Human-readable tables for decisions and checks (the JSON report is built by the pipeline)."""

from __future__ import annotations

from .plan import Decision
from .verify import CheckReport


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


def _num(x: float) -> str:
    return f"{x:.3g}" if x != float("inf") else "inf"


def check_table(report: CheckReport) -> str:
    """One row per compared output, then accuracy per runner when labels were given."""
    rows = []
    for comp in report.comparisons:
        for o in comp.outputs:
            top1 = "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.2f}%"
            rows.append([comp.reference, comp.candidate, o.name, _num(o.max_abs), _num(o.max_rel),
                         _num(o.mean_abs), top1, "ok" if o.passed else "FAIL"])
    lines = [
        f"check on {report.source} ({report.samples} samples), pass if |diff| <= {report.atol:g} + {report.rtol:g}*|ref|",
        _table(["reference", "candidate", "output", "max_abs", "max_rel", "mean_abs", "top1_agree", "result"], rows),
    ]
    if report.accuracy:
        lines.append("accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in report.accuracy.items()))
    lines.append("check passed" if report.passed else "check FAILED: outputs differ beyond tolerance")
    return "\n".join(lines)
