"""Live steering on a labelled data split: every policy generates, is graded, and is costed, side by side.

    kvprobe evaluate --generator qwen2.5-coder-0.5b --data configs/data/difficulty_mix.yaml --out live.json

For each policy (fast, slow, route, route+switch, verify, route+verify, oracle) the generator answers the questions
of the data config's split (by default test, which the probes never trained on), greedy, batched. Reported per
policy: accuracy, mean decoded tokens (every decoded token of every attempt, both modes), slow share (questions
that decoded in slow mode at all), escalations, switches, cue and prompt tokens (and of those, the ones prefilled
again when a question moved to slow mode), probe time as a share of the policy's wall time, wall time, the AUROC of
the returned confidence against the grades, and for the routing policies whether they meet the bar (accuracy of the better
fixed mode - 1 point, at most half of always-slow's tokens, probe time at most 1%) on these live answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from kvprobe.metrics import auroc_or_nan
from kvprobe.paths import writable_file, write_json_or_keep
from kvprobe.routing import Outcomes
from kvprobe.steering import POLICIES, KVProbeGenerator
from kvprobe.tasks import Item, grade, grader_of, load_items

PROBE_SHARE_BAR = 0.01  # the bar's limit on probe time as a share of wall time
GREEDY_POLICIES = tuple(p for p in POLICIES if p != "sample")  # one greedy answer each; ``sample``: python -m reports.sampling


def load_data(config: str):
    """The data module of a data config (``class_path`` + ``init_args`` YAML), captured and set up."""
    from jsonargparse import ArgumentParser
    from lightning import LightningDataModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    dm = parser.instantiate(parser.parse_args(["--data", config])).data
    dm.prepare_data()
    dm.setup("test")
    return dm


def run_policy(gen: KVProbeGenerator, items: list[Item], policy: str, batch_size: int, oracle_modes=None,
               grader: Callable[[Item, str, str], tuple[str, bool]] | None = None) -> dict:
    """One policy over ``items`` in batches: its figures, and every question's record under ``rows``. ``grader``:
    ``(item, response, mode) -> (prediction, correct)`` as the capture grades (``kvprobe.tasks.grader_of``); the
    default grader when None."""
    grader = grader or (lambda item, response, mode: grade(item, response))
    rows, t0 = [], time.perf_counter()
    bar = tqdm(total=len(items), desc=f"live {policy}", unit="q")
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        modes = oracle_modes[start : start + batch_size] if oracle_modes else None
        for item, r in zip(chunk, gen.generate(chunk, policy=policy, oracle_modes=modes)):
            rows.append({"qid": item.qid, "correct": grader(item, r.text, r.final_mode)[1], "decoded": r.decoded_tokens, "cue": r.cue_tokens,
                         "prompt": r.prompt_tokens, "reprompt": r.reprompt_tokens, "mode": r.mode, "final_mode": r.final_mode,
                         "switched": r.switched_at is not None, "switched_at": r.switched_at, "escalated": r.escalated,
                         "verify_score": r.verify_score, "probe_seconds": r.probe_seconds, "confidence": r.confidence,
                         "text": r.text})
        bar.update(len(chunk))
    bar.close()
    wall = time.perf_counter() - t0
    n = len(rows)
    confident = [r for r in rows if r["confidence"] is not None]
    return {
        "accuracy": sum(r["correct"] for r in rows) / n, "mean_tokens": sum(r["decoded"] for r in rows) / n,
        "mean_cue_tokens": sum(r["cue"] for r in rows) / n, "mean_prompt_tokens": sum(r["prompt"] for r in rows) / n,
        "mean_reprompt_tokens": sum(r["reprompt"] for r in rows) / n,
        "slow_share": sum("slow" in (r["mode"], r["final_mode"]) for r in rows) / n,
        "escalations": sum(r["escalated"] for r in rows), "switches": sum(r["switched"] for r in rows),
        "confidence_auroc": auroc_or_nan(torch.tensor([float(r["confidence"]) for r in confident]),
                                         torch.tensor([float(r["correct"]) for r in confident])) if confident else float("nan"),
        "probe_share": sum(r["probe_seconds"] for r in rows) / wall, "wall_seconds": wall, "items": n, "rows": rows,
    }


def judge(results: dict) -> None:
    """Mark each routing policy with ``meets_bar``, against the live fast and slow answers to the same questions."""
    if not {"fast", "slow"} <= set(results):
        return
    col = lambda policy, key: torch.tensor([float(r[key]) for r in results[policy]["rows"]])
    live = Outcomes(col("fast", "correct"), col("slow", "correct"), col("fast", "decoded"), col("slow", "decoded"))
    least_accuracy, most_tokens = live.bar()
    for policy, r in results.items():
        if policy.startswith("route"):
            r["meets_bar"] = (r["accuracy"] >= least_accuracy and r["mean_tokens"] <= most_tokens
                              and r["probe_share"] <= PROBE_SHARE_BAR)


def evaluate(gen: KVProbeGenerator, dm, split: str = "test", policies=GREEDY_POLICIES, limit: int | None = None,
             batch_size: int = 32) -> dict:
    """Every policy on the questions of ``dm``'s split (a difficulty data module: the oracle's modes come from its
    captured outcomes); per policy, its figures."""
    if not hasattr(dm, "outcomes"):
        raise ValueError("evaluation needs difficulty data (both modes captured), e.g. configs/data/difficulty_mix.yaml")
    ds = dm.datasets[split]
    indices = ds.indices[:limit]
    # The questions as their task loads them (choices and all), each graded by its task's grader, as captured.
    tasks = [dm.capture.task] + ([dm.extra_train] if dm.extra_train else [])
    graders = [grader_of(task) for task in tasks]
    known = {item.qid: (item, g) for task, g in zip(tasks, graders) for item in load_items(task)}
    items = [known[ds.rows[g]["qid"]][0] for g in indices]
    grader = lambda item, response, mode: known[item.qid][1](item, response, mode)
    idx = torch.tensor(indices)
    captured = Outcomes(*(dm.outcomes[k][idx] for k in ("fast_correct", "slow_correct", "fast_tokens", "slow_tokens")))
    oracle_modes = ["slow" if s else "fast" for s in captured.oracle().tolist()]
    results = {}
    for policy in policies:
        results[policy] = r = run_policy(gen, items, policy, batch_size, oracle_modes if policy == "oracle" else None, grader)
        print(f"[kvprobe] {policy}: accuracy {r['accuracy']:.3f}, {r['mean_tokens']:.1f} decoded tokens/question, "
              f"{r['switches']} switches, {r['escalations']} escalations, confidence AUROC {r['confidence_auroc']:.3f}, "
              f"probe {r['probe_share']:.2%} of wall, {r['wall_seconds']:.0f} s", flush=True)
    judge(results)
    return results


def parser(prog: str = "kvprobe evaluate", description: str = __doc__):
    """The evaluation's options (``reports.steering`` reuses them)."""
    from typing import Literal

    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    p.add_argument("--generator", type=str, default="qwen2.5-coder-0.5b", help="generator folder or shipped alias")
    p.add_argument("--data", type=str, default="configs/data/difficulty_mix.yaml", help="difficulty data config (both modes)")
    p.add_argument("--split", type=Literal["train", "val", "test"], default="test")
    p.add_argument("--policies", type=list[Literal[GREEDY_POLICIES]], default=list(GREEDY_POLICIES),
                   help="route+switch needs a switch probe; sampling is evaluated by python -m reports.sampling")
    p.add_argument("--limit", type=int | None, default=None, help="first n questions of the split only")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--out", type=str | None, default=None, help="write every figure and per-question record as JSON here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a number of questions >= 1 (or left out: all), not {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, not {args.batch_size}")
    if args.out:  # before any model work: a folder, or a path that cannot be written, is named now
        writable_file(args.out, "--out")
    results = evaluate(KVProbeGenerator.from_pretrained(args.generator), load_data(args.data), args.split, args.policies,
                       args.limit, args.batch_size)
    if args.out:
        write_json_or_keep(args.out, results)
        print(f"[kvprobe] results written to {args.out}")
    return results


if __name__ == "__main__":
    from kvprobe.cli import run_module

    run_module(main, "kvprobe evaluate")
