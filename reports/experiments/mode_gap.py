"""Does thinking step by step help this model on this task? Fast vs slow accuracy and tokens, per task.

    python -m reports.experiments.mode_gap --model qwen2.5-coder-0.5b --tasks arc_easy commonsense_qa --n 48   # ~5 min, 2 cores

Answers the first ``n`` questions of each task in both modes (the package's default prompts, greedy, batches of
``batch_size`` as capture runs them) and prints accuracy and mean decoded tokens per mode. A task where fast mode
is as good as slow is one a fast/slow router can answer cheaply; docs/difficulty.md uses it to discuss mixes.
"""

import argparse

from kvprobe.capture import GenerationSpec
from kvprobe.models import ModelSpec, load_model
from kvprobe.prompts import MODES, PromptSpec
from kvprobe.tasks import TaskSpec, load_items
from reports.common import answer_and_grade

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reports.experiments.mode_gap", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "commonsense_qa"])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=24)
    args = parser.parse_args(argv)

    lm = load_model(ModelSpec(name=args.model, dtype=args.dtype))
    gen = GenerationSpec(batch_size=args.batch_size)
    for task in args.tasks:
        items = load_items(TaskSpec(task))[: args.n]
        for mode in MODES:
            correct, tokens = answer_and_grade(lm, items, PromptSpec(mode=mode), gen)
            print(f"{task} {mode}: accuracy {sum(correct) / len(items):.3f}, {sum(tokens) / len(items):.1f} tokens "
                  f"({len(items)} questions)", flush=True)


if __name__ == "__main__":
    main()
