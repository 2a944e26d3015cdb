"""Write ``docs/steering.md`` (and ``docs/steering.json``, ``docs/steering.png``): every policy live on the test split.

    python -m reports.steering            # the Qwen generator on configs/data/difficulty_mix.yaml's test questions

Runs ``kvprobe.evaluate`` (see its docstring for what is measured) and writes the table, the accuracy-vs-tokens
plot, the per-question records, and the switch probe's own offline figures beside the live ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvprobe.evaluate import evaluate, load_data, parser
from kvprobe.plots import pyplot
from kvprobe.steering import KVProbeGenerator
from reports.common import write_report


def main(argv: list[str] | None = None) -> dict:
    p = parser("python -m reports.steering", __doc__)
    p.set_defaults(out="docs/steering.md")
    args = p.parse_args(argv)
    gen = KVProbeGenerator.from_pretrained(args.generator)
    results = evaluate(gen, load_data(args.data), args.split, args.policies, args.limit, args.batch_size)
    n = next(iter(results.values()))["items"]
    out = Path(args.out)
    figure = out.with_name("steering.png")
    draw(results, n, args.split).savefig(figure, dpi=120)
    command = (f"python -m reports.steering --generator {args.generator} --data {args.data} --split {args.split}"
               + (f" --limit {args.limit}" if args.limit else "") + f" --batch_size {args.batch_size}")
    write_report(out, "\n".join(header(gen, args, n, command) + table(results) + ["", f"![accuracy vs tokens]({figure.name})", ""]
                                + switch_lines(gen)))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))  # per policy: figures, and every question's record
    return results


def header(gen: KVProbeGenerator, args, n: int, command: str) -> list[str]:
    s = gen.steering
    threshold = _number(gen, s.threshold)
    switch = (f"; route+switch: the switch probe reads the latest {gen.switch_window} positions of a slow answer every "
              f"{s.probe_every} token(s) from token {s.min_tokens}, arms above {s.switch_high} and switches slow->fast below "
              f"{s.switch_low:.4f} (calibrated on validation), answer cue {json.dumps(s.answer_cue)}" if gen.switch else "")
    return [
        "# Steering: live routing, switching and verifying with KVProbeGenerator", "",
        "Reproduce (the captures of `configs/data/difficulty_mix.yaml` give the split and the oracle's modes):", "",
        "```bash", command, "```", "",
        f"Base model `{gen.lm.spec.name}` ({gen.lm.spec.dtype}); {n} {args.split} questions the probes never trained on; greedy; "
        f"batches of {args.batch_size}. Route threshold `{s.threshold}` ({threshold:.4f}, calibrated on validation){switch}. "
        f"verify / route+verify: a fast answer whose escalation score ({'1 - P(correct)' if s.escalate_on == 'wrong' else '(1 - P(correct)) x P(slow right | fast wrong)'}) "
        f"is above {s.escalate_above:.4f} is answered again in slow mode; route+verify sends a question straight to slow above "
        f"route score {_number(gen, s.verify_route_threshold):.4f} (both calibrated jointly on validation for route+verify, "
        "the cascade report that made the shipped folder: checkpoints/README.md). "
        "Tokens count every decoded token of both modes and of both attempts; cue tokens are forced (fed, not decoded) and "
        "listed apart, as are prompt tokens. Confidence AUROC: the returned confidence (from the correctness probe of the "
        "mode each answer was written in) against the grades. "
        "The bar: accuracy >= best fixed mode - 1 point, <= 0.5x always-slow's tokens, probe time <= 1%.", "",
    ]


def _number(gen: KVProbeGenerator, threshold) -> float:
    """A route threshold as a number (a calibrated name looked up; None = the steering's threshold)."""
    threshold = gen.steering.threshold if threshold is None else threshold
    return threshold if isinstance(threshold, (int, float)) else gen.difficulty.thresholds[threshold]["threshold"]


def table(results: dict) -> list[str]:
    slow = results.get("slow", {}).get("mean_tokens")
    lines = ["| policy | accuracy | mean decoded tokens | tokens / always-slow | slow share | escalations | switches | "
             "confidence AUROC | cue tokens / q | prompt tokens / q (of which re-prompted) | probe time / wall | wall s | meets the bar |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for policy, r in results.items():
        ratio = f"{r['mean_tokens'] / slow:.2f}" if slow else "–"
        bar = {True: "**yes**", False: "no", None: "–"}[r.get("meets_bar")]
        lines.append(f"| {policy} | {r['accuracy']:.3f} | {r['mean_tokens']:.1f} | {ratio} | {r['slow_share']:.2f} | "
                     f"{r['escalations']} | {r['switches']} | {r['confidence_auroc']:.3f} | {r['mean_cue_tokens']:.2f} | "
                     f"{r['mean_prompt_tokens']:.1f} ({r['mean_reprompt_tokens']:.1f}) | {r['probe_share']:.2%} | "
                     f"{r['wall_seconds']:.0f} | {bar} |")
    return lines


def draw(results: dict, n: int, split: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for policy, r in results.items():
        ax.plot(r["mean_tokens"], r["accuracy"], "o", ms=8, label=policy)
    if "slow" in results:
        ax.axvline(0.5 * results["slow"]["mean_tokens"], color="grey", lw=0.7, ls="--", label="0.5x always-slow tokens")
    ax.set(xlabel="mean decoded tokens per question", ylabel="accuracy", title=f"live steering, {n} {split} questions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def switch_lines(gen: KVProbeGenerator) -> list[str]:
    """The switch probe's own offline figures (its export's test split), beside the live ones."""
    test = gen.switch.card.metrics.get("test") if gen.switch else None
    if not test:
        return []
    p, w = test["policy"], test["windows"]
    return [f"Switch probe offline (`kvprobe fit --config configs/switch.yaml`, its test split: every decode "
            f"position of {p['answers']:.0f} slow answers): AUROC {w['auroc']:.3f} for \"the result is written\"; the "
            f"calibrated policy replayed there cuts {p['cut_share']:.0%} of the answers, saves {p['saved_tokens']:.1f} of "
            f"{p['mean_tokens']:.1f} decoded tokens per answer, and cuts {p['lost_share']:.1%} of them (right ones) "
            "before their result was written.", ""]


if __name__ == "__main__":
    main()
