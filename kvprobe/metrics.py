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
