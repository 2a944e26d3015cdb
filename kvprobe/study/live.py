"""The generator folder a study wrote, loaded as a user loads it and run live on the test questions: does it decide
and answer as the study's simulation of its policy said, question by question?"""

from __future__ import annotations

from pathlib import Path

import torch

from kvprobe.cascade import paired_bootstrap
from kvprobe.evaluate import evaluate


def check(folder: Path, lm, dm, offline: dict, qids: list[str], slow_tokens: float) -> dict:
    """``folder``'s default policy over ``dm``'s test questions through ``KVProbeGenerator``. ``offline``: that
    policy's calibrated test result in the study (its ``per_question`` outcome); ``slow_tokens``: always-slow's mean
    decoded tokens on the same questions, as captured."""
    from kvprobe.steering import KVProbeGenerator

    gen = KVProbeGenerator.from_pretrained(folder, model=lm)
    policy = gen.steering.policy
    r = evaluate(gen, dm, "test", [policy])[policy]
    rows = r.pop("rows")
    if [x["qid"] for x in rows] != qids:
        raise RuntimeError("the live run did not answer the study's test questions in the study's order")
    pq = offline["per_question"]
    # A decision is where the question went: straight to slow, escalated after a fast answer, or answered fast.
    decisions = [(x["final_mode"] == "slow") == bool(s or e) and bool(x["escalated"]) == bool(e)
                 for x, s, e in zip(rows, pq["slow"].tolist(), pq["escalated"].tolist())]
    grades = [bool(x["correct"]) == bool(c) for x, c in zip(rows, pq["correct"].tolist())]
    n = len(rows)
    live_correct = torch.tensor([float(x["correct"]) for x in rows])
    return {
        "policy": policy, "questions": n, "accuracy": r["accuracy"], "mean_tokens": r["mean_tokens"],
        "tokens_over_slow": r["mean_tokens"] / slow_tokens, "offline_accuracy": offline["accuracy"],
        "offline_tokens_over_slow": offline["tokens_over_slow"], "escalations": r["escalations"],
        "mean_reprompt_tokens": r["mean_reprompt_tokens"], "confidence_auroc": r["confidence_auroc"],
        "probe_share": r["probe_share"], "wall_seconds": r["wall_seconds"],
        "agreement": {"decisions": sum(decisions) / n, "grades": sum(grades) / n,
                      "both": sum(a and b for a, b in zip(decisions, grades)) / n},
        "minus_offline": paired_bootstrap(live_correct, pq["correct"].float()),
    }
