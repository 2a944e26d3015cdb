"""How stable is "only slow mode gets this right" for one question? Reruns of the difficulty test split.

    python scripts/label_stability.py     # ~10 min on 2 cores; needs bash scripts/setup_qwen.sh and the cached captures

Issue 4's bar asks a router to pick nearly every question's mode right. This reruns the 120 test questions of
configs/difficulty.yaml in both modes under two perturbations that leave the task unchanged and compares the
outcomes with the captured ones:
- ``batch 8``: the same prompts, greedy, in batches of 8 instead of 32 (bf16 numerics change with batch
  composition, so greedy answers can flip);
- ``paraphrase``: the same questions under reworded fast and slow instructions.
Its "rerun router" sends a question to slow mode when the rerun says only slow mode gets it right, and is scored on
the captured outcomes like every router in docs/difficulty.md: it knows how the model fares on that very question,
up to the perturbation. If it misses the bar, no probe of the question can be expected to meet it.
"""

import dataclasses

import torch

from kvprobe import fit, routing
from kvprobe.capture import _generate_batch
from kvprobe.features import FeatureSpec
from kvprobe.models import load_model
from kvprobe.prompts import MODES, prompt_ids
from kvprobe.tasks import grade, load_items

# Reworded, same demands. (A looser slow instruction, "Work it out step by step. End with a line 'Answer: <answer>'.",
# made the model skip the reasoning on most questions: that changes the mode, not the wording.)
PARAPHRASE = {"fast": "Respond with just the final answer and no explanation.",
              "slow": "Reason step by step, then give the final answer on the last line as 'Answer: <answer>'."}

cli = fit.make_cli(["--config", "configs/difficulty.yaml", "--trainer.logger", "false"])
dm = cli.datamodule
dm.prepare_data()
dm.setup()
test = dm.datasets["test"]
idx = torch.tensor(test.indices)
captured = routing.Outcomes(*(dm.outcomes[k][idx] for k in ("fast_correct", "slow_correct", "fast_tokens", "slow_tokens")))
by_qid = {item.qid: item for item in load_items(dm.task)}
items = [by_qid[test.rows[i]["qid"]] for i in test.indices]
lm = load_model(dm.model_spec)


def rerun(batch_size: int, instructions: dict[str, str]) -> routing.Outcomes:
    cols = {}
    for mode in MODES:
        spec = dataclasses.replace(dm.mode_prompt(mode), **instructions)
        ids = [prompt_ids(item, spec, lm.tokenizer) for item in items]
        correct, tokens = [], []
        for start in range(0, len(ids), batch_size):
            with torch.inference_mode():
                _, new, lengths, *_ = _generate_batch(lm, ids[start:start + batch_size], dm.generation,
                                                      dm.generation.max_new_tokens[mode], FeatureSpec())
            for b, item in enumerate(items[start:start + batch_size]):
                correct.append(float(grade(item, lm.tokenizer.decode(new[b, :int(lengths[b])], skip_special_tokens=True))[1]))
                tokens.append(float(lengths[b]))
        cols[mode] = (torch.tensor(correct), torch.tensor(tokens))
    return routing.Outcomes(cols["fast"][0], cols["slow"][0], cols["fast"][1], cols["slow"][1])


def needed(o: routing.Outcomes) -> torch.Tensor:
    return (o.slow_correct == 1) & (o.fast_correct == 0)


oracle = captured.route(captured.oracle())
slow_tokens, bar = float(captured.slow_tokens.mean()), max(float(captured.fast_correct.mean()), float(captured.slow_correct.mean())) - 0.01
print(f"captured: fast {captured.fast_correct.mean():.3f}, slow {captured.slow_correct.mean():.3f} @ {slow_tokens:.1f} tok; "
      f"bar: >= {bar:.3f} at <= {0.5 * slow_tokens:.1f} tok; oracle {oracle['accuracy']:.3f} @ {oracle['mean_tokens']:.1f} tok", flush=True)
for name, (batch_size, instructions) in {"batch 8": (8, {}), "paraphrase": (32, PARAPHRASE)}.items():
    again = rerun(batch_size, instructions)
    flips = {m: int((getattr(again, f"{m}_correct") != getattr(captured, f"{m}_correct")).sum()) for m in MODES}
    agree = float((needed(again) == needed(captured)).float().mean())
    r = captured.route(needed(again))
    print(f"{name}: rerun fast {again.fast_correct.mean():.3f}, slow {again.slow_correct.mean():.3f}; grades flipped: "
          f"fast {flips['fast']}, slow {flips['slow']} of {len(items)}; 'slow needed' agrees on {agree:.1%}; rerun router "
          f"{r['accuracy']:.3f} @ {r['mean_tokens']:.1f} tok ({r['mean_tokens'] / slow_tokens:.2f}x), meets bar: "
          f"{r['accuracy'] >= bar and r['mean_tokens'] <= 0.5 * slow_tokens}", flush=True)
