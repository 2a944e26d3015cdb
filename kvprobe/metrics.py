"""Correctness metrics, correct = positive class: AUROC, AUPR, ECE (torchmetrics), FPR at 95% TPR, bootstrap CI."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_calibration_error,
    binary_roc,
)


def fpr_at_95_tpr(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Lowest false-positive rate among thresholds that keep >= 95% of correct answers (as in CoE)."""
    fpr, tpr, _ = binary_roc(scores.float(), labels.long())
    return float(fpr[tpr >= 0.95].min())


def bootstrap_auroc(scores: torch.Tensor, labels: torch.Tensor, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of AUROC over resamples of the items (resamples with one class are skipped)."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n):
        idx = torch.randint(len(labels), (len(labels),), generator=gen)
        if labels[idx].min() != labels[idx].max():
            values.append(float(binary_auroc(scores[idx].float(), labels[idx].long())))
    values = torch.tensor(values)
    return float(values.quantile(0.025)), float(values.quantile(0.975))


def score_metrics(scores: torch.Tensor, labels: torch.Tensor, is_probability: bool) -> dict[str, float]:
    """AUROC / AUPR / FPR95 for any score oriented higher = correct; ECE only for calibrated probabilities."""
    scores, labels = scores.detach().float().cpu(), labels.detach().long().cpu()
    if labels.min() == labels.max():
        raise ValueError(f"all {len(labels)} test answers are {'correct' if labels[0] else 'wrong'}: AUROC is undefined")
    lo, hi = bootstrap_auroc(scores, labels)
    out = {
        "auroc": float(binary_auroc(scores, labels)),
        "auroc_lo": lo,
        "auroc_hi": hi,
        "aupr": float(binary_average_precision(scores, labels)),
        "fpr95": fpr_at_95_tpr(scores, labels),
    }
    if is_probability:
        out["ece"] = float(binary_calibration_error(scores.clamp(0, 1), labels, n_bins=10))
    return out


def paired_bootstrap_auroc(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, n: int = 1000, seed: int = 0) -> dict[str, float]:
    """AUROC(a) - AUROC(b) on the same items, with a 95% interval from resampling the items jointly.

    Pairing matters: both scores see the same resampled items, so the interval reflects the difference, not the
    two AUROCs' separate noise. ``p_le_0`` is the share of resamples where ``a`` is not better.
    """
    a, b, labels = a.float().cpu(), b.float().cpu(), labels.long().cpu()
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(n):
        idx = torch.randint(len(labels), (len(labels),), generator=gen)
        if labels[idx].min() != labels[idx].max():
            diffs.append(float(binary_auroc(a[idx], labels[idx]) - binary_auroc(b[idx], labels[idx])))
    diffs = torch.tensor(diffs)
    return {"diff": float(binary_auroc(a, labels) - binary_auroc(b, labels)), "lo": float(diffs.quantile(0.025)),
            "hi": float(diffs.quantile(0.975)), "p_le_0": float((diffs <= 0).float().mean())}


def bucketed_auroc(scores: dict[str, torch.Tensor], labels: torch.Tensor, by: torch.Tensor, buckets: int = 4) -> list[dict]:
    """AUROC of each score within quantile buckets of ``by`` (e.g. response length): what a score knows beyond it.

    Returns one row per bucket (its range, size, positive share, each score's AUROC or NaN when the bucket holds
    one class) and a last row ``all`` with the size-weighted mean over the buckets that hold both classes.
    """
    labels = labels.long().cpu()
    edges = torch.quantile(by.float(), torch.linspace(0, 1, buckets + 1))
    which = torch.bucketize(by.float(), edges[1:-1], right=True)
    rows, weighted, weight = [], {k: 0.0 for k in scores}, 0
    for q in range(buckets):
        m = which == q
        if not m.any():
            continue
        row = {"range": (float(by[m].min()), float(by[m].max())), "n": int(m.sum()), "positive": float(labels[m].float().mean())}
        both = labels[m].min() != labels[m].max()
        for name, s in scores.items():
            row[name] = float(binary_auroc(s[m].float().cpu(), labels[m])) if both else float("nan")
            if both:
                weighted[name] += row[name] * row["n"]
        weight += row["n"] if both else 0
        rows.append(row)
    rows.append({"range": "all", "n": weight} | {k: (v / weight if weight else float("nan")) for k, v in weighted.items()})
    return rows


def auroc_or_nan(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of ``scores`` for binary ``labels``; NaN when only one class is present (tiny or degenerate splits)."""
    labels = labels.long()
    if labels.min() == labels.max():
        return float("nan")
    # as dense ranks in [0, 1]: torchmetrics passes scores outside [0, 1] through a sigmoid, which saturates raw
    # scores such as token counts (every one becomes 1.0: a tie, AUROC 0.5); ranks keep the order and the ties
    values, ranks = torch.unique(scores.float(), return_inverse=True)
    return float(binary_auroc(ranks.float() / max(len(values) - 1, 1), labels))
