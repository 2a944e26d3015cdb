"""Turning probe logits into calibrated probabilities, fitted on the validation split only.

Temperature scaling keeps the ranking (AUROC unchanged) and fits one scalar; isotonic regression (pool adjacent
violators) fits a monotone step function, more flexible but needs more validation items.
"""

from __future__ import annotations

import torch


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """The temperature T minimising validation NLL of sigmoid(logits / T); searched in log space."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)
    y = labels.float()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float() / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may well sit under no_grad / inference_mode
        opt.step(closure)
    return float(log_t.detach().exp().clamp(1e-2, 1e2))


def fit_isotonic(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool-adjacent-violators: (thresholds, values) of a non-decreasing step function of the logit."""
    order = torch.argsort(logits)
    x, y = logits[order].double().tolist(), labels[order].double().tolist()
    blocks: list[list[float]] = []  # [sum of y, count, first x]
    for xi, yi in zip(x, y):
        blocks.append([yi, 1.0, xi])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            s, c, _ = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    thresholds = torch.tensor([b[2] for b in blocks], dtype=torch.float32)
    values = torch.tensor([b[0] / b[1] for b in blocks], dtype=torch.float32)
    return thresholds, values


def apply_isotonic(logits: torch.Tensor, thresholds: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    index = (torch.searchsorted(thresholds, logits.float().contiguous(), right=True) - 1).clamp(0, len(values) - 1)
    return values[index]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3) -> torch.Tensor:
    """Logistic regression by L-BFGS on a few features: returns (weights..., bias). Features are used as given."""
    x, y = x.float(), y.float()
    coef = torch.zeros(x.shape[1] + 1, requires_grad=True)
    opt = torch.optim.LBFGS([coef], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ coef[:-1] + coef[-1], y) + l2 * coef[:-1].pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return coef.detach()
