"""How stable is "only slow mode gets this right" for one question? Reruns of the difficulty test split.

    python -m reports.experiments.label_stability     # ~10 min on 2 cores; needs bash scripts/setup_qwen.sh and the cached captures

The bar asks a router to pick nearly every question's mode right. This reruns the 120 test questions of
configs/difficulty.yaml in both modes under two perturbations that leave the task unchanged and compares the
outcomes with the captured ones:
- ``batch 8``: the same prompts, greedy, in batches of 8 instead of 32 (bf16 numerics change with batch
  composition, so greedy answers can flip);
- ``paraphrase``: the same questions under reworded fast and slow instructions.
Its "rerun router" sends a question to slow mode when the rerun says only slow mode gets it right, and is scored on
the captured outcomes like every router in docs/difficulty.md: it knows how the model fares on that very question,
up to the perturbation. If it misses the bar, no probe of the question can be expected to meet it.
"""

import argparse
import dataclasses

import torch

from kvprobe import fit, routing
from kvprobe.models import load_model
from kvprobe.prompts import MODES
from kvprobe.tasks import load_items
from reports.common import answer_and_grade, split_columns

# Reworded, same demands. (A looser slow instruction, "Work it out step by step. End with a line 'Answer: <answer>'.",
# made the model skip the reasoning on most questions: that changes the mode, not the wording.)
PARAPHRASE = {"fast": "Respond with just the final answer and no explanation.",
              "slow": "Reason step by step, then give the final answer on the last line as 'Answer: <answer>'."}


def rerun(dm, lm, items, batch_size: int, instructions: dict[str, str]) -> routing.Outcomes:
    gen = dataclasses.replace(dm.capture.generation, batch_size=batch_size)
    cols = {mode: answer_and_grade(lm, items, dataclasses.replace(dm.mode_prompt(mode), **instructions), gen) for mode in MODES}
    return routing.Outcomes(*(torch.tensor(cols[mode][k]) for k in (0, 1) for mode in MODES))


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m reports.experiments.label_stability", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    cli = fit.make_cli(["--config", "configs/difficulty.yaml", "--trainer.logger", "false"])
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup()
    captured, rows = split_columns(dm, "test")
    by_qid = {item.qid: item for item in load_items(dm.capture.task)}
    items = [by_qid[row["qid"]] for row in rows]
    lm = load_model(dm.capture.model)
    oracle = captured.route(captured.oracle())
    slow_tokens, (bar, budget) = float(captured.slow_tokens.mean()), captured.bar()
    print(f"captured: fast {captured.fast_correct.mean():.3f}, slow {captured.slow_correct.mean():.3f} @ {slow_tokens:.1f} tok; "
          f"bar: >= {bar:.3f} at <= {budget:.1f} tok; oracle {oracle['accuracy']:.3f} @ {oracle['mean_tokens']:.1f} tok", flush=True)
    for name, (batch_size, instructions) in {"batch 8": (8, {}), "paraphrase": (32, PARAPHRASE)}.items():
        again = rerun(dm, lm, items, batch_size, instructions)
        flips = {m: int((getattr(again, f"{m}_correct") != getattr(captured, f"{m}_correct")).sum()) for m in MODES}
        agree = float((again.slow_needed() == captured.slow_needed()).float().mean())
        r = captured.route(again.slow_needed())
        print(f"{name}: rerun fast {again.fast_correct.mean():.3f}, slow {again.slow_correct.mean():.3f}; grades flipped: "
              f"fast {flips['fast']}, slow {flips['slow']} of {len(items)}; 'slow needed' agrees on {agree:.1%}; rerun router "
              f"{r['accuracy']:.3f} @ {r['mean_tokens']:.1f} tok ({r['mean_tokens'] / slow_tokens:.2f}x), meets bar: "
              f"{r['accuracy'] >= bar and r['mean_tokens'] <= budget}", flush=True)


if __name__ == "__main__":
    main()
