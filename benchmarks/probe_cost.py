"""Probe costs: a live difficulty probe call against a decode step, and probe training throughput, one run.

    python benchmarks/probe_cost.py                      # SmolLM2, batch 1, context ~300, 10k training items
    python benchmarks/probe_cost.py --model <folder> --train-items 512 --steps 4    # CI, reduced

1. Live: the time of one ``route+switch`` probe call (read the window from the cache with ``features.window_kv``,
   pool it, run the MLP: exactly what ``KVProbeGenerator`` does every token) as a share of one decode step of the
   same model on the same cache, for windows 4..32 and for all layers vs the last 8.
2. Training: examples per second of one epoch of each probe (correctness on pooled answer KV, difficulty on the
   prompt window) through a Lightning Trainer on CPU, at this model's shapes, with synthetic inputs of the stored
   dtypes; and the seconds a 10k-item epoch takes.

Prints one JSON line and writes it to benchmarks/results/probe_cost.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from kvprobe import features as F
from kvprobe.cache import cache_argument, layer_kv
from kvprobe.models import ModelSpec, load_model
from kvprobe.probes import CorrectnessProbe, DifficultyProbe

from common import emit


def live_cost(lm, windows: list[int], steps: int) -> list[dict]:
    from transformers import DynamicCache

    s = lm.shape
    ids = torch.randint(100, lm.model.config.vocab_size - 1, (1, 300), generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.inference_mode():
        cache = DynamicCache(config=lm.model.config)
        out = lm.model(input_ids=ids, use_cache=True, **cache_argument(lm.model, cache))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(steps):  # decode steps on a growing cache
            out = lm.model(input_ids=token, use_cache=True, **cache_argument(lm.model, cache))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        step = (time.perf_counter() - t0) / steps
        mask = torch.ones(1, cache.get_seq_length(), dtype=torch.long)
        for window in windows:
            for layers in sorted({s.layers, min(8, s.layers)}, reverse=True):
                dim = layers * 2 * s.kv_heads * s.head_dim
                probe = DifficultyProbe(window=window, layers=layers, input_dim=dim).eval()
                ids_all = list(range(s.layers))
                t0 = time.perf_counter()
                for _ in range(steps):
                    pairs = layer_kv(cache)
                    w = F.window_kv(pairs, mask, window, ids_all).half().float()
                    probe.score(probe(probe.pooled_inputs(F.pool_positions(w, "mean"))))
                call = (time.perf_counter() - t0) / steps
                rows.append({"window": window, "layers": layers, "probe_ms": round(call * 1e3, 4),
                             "decode_step_ms": round(step * 1e3, 3), "probe_over_step": round(call / step, 5)})
    return rows


class Synthetic(Dataset):
    def __init__(self, n: int, shape: tuple, key: str, dtype: torch.dtype):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn((n,) + shape, generator=g).to(dtype)
        self.y = (torch.rand(n, generator=g) < 0.4).float()
        self.key = key

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        y = self.y[i]
        return {self.key: self.x[i].float(), "correct": y, "slow_needed": y, "label": y * 75, "gen_tokens": torch.tensor(50.0),
                "finished": torch.tensor(1.0), "fast_correct": 1 - y, "slow_correct": y, "fast_tokens": torch.tensor(4.0),
                "slow_tokens": torch.tensor(120.0)}


def training_throughput(lm, n: int) -> dict:
    s = lm.shape
    out = {}
    cases = {
        "correctness": (CorrectnessProbe, (s.layers, 2, s.kv_heads, s.head_dim), "response_kv", torch.float32),
        "difficulty": (DifficultyProbe, (s.layers, 2, s.kv_heads, 8, s.head_dim), "prompt_kv", torch.float16),
    }
    for name, (cls, shape, key, dtype) in cases.items():
        loader = DataLoader(Synthetic(n, shape, key, dtype), batch_size=64, shuffle=True)
        probe = cls(input_dim=s.layers * 2 * s.kv_heads * s.head_dim)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        t0 = time.perf_counter()
        trainer.fit(probe, train_dataloaders=loader)
        seconds = time.perf_counter() - t0
        out[name] = {"items": n, "epoch_s": round(seconds, 3), "examples_per_s": round(n / seconds, 1),
                     "epoch_s_per_10k": round(seconds * 10_000 / n, 2)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=32, help="decode steps and probe calls timed")
    parser.add_argument("--train-items", type=int, default=10_000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe_cost.json"))
    args = parser.parse_args(argv)

    lm = load_model(ModelSpec(name=args.model, dtype=args.dtype))
    live = live_cost(lm, args.windows, args.steps)
    default = next(r for r in live if r["window"] == 8 and r["layers"] == lm.shape.layers) if any(
        r["window"] == 8 for r in live) else live[0]
    figures = {
        "benchmark": "probe_cost", "model": args.model, "dtype": args.dtype, "live": live,
        "probe_over_decode_step_default": default["probe_over_step"], "training": training_throughput(lm, args.train_items),
    }
    return emit(figures, args.out)


if __name__ == "__main__":
    main()
