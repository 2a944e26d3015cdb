"""Every policy of a study, its thresholds calibrated on the validation questions, then scored once on the test
questions (``kvprobe.cascade``), and the choices between policies, made on validation alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvprobe import cascade
from kvprobe.routing import Outcomes
from kvprobe.study.peers import random_outcome, random_share

PROBE, PEER, OTHER = "probe", "no probe", "other"  # a policy's family: what the comparisons group


@dataclass(frozen=True)
class Policy:
    """``kind``: a ``kvprobe.cascade`` policy (route, verify, route+verify) or ``random``; ``router``: whose scores
    route; ``rule``: what a fast answer is escalated on (``kvprobe.cascade.escalation``)."""

    label: str
    kind: str
    router: str | None
    rule: str
    family: str


def budget_key(kind: str, value: float) -> str:
    return f"{'tokens' if kind == 'token_ratio' else 'loss'}_{value:g}"


def calibrated(policy: Policy, signals: dict[str, cascade.Signals], outcomes: dict[str, Outcomes], **budget) -> dict:
    """``policy``'s thresholds calibrated on validation to ``budget`` (``token_ratio=`` / ``max_loss=``, and
    ``spend=``), then applied once to test: the calibration, the test summary and the per-question outcome."""
    val, test = outcomes["val"], outcomes["test"]
    if policy.kind != "random":
        return cascade.calibrate_then_test(policy.kind, (signals["val"], val), (signals["test"], test), **budget)
    budget.pop("spend", None)
    share = random_share(val, **budget)
    val_summary = cascade.summary(random_outcome(val, share), float(val.slow_tokens.mean()))
    fits = (val_summary["mean_tokens"] <= budget["token_ratio"] * float(val.slow_tokens.mean()) + 1e-9 if "token_ratio" in budget
            else val_summary["accuracy"] >= float(val.slow_correct.mean()) - budget["max_loss"] - 1e-9)
    per_q = random_outcome(test, share)
    return ({"thresholds": [share], "fits": fits} | {f"val_{k}": v for k, v in val_summary.items()}
            | cascade.summary(per_q, float(test.slow_tokens.mean())) | {"per_question": per_q})


def score_all(policies: list[Policy], route: dict[str, dict[str, torch.Tensor]], escalate: dict[str, dict[str, torch.Tensor]],
              outcomes: dict[str, Outcomes], budgets: list[float], losses: list[float], spend: float) -> dict[str, dict]:
    """label -> {budget key -> ``calibrated``} for every policy at every token budget and accuracy loss, and its
    ``frontier`` on test (the best accuracy any threshold reaches at each cost: for the figure, never a choice)."""
    out = {}
    for p in policies:
        signals = {s: cascade.Signals(route[p.router][s] if p.router else torch.zeros(len(outcomes[s])),
                                      escalate[p.rule][s] if p.kind != "random" and "verify" in p.kind else torch.zeros(len(outcomes[s])))
                   for s in ("val", "test")}
        out[p.label] = {budget_key("token_ratio", b): calibrated(p, signals, outcomes, token_ratio=b, spend=spend) for b in budgets}
        out[p.label] |= {budget_key("max_loss", x): calibrated(p, signals, outcomes, max_loss=x) for x in losses}
        test = outcomes["test"]
        out[p.label]["frontier"] = (cascade.frontier(p.kind, signals["test"], test) if p.kind != "random" else
                                    ([float(test.fast_tokens.mean()), float(test.slow_tokens.mean())],
                                     [float(test.fast_correct.mean()), float(test.slow_correct.mean())]))
    return out


def best_at(results: dict[str, dict], policies: list[Policy], family: str, key: str) -> str:
    """The policy of ``family`` chosen on validation at budget ``key``: within a token budget the most accurate
    (ties: cheaper); within an accuracy loss the cheapest of those that stay within it (ties: more accurate)."""
    labels = [p.label for p in policies if p.family == family]
    if key.startswith("tokens"):
        rank = lambda r: (r["fits"], r["val_accuracy"], -r["val_mean_tokens"])
    else:
        rank = lambda r: (r["fits"], -r["val_mean_tokens"], r["val_accuracy"])
    return max(labels, key=lambda label: rank(results[label][key]))


def fixed(outcomes: Outcomes) -> dict[str, dict]:
    """Always-fast, always-slow and the oracle (the cheapest right mode per question) on these questions."""
    n = len(outcomes)
    none = torch.zeros(n, dtype=torch.bool)
    out = {}
    for name, slow in (("always-fast", none), ("always-slow", ~none), ("oracle", outcomes.oracle())):
        per_q = cascade.outcome(outcomes, slow, none)
        out[name] = cascade.summary(per_q, float(outcomes.slow_tokens.mean())) | {"per_question": per_q}
    return out


def by_segment(per_question: dict[str, torch.Tensor], segment: torch.Tensor, slow_tokens: torch.Tensor, n: int) -> list[dict]:
    """Accuracy and tokens over always-slow's within each of ``n`` segments of the question range."""
    rows = []
    for k in range(n):
        m = segment == k
        if not m.any():
            rows.append({"questions": 0})
            continue
        rows.append({"questions": int(m.sum()), "accuracy": float(per_question["correct"][m].float().mean()),
                     "tokens_over_slow": float(per_question["tokens"][m].float().mean() / slow_tokens[m].mean())})
    return rows


def strip(result: dict) -> dict:
    """A calibrated result without its per-question tensors (for JSON)."""
    return {k: v for k, v in result.items() if k != "per_question"}
