"""The cost of one decode step against the rows in it, per dtype: how much a batch can buy on this machine.

    python benchmarks/decode_step.py                                     # SmolLM2, fp32 and bf16, 1-16 rows
    python benchmarks/decode_step.py --model <folder> --rows 1 2 --steps 2   # CI, reduced

Each dtype's model decodes ``--steps`` tokens (after three warm-up steps) from an 80-token prompt of random ids, for
each number of rows; one forward of one token per row per step, the cache growing as in a real decode. A server's
throughput at concurrency c over 1 is at most c x step(1) / step(c).

Prints one JSON line and writes it to benchmarks/results/decode_step.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kvprobe.models import ModelSpec, load_model

from common import emit


def step_seconds(lm, rows: int, prompt_tokens: int, steps: int) -> float:
    ids = torch.randint(100, min(1000, lm.model.config.vocab_size), (rows, prompt_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = lm.model(input_ids=ids, use_cache=True).past_key_values
        token = ids[:, -1:]
        for i in range(steps + 3):
            if i == 3:
                t0 = time.perf_counter()
            cache = lm.model(input_ids=token, past_key_values=cache, use_cache=True).past_key_values
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--prompt-tokens", type=int, default=80)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_step.json"))
    args = parser.parse_args(argv)

    figures = {"benchmark": "decode_step", "model": args.model, "prompt_tokens": args.prompt_tokens, "steps": args.steps}
    for dtype in args.dtypes:
        lm = load_model(ModelSpec(name=args.model, dtype=dtype))
        ms = {r: step_seconds(lm, r, args.prompt_tokens, args.steps) * 1000 for r in args.rows}
        figures[dtype] = {"step_ms": {r: round(v, 2) for r, v in ms.items()},
                          "step_over_1_row": {r: round(v / ms[args.rows[0]], 3) for r, v in ms.items()},
                          "max_throughput_over_1_row": {r: round(r * ms[args.rows[0]] / v, 2) for r, v in ms.items()}}
        del lm
    return emit(figures, args.out)


if __name__ == "__main__":
    main()
