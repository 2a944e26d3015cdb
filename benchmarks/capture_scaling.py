"""Capture scaling: time against number of items and against response length, and 2 processes against 1.

    python benchmarks/capture_scaling.py                     # SmolLM2: 16/32/64 items; 16/32/64 new tokens; 1 vs 2 processes
    python benchmarks/capture_scaling.py --model <folder> --items 4 8 --lengths 4 8 --parallel-items 8   # CI, reduced

Every capture runs into a fresh temporary folder (no reuse). Items: the first n of the same seeded arithmetic
questions, fixed answer cap. Length: the same questions under rising caps (step-by-step answers run into the cap,
so the mean answer length follows it; the figure reports the measured mean). Data-parallel: the capture CLI with ``--devices 2`` (two CPU processes, gloo) against one
process on the same items, and whether both stored the same tensors.

Prints one JSON line and writes it to benchmarks/results/capture_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvprobe.capture import CaptureSpec, GenerationSpec, capture
from kvprobe.features import FeatureSpec
from kvprobe.models import ModelSpec, load_model
from kvprobe.prompts import PromptSpec
from kvprobe.store import CaptureStore
from kvprobe.tasks import TaskSpec

from common import emit


def timed(lm, task: TaskSpec, gen: GenerationSpec) -> tuple[float, float]:
    """(seconds, mean generated tokens per answer) of a capture into a fresh folder."""
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        result = capture(CaptureSpec(task=task, prompt=PromptSpec(mode="slow"), generation=gen, features=FeatureSpec()), root, loaded=lm, verbose=False)
        return time.perf_counter() - t0, result.summary["mean_gen_tokens"]


def fit_line(xs: list[float], ys: list[float]) -> dict:
    """Least-squares y = a + b x and the worst relative deviation from it (linear growth keeps it small)."""
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    b = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    a = float(y.mean() - b * x.mean())
    worst = float(((a + b * x - y).abs() / y).max())
    return {"intercept_s": round(a, 3), "seconds_per_unit": round(b, 4), "max_relative_deviation": round(worst, 3)}


def cli_capture(model: str, n: int, devices: int, root: str, batch: int, max_new: int) -> float:
    cmd = [sys.executable, "-m", "kvprobe.capture", "--capture.model.name", model, "--capture.task.params", json.dumps({"n": n, "seed": 13}),
           "--capture.generation.max_new_tokens", json.dumps({"fast": max_new, "slow": max_new}), "--capture.generation.batch_size", str(batch),
           "--capture.generation.shard_size", str(max(1, n // 4)), "--cache_dir", root, "--devices", str(devices)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--items", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--parallel-items", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "capture_scaling.json"))
    args = parser.parse_args(argv)

    lm = load_model(ModelSpec(name=args.model))
    timed(lm, TaskSpec("arithmetic", params={"n": args.batch_size, "seed": 12}), GenerationSpec(max_new_tokens={"fast": 4, "slow": 4},
                                                                                          batch_size=args.batch_size))  # warm-up
    by_items = []
    for n in args.items:
        gen = GenerationSpec(max_new_tokens={"fast": 32, "slow": 32}, batch_size=args.batch_size, shard_size=n)
        seconds, tokens = timed(lm, TaskSpec("arithmetic", limit=n, params={"n": max(args.items), "seed": 12}), gen)
        by_items.append({"items": n, "seconds": round(seconds, 3), "mean_tokens": tokens})
    by_length = []
    for cap in args.lengths:
        gen = GenerationSpec(max_new_tokens={"fast": cap, "slow": cap}, batch_size=args.batch_size, shard_size=args.batch_size * 2)
        seconds, tokens = timed(lm, TaskSpec("arithmetic", params={"n": args.batch_size * 2, "seed": 12}), gen)
        by_length.append({"cap": cap, "mean_tokens": tokens, "seconds": round(seconds, 3)})

    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        t1 = cli_capture(args.model, args.parallel_items, 1, one, args.batch_size, 32)
        t2 = cli_capture(args.model, args.parallel_items, 2, two, args.batch_size, 32)
        (a,), (b,) = list(Path(one).iterdir()), list(Path(two).iterdir())
        sa, _ = CaptureStore(a).open()
        sb, _ = CaptureStore(b).open()
        diff = max(float((x[k].float() - y[k].float()).abs().max()) for x, y in zip(sa, sb) for k in x)
        same = a.name == b.name
    figures = {
        "benchmark": "capture_scaling", "model": args.model, "batch_size": args.batch_size,
        "by_items": by_items, "items_fit": fit_line([r["items"] for r in by_items], [r["seconds"] for r in by_items]),
        "by_length": by_length, "length_fit": fit_line([r["mean_tokens"] for r in by_length], [r["seconds"] for r in by_length]),
        "parallel_items": args.parallel_items, "one_process_s": round(t1, 3), "two_processes_s": round(t2, 3),
        "speedup_two_over_one": round(t1 / t2, 3), "same_capture": same,
        "max_abs_tensor_difference": diff,
    }
    return emit(figures, args.out)


if __name__ == "__main__":
    main()
