"""The live loop in process, against the model's own steps: what a served answer costs before any server.

    python benchmarks/live_loop.py --dtype bfloat16                         # SmolLM2's shipped generator, ~2 min
    python benchmarks/live_loop.py --generator <folder> --tokens 6 --repeats 1   # CI, reduced

Two measurements, each the median of ``--repeats``:

- per token: one slow-mode answer of ``--tokens`` tokens (prefill included) through ``KVProbeGenerator.generate``,
  through ``model.generate`` on the same prompt ids, and as bare ``model(...)`` steps (greedy, no probe, no
  bookkeeping): what the live loop costs over the model's own steps and over transformers' loop.
- joining an open batch (``stream(admit=...)``, what ``kvprobe serve`` runs): a short answer (``--short-tokens``)
  alone (timed from the ``generate`` call: argument checks and hook set-up included), and admitted into a running
  long answer at a step boundary (timed from its admission to its answer).

Prints one JSON line and writes it to benchmarks/results/live_loop.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kvprobe.models import last_logits_only
from kvprobe.steering import DoneEvent, Hook, KVProbeGenerator

from common import emit

LONG = [{"role": "user", "content": "Explain step by step how to compute 37 * 43 - 19."}]
SHORT = [{"role": "user", "content": "What is 2 + 3?"}]


def median(f, repeats: int) -> float:
    xs = sorted(f() for _ in range(repeats))
    return xs[len(xs) // 2]


def bare_steps(model, ids: torch.Tensor, tokens: int) -> float:
    """Prefill, then ``tokens - 1`` greedy one-token steps, the last position's logits only (as the live loop asks
    for them, ``last_logits_only``): seconds."""
    from transformers import DynamicCache

    last = last_logits_only(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        token = model(input_ids=ids, past_key_values=cache, use_cache=True, **last).logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(tokens - 1):
            token = model(input_ids=token, past_key_values=cache, use_cache=True, **last).logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


def hf_generate(model, ids: torch.Tensor, tokens: int) -> float:
    """``model.generate`` as transformers serve calls it (its own ``logits_to_keep``): seconds."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False)
    return time.perf_counter() - t0


def answer(gen: KVProbeGenerator, chat: list[dict], tokens: int) -> float:
    """One slow-mode answer of at most ``tokens`` tokens through ``KVProbeGenerator.generate``: seconds."""
    t0 = time.perf_counter()
    gen.generate(chat, "slow", max_new_tokens=tokens)
    return time.perf_counter() - t0


class RowCap(Hook):
    """Ends row ``row`` after ``tokens`` tokens, as the server's per-request caps do in a batch with a larger cap."""

    def __init__(self, row: int, tokens: int):
        self.row, self.tokens = row, tokens

    def on_token(self, engine, state, blocks) -> None:
        for r in state.rows:
            if r.index == self.row and r.in_mode >= self.tokens:
                r.done = True


def joined(gen: KVProbeGenerator, tokens: int, after: int) -> float:
    """Seconds from the short answer's admission, ``after`` steps into the long one, to its answer."""
    calls, admitted = [], []

    def admit():
        calls.append(1)
        if len(calls) == after:
            admitted.append(time.perf_counter())
            return [SHORT]
        return []

    for event in gen.stream([LONG], "slow", max_new_tokens=after + 4 * tokens, admit=admit, hooks=[RowCap(1, tokens)]):
        if isinstance(event, DoneEvent) and event.row == 1:
            return time.perf_counter() - admitted[0]
    raise RuntimeError("the admitted answer never finished")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="smollm2", help="a generator folder or alias")
    parser.add_argument("--dtype", default=None, help="the base model's dtype (default: the folder's)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens of the per-token answer")
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--after", type=int, default=8, help="steps of the long answer before the short one joins")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "live_loop.json"))
    a = parser.parse_args(argv)

    gen = KVProbeGenerator.from_pretrained(a.generator, dtype=a.dtype)
    model = gen.lm.model
    ids = torch.tensor([gen.prompt_ids(LONG, "slow")])
    for f in (lambda: answer(gen, LONG, 4), lambda: hf_generate(model, ids, 4), lambda: bare_steps(model, ids, 4),
              lambda: answer(gen, SHORT, a.short_tokens), lambda: joined(gen, a.short_tokens, a.after)):
        f()  # warm-up
    tokens = len(gen.generate(LONG, "slow", max_new_tokens=a.tokens).token_ids)  # eos may come first: all three decode this many
    per_token = {name: median(f, a.repeats) / tokens * 1000 for name, f in (
        ("kvprobe_ms", lambda: answer(gen, LONG, tokens)), ("model_generate_ms", lambda: hf_generate(model, ids, tokens)),
        ("bare_steps_ms", lambda: bare_steps(model, ids, tokens)))}
    short_alone = median(lambda: answer(gen, SHORT, a.short_tokens), a.repeats)
    short_joined = median(lambda: joined(gen, a.short_tokens, a.after), a.repeats)
    return emit({"benchmark": "live_loop", "generator": a.generator, "dtype": gen.lm.spec.dtype, "tokens": tokens,
                 "repeats": a.repeats, "per_token": {k: round(v, 2) for k, v in per_token.items()},
                 "kvprobe_over_bare_steps": round(per_token["kvprobe_ms"] / per_token["bare_steps_ms"], 3),
                 "kvprobe_over_model_generate": round(per_token["kvprobe_ms"] / per_token["model_generate_ms"], 3),
                 "short_alone_s": round(short_alone, 4), "short_joined_s": round(short_joined, 4),
                 "short_joined_over_alone": round(short_joined / short_alone, 3)}, a.out)


if __name__ == "__main__":
    main()
