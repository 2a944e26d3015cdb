"""Choosing among sampled answers: equivalence classes by the task's grader, and the selection rules side by side.

A question's samples become a vote table: each sample's answer class (answers the grader holds equal share one:
math-verify makes ``0.5`` and ``\\frac{1}{2}`` one class), its probe score P(correct), its mean token confidence
(mean max-probability, DeepConf's signal) and its grade. Each rule picks one class:

- ``vote``: the most samples (self-consistency);
- ``probe_best``: the class of the sample with the highest P(correct);
- ``probe_vote``: the highest sum of P(correct);
- ``confidence_vote``: DeepConf's offline rule: keep the ``eta`` most confident share of the samples, then the
  highest sum of confidence;
- ``max_prob_best``: the class of the most confident sample;
- ``oracle``: a right class whenever one was sampled (pass@N, the ceiling).

Early stopping (``settled``, ``stopped_at``) draws samples in waves and stops once the table so far is settled: the
probe's rule (``margin``: the leading class's summed P(correct) is ahead of the runner-up's by ``stop_at``), a
label-free one (``votes``: the leading class is ahead by ``stop_at`` votes, as in Adaptive-Consistency) or ESC's
(``agree``: the latest wave answered as one). The live ``sample`` policy and the offline simulation call the same
functions.

Ties go to the lower class number (``answer_classes`` numbers classes in order of appearance), and between samples to
the earlier one. A sample whose answer could not be extracted joins no class; a table
with no class answers nothing (counted wrong).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from kvprobe.tasks import Item, grade

RULES = ("vote", "probe_best", "probe_vote", "confidence_vote", "max_prob_best", "oracle")
STOP_ON = ("margin", "votes", "agree")


def answer_classes(item: Item, responses: list[str], answers: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Each response's answer class (-1: nothing extracted) and each class's answer, in order of appearance. Two
    answers share a class when the task's grader, given one as the gold answer, accepts the other. ``answers``: the
    classes found so far (earlier samples'), which new responses join or extend; never changed in place."""
    classes, answers = [], list(answers or [])
    for response in responses:
        prediction = grade(item, response)[0]
        if not prediction:
            classes.append(-1)
            continue
        same = next((k for k, a in enumerate(answers) if grade(Item(item.qid, item.question, a, item.choices), response)[1]), None)
        if same is None:
            answers.append(prediction)
            same = len(answers) - 1
        classes.append(same)
    return classes, answers


@dataclass
class VoteTable:
    """One question's samples: class per sample (-1 = no answer), probe P(correct), mean token confidence, grade."""

    classes: list[int]
    probe: list[float]
    confidence: list[float]
    correct: list[bool]

    def __post_init__(self):
        n = len(self.classes)
        if not n or any(len(x) != n for x in (self.probe, self.confidence, self.correct)):
            raise ValueError("a vote table needs one class, probe score, confidence and grade per sample")

    def head(self, m: int) -> "VoteTable":
        """The table of the first ``m`` samples (classes keep their numbers: they are numbered by first appearance)."""
        return VoteTable(self.classes[:m], self.probe[:m], self.confidence[:m], self.correct[:m])

    def totals(self, weights: list[float], samples: list[int] | None = None) -> dict[int, float]:
        """Each class's summed weight over ``samples`` (default: every answered one)."""
        out: dict[int, float] = {}
        for i in self._answered() if samples is None else samples:
            out[self.classes[i]] = out.get(self.classes[i], 0.0) + weights[i]
        return out

    def _answered(self) -> list[int]:
        return [i for i, k in enumerate(self.classes) if k >= 0]

    def _by_sum(self, weights: list[float], samples: list[int]) -> int | None:
        totals = self.totals(weights, samples)
        return max(totals, key=lambda k: (totals[k], -k)) if totals else None  # ties: the class seen first

    def _best(self, scores: list[float]) -> int | None:
        samples = self._answered()
        return self.classes[max(samples, key=lambda i: (scores[i], -i))] if samples else None

    def choose(self, rule: str, eta: float = 0.9) -> int | None:
        """The class ``rule`` picks (None: no sample answered)."""
        samples = self._answered()
        if rule == "vote":
            return self._by_sum([1.0] * len(self.classes), samples)
        if rule == "probe_vote":
            return self._by_sum(self.probe, samples)
        if rule == "probe_best":
            return self._best(self.probe)
        if rule == "max_prob_best":
            return self._best(self.confidence)
        if rule == "confidence_vote":
            if not 0 < eta <= 1:
                raise ValueError(f"eta must be in (0, 1], not {eta}")
            kept = sorted(samples, key=lambda i: (-self.confidence[i], i))[: max(1, math.ceil(eta * len(samples)))]
            return self._by_sum(self.confidence, kept)
        if rule == "oracle":
            right = [self.classes[i] for i in samples if self.correct[i]]
            return right[0] if right else self._by_sum([1.0] * len(self.classes), samples)
        raise ValueError(f"rule {rule!r} is not one of {RULES}")

    def is_right(self, rule: str, eta: float = 0.9) -> bool:
        """Whether the class ``rule`` picks is a right answer (a class's samples share their grade)."""
        k = self.choose(rule, eta)
        return k is not None and any(c for c, kk in zip(self.correct, self.classes) if kk == k)


def settled(table: VoteTable, stop_on: str, stop_at: float, window: int) -> bool:
    """Whether sampling may stop at ``table``: ``margin``: the leading class's summed probe P(correct) exceeds the
    runner-up's (0 if none) by at least ``stop_at``; ``votes``: its count of samples does; ``agree`` (ESC): the last
    ``window`` samples gave one answer."""
    if stop_on in ("margin", "votes"):
        weights = table.probe if stop_on == "margin" else [1.0] * len(table.classes)
        ranked = sorted(table.totals(weights).values(), reverse=True) + [0.0, 0.0]
        return ranked[0] - ranked[1] >= stop_at
    if stop_on == "agree":
        last = table.classes[-window:]
        return len(last) == window and last[0] >= 0 and all(k == last[0] for k in last)
    raise ValueError(f"stop_on {stop_on!r} is not one of {STOP_ON}")


def stopped_at(table: VoteTable, n: int, wave: int, stop_on: str, stop_at: float) -> int:
    """How many of a question's samples (``table``, in drawing order) early stopping draws: waves of ``wave``, up to
    ``n``, until ``settled``."""
    return first_settled(table, n, wave, lambda so_far: settled(so_far, stop_on, stop_at, wave))


def first_settled(table: VoteTable, n: int, wave: int, settle: Callable[[VoteTable], bool]) -> int:
    """How many of ``table``'s samples drawing waves of ``wave``, up to ``n``, takes until ``settle(table so far)``
    (``stopped_at``'s loop, for any stopping test)."""
    m = min(wave, n)
    while m < n and not settle(table.head(m)):
        m = min(m + wave, n)
    return m
