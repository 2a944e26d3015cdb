"""Which stopping signal would let early-stopped sampling reach vote@8's accuracy at half its tokens? Levers beyond
the probe's margin rule of docs/sampling.md, on the same samples.

    python -m reports.experiments.sampling_stop_rules   # ~1 min once python -m reports.sampling has run (its capture, its fitted probe)

Each statistic is computed on a question's samples so far, after waves of 1, 2 or 4; sampling stops once it reaches
a threshold. The (wave, threshold) with the fewest validation tokens within 1 point of validation's vote@8 is run once
on test. The answer is then picked by ``probe_vote`` or ``vote``. Probes: the shipped greedy-trained one, and the one
the report fitted on sampled answers (runs/report/sampled-correctness).

- ``share``: the leading class's share of the summed P(correct).
- ``votes``: the leading class's lead in votes over the runner-up. It is label-free, like Adaptive-Consistency.
- ``logodds``: the lead in summed log-odds (+3) of P(correct).
- ``lead_p``: the best P(correct) among the leading class's samples.

Prints where ``probe_vote`` departs from ``vote`` and ``confidence_vote`` at N=8 and 16 (questions each gets right
that the other does not), then one line per statistic, probe and pick: test accuracy and sampled tokens over vote@8's.
"""

import argparse
import math
from pathlib import Path

from kvprobe.evaluate import load_data
from kvprobe.export import load_probe
from kvprobe.sampling import first_settled
from reports.sampling import DATA, MATCH, SHIPPED, probe_scores, questions_of, rule_at, waves

STATISTICS = {"share": (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99), "votes": (1, 2, 3, 4, 5),
              "logodds": (1, 2, 3, 4, 5, 6, 8, 10, 12), "lead_p": (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)}


def statistic(t, kind: str) -> float:
    if kind == "share":
        totals = t.totals(t.probe)
        return max(totals.values()) / max(1e-9, sum(totals.values())) if totals else 0.0
    weights = {"votes": [1.0] * len(t.classes),
               "logodds": [math.log(max(p, 1e-4) / max(1 - p, 1e-4)) + 3 for p in t.probe]}.get(kind)
    if weights is not None:
        ranked = sorted(t.totals(weights).values(), reverse=True) + [0.0, 0.0]
        return ranked[0] - ranked[1]
    lead = t.choose("probe_vote")
    return max([p for p, k in zip(t.probe, t.classes) if k == lead], default=0.0)


def run(qs, kind: str, threshold: float, wave: int, probe: str, pick: str) -> tuple[float, float]:
    """Accuracy and mean sampled tokens (with the re-fed prompt position of each later-wave sample)."""
    right, tokens, _ = waves(qs, probe, wave, pick, lambda t: first_settled(t, 16, wave, lambda h: statistic(h, kind) >= threshold))
    return float(right.mean()), float(tokens.mean()) - sum(q.prompt_tokens for q in qs) / len(qs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reports.experiments.sampling_stop_rules", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampled_probe", default="runs/report/sampled-correctness")
    args = parser.parse_args(argv)
    dm = load_data(DATA)
    probes = {"greedy": load_probe(Path(SHIPPED) / "correctness"), "sampled": load_probe(args.sampled_probe)}
    split = {s: questions_of(dm, s, {k: probe_scores(p, dm, s) for k, p in probes.items()}) for s in ("val", "test")}
    target = float(rule_at(split["val"], "vote", 8)[0].mean()) - MATCH
    vote8 = sum(sum(q.tokens[:8]) for q in split["test"]) / len(split["test"])
    print(f"validation vote@8 {target + MATCH:.3f}; test vote@8 {float(rule_at(split['test'], 'vote', 8)[0].mean()):.3f} "
          f"at {vote8:.0f} sampled tokens")
    for n in (8, 16):  # where probe_vote departs from vote and confidence_vote, and who is right
        pv = rule_at(split["test"], "probe_vote", n)[0]
        for other in ("vote", "confidence_vote"):
            o = rule_at(split["test"], other, n)[0]
            print(f"N={n}: probe_vote right where {other} is wrong on {int(((pv == 1) & (o == 0)).sum())} test questions, "
                  f"wrong where it is right on {int(((pv == 0) & (o == 1)).sum())}")
    for kind, thresholds in STATISTICS.items():
        for probe in probes:
            for pick in ("probe_vote", "vote"):
                ok = [(tokens, w, th) for w in (1, 2, 4) for th in thresholds
                      for acc, tokens in [run(split["val"], kind, th, w, probe, pick)] if acc >= target - 1e-9]
                if not ok:
                    print(f"{kind:8s} {probe:8s} {pick:10s} none within 1 point on validation")
                    continue
                _, wave, th = min(ok)
                acc, tokens = run(split["test"], kind, th, wave, probe, pick)
                print(f"{kind:8s} {probe:8s} {pick:10s} wave {wave} threshold {th}: test accuracy {acc:.3f}, "
                      f"sampled tokens {tokens / vote8:.2f}x vote@8's")


if __name__ == "__main__":
    main()
