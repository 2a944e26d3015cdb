"""Fast/slow routing from captured answers of both modes: labels, budget-calibrated thresholds, offline evaluation.

Every question was answered in both modes, so any router (a score per question and a threshold: slow when
``score > threshold``) can be scored exactly, without generating again: its accuracy is the chosen mode's grade,
its cost the chosen mode's generated tokens. Costs here count every decoded token of the chosen mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvprobe.plots import pyplot

LABELS = (0, 25, 75, 100)  # the KV paper's difficulty scheme, as class indices 0..3


def difficulty_labels(fast_correct: torch.Tensor, fast_tokens: torch.Tensor, slow_correct: torch.Tensor, short_tokens: int = 128) -> torch.Tensor:
    """Per question: 0 = fast right in under ``short_tokens``, 25 = fast right but long, 75 = only slow right,
    100 = both wrong. A missing grade (NaN) in a mode the label depends on gives NaN (unlabelled)."""
    fast_ok, slow_ok = fast_correct == 1, slow_correct == 1
    label = torch.where(fast_ok, torch.where(fast_tokens < short_tokens, 0.0, 25.0), torch.where(slow_ok, 75.0, 100.0))
    missing = fast_correct.isnan() | (~fast_ok & slow_correct.isnan())
    return torch.where(missing, torch.nan, label)


@dataclass
class Outcomes:
    """Both modes' grades and generated tokens for the same questions (1-D tensors of equal length)."""

    fast_correct: torch.Tensor
    slow_correct: torch.Tensor
    fast_tokens: torch.Tensor
    slow_tokens: torch.Tensor

    def __post_init__(self):
        self.fast_correct, self.slow_correct = self.fast_correct.float(), self.slow_correct.float()
        self.fast_tokens, self.slow_tokens = self.fast_tokens.float(), self.slow_tokens.float()

    def __len__(self) -> int:
        return len(self.fast_correct)

    def route(self, slow: torch.Tensor) -> dict[str, float]:
        """Accuracy, mean decoded tokens and slow share when ``slow`` (bool per question) picks the mode."""
        slow = slow.bool()
        correct = torch.where(slow, self.slow_correct, self.fast_correct)
        tokens = torch.where(slow, self.slow_tokens, self.fast_tokens)
        return {"accuracy": float(correct.mean()), "mean_tokens": float(tokens.mean()), "slow_share": float(slow.float().mean())}

    def slow_needed(self) -> torch.Tensor:
        """Per question: only slow mode answers it right (label 75)."""
        return (self.slow_correct == 1) & (self.fast_correct == 0)

    def bar(self) -> tuple[float, float]:
        """The difficulty issue's bar on these questions: (least accuracy, most mean decoded tokens) = (the better
        fixed mode's accuracy - 1 point, 0.5x always-slow's tokens)."""
        best_fixed = max(float(self.fast_correct.mean()), float(self.slow_correct.mean()))
        return best_fixed - 0.01, 0.5 * float(self.slow_tokens.mean())

    def oracle(self) -> torch.Tensor:
        """The cheapest correct mode per question (fast when both are wrong: no mode helps, so pay least)."""
        fast_cheaper = self.fast_tokens <= self.slow_tokens
        return torch.where(self.fast_correct == 1, ~fast_cheaper & (self.slow_correct == 1), self.slow_correct == 1)

    def random(self, share: float) -> dict[str, float]:
        """The expected outcome of sending a random ``share`` of questions to slow mode (exact, no sampling)."""
        fast, slow = self.route(torch.zeros(len(self), dtype=torch.bool)), self.route(torch.ones(len(self), dtype=torch.bool))
        mix = {k: (1 - share) * fast[k] + share * slow[k] for k in ("accuracy", "mean_tokens")}
        return mix | {"slow_share": share}

    def curve(self, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Send the k highest-scoring questions to slow mode, for every k = 0..N: accuracy and mean tokens."""
        order = torch.argsort(scores, descending=True, stable=True)
        gain = torch.cat([torch.zeros(1), (self.slow_correct - self.fast_correct)[order].cumsum(0)])
        extra = torch.cat([torch.zeros(1), (self.slow_tokens - self.fast_tokens)[order].cumsum(0)])
        n = len(self)
        return {
            "slow_share": torch.arange(n + 1) / n,
            "accuracy": (self.fast_correct.sum() + gain) / n,
            "mean_tokens": (self.fast_tokens.sum() + extra) / n,
        }

    def route_gain(self, scores: torch.Tensor) -> float:
        """Mean accuracy gain over a random router, averaged over every slow share: > 0 when the score ranks well."""
        curve = self.curve(scores)
        fast, slow = float(self.fast_correct.mean()), float(self.slow_correct.mean())
        random = fast + curve["slow_share"] * (slow - fast)
        return float((curve["accuracy"] - random).mean())


def _threshold(sorted_desc: torch.Tensor, k: int) -> float:
    """The threshold that sends exactly the top ``k`` scores to slow (``score > threshold``)."""
    if k == 0:
        return float(sorted_desc[0]) + 1.0
    if k == len(sorted_desc):
        return float(sorted_desc[-1]) - 1.0
    return float(sorted_desc[k - 1] + sorted_desc[k]) / 2


@dataclass
class BudgetSpec:
    """Budgets to calibrate router thresholds to, on the validation split. Each becomes one named threshold.

    Args:
        slow_share: target shares of questions sent to slow mode.
        mean_tokens: target mean decoded tokens per question (the most slow questions that fit).
        token_ratio: maximise accuracy at no more than this multiple of always-slow's mean tokens.
        paper: raw score thresholds of the KV paper (30 / 50 / 70 on its 0-100 scale), kept for parity; applied to
            scores in [0, 1] as they are, so they are not calibrated to anything.
    """

    slow_share: list[float] = field(default_factory=lambda: [0.25, 0.4, 0.5])
    mean_tokens: list[float] = field(default_factory=list)
    token_ratio: list[float] = field(default_factory=lambda: [0.5])
    paper: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])


def calibrate(scores: torch.Tensor, outcomes: Outcomes, budgets: BudgetSpec) -> dict[str, dict[str, float]]:
    """Name -> {threshold, target, and the validation accuracy / tokens / slow share it reached}."""
    order = torch.argsort(scores, descending=True, stable=True)
    ranked = scores[order].float()
    curve = outcomes.curve(scores)
    n = len(outcomes)
    out: dict[str, dict[str, float]] = {}

    def add(name: str, k: int, target: float) -> None:
        out[name] = {"threshold": _threshold(ranked, k), "target": target} | {
            f"val_{key}": float(curve[key][k]) for key in ("accuracy", "mean_tokens", "slow_share")
        }

    for share in budgets.slow_share:
        if not 0 <= share <= 1:
            raise ValueError(f"slow_share budget {share} is not in [0, 1]")
        add(f"share_{share:g}", round(share * n), share)
    for budget in budgets.mean_tokens:
        fits = (curve["mean_tokens"] <= budget).nonzero().flatten()
        add(f"tokens_{budget:g}", int(fits.max()) if len(fits) else 0, budget)  # the curve's cost rises with k on average
    slow_tokens = float(outcomes.slow_tokens.mean())
    for ratio in budgets.token_ratio:
        fits = (curve["mean_tokens"] <= ratio * slow_tokens).nonzero().flatten()
        k = int(fits[curve["accuracy"][fits].argmax()]) if len(fits) else 0
        add(f"best_at_{ratio:g}x_slow", k, ratio)
    for raw in budgets.paper:
        slow = scores > raw
        out[f"paper_{raw:g}"] = {"threshold": raw, "target": raw} | {f"val_{k}": v for k, v in outcomes.route(slow).items()}
    return out


def evaluate(scores: torch.Tensor, outcomes: Outcomes, thresholds: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Every policy on the same questions: fixed modes, the oracle, the router at each calibrated threshold and a
    random router at the same slow share. Router rows say whether they Pareto-dominate each fixed mode (as
    accurate and as cheap, one strictly better; always-fast is rarely beaten on cost) and whether they meet the bar (accuracy >= best fixed mode - 1 point at <= 0.5x always-slow's tokens)."""
    n = len(outcomes)
    rows = {
        "always_fast": outcomes.route(torch.zeros(n, dtype=torch.bool)),
        "always_slow": outcomes.route(torch.ones(n, dtype=torch.bool)),
        "oracle": outcomes.route(outcomes.oracle()),
    }
    least_accuracy, most_tokens = outcomes.bar()
    for name, t in thresholds.items():
        row = outcomes.route(scores > t["threshold"])
        row["dominates_fast"] = float(_dominates(row, rows["always_fast"]))
        row["dominates_slow"] = float(_dominates(row, rows["always_slow"]))
        row["meets_bar"] = float(row["accuracy"] >= least_accuracy and row["mean_tokens"] <= most_tokens)
        rows[f"router_{name}"] = row
        rows[f"random_{name}"] = outcomes.random(row["slow_share"])
    return rows


def _dominates(a: dict, b: dict) -> bool:
    """``a`` is at least as accurate and as cheap as ``b``, and strictly better in one."""
    return a["accuracy"] >= b["accuracy"] and a["mean_tokens"] <= b["mean_tokens"] and (
        a["accuracy"] > b["accuracy"] or a["mean_tokens"] < b["mean_tokens"]
    )


def routing_figure(curves: dict[str, dict[str, torch.Tensor]], rows: dict[str, dict[str, float]], title: str):
    """Accuracy against mean decoded tokens: each score's full curve, the fixed modes, the oracle, the routers."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot(curve["mean_tokens"], curve["accuracy"], lw=2.2 if i == 0 else 1, label=f"{name} (every threshold)")
    fast, slow = rows["always_fast"], rows["always_slow"]
    ax.plot([fast["mean_tokens"], slow["mean_tokens"]], [fast["accuracy"], slow["accuracy"]], "k:", lw=1, label="random router")
    for name, marker in (("always_fast", "s"), ("always_slow", "D"), ("oracle", "*")):
        ax.plot(rows[name]["mean_tokens"], rows[name]["accuracy"], marker, ms=10, color="k" if name != "oracle" else "gold",
                mec="k", label=name.replace("_", " "), ls="none")
    for name, row in rows.items():
        if name.startswith("router_"):
            ax.plot(row["mean_tokens"], row["accuracy"], "o", ms=6, mfc="none", mec="C3", ls="none")
            ax.annotate(name.removeprefix("router_"), (row["mean_tokens"], row["accuracy"]), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.axvline(0.5 * slow["mean_tokens"], color="grey", lw=0.7, ls="--", label="0.5x always-slow tokens")
    ax.set(xlabel="mean decoded tokens per question", ylabel="accuracy", title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
