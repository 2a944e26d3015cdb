"""Write ``docs/correctness.md``: every correctness signal on the same held-out answers, per (model, task).

    python -m kvprobe.correctness_report            # captures if needed, trains 3 probes per task, ~5 min cached

For each task config it trains the KV probe, the hidden-state probe and the prompt-KV probe with the same
machinery (``kvprobe.fit``), reports them beside the label-free scores on the same test questions, and adds the
transfer rows: the KV probe trained on one task, tested on the other's test split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kvprobe import fit
from kvprobe.export import load_probe
from kvprobe.metrics import score_metrics
from kvprobe.store import CaptureStore

NOTES = "<!-- notes: everything below this line is hand-written and kept when the tables are regenerated -->"
PROBES = {"kv": "configs/model/coe_kv.yaml", "hidden": "configs/model/coe_hidden.yaml"}
LABELS = {
    "probe:kv": "trained probe, answer KV (per layer, pooled)",
    "probe:hidden": "trained probe, hidden states (per layer, pooled)",
    "probe:prompt_kv": "trained probe, prompt KV only (before decoding)",
    "probe:length": "trained probe, response length + finished-before-cap only",
    "kv_coe_r_layer": "KV-CoE-R, layer axis (label-free)",
    "kv_coe_c_layer": "KV-CoE-C, layer axis (label-free)",
    "kv_coe_r_token": "KV-CoE-R, token axis (label-free)",
    "kv_coe_c_token": "KV-CoE-C, token axis (label-free)",
    "hs_coe_r": "hidden-state CoE-R (label-free)",
    "hs_coe_c": "hidden-state CoE-C (label-free)",
    "max_prob": "mean max-prob (output)",
    "neg_entropy": "- mean entropy (output)",
    "neg_length": "- response length (shorter = correct)",
    "finished": "finished before the token cap",
}


def train(data: str, source: str, out: Path) -> tuple[dict, object]:
    model_cfg = PROBES.get(source, PROBES["kv"])
    args = ["--config", "configs/coe.yaml", "--data", data, "--model", model_cfg, "--export_dir", str(out),
            "--trainer.logger", "false", "--trainer.callbacks.init_args.dirpath", str(out / "lightning"),
            "--trainer.enable_progress_bar", "false"]
    if source in ("prompt_kv", "length"):
        args += ["--model.init_args.source", source]
    cli = fit.make_cli(args)
    return fit.run(cli, out), cli.datamodule


def evaluate(probe, loader) -> dict:
    logits, labels = probe.predict_logits(loader)
    return score_metrics(probe.probability(logits), labels, is_probability=True)


def bytes_per_item(path: Path) -> dict[str, float]:
    shards, table = CaptureStore(path).open()
    n = table.num_rows
    sizes = {}
    for name in ("response_kv", "hidden", "prompt_kv", "token_kv"):
        if name in shards[0]:
            sizes[name] = sum(s[name].numel() * s[name].element_size() for s in shards) / n
    return sizes


def fmt(m: dict, key: str) -> str:
    return "–" if key not in m else f"{m[key]:.3f}"


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| signal | AUROC [95% CI] | FPR95 | AUPR | ECE |", "|---|---|---|---|---|"]
    for key, m in results.items():
        lines.append(f"| {LABELS.get(key, key)} | {m['auroc']:.3f} [{m['auroc_lo']:.2f}, {m['auroc_hi']:.2f}] | "
                     f"{fmt(m, 'fpr95')} | {fmt(m, 'aupr')} | {fmt(m, 'ece')} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["configs/data/arithmetic.yaml", "configs/data/arc_easy.yaml"])
    parser.add_argument("--out", default="docs/correctness.md")
    parser.add_argument("--checkpoints", default="checkpoints/report")
    args = parser.parse_args(argv)

    sections, exported, modules = [], {}, {}
    for data in args.tasks:
        task = Path(data).stem
        rows = {}
        for source in ("kv", "hidden", "prompt_kv", "length"):
            out = Path(args.checkpoints) / f"{task}-{source}"
            results, dm = train(data, source, out)
            rows[f"probe:{source}"] = results["test"]["probe"]
            exported[(task, source)] = out
            baselines = {k: v for k, v in results["test"].items() if k != "probe"}
        rows |= baselines
        modules[task] = dm
        spec = CaptureStore(dm.path).spec()
        test = dm.datasets["test"]
        correct = sum(test.rows[i]["correct"] for i in test.indices)
        sizes = bytes_per_item(dm.path)
        sections.append(
            [f"## {spec['model']['name']} on {spec['task']['name']} ({spec['prompt']['mode']} mode)", "",
             f"Test split: {len(test)} questions never used for training, checkpoint selection or calibration; "
             f"{correct} correct / {len(test) - correct} wrong ({correct / len(test):.0%} positive). "
             f"Train {len(dm.datasets['train'])}, validation {len(dm.datasets['val'])}. Capture `{dm.path.name}`.", ""]
            + table(rows)
            + ["", "Bytes per item on disk: " + ", ".join(f"`{k}` {v / 1024:.1f} KB" for k, v in sizes.items())
               + " (`token_kv` is the mean over answers; fp16 for `prompt_kv` and `token_kv`, fp32 otherwise).", ""]
        )
    tasks = [Path(t).stem for t in args.tasks]
    transfer = ["## Transfer: the KV probe trained on one task, tested on the other", "",
                "| trained on | tested on | AUROC [95% CI] | FPR95 | AUPR | ECE |", "|---|---|---|---|---|---|"]
    for src in tasks:
        for dst in tasks:
            if src != dst:
                probe = load_probe(exported[(src, "kv")])
                m = evaluate(probe, modules[dst].test_dataloader())
                transfer.append(f"| {src} | {dst} | {m['auroc']:.3f} [{m['auroc_lo']:.2f}, {m['auroc_hi']:.2f}] | "
                                f"{m['fpr95']:.3f} | {m['aupr']:.3f} | {m['ece']:.3f} |")
    header = [
        "# Correctness: which signal tells a right answer from a wrong one?", "",
        "Regenerate everything below (captures are cached; ~5 min after the first capture):", "",
        "```bash", "python -m kvprobe.correctness_report", "```", "",
        "Correct = positive class. Every score keeps its fixed orientation (higher = more likely correct), never "
        "flipped on test data, so a label-free AUROC below 0.5 means the score points the wrong way on this model. "
        "The four trained probes share one class (`kvprobe.probes.CorrectnessProbe`, linear head, standardised "
        "inputs, BCE, temperature-calibrated on validation) and differ only in their input. 95% intervals: 1000 "
        "bootstrap resamples of the test questions. ECE applies to calibrated probabilities only.", "",
    ]
    text = "\n".join(header + [line for s in sections for line in s] + transfer) + "\n"
    out = Path(args.out)
    if out.is_file() and NOTES in out.read_text():  # hand-written reading of the numbers survives regeneration
        text += "\n" + NOTES + out.read_text().split(NOTES, 1)[1]
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
