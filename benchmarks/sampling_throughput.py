"""N samples per prompt: the generator's ``sample`` policy (one prefill, cache expanded to N rows, the correctness probe
scoring every sample) against transformers' ``generate(num_return_sequences=N)`` and against N separate ``generate``
calls, on the same prompts and sampling settings; and the generator's own greedy loop against ``generate`` at the
same batch. One run.

    python benchmarks/sampling_throughput.py        # Qwen2.5-Coder-0.5B bf16 (shipped generator), 4 prompts x 8 samples
    python benchmarks/sampling_throughput.py --model <tiny folder> --prompts 2 --samples 3 --max-new-tokens 4   # CI

Every arm decodes up to ``--max-new-tokens`` (short of a step-by-step answer's length, so nearly every row runs to
the cap in every arm); tokens/s counts each row's tokens up to its end. Peak memory: the growth of the peak resident
set during the arm (CUDA: peak allocated), weights excluded. The probe's share is the generator's own
``probe_seconds`` over the arm's wall time. Arms run in turn ``--repeats`` times; the best time of each is kept.
Prints one JSON line and writes it to benchmarks/results/sampling_throughput.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from kvprobe.models import ModelSpec, eos_ids, last_logits_only, left_pad, load_model
from kvprobe.prompts import PromptSpec, prompt_ids
from kvprobe.steering import DecodeEngine, DoneEvent, FixedMode, GenerationConfig, KVProbeGenerator, Sampler, SteeringSpec
from kvprobe.tasks import TaskSpec, load_items

from common import emit, peak_rss, reset_peak_rss, rss


def measure(fn) -> dict:
    """Run ``fn`` (-> (decoded tokens, probe seconds)) once: tokens, seconds, peak memory growth."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss()
    t0 = time.perf_counter()
    tokens, probe = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss()) - base
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds, "peak_bytes": peak, "probe_seconds": probe}


def hf_generate(lm, ids: list[list[int]], max_new: int, sampling: dict | None, n: int = 1) -> int:
    """transformers' ``generate`` on left-padded ``ids`` (``n`` return sequences each); tokens up to each row's end."""
    input_ids, mask = left_pad(ids, lm.tokenizer.pad_token_id)
    device, eos = lm.input_device, eos_ids(lm)
    kwargs = {"do_sample": True, "top_k": 0, **sampling, "num_return_sequences": n} if sampling else {"do_sample": False}
    out = lm.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                            pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=eos, **kwargs, **last_logits_only(lm.model))
    new = out[:, input_ids.shape[1]:].cpu()
    is_eos = torch.isin(new, torch.tensor(eos))
    return int(torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1]).sum())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="qwen2.5-coder-0.5b", help="a generator (alias or folder): its model and probes")
    p.add_argument("--model", default=None, help="a model instead of a generator: the sample arm runs without a probe")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/sampling_throughput.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    items = load_items(TaskSpec("arithmetic", params={"n": args.prompts, "seed": 77, "terms": 3, "digits": 2, "min_digits": 1}))
    n, cap = args.samples, args.max_new_tokens
    sampling = {"temperature": args.temperature, "top_p": args.top_p}
    if args.model:
        lm, spec = load_model(ModelSpec(name=args.model, dtype="float32")), PromptSpec(mode="slow")
        prompt = lambda item, mode: prompt_ids(item, spec, lm.tokenizer)  # noqa: E731
        hooks = lambda: [Sampler(SteeringSpec(samples=n, select="vote"))]  # noqa: E731
    else:
        gen = KVProbeGenerator.from_pretrained(args.generator)
        lm, prompt = gen.lm, gen.prompt_ids
        hooks = lambda: gen.hooks("sample", len(items), steering=SteeringSpec(samples=n, select="probe_vote"))  # noqa: E731
    ids = [prompt(item, "slow") for item in items]
    config = GenerationConfig(max_new_tokens=cap, do_sample=True, seed=0, **sampling)

    def kvprobe_sample():
        results = [e.result for e in DecodeEngine(lm, prompt, hooks(), config, config.caps({})).run(items) if isinstance(e, DoneEvent)]
        return sum(r.decoded_tokens for r in results), sum(r.probe_seconds for r in results)

    def kvprobe_greedy():
        greedy = GenerationConfig(max_new_tokens=cap)
        results = [e.result for e in DecodeEngine(lm, prompt, [FixedMode("slow")], greedy, greedy.caps({})).run(items * n)
                   if isinstance(e, DoneEvent)]
        return sum(r.decoded_tokens for r in results), 0.0

    arms = {
        "kvprobe_sample": kvprobe_sample,
        "hf_num_return_sequences": lambda: (hf_generate(lm, ids, cap, sampling, n), 0.0),
        "hf_separate_calls": lambda: (sum(hf_generate(lm, ids, cap, sampling) for _ in range(n)), 0.0),
        "kvprobe_greedy_loop": kvprobe_greedy,
        "hf_greedy": lambda: (hf_generate(lm, ids * n, cap, None), 0.0),
    }
    best: dict[str, dict] = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, fn in arms.items():
                m = measure(fn)
                if name not in best or m["seconds"] < best[name]["seconds"]:
                    best[name] = m
    tps = {k: v["tokens_per_second"] for k, v in best.items()}
    return emit({
        "model": lm.spec.name, "prompts": len(items), "samples": n, "max_new_tokens": cap, **sampling,
        "sampling_over_hf": round(tps["kvprobe_sample"] / tps["hf_num_return_sequences"], 3),
        "sampling_over_separate": round(tps["kvprobe_sample"] / tps["hf_separate_calls"], 3),
        "greedy_over_hf": round(tps["kvprobe_greedy_loop"] / tps["hf_greedy"], 3),
        "probe_share": round(best["kvprobe_sample"]["probe_seconds"] / best["kvprobe_sample"]["seconds"], 5),
        "arms": {k: {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()} for k, v in best.items()},
    }, args.out)


if __name__ == "__main__":
    main()
