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
    """Per question: ``route`` (the difficulty score, higher = slow) and ``escalate`` (read after the fast answer,
    higher = answer again in slow mode: see ``escalation``)."""

    route: torch.Tensor
    escalate: torch.Tensor


ESCALATE_ON = ("wrong", "gain")


def escalation(rule: str, confidence: torch.Tensor, slow_helps: torch.Tensor | None = None) -> torch.Tensor:
    """The score a fast answer is escalated on: ``wrong`` = P(the fast answer is wrong) = 1 - its confidence;
    ``gain`` = P(wrong) x P(slow mode gets it right | fast is wrong) (``slow_helps``, from a four-class difficulty
    probe): the expected accuracy an escalation buys, so that the budget goes to wrong answers slow mode can fix."""
    if rule == "wrong":
        return 1 - confidence
    if rule == "gain":
        if slow_helps is None:
            raise ValueError("escalating on 'gain' needs P(slow right | fast wrong) from a four-class (ce) difficulty probe")
        return (1 - confidence) * slow_helps
    raise ValueError(f"escalation rule {rule!r} is not one of {ESCALATE_ON}")


def decide(policy: str, signals: Signals, thresholds: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(straight to slow, escalated after the fast answer) per question under ``policy`` at ``thresholds``."""
    none = torch.zeros(len(signals.route), dtype=torch.bool)
    if policy == "route":
        return signals.route > thresholds[0], none
    if policy == "verify":
        return none, signals.escalate > thresholds[0]
    if policy == "route+verify":
        slow = signals.route > thresholds[0]
        return slow, ~slow & (signals.escalate > thresholds[1])
    raise ValueError(f"policy {policy!r} is not one of {POLICIES}")


POLICIES = {"route": ("route",), "verify": ("escalate",), "route+verify": ("route", "escalate")}  # policy -> its signals


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


def grid(scores: torch.Tensor, points: int | None) -> list[float]:
    """Thresholds that cut ``scores`` between every two distinct values (``points`` None: every cut there is) or
    at ``points`` quantiles, plus ones below and above every score."""
    values = torch.unique(scores.float())
    cuts = (values[1:] + values[:-1]) / 2 if points is None else torch.quantile(values, torch.linspace(0, 1, points))
    return sorted({float(values[0]) - 1.0, float(values[-1]) + 1.0, *cuts.tolist()})


def candidates(policy: str, signals: Signals, points: int) -> list[tuple[float, ...]]:
    """Every threshold choice to try: each cut of a one-signal policy; a ``points``-quantile grid per signal of a
    two-signal one."""
    names = POLICIES[policy]
    return list(itertools.product(*(grid(getattr(signals, n), None if len(names) == 1 else points) for n in names)))


def calibrate(policy: str, signals: Signals, outcomes: Outcomes, *, token_ratio: float | None = None,
              max_loss: float | None = None, points: int = 41, spend: float = 0.0) -> dict:
    """Thresholds for ``policy`` from these (validation) questions alone: the most accurate within ``token_ratio`` x
    always-slow's mean tokens (ties: fewer tokens), or the cheapest within ``max_loss`` accuracy of always-slow
    (ties: more accurate). ``spend`` > 0: within a token budget, only choices that use at least that share of it
    compete (where any does), so that a budget is spent rather than undershot on validation noise (a small
    validation set often peaks early, and the same threshold then leaves most of the budget unused on test).
    Returns the thresholds and what they reached here; ``fits`` False when no choice meets the budget (then the
    cheapest, or the most accurate, is returned)."""
    if (token_ratio is None) == (max_loss is None):
        raise ValueError("give token_ratio or max_loss")
    slow_tokens, slow_acc = float(outcomes.slow_tokens.mean()), float(outcomes.slow_correct.mean())
    tried = [(t, summary(outcome(outcomes, *decide(policy, signals, t)), slow_tokens)) for t in candidates(policy, signals, points)]
    if token_ratio is not None:
        budget = token_ratio * slow_tokens
        fits = lambda r: r["mean_tokens"] <= budget + 1e-9
        spent = lambda r: r["mean_tokens"] >= spend * budget - 1e-9
        if not any(fits(r) and spent(r) for _, r in tried):
            spent = lambda r: True
        key = lambda r: (fits(r), spent(r), r["accuracy"], -r["mean_tokens"]) if fits(r) else (False, False, -r["mean_tokens"], r["accuracy"])
    else:
        fits = lambda r: r["accuracy"] >= slow_acc - max_loss - 1e-9
        key = lambda r: (fits(r), -r["mean_tokens"], r["accuracy"]) if fits(r) else (False, r["accuracy"], -r["mean_tokens"])
    t, r = max(tried, key=lambda tr: key(tr[1]))
    return {"thresholds": list(t), "fits": fits(r)} | {f"val_{k}": v for k, v in r.items()}


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


def best_within(policy: str, signals: Signals, outcomes: Outcomes, token_ratio: float, points: int = 41) -> float:
    """The best accuracy any threshold choice reaches on these questions within ``token_ratio`` x always-slow's mean
    tokens: an upper bound for diagnosis (chosen on the very questions it is measured on), never a policy."""
    xs, ys = frontier(policy, signals, outcomes, points)
    return max((y for x, y in zip(xs, ys) if x <= token_ratio * float(outcomes.slow_tokens.mean()) + 1e-9), default=float("nan"))


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, n: int = 5000, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` (paired per question) with a 95% percentile bootstrap interval over questions."""
    d = (a.float() - b.float())
    idx = torch.randint(len(d), (n, len(d)), generator=torch.Generator().manual_seed(seed))
    means = d[idx].mean(1)
    return {"diff": float(d.mean()), "lo": float(means.quantile(0.025)), "hi": float(means.quantile(0.975))}


def calibrate_then_test(policy: str, val: tuple[Signals, Outcomes], test: tuple[Signals, Outcomes], **budget) -> dict:
    """Thresholds calibrated on ``val`` alone (``calibrate``), then applied once to ``test``: the calibration, the
    test summary and the per-question test outcome (``per_question``)."""
    cal = calibrate(policy, *val, **budget)
    signals, outcomes = test
    per_q = outcome(outcomes, *decide(policy, signals, tuple(cal["thresholds"])))
    return cal | summary(per_q, float(outcomes.slow_tokens.mean())) | {"per_question": per_q}
