"""Is the difficulty mix's weak fast mode our prompt's fault? Fast-mode prompt variants on Qwen2.5-Coder-0.5B.

    python scripts/fast_prompts.py        # ~1 min on 2 cores; needs bash scripts/setup_qwen.sh

The first 64 two-term questions of configs/data/difficulty_mix.yaml's first part (from all three splits; nothing is
tuned on the result: the shipped prompts stay as they are), answered directly under several instructions and system prompts, greedy,
batches of 32 as capture runs them; accuracy and mean decoded tokens per variant (docs/difficulty.md).
"""

import torch

from kvprobe.capture import GenerationSpec, _generate_batch
from kvprobe.features import FeatureSpec
from kvprobe.models import ModelSpec, load_model
from kvprobe.prompts import PromptSpec, prompt_ids
from kvprobe.tasks import TaskSpec, grade, load_items

VARIANTS = {
    "default ('Reply with only the final answer, no explanation.')": PromptSpec(mode="fast"),
    "'Answer with only the number.'": PromptSpec(mode="fast", fast="Answer with only the number."),
    "'Give the answer directly.'": PromptSpec(mode="fast", fast="Give the answer directly."),
    "'Compute it and reply with the result only.'": PromptSpec(mode="fast", fast="Compute it and reply with the result only."),
    "default, plain system prompt": PromptSpec(mode="fast", system="You are a helpful assistant."),
}

lm = load_model(ModelSpec(name="qwen2.5-coder-0.5b", dtype="bfloat16"))
params = {"n": 360, "seed": 1, "terms": 2, "digits": 2, "min_digits": 1, "operators": "+-*"}
items = load_items(TaskSpec("arithmetic", params=params))[:64]
for name, spec in VARIANTS.items():
    ids = [prompt_ids(item, spec, lm.tokenizer) for item in items]
    right = tokens = 0
    for start in range(0, len(ids), 32):
        with torch.inference_mode():
            _, new, lengths, _, _, _ = _generate_batch(lm, ids[start:start + 32], GenerationSpec(), 32, FeatureSpec())
        for b, item in enumerate(items[start:start + 32]):
            right += grade(item, lm.tokenizer.decode(new[b, :int(lengths[b])], skip_special_tokens=True))[1]
            tokens += int(lengths[b])
    print(f"{name}: accuracy {right / len(items):.3f}, {tokens / len(items):.1f} tokens", flush=True)
