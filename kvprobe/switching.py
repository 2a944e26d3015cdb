"""Switching slow -> fast mid-decode: has a step-by-step answer already written its final result?

A slow answer can stop reasoning once the number it will finally give is on the page: appending the answer cue
then ("\\n\\nAnswer:") costs a few tokens and keeps the answer; everything it would have written after that point is
saved. The switch probe learns that moment from the KV of the latest tokens, and the generator asks it while
decoding. Everything here works on one slow answer at a time, from what capture stored:

- the label: ``settled_at`` = the decoded-token count from which the answer's final result is written as a result
  ("= 42", "is 42", "Answer: 42"), from the response text and its tokenisation;
- the input: the mean over the last ``window`` decode positions of the layer-averaged K and V (capture's
  ``token_kv`` trajectory; live, a ring buffer of the same per-position vectors), zero-filled like a window that
  reaches past the answer's start;
- the policy (``simulate``): probe every ``every`` tokens from ``min_tokens`` on; arm once the score ("keep
  thinking", 1 - P(settled)) rises above ``high``; cut at the first later score below ``low``. Hysteresis: an
  answer must first look unsettled before a low score may end it.
"""

from __future__ import annotations

import re

import torch

RESULT_PREFIX = r"(?:=|\bis|:)\s*\**\s*\\?\$?\s*"  # "= 42", "is 42", "Answer: 42", "= **42**", "= $42"


def settled_at(response: str, prediction: str, token_ends: list[int]) -> int | None:
    """Decoded tokens after which ``prediction`` first stands written as a result in ``response``; ``None`` if never.

    ``token_ends[i]`` is the character offset where response token ``i`` ends (a tokenizer's offset mapping).
    Only a result position counts ("= 42", "is 42", "Answer: 42"): an operand restated from the question is not
    a result, so "7 + 35 = 42" settles at 42, not at a 42 that was in the question.
    """
    if not prediction:
        return None
    match = re.search(RESULT_PREFIX + re.escape(prediction) + r"(?!\d|\.\d)", response)
    if match is None:
        return None
    end = match.end()
    for i, token_end in enumerate(token_ends):
        if token_end >= end:
            return i + 1
    return None


def trajectory_windows(token_kv: torch.Tensor, window: int) -> torch.Tensor:
    """For every decoded-token count t = 1..n, the mean of trajectory entries ``[t - window, t)`` (zeros before
    the first): (n, 2, kv_heads, head_dim) float32 from (n, 2, kv_heads, head_dim).

    Entry ``j`` of a capture's trajectory is the position that emitted answer token ``j``, so after t tokens the
    live cache's latest positions are exactly entries ``[t - window, t)``.
    """
    x = token_kv.float()
    sums = torch.cat([torch.zeros_like(x[:1]), x.cumsum(0)])
    t = torch.arange(1, len(x) + 1)
    return (sums[t] - sums[(t - window).clamp_min(0)]) / window


def first_cut(trace, low: float, high: float, min_tokens: int, every: int = 1) -> int | None:
    """The decoded-token count at which the policy switches, from ``(t, score)`` pairs in decoding order; ``None``:
    never. Probes at ``t >= min_tokens`` with ``t % every == 0``; arms once a score exceeds ``high``; after that,
    the first score below ``low`` switches. (The generator takes the same steps live, one token at a time.)"""
    armed = False
    for step, score in trace:
        if step < min_tokens or step % every:
            continue
        if armed and score < low:
            return step
        armed = armed or score > high
    return None


def simulate(scores: torch.Tensor, t: torch.Tensor, answer: torch.Tensor, answers: dict[int, dict],
             low: float, high: float, min_tokens: int, every: int = 1, answer_tokens: float = 3.0) -> dict[str, float]:
    """Where the switch policy would cut each answer, from per-window ``scores`` ("keep thinking").

    ``t`` (decoded-token count) and ``answer`` (answer id) locate each score; ``answers[a]`` holds answer a's
    ``n`` (decoded tokens), ``settled`` (``settled_at``) and ``correct``. A cut at t is safe when the result is
    already written (``settled <= t``). Saved tokens count the answer the model still writes after the cue
    (``answer_tokens``, its typical length). Returns mean saved tokens, the share of answers cut, and ``lost``:
    the share of all answers that were right and got cut before their result was written (an upper bound on the
    accuracy the cuts can cost).
    """
    saved, cut, lost = [], 0, 0
    for a, info in sorted(answers.items()):
        rows = (answer == a).nonzero().squeeze(1)
        order = rows[t[rows].argsort()]
        at = first_cut(zip(t[order].tolist(), scores[order].tolist()), low, high, min_tokens, every)
        if at is None:
            saved.append(0.0)
            continue
        cut += 1
        safe = info["settled"] is not None and info["settled"] <= at
        lost += bool(info["correct"]) and not safe
        saved.append(max(0.0, info["n"] - at - answer_tokens))
    n = max(1, len(answers))
    return {"saved_tokens": sum(saved) / n, "cut_share": cut / n, "lost_share": lost / n}


def calibrate(scores: torch.Tensor, t: torch.Tensor, answer: torch.Tensor, answers: dict[int, dict], high: float,
              min_tokens: int, max_lost: float, every: int = 1) -> dict[str, float]:
    """The cut threshold ``low`` (below ``high``) saving the most tokens while cutting at most ``max_lost`` of the
    answers right before their result is written; fitted on the validation split."""
    candidates = torch.quantile(scores.float(), torch.linspace(0, 1, 41)).tolist()
    best = {"low": 0.0} | simulate(scores, t, answer, answers, 0.0, high, min_tokens, every)
    for low in sorted({round(c, 6) for c in candidates if c < high}):
        out = simulate(scores, t, answer, answers, low, high, min_tokens, every)
        if out["lost_share"] <= max_lost and out["saved_tokens"] > best["saved_tokens"]:
            best = {"low": low} | out
    return best | {"high": high}
