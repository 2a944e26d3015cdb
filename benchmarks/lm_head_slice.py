"""The prefill's vocabulary projection: transformers' strided last-position slice vs a contiguous index, one run.

    python benchmarks/lm_head_slice.py                                  # Qwen2.5-Coder-0.5B bf16 (optional extra)
    python benchmarks/lm_head_slice.py --model smollm2 --dtype float32  # the embedded model
    python benchmarks/lm_head_slice.py --model <folder> --rows 2        # CI, reduced

``generate`` asks for the last position's logits with ``logits_to_keep=1``, a strided view of the prompt's hidden
states; kvprobe passes ``models.last_logits_only`` (a 1-D index, which copies the rows). This times the model's own
``lm_head`` on both inputs, and whole prefills with both keywords, on the same random prompts.

Prints one JSON line and writes it to benchmarks/results/lm_head_slice.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kvprobe.models import ModelSpec, last_logits_only, load_model

from common import emit


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lm_head_slice.json"))
    args = parser.parse_args(argv)

    lm = load_model(ModelSpec(name=args.model, dtype=args.dtype))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(1000, lm.model.config.vocab_size), (args.rows, args.prompt_tokens), generator=g)
    hidden = torch.randn(args.rows, args.prompt_tokens, lm.shape.hidden_size, generator=g).to(lm.model.dtype)
    head = lm.model.get_output_embeddings()
    with torch.inference_mode():
        strided = timed(lambda: head(hidden[:, -1:, :]), args.repeats)
        contiguous = timed(lambda: head(hidden[:, torch.tensor([-1]), :]), args.repeats)
        prefill_default = timed(lambda: lm.model(input_ids=ids, logits_to_keep=1), args.repeats)
        prefill_index = timed(lambda: lm.model(input_ids=ids, **last_logits_only(lm.model)), args.repeats)
        same = torch.equal(lm.model(input_ids=ids, logits_to_keep=1).logits.argmax(-1),
                           lm.model(input_ids=ids, **last_logits_only(lm.model)).logits.argmax(-1))
    figures = {
        "benchmark": "lm_head_slice", "model": args.model, "dtype": args.dtype, "rows": args.rows,
        "prompt_tokens": args.prompt_tokens, "lm_head_strided_slice_s": round(strided, 6),
        "lm_head_contiguous_index_s": round(contiguous, 6), "lm_head_ratio": round(strided / contiguous, 2),
        "prefill_logits_to_keep_1_s": round(prefill_default, 6), "prefill_last_logits_only_s": round(prefill_index, 6),
        "prefill_ratio": round(prefill_default / prefill_index, 2), "same_next_tokens": same,
    }
    return emit(figures, args.out)


if __name__ == "__main__":
    main()
