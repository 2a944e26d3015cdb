"""Live steering on a task's test split: every policy generates, is graded, and is costed, side by side.

    python -m kvprobe.evaluate --generator qwen2.5-coder-0.5b --data configs/data/difficulty_mix.yaml

For each policy (fast, slow, route, route+switch, oracle) the generator answers the test questions of the data
config's split (the split the probes never trained on), greedy, batched. Reported per policy: accuracy, mean
decoded tokens (every decoded token, both modes), tokens saved versus always-slow, switches, probe time as a share
of the policies' wall time, wall time. Writes a table and an accuracy-vs-tokens plot to ``docs/steering.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvprobe.plots import pyplot
from kvprobe.routing import Outcomes
from kvprobe.steering import POLICIES, KVProbeGenerator
from kvprobe.tasks import Item, grade


def load_data(config: str):
    """The data module of a data config (``class_path`` + ``init_args`` YAML), captured and set up."""
    from jsonargparse import ArgumentParser

    from datamodules import KVCaptureDataModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(KVCaptureDataModule, "data")
    dm = parser.instantiate_classes(parser.parse_args(["--data", config])).data
    dm.prepare_data()
    dm.setup("test")
    return dm


def run_policy(gen: KVProbeGenerator, items: list[Item], policy: str, batch_size: int, oracle_modes=None) -> dict:
    rows, t0 = [], time.perf_counter()
    bar = tqdm(total=len(items), desc=f"live {policy}", unit="q")
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        modes = oracle_modes[start : start + batch_size] if oracle_modes else None
        for item, r in zip(chunk, gen.generate(chunk, policy=policy, oracle_modes=modes)):
            rows.append({"qid": item.qid, "correct": grade(item, r.text)[1], "decoded": r.decoded_tokens, "cue": r.cue_tokens,
                         "prompt": r.prompt_tokens, "mode": r.mode, "switched": r.switched_at is not None,
                         "switched_at": r.switched_at, "probe_seconds": r.probe_seconds, "confidence": r.confidence, "text": r.text})
        bar.update(len(chunk))
    bar.close()
    wall = time.perf_counter() - t0
    n = len(rows)
    return {
        "accuracy": sum(r["correct"] for r in rows) / n, "mean_tokens": sum(r["decoded"] for r in rows) / n,
        "mean_cue_tokens": sum(r["cue"] for r in rows) / n, "mean_prompt_tokens": sum(r["prompt"] for r in rows) / n,
        "slow_share": sum(r["mode"] == "slow" for r in rows) / n, "switches": sum(r["switched"] for r in rows),
        "probe_share": sum(r["probe_seconds"] for r in rows) / wall, "wall_seconds": wall, "items": n, "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="kvprobe evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="qwen2.5-coder-0.5b", help="generator folder or alias")
    parser.add_argument("--data", default="configs/data/difficulty_mix.yaml", help="difficulty data config (both modes)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES, help="route+switch needs a switch probe")
    parser.add_argument("--limit", type=int, default=None, help="first n questions of the split only")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--out", default="docs/steering.md")
    args = parser.parse_args(argv)

    dm = load_data(args.data)
    if not hasattr(dm, "outcomes"):
        parser.error(f"--data {args.data} is a one-mode capture; give a difficulty data config (class_path "
                     "datamodules.DifficultyDataModule, both modes), e.g. configs/data/difficulty_mix.yaml")
    ds = dm.datasets[args.split]
    indices = ds.indices[: args.limit]
    items = [Item(ds.rows[g]["qid"], ds.rows[g]["question"], ds.rows[g]["gold"]) for g in indices]
    gen = KVProbeGenerator.from_pretrained(args.generator)
    idx = torch.tensor(indices)
    captured = Outcomes(*(dm.outcomes[k][idx] for k in ("fast_correct", "slow_correct", "fast_tokens", "slow_tokens")))
    oracle_modes = ["slow" if s else "fast" for s in captured.oracle().tolist()]
    results = {}
    for policy in args.policies:
        results[policy] = run_policy(gen, items, policy, args.batch_size, oracle_modes if policy == "oracle" else None)
        r = results[policy]
        print(f"[kvprobe] {policy}: accuracy {r['accuracy']:.3f}, {r['mean_tokens']:.1f} decoded tokens/question, "
              f"{r['switches']} switches, probe {r['probe_share']:.2%} of wall, {r['wall_seconds']:.0f} s", flush=True)
    write_report(args, gen, results, len(items))
    return results


def write_report(args, gen: KVProbeGenerator, results: dict, n: int) -> None:
    plt = pyplot()

    out = Path(args.out)
    slow = results.get("slow", {}).get("mean_tokens")
    best_fixed = max((results[p]["accuracy"] for p in ("fast", "slow") if p in results), default=None)
    lines = ["| policy | accuracy | mean decoded tokens | tokens / always-slow | slow share | switches | cue tokens / q | "
             "prompt tokens / q | probe time / wall | wall s | meets the bar |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for policy, r in results.items():
        ratio = f"{r['mean_tokens'] / slow:.2f}" if slow else "–"
        bar = "–"
        if policy.startswith("route") and slow and best_fixed is not None:
            ok = r["accuracy"] >= best_fixed - 0.01 and r["mean_tokens"] <= 0.5 * slow and r["probe_share"] <= 0.01
            bar = "**yes**" if ok else "no"
        lines.append(f"| {policy} | {r['accuracy']:.3f} | {r['mean_tokens']:.1f} | {ratio} | {r['slow_share']:.2f} | {r['switches']} | "
                     f"{r['mean_cue_tokens']:.2f} | {r['mean_prompt_tokens']:.1f} | {r['probe_share']:.2%} | {r['wall_seconds']:.0f} | {bar} |")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for policy, r in results.items():
        ax.plot(r["mean_tokens"], r["accuracy"], "o", ms=8, label=policy)
    if slow:
        ax.axvline(0.5 * slow, color="grey", lw=0.7, ls="--", label="0.5x always-slow tokens")
    ax.set(xlabel="mean decoded tokens per question", ylabel="accuracy", title=f"live steering, {n} {args.split} questions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figure = out.with_name("steering.png")
    fig.savefig(figure, dpi=120)
    s = gen.steering
    text = "\n".join([
        "# Steering: live routing and switching with KVProbeGenerator", "",
        "Reproduce (the captures of `configs/data/difficulty_mix.yaml` give the split and the oracle's modes):", "",
        "```bash", f"python -m kvprobe.evaluate --generator {args.generator} --data {args.data} --split {args.split}"
        + (f" --limit {args.limit}" if args.limit else "") + f" --batch_size {args.batch_size}", "```", "",
        f"Base model `{gen.lm.spec.name}` ({gen.lm.spec.dtype}); {n} {args.split} questions the probes never trained on; greedy; "
        f"batches of {args.batch_size}. Route threshold `{s.threshold}` "
        f"({gen.difficulty.thresholds[s.threshold]['threshold']:.4f}, calibrated on validation)" + (
            f"; route+switch: the switch probe reads the latest {gen.switch_window} positions of a slow answer every "
            f"{s.probe_every} token(s) from token {s.min_tokens}, arms above {s.switch_high} and switches slow->fast below "
            f"{s.switch_low:.4f} (calibrated on validation), answer cue {json.dumps(s.answer_cue)}" if gen.switch else "")
        + ". Tokens count every decoded token of both modes; cue "
        "tokens are forced (fed, not decoded) and listed apart, as are prompt tokens. The bar: accuracy >= best "
        "fixed mode - 1 point, <= 0.5x always-slow's tokens, probe time <= 1%.", "",
    ] + lines + ["", f"![accuracy vs tokens]({figure.name})", ""] + switch_lines(gen))
    notes = "<!-- notes: everything below this line is hand-written and kept when the tables are regenerated -->"
    if out.is_file() and notes in out.read_text():
        text += "\n" + notes + out.read_text().split(notes, 1)[1]
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=1))  # per policy: figures, and every question's record
    print(text)


def switch_lines(gen: KVProbeGenerator) -> list[str]:
    """The switch probe's own offline figures (its export's test split), beside the live ones."""
    test = gen.configs.get("switch", {}).get("metrics", {}).get("test") if gen.switch else None
    if not test:
        return []
    p, w = test["policy"], test["windows"]
    return [f"Switch probe offline (`python -m kvprobe.fit --config configs/switch.yaml`, its test split: every decode "
            f"position of {p['answers']:.0f} slow answers): AUROC {w['auroc']:.3f} for \"the result is written\"; the "
            f"calibrated policy replayed there cuts {p['cut_share']:.0%} of the answers, saves {p['saved_tokens']:.1f} of "
            f"{p['mean_tokens']:.1f} decoded tokens per answer, and cuts {p['lost_share']:.1%} of them (right ones) "
            "before their result was written.", ""]


if __name__ == "__main__":
    from kvprobe.cli import run_module

    run_module(main, "kvprobe evaluate")
