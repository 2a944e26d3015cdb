"""Write ``docs/difficulty.md``: offline fast/slow routing on held-out questions, from captured answers of both modes.

    python -m reports.difficulty          # captures if needed (~45-50 min once), then ~5 min of probe training

Trains the difficulty probe of ``configs/difficulty.yaml`` with each objective and a few design-space variants
(same data, same split), picks the objective by validation routing gain, and reports on the test split: accuracy
and mean decoded tokens of always-fast, always-slow, the oracle, the probe's router at each calibrated budget, a
random router at the same slow share, and a trivial router on prompt length, with the accuracy-vs-tokens curve.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from kvprobe import routing
from reports.common import quiet_fit, split_columns, write_report

OBJECTIVES = ("bce", "regression", "ce")
VARIANTS = {  # design-space points beside the objectives, each with the chosen objective
    "last 8 prompt positions": ["--model.init_args.window", "8"],
    "last 16 prompt positions": ["--model.init_args.window", "16"],
    "last 32 prompt positions": ["--model.init_args.window", "32"],
    "K only": ["--model.init_args.kv", "k"],
    "V only": ["--model.init_args.kv", "v"],
    "last 8 layers": ["--model.init_args.layers", "8"],
    "last position only": ["--model.init_args.position_pool", "last"],
    "L2 per layer, layers averaged": ["--model.init_args.l2_norm", "true", "--model.init_args.layer_pool", "mean"],
    "linear head": ["--model.init_args.head", "linear"],
}


def fmt_row(name: str, r: dict, slow_tokens: float) -> str:
    verdicts = ("yes" if r["dominates_slow"] else "no", "**yes**" if r["meets_bar"] else "no") if "meets_bar" in r else ("", "")
    return (f"| {name} | {r['accuracy']:.3f} | {r['mean_tokens']:.1f} | {r['mean_tokens'] / slow_tokens:.2f} | "
            f"{r['slow_share']:.2f} | {verdicts[0]} | {verdicts[1]} |")


def describe(task: dict) -> str:
    """A task spec in words: the parts of a mix of arithmetic tasks, else the task's name."""
    parts = task["params"].get("parts") if task["name"] == "mix" else [task]
    words = []
    for part in parts or []:
        p = part.get("params", {})
        if part["name"] != "arithmetic":
            words.append(part["name"])
            continue
        digits = f"{p.get('min_digits')}-{p.get('digits', 1)} digit operands" if p.get("min_digits") else f"operands 1-{10 ** p.get('digits', 1) - 1}"
        words.append(f"{p.get('n')} with {p.get('terms', 2)} terms ({digits}, operators {p.get('operators', '+-*')})")
    return "; ".join(words) or task["name"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reports.difficulty", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/difficulty.yaml")
    parser.add_argument("--out", default="docs/difficulty.md")
    parser.add_argument("--probes", default="runs/report", help="where the report's probes are exported")
    args = parser.parse_args(argv)
    root = Path(args.probes)

    runs = {}
    for objective in OBJECTIVES:
        runs[objective] = quiet_fit(["--config", args.config, "--model.init_args.objective", objective], root / f"difficulty-{objective}")
    chosen = max(OBJECTIVES, key=lambda o: runs[o][0]["val_select"])
    for name, extra in VARIANTS.items():
        runs[name] = quiet_fit(["--config", args.config, "--model.init_args.objective", chosen, *extra],
                               root / f"difficulty-{name.replace(' ', '_').replace(',', '')}")
    results, cli = runs[chosen]
    dm, probe = cli.datamodule, cli.model
    spec = dm.export_spec()
    test, test_rows = split_columns(dm, "test")
    val, val_rows = split_columns(dm, "val")

    # a trivial router any report must show: longer prompt = harder question. Prompt lengths tie a lot; a seeded
    # jitter under one token breaks ties at random (never reorders different lengths), so every share is reachable.
    def prompt_length(rows: list[dict], seed: int) -> torch.Tensor:
        jitter = torch.rand(len(rows), generator=torch.Generator().manual_seed(seed)) * 0.5
        return torch.tensor([float(r["prompt_tokens"]) for r in rows]) + jitter

    length_val, length_test = prompt_length(val_rows, 1), prompt_length(test_rows, 2)
    budgets = routing.BudgetSpec(probe.budgets.slow_share, probe.budgets.mean_tokens, probe.budgets.token_ratio, paper=[])
    length_rows = routing.evaluate(length_test, test, routing.calibrate(length_val, val, budgets))
    rows = results["test"]
    slow_tokens = rows["always_slow"]["mean_tokens"]

    table = ["| policy | accuracy | mean decoded tokens | tokens / always-slow | slow share | dominates always-slow | meets the bar |",
             "|---|---|---|---|---|---|---|"]
    for name in ("always_fast", "always_slow", "oracle"):
        table.append(fmt_row(name.replace("_", "-"), rows[name], slow_tokens))
    for name in rows:
        if name.startswith("router_"):
            budget = name.removeprefix("router_")
            table.append(fmt_row(f"probe router, {budget}", rows[name], slow_tokens))
            table.append(fmt_row("random router, same slow share", rows[f"random_{budget}"], slow_tokens))
            if name in length_rows:  # the paper's raw thresholds mean nothing on a token count
                table.append(fmt_row(f"prompt-length router, {budget}", length_rows[name], slow_tokens))

    objectives = ["| probe | objective | val routing gain | val AUROC (slow needed) | test routing gain | test AUROC (slow needed) | test acc @ best_at_0.5x_slow | tokens |",
                  "|---|---|---|---|---|---|---|---|"]
    for name, (res, run_cli) in runs.items():
        t = res["test"]
        best = t.get("router_best_at_0.5x_slow", {})
        objective = run_cli.model.hparams.objective
        label = name if name in OBJECTIVES else f"{name} ({chosen})"
        objectives.append(
            f"| {label}{' **(default)**' if name == chosen else ''} | {objective} | {res['val_select']:.4f} | "
            f"{res['calibration']['val']['auroc']:.3f} | {t['score_vs_slow_needed']['route_gain']:.4f} | "
            f"{t['score_vs_slow_needed']['auroc']:.3f} | {best.get('accuracy', float('nan')):.3f} | {best.get('mean_tokens', float('nan')):.1f} |"
        )

    # per task family: where the router sends what
    groups = defaultdict(list)
    for j, r in enumerate(test_rows):
        groups[r["qid"].rsplit("/", 1)[0]].append(j)
    slow_at = probe.test_outputs["score"] > probe.thresholds["best_at_0.5x_slow"]["threshold"]
    parts = ["| questions | n | always-fast acc | always-slow acc | probe sends to slow (best_at_0.5x_slow) | router acc |",
             "|---|---|---|---|---|---|"]
    for group, js in groups.items():
        js = torch.tensor(js)
        sub = routing.Outcomes(test.fast_correct[js], test.slow_correct[js], test.fast_tokens[js], test.slow_tokens[js])
        routed = sub.route(slow_at[js])
        parts.append(f"| `{group}` | {len(js)} | {float(sub.fast_correct.mean()):.3f} | {float(sub.slow_correct.mean()):.3f} | "
                     f"{routed['slow_share']:.2f} | {routed['accuracy']:.3f} |")

    figure = Path(args.out).with_name("difficulty_routing.png")
    fig = routing.routing_figure(
        {"difficulty probe": test.curve(probe.test_outputs["score"]), "prompt length (trivial)": test.curve(length_test)},
        rows, f"{spec['model']['name']}: routing on {len(test)} test questions")
    fig.savefig(figure, dpi=120)

    counts = spec["difficulty"]["label_counts"]
    extra = spec["difficulty"].get("extra_train")
    n_task = len(dm.outcomes["label"]) - (extra["captured"] if extra else 0)
    more = (f" Training also uses {extra['used']} extra questions ({describe(extra['task'])}), answered the same way "
            f"({extra['captured'] - extra['used']} more were left out: the task has the same question)." if extra else "")
    header = [
        "# Difficulty: routing between fast and slow mode from the prompt's KV cache", "",
        "Regenerate everything below (captures are cached; the first capture of both modes takes ~45-50 min on 2 cores):", "",
        "```bash", "bash scripts/setup_qwen.sh            # the optional second model, once",
        "python -m reports.difficulty", "```", "",
        f"Model `{spec['model']['name']}` ({spec['model']['dtype']}), task `{spec['task']['name']}` "
        f"({n_task} questions: {describe(spec['task'])}), each answered "
        f"in both modes with greedy decoding (fast cap {spec['generation']['max_new_tokens']['fast']} tokens, slow cap "
        f"{spec['generation']['max_new_tokens']['slow']}).{more} Labels (short_tokens={spec['difficulty']['short_tokens']}"
        f"{', every captured question' if extra else ''}): "
        + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ". Question-level split: train "
        f"{len(dm.datasets['train'])}, validation {len(dm.datasets['val'])}, test {len(dm.datasets['test'])}; "
        "the probe is trained on train, its epoch and every threshold chosen on validation; test is touched once.", "",
        "Costs count every decoded token of the chosen mode (prompt tokens are not counted; the fast prompt is "
        "prefilled either way, since the probe reads its KV). The random router's row is its exact expectation.", "",
        "## Routing on the test split", "", f"Default probe: objective `{chosen}`. ![routing]({figure.name})", "",
    ]
    text = "\n".join(
        header + table + ["", "## Objectives and design-space variants (same split; the default objective is chosen "
                          "by validation routing gain: mean accuracy over a random router across every slow share)", ""]
        + objectives + ["", "## Where the router sends each kind of question (test split)", ""] + parts
    ) + "\n"
    write_report(args.out, text)


if __name__ == "__main__":
    main()
