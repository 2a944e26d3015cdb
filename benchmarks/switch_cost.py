"""Switch cost: a live switch from the same cache vs the KV paper's post-hoc procedure, same prompts, one run.

    python benchmarks/switch_cost.py                                   # the shipped SmolLM2 generator, 16 questions
    python benchmarks/switch_cost.py --generator <folder> --n 2        # any generator; CI runs it reduced

Both route the same question to slow mode and switch to answering at the same point (with the thresholds forced,
the first probe call at ``--at`` tokens arms the switch and the next one fires it; the mechanism is measured, not
the probes' judgement):

- live (``KVProbeGenerator``, policy ``route+switch``): prefill the fast prompt and score it, keep the prefix both
  prompts share and prefill the rest of the slow prompt, decode ``at`` tokens, append the answer cue to the same
  cache (``steering.cue_block``: tokenised as the text would be; one token a step), keep decoding. Tokens processed =
  prompts + decoded + cue.
- post hoc (the paper's procedure): prefill the fast prompt and score it, generate the slow answer in full from a
  fresh prefill of the slow prompt, replay the same switch probe and policy over the answer's windows afterwards
  to find the switch point, decode the prefix to text, append the cue as text, re-tokenise and prefill the whole
  thing again, generate the answer. Tokens processed = both prompts + full answer + re-prefill + answer.

Prints one JSON line and writes it to benchmarks/results/switch_cost.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kvprobe.features import token_trajectory
from kvprobe import switching
from kvprobe.cache import layer_kv
from kvprobe.steering import DecodeEngine, GenerationConfig, KVProbeGenerator, Row, SteeringSpec
from kvprobe.tasks import TaskSpec, load_items

from common import emit


def greedy(lm, ids: list[int], max_new: int):
    out = lm.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=max_new, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                            return_dict_in_generate=True)
    return out, out.sequences[0, len(ids):].tolist()


def post_hoc(gen: KVProbeGenerator, question: str, caps: dict) -> dict:
    lm, probe, tok, spec = gen.lm, gen.switch, gen.lm.tokenizer, gen.steering
    t0 = time.perf_counter()
    # 0. route first, as live route+switch does: prefill the fast prompt and score it (the forced route says slow)
    router = gen.router()
    engine = DecodeEngine(lm, gen.prompt_ids, [router], GenerationConfig(), caps)
    routing = [Row(0, gen.prompt_ids(question, gen.route_on), gen.route_on, t0)]
    router.scores(engine, engine.prefill(routing, gen.route_on))
    prompt = gen.prompt_ids(question, "slow")
    out, full = greedy(lm, prompt, caps["slow"])  # 1. the whole slow answer
    # 2. find the switch point afterwards: the switch probe over every window of the answer, the live policy replayed
    trajectory = token_trajectory(layer_kv(out), len(prompt), torch.tensor([len(full)]))[0].half().float()
    scores = probe.score(probe(probe.pooled_inputs(switching.trajectory_windows(trajectory, gen.switch_window)))).tolist()
    # scores[t - 1]: the window after t decoded tokens; the live loop stops probing once the last token is decoded
    trace = [(t, scores[t - 1]) for t in range(1, len(full))]
    cut = switching.first_cut(trace, spec.switch_low, spec.switch_high, spec.min_tokens, spec.probe_every)
    point = len(full) if cut is None else cut
    # 3. back to text, append the cue, re-tokenise, prefill everything again, answer
    text = tok.decode(prompt + full[:point], skip_special_tokens=False) + spec.answer_cue
    again = tok.encode(text, add_special_tokens=False)
    _, answer = greedy(lm, again, caps["fast"])
    return {"seconds": time.perf_counter() - t0, "tokens": len(routing[0].ids) + len(prompt) + len(full) + len(again) + len(answer),
            "switch_at": point, "full_answer": len(full), "answer": len(answer),
            "answer_text": tok.decode(answer, skip_special_tokens=True)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="smollm2", help="generator folder or shipped alias (checkpoints/)")
    parser.add_argument("--n", type=int, default=16, help="questions (seeded arithmetic)")
    parser.add_argument("--at", type=int, default=24, help="arm the switch after this many slow tokens (it fires at the next)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "switch_cost.json"))
    args = parser.parse_args(argv)

    base = KVProbeGenerator.from_pretrained(args.generator)
    forced = SteeringSpec(threshold=-1.0, switch_low=2.0, switch_high=-1.0, min_tokens=args.at, probe_every=1)
    gen = KVProbeGenerator(base.lm, base.difficulty, base.correctness, base.switch, forced)
    caps = dict(gen.max_new_tokens)
    caps["slow"] = max(caps["slow"], args.at + 9)
    questions = [item.question for item in load_items(TaskSpec("arithmetic", params={"n": args.n, "seed": 11}))]
    gen.generate(questions[0], policy="slow", max_new_tokens=4)  # warm-up
    per_item = []
    with torch.inference_mode():
        for q in questions:
            t0 = time.perf_counter()
            r = gen.generate(q, policy="route+switch", max_new_tokens=caps)
            live_s = time.perf_counter() - t0
            live_tokens = r.prompt_tokens + r.decoded_tokens + r.cue_tokens - 1  # the last decoded token is never fed
            ph = post_hoc(gen, q, caps)
            per_item.append({"switched": r.switched_at is not None, "live_s": live_s, "live_tokens": live_tokens,
                             "post_hoc_s": ph["seconds"], "post_hoc_tokens": ph["tokens"], "live_at": r.switched_at, "post_hoc_at": ph["switch_at"],
                             "live_decoded": r.decoded_tokens, "post_hoc_decoded": ph["full_answer"] + ph["answer"],
                             "same_answer": gen.lm.tokenizer.decode(r.token_ids[(r.switched_at or 0) + r.cue_tokens:],
                                                                    skip_special_tokens=True) == ph["answer_text"]})
    switched = [p for p in per_item if p["switched"]]
    total = lambda key: sum(p[key] for p in switched)
    figures = {
        "benchmark": "switch_cost", "generator": str(args.generator), "model": gen.lm.spec.name, "items": len(per_item),
        "switched_items": len(switched), "switch_after": args.at,
        "live_tokens_processed": total("live_tokens"), "post_hoc_tokens_processed": total("post_hoc_tokens"),
        "live_s": round(total("live_s"), 3), "post_hoc_s": round(total("post_hoc_s"), 3),
        "tokens_ratio_live_over_post_hoc": round(total("live_tokens") / max(1, total("post_hoc_tokens")), 4),
        "time_ratio_live_over_post_hoc": round(total("live_s") / max(1e-9, total("post_hoc_s")), 4),
        "live_fewer_tokens_every_item": all(p["live_tokens"] < p["post_hoc_tokens"] for p in switched),
        "live_faster_every_item": all(p["live_s"] < p["post_hoc_s"] for p in switched),
        "same_switch_point_every_item": all(p["live_at"] == p["post_hoc_at"] for p in switched),
        "same_answer_after_the_cue": sum(p["same_answer"] for p in switched),
        "per_switched_item": [{k: round(v, 3) if isinstance(v, float) else v for k, v in p.items() if k != "switched"} for p in switched],
    }
    return emit(figures, args.out)


if __name__ == "__main__":
    main()
