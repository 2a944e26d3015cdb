"""Cascades offline: answer fast, let a correctness probe read the fast answer, and pay for slow mode only when the
answer looks wrong; optionally send clearly hard questions straight to slow mode first (the router).

Every question was answered in both modes, so each policy is scored exactly from the captures, as in
``kvprobe.routing``. Costs count every decoded token: a question sent straight to slow pays slow's tokens; an
escalated one pays its fast answer and then slow's tokens (the live generator drops the fast answer's positions and
prefills only the slow prompt's differing suffix, counted apart as prompt tokens).

A policy is a rule with thresholds (``POLICIES``): its thresholds are calibrated jointly on the validation split,
on a grid of the validation scores' quantiles, to a budget; then applied once to test.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from kvprobe.routing import Outcomes


@dataclass
class Signals:
    """Per question: ``route`` (the difficulty score, higher = slow) and ``verify`` (P(the fast answer is right))."""

    route: torch.Tensor
    verify: torch.Tensor

    def __getitem__(self, index) -> "Signals":
        return Signals(self.route[index], self.verify[index])


def decide(policy: str, signals: Signals, thresholds: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(straight to slow, escalated after the fast answer) per question under ``policy`` at ``thresholds``."""
    none = torch.zeros(len(signals.route), dtype=torch.bool)
    if policy == "route":
        return signals.route > thresholds[0], none
    if policy == "verify":
        return none, signals.verify < thresholds[0]
    if policy == "route+verify":
        slow = signals.route > thresholds[0]
        return slow, ~slow & (signals.verify < thresholds[1])
    raise ValueError(f"policy {policy!r} is not one of {POLICIES}")


POLICIES = {"route": ("route",), "verify": ("verify",), "route+verify": ("route", "verify")}  # policy -> its signals


def outcome(outcomes: Outcomes, slow: torch.Tensor, escalate: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per question: correct (0/1) and decoded tokens."""
    escalate = escalate & ~slow
    correct = torch.where(slow | escalate, outcomes.slow_correct, outcomes.fast_correct)
    tokens = torch.where(slow, outcomes.slow_tokens, outcomes.fast_tokens + torch.where(escalate, outcomes.slow_tokens, 0))
    return {"correct": correct, "tokens": tokens, "slow": slow, "escalated": escalate}


def summary(per_question: dict[str, torch.Tensor], slow_tokens: float) -> dict[str, float]:
    return {"accuracy": float(per_question["correct"].mean()), "mean_tokens": float(per_question["tokens"].mean()),
            "tokens_over_slow": float(per_question["tokens"].mean()) / slow_tokens,
            "straight_to_slow": float(per_question["slow"].float().mean()), "escalated": float(per_question["escalated"].float().mean())}


def grid(scores: torch.Tensor, points: int) -> list[float]:
    """Thresholds that cut ``scores`` at ``points`` quantiles, plus ones below and above every score."""
    q = torch.quantile(scores.float(), torch.linspace(0, 1, points))
    return sorted({float(scores.min()) - 1.0, float(scores.max()) + 1.0, *q.tolist()})


def candidates(policy: str, signals: Signals, points: int) -> list[tuple[float, ...]]:
    return list(itertools.product(*(grid(getattr(signals, name), points) for name in POLICIES[policy])))


def calibrate(policy: str, signals: Signals, outcomes: Outcomes, *, token_ratio: float | None = None,
              max_loss: float | None = None, points: int = 41) -> dict:
    """Thresholds for ``policy`` from these (validation) questions alone, either the most accurate within
    ``token_ratio`` x always-slow's mean tokens, or the cheapest within ``max_loss`` accuracy of always-slow (ties:
    fewer tokens, then more accuracy). Returns the thresholds and what they reached here."""
    if (token_ratio is None) == (max_loss is None):
        raise ValueError("give token_ratio or max_loss")
    slow_tokens, slow_acc = float(outcomes.slow_tokens.mean()), float(outcomes.slow_correct.mean())
    best, key_best = None, None
    for t in candidates(policy, signals, points):
        r = summary(outcome(outcomes, *decide(policy, signals, t)), slow_tokens)
        if token_ratio is not None:
            fits, key = r["mean_tokens"] <= token_ratio * slow_tokens, (r["accuracy"], -r["mean_tokens"])
        else:
            fits, key = r["accuracy"] >= slow_acc - max_loss - 1e-9, (-r["mean_tokens"], r["accuracy"])
        if fits and (key_best is None or key > key_best):
            best, key_best = {"thresholds": list(t)} | {f"val_{k}": v for k, v in r.items()}, key
    if best is None:  # nothing fits: the cheapest (or the most accurate) point, marked
        t = candidates(policy, signals, points)[0 if token_ratio is not None else -1]
        best = {"thresholds": list(t), "fits": False}
    return best


def frontier(policy: str, signals: Signals, outcomes: Outcomes, points: int = 41) -> tuple[list[float], list[float]]:
    """The accuracy-vs-tokens points no other threshold choice beats (mean tokens ascending), for plots."""
    slow_tokens = float(outcomes.slow_tokens.mean())
    pts = sorted((r["mean_tokens"], r["accuracy"]) for t in candidates(policy, signals, points)
                 for r in [summary(outcome(outcomes, *decide(policy, signals, t)), slow_tokens)])
    xs, ys, top = [], [], -1.0
    for x, y in pts:
        if y > top:
            xs.append(x), ys.append(y)
            top = y
    return xs, ys


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, n: int = 5000, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` (paired per question) with a 95% percentile bootstrap interval over questions."""
    d = (a.float() - b.float())
    idx = torch.randint(len(d), (n, len(d)), generator=torch.Generator().manual_seed(seed))
    means = d[idx].mean(1)
    return {"diff": float(d.mean()), "lo": float(means.quantile(0.025)), "hi": float(means.quantile(0.975))}
