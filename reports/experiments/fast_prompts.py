"""Is the difficulty mix's weak fast mode our prompt's fault? Fast-mode prompt variants on Qwen2.5-Coder-0.5B.

    python -m reports.experiments.fast_prompts                      # ~1 min on 2 cores; needs bash scripts/setup_qwen.sh
    python -m reports.experiments.fast_prompts --dtype float32 --check_conversion   # ~3 min: the same in float32, and the
        # converted model's logits against transformers loading the GGUF itself (is our conversion the cause?)

The first 64 two-term questions of configs/data/difficulty_mix.yaml's first part (from all three splits; nothing is
tuned on the result: the shipped prompts stay as they are), answered directly under several instructions and system prompts, greedy,
batches of 32 as capture runs them; accuracy and mean decoded tokens per variant (docs/difficulty.md).
"""

import argparse

import torch

from kvprobe import assets
from kvprobe.capture import GenerationSpec
from kvprobe.models import ModelSpec, load_model
from kvprobe.prompts import PromptSpec, prompt_ids
from kvprobe.tasks import TaskSpec, load_items
from reports.common import answer_and_grade

VARIANTS = {
    "default ('Reply with only the final answer, no explanation.')": PromptSpec(mode="fast"),
    "'Answer with only the number.'": PromptSpec(mode="fast", fast="Answer with only the number."),
    "'Give the answer directly.'": PromptSpec(mode="fast", fast="Give the answer directly."),
    "'Compute it and reply with the result only.'": PromptSpec(mode="fast", fast="Compute it and reply with the result only."),
    "default, plain system prompt": PromptSpec(mode="fast", system="You are a helpful assistant."),
}

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reports.experiments.fast_prompts", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (as captured) or float32")
    parser.add_argument("--check_conversion", action="store_true", help="also compare logits with a direct GGUF load")
    args = parser.parse_args(argv)

    lm = load_model(ModelSpec(name="qwen2.5-coder-0.5b", dtype=args.dtype))
    params = {"n": 360, "seed": 1, "terms": 2, "digits": 2, "min_digits": 1, "operators": "+-*"}
    items = load_items(TaskSpec("arithmetic", params=params))[:64]
    for name, spec in VARIANTS.items():
        correct, tokens = answer_and_grade(lm, items, spec, GenerationSpec(batch_size=32))
        print(f"{name}: accuracy {sum(correct) / len(items):.3f}, {sum(tokens) / len(items):.1f} tokens", flush=True)

    if args.check_conversion:
        from transformers import AutoModelForCausalLM

        gguf = assets.EMBEDDED["qwen2.5-coder-0.5b"].gguf()
        direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=lm.model.dtype)
        ids = torch.tensor([prompt_ids(items[0], PromptSpec(mode="fast"), lm.tokenizer)])
        with torch.inference_mode():
            diff = (lm.model(ids).logits[0, -1] - direct(ids).logits[0, -1]).abs().max()
        print(f"converted folder vs transformers' own GGUF load: max |logit difference| {float(diff):.3g} on {items[0].question!r}")


if __name__ == "__main__":
    main()
