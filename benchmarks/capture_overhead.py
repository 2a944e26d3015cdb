"""Capture overhead: plain ``generate`` vs kvprobe capture vs capture through hidden states, same items, one run.

    python benchmarks/capture_overhead.py                       # SmolLM2, 32 arithmetic items, batch 16
    python benchmarks/capture_overhead.py --model <folder> --n 8 # any model; CI runs it reduced on a tiny one

Prints one JSON line and writes it to benchmarks/results/capture_overhead.json. kvprobe capture = generate + KV
features + grading + writing shards; the hidden-state route adds ``output_hidden_states=True`` and pools them.
Every route runs ``--repeats`` times, interleaved, so drift on a shared machine hits all of them; medians are
reported, with each round's kvprobe/plain ratio. Plain generate makes the same ``generate`` call capture makes
(``models.last_logits_only``); the same call with transformers' defaults runs in every round too and is reported
beside it (on CPU its strided last-position slice slows the prefill).
Peak memory: each route runs once more in a fresh process of its own, which loads the model and the libraries
capture uses (math-verify for grading, pyarrow and safetensors for shards; their resident size is reported apart, as
``capture_libraries_rss_bytes``, and added back in ``capture_peak_with_libraries_over_generate``), then resets its
peak resident set (Linux ``clear_refs``) and reports the peak of the route's work (weights included, the same for
every route), so neither the load nor another route's allocations can hide a difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvprobe.capture import CaptureSpec, GenerationSpec, capture
from kvprobe.features import FeatureSpec
from kvprobe.models import ModelSpec, last_logits_only, load_model
from kvprobe.prompts import PromptSpec, prompt_ids
from kvprobe.tasks import TaskSpec, load_items

from common import emit, peak_rss, reset_peak_rss, rss


ROUTES = ("plain", "kvprobe", "hidden")




def load_capture_libraries() -> None:
    """Import and first-call what capture needs beyond the model: math-verify (grading), a Parquet table and a
    safetensors file written once (pyarrow's first Parquet write maps ~20 MB of library code and allocates ~30 MB
    of its own state, once per process, however many items follow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from kvprobe.tasks import grade_math

    grade_math("Answer: 4", "4")
    with tempfile.TemporaryDirectory() as folder:
        pq.write_table(pa.Table.from_pylist([{"qid": "q", "correct": True}]), Path(folder) / "t.parquet")
        save_file({"x": torch.zeros(2)}, str(Path(folder) / "t.safetensors"))


def plain_generate(lm, ids: list[list[int]], batch_size: int, max_new: int, defaults: bool = False) -> float:
    """Seconds of ``generate`` over ``ids`` in capture's batches; the same call as capture (contiguous last-position
    logits) unless ``defaults``: transformers' own ``logits_to_keep=1``."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                              eos_token_id=lm.model.generation_config.eos_token_id)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # the batching capture uses
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            batch = [ids[i] for i in order[s : s + batch_size]]
            width = max(map(len, batch))
            input_ids = torch.tensor([[lm.tokenizer.pad_token_id] * (width - len(x)) + x for x in batch])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
            lm.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                              **({} if defaults else last_logits_only(lm.model)))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds of every route (medians reported)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "capture_overhead.json"))
    parser.add_argument("--route", choices=ROUTES, help=argparse.SUPPRESS)  # internal: one route, report peak memory
    args = parser.parse_args(argv)

    lm = load_model(ModelSpec(name=args.model, dtype=args.dtype))
    task = TaskSpec("arithmetic", params={"n": args.n, "seed": 11})
    prompt = PromptSpec(mode="slow")
    gen = GenerationSpec(max_new_tokens={"fast": args.max_new_tokens, "slow": args.max_new_tokens},
                         batch_size=args.batch_size, shard_size=args.n)
    ids = [prompt_ids(item, prompt, lm.tokenizer) for item in load_items(task)]
    plain_generate(lm, ids[: args.batch_size], args.batch_size, 4)  # warm-up: first-call kernel set-up

    if args.route:  # a child process: run one route, print its peak resident set
        # every route's process first loads the libraries capture uses (grading, shard files), so the peak compares
        # the work; the one-time cost of loading them is reported on its own
        before_libs = rss()
        load_capture_libraries()
        libraries = rss() - before_libs
        reset_peak_rss()  # the model load peaks higher than any route: measure from here on
        if args.route == "plain":
            plain_generate(lm, ids, args.batch_size, args.max_new_tokens)
        else:
            with tempfile.TemporaryDirectory() as root:
                capture(CaptureSpec(task=task, prompt=prompt, generation=gen, features=FeatureSpec(hidden_states=args.route == "hidden")),
                        root, loaded=lm, verbose=False)
        peak = {"peak_rss_bytes": peak_rss(), "library_rss_bytes": libraries}
        print(json.dumps(peak))
        return peak

    def timed_capture(features: FeatureSpec) -> tuple[float, int]:
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            result = capture(CaptureSpec(task=task, prompt=prompt, generation=gen, features=features), root, loaded=lm, verbose=False)
            return time.perf_counter() - t0, result.summary["bytes_on_disk"]

    # interleaved repeats: drift on a shared machine hits every route alike; medians, and the spread of the ratio
    times = {"plain": [], "kvprobe": [], "hidden": [], "defaults": []}
    for _ in range(args.repeats):
        times["plain"].append(plain_generate(lm, ids, args.batch_size, args.max_new_tokens))
        kv_s, kv_bytes = timed_capture(FeatureSpec(hidden_states=False))
        times["kvprobe"].append(kv_s)
        hs_s, hs_bytes = timed_capture(FeatureSpec(hidden_states=True))
        times["hidden"].append(hs_s)
        times["defaults"].append(plain_generate(lm, ids, args.batch_size, args.max_new_tokens, defaults=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [k / p for k, p in zip(times["kvprobe"], times["plain"])]
    own = [a for a in (argv if argv is not None else sys.argv[1:])]
    child = {route: json.loads(subprocess.run([sys.executable, __file__, *own, "--route", route], capture_output=True, text=True,
                                              check=True).stdout.strip().splitlines()[-1]) for route in ROUTES}
    peak = {route: c["peak_rss_bytes"] for route, c in child.items()}
    figures = {
        "benchmark": "capture_overhead", "model": args.model, "dtype": args.dtype, "items": args.n,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "plain_generate_s": round(med["plain"], 3), "plain_generate_transformers_defaults_s": round(med["defaults"], 3),
        "defaults_over_contiguous_last_logits": round(med["defaults"] / med["plain"], 4),
        "kvprobe_capture_s": round(med["kvprobe"], 3), "hidden_state_capture_s": round(med["hidden"], 3),
        "capture_over_generate": round(med["kvprobe"] / med["plain"], 4),
        "capture_over_generate_per_repeat": [round(r, 4) for r in ratios],
        "hidden_capture_over_generate": round(med["hidden"] / med["plain"], 4),
        "kvprobe_bytes_on_disk": kv_bytes, "hidden_state_bytes_on_disk": hs_bytes,
        "plain_peak_rss_bytes": peak["plain"], "kvprobe_peak_rss_bytes": peak["kvprobe"], "hidden_peak_rss_bytes": peak["hidden"],
        "capture_peak_over_generate": round(peak["kvprobe"] / peak["plain"], 4),
        "capture_libraries_rss_bytes": child["kvprobe"]["library_rss_bytes"],
        "capture_peak_with_libraries_over_generate": round((peak["kvprobe"] + child["kvprobe"]["library_rss_bytes"]) / peak["plain"], 4),
        "hidden_peak_over_generate": round(peak["hidden"] / peak["plain"], 4),
    }
    return emit(figures, args.out)


if __name__ == "__main__":
    main()
