"""Would more training questions make the difficulty router meet the bar? A learning curve.

    python -m reports.experiments.difficulty_learning_curve   # ~10 min with the captures cached; needs bash scripts/setup_qwen.sh

Fits the default difficulty probe (configs/difficulty.yaml) on seeded subsets of 1/16, 1/8, 1/4, 1/2 and all of
its training questions (the mix's 360 plus the extra ones; two subsets of each size below all), with the same
validation split for epoch selection and calibration and the same 120 test questions, and prints per fit:
validation and test AUROC for "only slow mode gets this right" and the best calibrated router's test accuracy
within 0.5x always-slow's tokens. docs/difficulty.md reads the trend.

Then: what ranking quality would the bar need? Simulated probes on the same test questions: scores drawn as
``d * slow_needed + N(0, 1)`` (300 draws per separation ``d``), each given its best threshold on the test split
itself (an optimistic router: nothing real can pick its threshold on the questions it is scored on). Printed per
``d``: mean AUROC, mean best accuracy within 0.5x always-slow's tokens, and the share of draws that meet the bar.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc

from kvprobe import fit
from reports.common import quiet_cli, split_columns

FRACTIONS = (1 / 16, 1 / 8, 0.25, 0.5, 1.0)
SEEDS = (0, 1)

def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m reports.experiments.difficulty_learning_curve", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for fraction in FRACTIONS:
            for seed in SEEDS if fraction < 1 else SEEDS[:1]:
                out = Path(tmp) / f"f{fraction:.4f}-s{seed}"
                cli = quiet_cli(["--config", "configs/difficulty.yaml"], out)
                dm = cli.datamodule
                dm.prepare_data()
                dm.setup()
                train = dm.datasets["train"]
                keep = torch.randperm(len(train.indices), generator=torch.Generator().manual_seed(seed))
                train.indices = [train.indices[i] for i in sorted(keep[: round(fraction * len(train.indices))].tolist())]
                results = fit.run(cli, out)
                test = results["test"]
                bar = test.get("router_best_at_0.5x_slow", {})
                print(f"[curve] train questions {len(train.indices)} (subset seed {seed}): val AUROC "
                      f"{results['calibration']['val']['auroc']:.3f}, test AUROC {test['score_vs_slow_needed']['auroc']:.3f}, "
                      f"best_at_0.5x_slow {bar.get('accuracy', float('nan')):.3f} @ {bar.get('mean_tokens', float('nan')):.1f} tok",
                      flush=True)

    outcomes, _ = split_columns(dm, "test")
    needed = outcomes.slow_needed().float()
    bar, budget = outcomes.bar()
    generator = torch.Generator().manual_seed(0)
    for d in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5):
        aurocs, accuracies = [], []
        for _ in range(300):
            scores = d * needed + torch.randn(len(needed), generator=generator)
            curve = outcomes.curve(scores)
            aurocs.append(float(binary_auroc(scores, needed.long())))
            accuracies.append(float(curve["accuracy"][curve["mean_tokens"] <= budget].max()))
        hits = sum(a >= bar - 1e-9 for a in accuracies) / len(accuracies)
        print(f"[simulated] d={d}: AUROC {sum(aurocs) / len(aurocs):.3f}, best accuracy within {budget:.1f} tok "
              f"{sum(accuracies) / len(accuracies):.3f} (bar {bar:.3f}), meets the bar in {hits:.0%} of draws", flush=True)


if __name__ == "__main__":
    main()
