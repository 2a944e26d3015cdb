"""Probe costs: the live route+switch probe against a decode step, and probe training throughput, one run.

    python benchmarks/probe_cost.py                      # SmolLM2, batch 1, context ~300, 10k training items
    python benchmarks/probe_cost.py --model <folder> --train-items 512 --steps 4    # CI, reduced

1. Live: what ``KVProbeGenerator`` does every token under ``route+switch`` with the probe every token, as a share
   of one decode step of the same model on the same cache: the ``Switcher`` hook's ``on_forward`` (read the new
   position's K and/or V from every layer, average over layers, project by the switch probe's first layer into the
   ring buffer) plus one switch-probe call on the ring buffer (``Switcher.scores``). Timed by calling the hook the
   generator runs, for
   windows 4..32, caches of 8, 16 and all layers, and probes on K alone or K and V (the upkeep reads one column
   per layer and part). Also end to end, with the shipped probe's parts: the share of ``probe_seconds`` in the
   wall time of real ``route+switch`` generations, in ``--rounds`` interleaved repeats (median).
2. Training: examples per second of one epoch of each probe (correctness on pooled answer KV, difficulty on the
   prompt window, switch on decode windows) through a Lightning Trainer on CPU, at this model's shapes, with
   synthetic inputs of the stored dtypes; and the seconds a 10k-item epoch takes.

Prints one JSON line and writes it to benchmarks/results/probe_cost.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from kvprobe.cache import cache_argument, layer_kv
from kvprobe.export import ProbeCard
from kvprobe.models import ModelSpec, load_model
from kvprobe.probes import CorrectnessProbe, DifficultyProbe, SwitchProbe
from kvprobe.steering import DecodeEngine, DecodeState, GenerationConfig, KVProbeGenerator, Row, SteeringSpec, Switcher

from common import emit

REPO = Path(__file__).resolve().parents[1]


def shipped_kv() -> str:
    """What the shipped switch probe reads (configs/model/switch.yaml): ``k``, ``v`` or ``both``."""
    return yaml.safe_load((REPO / "configs" / "model" / "switch.yaml").read_text())["init_args"]["kv"]


def switch_probe(lm, kv: str, **kwargs) -> SwitchProbe:
    """An untrained switch probe on ``kv`` (``k``, ``v`` or ``both``) of this model's layer-averaged windows."""
    return SwitchProbe(kv=kv, input_dim=(2 if kv == "both" else 1) * lm.shape.kv_heads * lm.shape.head_dim, **kwargs)


def generator(lm, window: int, layers: int, kv: str, threshold: float = 0.5) -> KVProbeGenerator:
    """A generator with untrained probes of the right shapes (timing does not depend on the weights)."""
    s = lm.shape
    spec = {"model": {"name": lm.spec.name, "fingerprint": lm.fingerprint}, "prompt": {}, "generation": {"max_new_tokens": {"fast": 8, "slow": 64}},
            "features": {"prompt_window": 8}, "task": {}, "difficulty": {"route_on": "fast"}, "switch": {"window": window}}
    difficulty = DifficultyProbe(input_dim=s.layers * 2 * s.kv_heads * s.head_dim).eval()
    difficulty.thresholds = {"best_at_0.5x_slow": {"threshold": 0.5}}
    correctness = CorrectnessProbe(input_dim=layers * 2 * s.kv_heads * s.head_dim).eval()
    switch = switch_probe(lm, kv, probe_every=1, min_tokens=1).eval()
    switch.thresholds = {"switch_low": -1.0, "switch_high": 2.0}  # scores every token, never switches
    for probe in (difficulty, correctness, switch):
        probe.card = ProbeCard.from_capture(probe, spec)
    return KVProbeGenerator(lm, difficulty, correctness, switch, SteeringSpec(threshold=threshold))


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
        pairs = layer_kv(cache)
        for layers in sorted({s.layers, 16, 8} & set(range(1, s.layers + 1)), reverse=True):
            part = DynamicCache()  # the first `layers` layers of the same cache
            for i in range(layers):
                part.update(pairs[i][0], pairs[i][1], i)
            for kv, window in [(kv, w) for kv in ("k", "both") for w in windows]:
                gen = generator(lm, window, layers, kv)
                switcher = next(h for h in gen.hooks("route+switch", 1) if isinstance(h, Switcher))
                engine = DecodeEngine(lm, gen.prompt_ids, [switcher], GenerationConfig(), gen.max_new_tokens)
                state = DecodeState([Row(0, [], "slow", 0.0)], "slow", part, torch.ones(1, pairs[0][0].shape[2], dtype=torch.long))
                for _ in range(3):  # warm-up: first calls allocate
                    switcher.on_forward(engine, state, [token[0].tolist()], [True])
                    switcher.scores(state, [0])
                t0 = time.perf_counter()
                for _ in range(steps):
                    switcher.on_forward(engine, state, [token[0].tolist()], [True])  # the upkeep every decode step pays
                    switcher.scores(state, [0])  # the probe call
                call = (time.perf_counter() - t0) / steps
                rows.append({"kv": kv, "window": window, "layers": layers, "probe_ms": round(call * 1e3, 4),
                             "decode_step_ms": round(step * 1e3, 3), "probe_over_step": round(call / step, 5)})
    return rows


def end_to_end(lm, n: int, max_new: int, rounds: int) -> dict:
    """Real route+switch generations with the probe every token: probe seconds over wall seconds, for the shipped
    probe's parts and the other choice (K alone / K and V), interleaved over ``rounds``; medians."""
    from kvprobe.tasks import TaskSpec, load_items

    questions = [item.question for item in load_items(TaskSpec("arithmetic", params={"n": n, "seed": 13}))]
    kinds = [shipped_kv(), "both" if shipped_kv() != "both" else "k"]
    gens = {}
    for kv in kinds:
        gens[kv] = generator(lm, 8, lm.shape.layers, kv, threshold=-1.0)  # every question decodes slow: probed
        gens[kv].generate(questions[0], policy="route+switch", max_new_tokens=4)  # warm-up: first calls allocate
    runs = {kv: [] for kv in kinds}
    for _ in range(rounds):
        for kv in kinds:
            probe = wall = tokens = 0.0
            for q in questions:
                t0 = time.perf_counter()
                r = gens[kv].generate(q, policy="route+switch", max_new_tokens=max_new)
                wall += time.perf_counter() - t0
                probe, tokens = probe + r.probe_seconds, tokens + r.decoded_tokens
            runs[kv].append({"decoded_tokens": int(tokens), "probe_s": round(probe, 4), "wall_s": round(wall, 3),
                             "probe_share_of_wall": round(probe / wall, 5)})
    return {"questions": n, "rounds": rounds, "shipped_kv": kinds[0]} | {
        kv: {"probe_share_of_wall_median": statistics.median(r["probe_share_of_wall"] for r in runs[kv]),
             "probe_ms_per_token_median": round(statistics.median(1e3 * r["probe_s"] / r["decoded_tokens"] for r in runs[kv]), 4),
             "rounds": runs[kv]} for kv in kinds}


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
        return {self.key: self.x[i].float(), "correct": y, "slow_needed": y, "keep": y, "label": y * 75, "gen_tokens": torch.tensor(50.0),
                "finished": torch.tensor(1.0), "fast_correct": 1 - y, "slow_correct": y, "fast_tokens": torch.tensor(4.0),
                "slow_tokens": torch.tensor(120.0)}


def training_throughput(lm, n: int) -> dict:
    s = lm.shape
    out = {}
    cases = {
        "correctness": (CorrectnessProbe, (s.layers, 2, s.kv_heads, s.head_dim), "response_kv", torch.float32),
        "difficulty": (DifficultyProbe, (s.layers, 2, s.kv_heads, 8, s.head_dim), "prompt_kv", torch.float16),
        "switch": (SwitchProbe, (2, s.kv_heads, s.head_dim), "window", torch.float32),  # the data's windows hold K and V
    }
    for name, (cls, shape, key, dtype) in cases.items():
        loader = DataLoader(Synthetic(n, shape, key, dtype), batch_size=64, shuffle=True)
        if name == "switch":  # reads the shipped probe's parts of each window
            probe = switch_probe(lm, shipped_kv())
        else:
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
    parser.add_argument("--questions", type=int, default=8, help="route+switch generations timed end to end")
    parser.add_argument("--max-new", type=int, default=64, help="decoded tokens per end-to-end generation")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved end-to-end repeats")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe_cost.json"))
    args = parser.parse_args(argv)

    lm = load_model(ModelSpec(name=args.model, dtype=args.dtype))
    live = live_cost(lm, args.windows, args.steps)
    default = next((r for r in live if r["window"] == 8 and r["layers"] == lm.shape.layers and r["kv"] == shipped_kv()), live[0])
    figures = {
        "benchmark": "probe_cost", "model": args.model, "dtype": args.dtype, "live": live,
        "probe_over_decode_step_default": default["probe_over_step"], "end_to_end": end_to_end(lm, args.questions, args.max_new, args.rounds),
        "training": training_throughput(lm, args.train_items),
    }
    return emit(figures, args.out)


if __name__ == "__main__":
    main()
