"""Did folding change accuracy? Over the labelled samples, each side's top-1 and top-k accuracy
(the first output's argmax), the samples that only one side gets right (the discordant pairs: b,
the reference right and the candidate wrong; c, the reverse), an exact McNemar test on them (a
two-sided binomial test of b against b + c at one half: the chance that a model no better and no
worse than the reference disagrees this unevenly), and a 95 % interval for the accuracy
difference (candidate − reference; the Wald interval for paired proportions, which is 0 … 0 when
nothing is discordant).
"""

from __future__ import annotations

import math

import numpy as np

CHANCE = 0.05  # a McNemar p-value below this: the difference is more than chance
Z95 = 1.959963984540054


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per sample, whether the label is among the ``k`` largest logits (ties: the earlier class)."""
    scores = logits.reshape(len(labels), -1)
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


def mcnemar_p(b: int, c: int) -> float:
    """The exact two-sided McNemar p-value of ``b`` against ``c`` discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    return min(1.0, 2.0 * math.exp(float(np.logaddexp.reduce(terms))))


def paired(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray, top_k: int = 5) -> dict:
    """The statistics of one candidate's first output against the reference's, on ``labels``."""
    ref1, cand1 = topk_correct(reference, labels, 1), topk_correct(candidate, labels, 1)
    n = len(labels)
    b, c = int(np.sum(ref1 & ~cand1)), int(np.sum(~ref1 & cand1))
    diff = (c - b) / n
    half = Z95 * math.sqrt(max(0.0, (b + c) - (c - b) ** 2 / n)) / n
    p = mcnemar_p(b, c)
    return {"samples": n, "top1": [float(np.mean(ref1)), float(np.mean(cand1))],
            "top_k": [float(np.mean(topk_correct(reference, labels, top_k))),
                      float(np.mean(topk_correct(candidate, labels, top_k)))], "k": top_k,
            "reference_only": b, "candidate_only": c, "mcnemar_p": p, "difference": diff,
            "difference_ci95": [diff - half, diff + half], "within_chance": p >= CHANCE}


def describe(label: str, reference: str, stats: dict) -> str:
    """One line: both sides' accuracy, the discordant samples, the test and its verdict."""
    low, high = stats["difference_ci95"]
    verdict = "within chance" if stats["within_chance"] else f"more than chance (p < {CHANCE})"
    return (f"accuracy on {stats['samples']} labelled samples: {reference} {100 * stats['top1'][0]:.2f}% "
            f"(top-{stats['k']} {100 * stats['top_k'][0]:.2f}%), {label} {100 * stats['top1'][1]:.2f}% "
            f"(top-{stats['k']} {100 * stats['top_k'][1]:.2f}%); right only in the reference {stats['reference_only']}, "
            f"only in {label} {stats['candidate_only']}; McNemar p = {stats['mcnemar_p']:.3g}; difference "
            f"{100 * stats['difference']:+.2f} pp (95% CI {100 * low:+.2f} to {100 * high:+.2f}): {verdict}")
