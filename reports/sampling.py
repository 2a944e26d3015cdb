"""Sampling with the correctness probe: best-of-N, probe-weighted voting and early-stopped sampling, against
self-consistency, DeepConf-style confidence voting and ESC, on Qwen2.5-Coder-0.5B's sampled answers.

    python -m reports.sampling                      # the capture (configs/captures/qwen_sampled.yaml) takes ~80 min
    python -m reports.sampling --generator_out checkpoints/qwen2.5-coder-0.5b   # also ship the calibrated steering

1. The capture: 16 samples (T=0.7, top-p 0.95, sample j seeded j) of each of 180 three-term arithmetic questions,
   split by question: 30 train, 30 validation, 120 test (``configs/data/qwen_sampled.yaml``; ``--data`` names
   another sampled data config, e.g. one of ASDiv, with ``--out`` another report).
2. Every sample is scored by the shipped slow-answer correctness probe (trained on greedy answers of another
   question set) and by one fitted here on the 30 training questions' sampled answers.
3. For N = 1..16 (the first N samples of each question) each rule of ``kvprobe.sampling`` picks an answer; accuracy
   and mean tokens per question (sampled + one prefill) with bootstrap intervals over questions; paired bootstraps
   of ``probe_vote`` against ``vote`` and ``confidence_vote``; the AUROC among one question's samples.
4. Early stopping (``kvprobe.sampling.stopped_at``, what the live policy runs): the probe's margin rule and ESC's
   agreement rule, each calibrated on validation (the cheapest setting within 1 point of validation's vote@8),
   then run once on test; and their whole accuracy-vs-tokens curves.
5. Live: the ``sample`` policy with the calibrated steering on test questions, against the offline simulation of
   the same questions; and the probe's share of its wall time.
6. Throughput: ``benchmarks/sampling_throughput.py``'s result, when present (run it first).

Writes docs/sampling.md, docs/sampling.json (headline figures) and docs/sampling.png (``--out`` names others).
Nothing is tuned on test.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvprobe.cascade import paired_bootstrap
from kvprobe.evaluate import load_data
from kvprobe.export import load_probe
from kvprobe.metrics import auroc_or_nan
from kvprobe.plots import pyplot
from kvprobe.sampling import RULES, VoteTable, answer_classes, stopped_at
from kvprobe.tasks import Item, grade, load_items
from kvprobe.study.run import scores
from reports.common import quiet_fit, write_report

DATA = "configs/data/qwen_sampled.yaml"
SHIPPED = "checkpoints/qwen2.5-coder-0.5b"
NS = (1, 2, 4, 8, 16)
MATCH = 0.01  # early stopping must come within this of vote@8's accuracy (on validation when calibrating)
WAVES = (1, 2, 4)
ESC_WINDOWS = (2, 3, 4, 5, 6, 8)
THROUGHPUT = Path("benchmarks/results/sampling_throughput.json")
LIVE = 24  # test questions run live by default


@dataclass
class Question:
    """One question's samples in drawing order: the vote tables under each probe, tokens and prompt length."""

    qid: str
    tables: dict[str, VoteTable]  # probe name -> table (its probe column), same classes and grades
    tokens: list[int]
    prompt_tokens: int
    responses: list[str]

    def cost(self, m: int) -> int:
        """Tokens of drawing the first ``m`` samples: one prefill, every decoded token."""
        return self.prompt_tokens + sum(self.tokens[:m])


def questions_of(dm, split: str, scores: dict[str, torch.Tensor]) -> list[Question]:
    """The split's questions with their samples' classes (by the grader), grades, token counts and probe scores."""
    ds = dm.datasets[split]
    rows = [ds.rows[i] for i in ds.indices]
    by_qid: dict[str, list[int]] = {}
    for j, r in enumerate(rows):
        by_qid.setdefault(r["qid"], []).append(j)
    out = []
    for qid, where in by_qid.items():
        where.sort(key=lambda j: rows[j]["sample"])
        first = rows[where[0]]
        item = Item(qid, first["question"], first["gold"], tuple(json.loads(first["choices"])) if first["choices"] else None)
        classes, _ = answer_classes(item, [rows[j]["response"] for j in where])
        correct = [bool(rows[j]["correct"]) for j in where]
        confidence = [float(rows[j]["max_prob"]) for j in where]
        tables = {name: VoteTable(classes, s[where].tolist(), confidence, correct) for name, s in scores.items()}
        out.append(Question(qid, tables, [rows[j]["gen_tokens"] for j in where], first["prompt_tokens"],
                            [rows[j]["response"] for j in where]))
    return out


def probe_scores(probe, dm, split: str) -> torch.Tensor:
    """The probe's P(correct) of every answer of the split, in its order."""
    return scores(probe, dm.val_dataloader() if split == "val" else dm.test_dataloader())


def rule_at(qs: list[Question], rule: str, n: int, probe: str = "greedy") -> tuple[torch.Tensor, torch.Tensor]:
    """Per question: whether ``rule`` on the first ``n`` samples is right, and the tokens they cost."""
    right = torch.tensor([float(q.tables[probe].head(n).is_right(rule)) for q in qs])
    return right, torch.tensor([float(q.cost(n)) for q in qs])


def early(qs: list[Question], stop_on: str, stop_at: float, wave: int, n: int = 16, probe: str = "greedy"):
    """Per question under early stopping: right (probe_vote for the probe's rule, vote for ESC), tokens, samples."""
    return waves(qs, probe, wave, "probe_vote" if stop_on == "margin" else "vote",
                 lambda t: stopped_at(t, n, wave, stop_on, stop_at))


def waves(qs: list[Question], probe: str, wave: int, pick: str, samples_of) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per question, when sampling in waves of ``wave`` draws ``samples_of(its table)`` samples and ``pick`` chooses
    among them: whether it is right, the tokens it costs, the samples."""
    used = [samples_of(q.tables[probe]) for q in qs]
    right = torch.tensor([float(q.tables[probe].head(m).is_right(pick)) for q, m in zip(qs, used)])
    # a sample of a later wave re-feeds the prompt's last position (the live policy's reprompt): counted too
    tokens = [float(q.cost(m) + max(0, m - wave)) for q, m in zip(qs, used)]
    return right, torch.tensor(tokens), torch.tensor(used, dtype=torch.float)


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """Mean of ``a - b`` over questions with its 95% bootstrap interval (``kvprobe.cascade.paired_bootstrap``)."""
    d = paired_bootstrap(a, b)
    return d["diff"], d["lo"], d["hi"]


def mean_ci(x: torch.Tensor) -> tuple[float, float, float]:
    return paired(x, torch.zeros_like(x))


def within_question_auroc(qs: list[Question], score) -> tuple[float, int]:
    """Mean AUROC among one question's samples (``score(question)``), over questions with right and wrong ones."""
    return grouped_auroc(torch.tensor([x for q in qs for x in score(q)]),
                         torch.tensor([float(c) for q in qs for c in q.tables["greedy"].correct]),
                         [q.qid for q in qs for _ in q.tokens])


def grouped_auroc(scores: torch.Tensor, labels: torch.Tensor, groups: list[str]) -> tuple[float, int]:
    """Mean AUROC within each group (one question's samples) over the groups with both labels, and their number."""
    where: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        where.setdefault(g, []).append(i)
    values = [auroc_or_nan(scores[i], labels[i]) for i in map(torch.tensor, where.values()) if 0 < labels[i].sum() < len(i)]
    return sum(values) / len(values), len(values)


def margins(qs: list[Question], probe: str) -> list[float]:
    """Candidate thresholds of the margin rule: every margin the tables reach, halfway between neighbours."""
    seen = set()
    for q in qs:
        t = q.tables[probe]
        for m in range(1, 17):
            ranked = sorted(t.head(m).totals(t.probe).values(), reverse=True) + [0.0, 0.0]
            seen.add(round(ranked[0] - ranked[1], 4))
    seen = sorted(seen)
    return [(a + b) / 2 for a, b in zip(seen, seen[1:])] + [math.inf]


def calibrate(val: list[Question], stop_on: str, settings: list[tuple[int, float]], probe: str = "greedy") -> dict:
    """The setting (wave, stop_at) of ``early`` with the fewest validation tokens within ``MATCH`` of validation's
    vote@8 (or, if none is, the most accurate)."""
    return cheapest(val, settings, lambda qs, wave, stop_at: early(qs, stop_on, stop_at, wave, probe=probe))


def cheapest(val: list[Question], settings: list[tuple[int, float]], run) -> dict:
    """``calibrate`` for any stopping simulation ``run(questions, wave, stop_at)`` (returning what ``early`` does)."""
    target = float(rule_at(val, "vote", 8)[0].mean()) - MATCH
    rows = []
    for wave, stop_at in settings:
        right, tokens, used = run(val, wave, stop_at)
        rows.append({"wave": wave, "stop_at": stop_at, "accuracy": float(right.mean()), "tokens": float(tokens.mean())})
    ok = [r for r in rows if r["accuracy"] >= target - 1e-9]
    best = min(ok, key=lambda r: (r["tokens"], -r["accuracy"])) if ok else max(rows, key=lambda r: (r["accuracy"], -r["tokens"]))
    return best | {"target": target, "met_on_val": bool(ok)}


def live_check(questions: list[Question], dm, steering: dict, limit: int, batch: int) -> dict:
    """The ``sample`` policy, live, on the first ``limit`` test questions, against their captured samples."""
    from kvprobe.steering import KVProbeGenerator

    gen = KVProbeGenerator.from_pretrained(SHIPPED)
    capture = dm.capture.generation
    ds = dm.datasets["test"]
    rows = {ds.rows[i]["qid"]: ds.rows[i] for i in ds.indices}
    qs = questions[:limit]
    items = [Item(q.qid, rows[q.qid]["question"], rows[q.qid]["gold"]) for q in qs]
    results, t0 = [], time.perf_counter()
    for start in tqdm(range(0, len(items), batch), desc="live sample", unit="call"):
        results += gen.generate(items[start:start + batch], policy="sample", do_sample=True, temperature=capture.temperature,
                                top_p=capture.top_p, seed=capture.seed, max_new_tokens=dict(capture.max_new_tokens), **steering)
    wall = time.perf_counter() - t0
    offline_right, offline_tokens, offline_used = early(qs, steering["stop_on"], steering["stop_at"], steering["wave"])
    same_samples = sum(s.text == q.responses[j] for r, q in zip(results, qs) for j, s in enumerate(r.samples))
    drawn = sum(len(r.samples) for r in results)
    return {
        "questions": len(qs), "accuracy": sum(grade(i, r.text)[1] for i, r in zip(items, results)) / len(qs),
        "offline_accuracy": float(offline_right.mean()),
        "mean_samples": drawn / len(qs), "offline_mean_samples": float(offline_used.mean()),
        "mean_tokens": sum(r.decoded_tokens + r.prompt_tokens for r in results) / len(qs),
        "offline_mean_tokens": float(offline_tokens.mean()),
        "samples_as_captured": same_samples / drawn, "probe_share": sum(r.probe_seconds for r in results) / wall,
        "wall_seconds": wall, "tokens_per_second": sum(r.decoded_tokens for r in results) / wall, "batch": batch,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m reports.sampling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DATA, help="a data config over a sampled capture (16 samples per question)")
    parser.add_argument("--out", default="docs/sampling.md")
    parser.add_argument("--runs", default="runs/report")
    parser.add_argument("--live", type=int, default=LIVE, help="the first test questions, run live (0: none)")
    parser.add_argument("--live_batch", type=int, default=12, help="questions per live call (each expands to its samples)")
    parser.add_argument("--generator_out", default=None, help="write the shipped generator with the calibrated steering here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    dm = load_data(args.data)
    greedy = load_probe(Path(SHIPPED) / "correctness")
    folder = Path(args.runs) / ("sampled-correctness" + ("" if args.data == DATA else "-" + Path(args.data).stem))
    quiet_fit(["--config", "configs/coe.yaml", "--data", args.data], folder)
    sampled = load_probe(folder)
    split = {s: questions_of(dm, s, {"greedy": probe_scores(greedy, dm, s), "sampled": probe_scores(sampled, dm, s)})
             for s in ("val", "test")}
    val, test = split["val"], split["test"]
    # the greedy-trained probe learned on another question set (its card's task): how many test questions it saw
    overlap = {dm.datasets["test"].rows[i]["question"] for i in dm.datasets["test"].indices} & {i.question for i in load_items(greedy.card.task)}

    # --- fixed N ---------------------------------------------------------------------------------------------------
    table = {}
    for n in NS:
        for rule in RULES:
            right, tokens = rule_at(test, rule, n)
            table[(rule, n)] = (mean_ci(right), float(tokens.mean()))
        for rule in ("probe_vote", "probe_best"):
            right, tokens = rule_at(test, rule, n, "sampled")
            table[(rule + " (sampled-trained)", n)] = (mean_ci(right), float(tokens.mean()))
    diffs = {}
    for n in (8, 16):
        pv = rule_at(test, "probe_vote", n)[0]
        diffs[n] = {"vote": paired(pv, rule_at(test, "vote", n)[0]),
                    "confidence_vote": paired(pv, rule_at(test, "confidence_vote", n)[0])}
    wq = {name: within_question_auroc(test, fn) for name, fn in {
        "probe (greedy-trained)": lambda q: q.tables["greedy"].probe, "probe (sampled-trained)": lambda q: q.tables["sampled"].probe,
        "mean max-prob": lambda q: q.tables["greedy"].confidence, "length (shorter)": lambda q: [-t for t in q.tokens]}.items()}
    pooled = {name: auroc_or_nan(torch.tensor([x for q in test for x in col(q)]),
                                 torch.tensor([float(c) for q in test for c in q.tables["greedy"].correct]))
              for name, col in {"probe (greedy-trained)": lambda q: q.tables["greedy"].probe,
                                "probe (sampled-trained)": lambda q: q.tables["sampled"].probe,
                                "mean max-prob": lambda q: q.tables["greedy"].confidence}.items()}

    # --- early stopping: calibrated on validation, run once on test ------------------------------------------------
    probe_cal = calibrate(val, "margin", [(w, t) for w in WAVES for t in margins(val, "greedy")])
    esc_cal = calibrate(val, "agree", [(w, 0.0) for w in ESC_WINDOWS])
    vote8_right, vote8_tokens = rule_at(test, "vote", 8)
    vote8_sampled = float(vote8_tokens.mean()) - sum(q.prompt_tokens for q in test) / len(test)
    prompt_mean = sum(q.prompt_tokens for q in test) / len(test)
    sampled_cal = calibrate(val, "margin", [(w, t) for w in WAVES for t in margins(val, "sampled")], probe="sampled")
    stops = {}
    for name, cal, stop_on, probe in (("probe margin", probe_cal, "margin", "greedy"), ("ESC", esc_cal, "agree", "greedy"),
                                      ("probe margin (sampled-trained probe)", sampled_cal, "margin", "sampled")):
        right, tokens, used = early(test, stop_on, cal["stop_at"], cal["wave"], probe=probe)
        stops[name] = {"calibrated": cal, "accuracy": mean_ci(right), "tokens": float(tokens.mean()),
                       "sampled_tokens": float(tokens.mean()) - prompt_mean, "samples": float(used.mean()),
                       "minus_vote8": paired(right, vote8_right)}
    # the ceiling of any stopping rule that picks by probe_vote: stop at the first sample count whose pick is right
    # (one sample when none is); no rule knows the grades, so none can do better
    used = torch.tensor([float(next((m for m in range(1, 17) if q.tables["greedy"].head(m).is_right("probe_vote")), 1)) for q in test])
    right = torch.tensor([float(q.tables["greedy"].head(int(m)).is_right("probe_vote")) for q, m in zip(test, used)])
    tokens = torch.tensor([float(q.cost(int(m)) + m - 1) for q, m in zip(test, used)])
    stops["oracle stopping (ceiling)"] = {"calibrated": {"wave": 1, "met_on_val": True}, "accuracy": mean_ci(right),
                                          "tokens": float(tokens.mean()), "sampled_tokens": float(tokens.mean()) - prompt_mean,
                                          "samples": float(used.mean()), "minus_vote8": paired(right, vote8_right)}

    # --- curves (descriptive: every setting on test; nothing chosen from them) --------------------------------------
    curves = {rule: [(float(tokens.mean()), float(right.mean())) for n in range(1, 17) for right, tokens in [rule_at(test, rule, n)]]
              for rule in ("vote", "probe_vote", "confidence_vote", "probe_best", "max_prob_best", "oracle")}
    margin_curve = sorted({(float(t.mean()), float(r.mean())) for t_at in margins(test, "greedy")[::3] + [math.inf]
                           for r, t, _ in [early(test, "margin", t_at, probe_cal["wave"])]})
    curves["early stop (probe margin)"] = margin_curve
    curves["early stop (ESC)"] = sorted((float(t.mean()), float(r.mean())) for w in ESC_WINDOWS
                                        for r, t, _ in [early(test, "agree", 0.0, w)])
    gap = min(acc - _interpolate(curves["vote"], tok) for tok, acc in margin_curve if tok <= curves["vote"][-1][0])
    c = dm.capture
    setting = {"task": c.task.name, "params": c.task.params, "temperature": c.generation.temperature, "top_p": c.generation.top_p,
               "cap": c.generation.max_new_tokens[c.prompt.mode], "samples": c.generation.samples, "model": c.model.name,
               "train": len({dm.datasets["train"].rows[i]["qid"] for i in dm.datasets["train"].indices}), "data": args.data,
               "out": args.out, "live": args.live,
               "command": "python -m reports.sampling" + ("" if args.data == DATA else f" --data {args.data} --out {args.out}")
               + ("" if args.live == LIVE else f" --live {args.live}")}
    _plot(curves, Path(args.out).with_suffix(".png"), setting)

    live = {}
    steering = {"samples": 16, "select": "probe_vote", "wave": probe_cal["wave"], "stop_on": "margin", "stop_at": probe_cal["stop_at"]}
    if args.live:
        live = live_check(test, dm, steering, args.live, args.live_batch)
    if args.generator_out:
        _ship(args.generator_out, steering)
    throughput = json.loads(THROUGHPUT.read_text()) if THROUGHPUT.is_file() else {}

    figures = {
        "test_questions": len(test), "val_questions": len(val), "samples_per_question": 16,
        **{f"{rule}_acc_n{n}": round(table[(rule, n)][0][0], 4) for rule in ("vote", "probe_vote", "confidence_vote", "probe_best", "max_prob_best") for n in NS},
        **{f"pass_at_{n}": round(table[("oracle", n)][0][0], 4) for n in NS},
        "sampled_trained_probe_vote_acc_n8": round(table[("probe_vote (sampled-trained)", 8)][0][0], 4),
        "probe_vote_minus_vote_n8_ci_lo": round(diffs[8]["vote"][1], 4), "probe_vote_minus_vote_n8_ci_hi": round(diffs[8]["vote"][2], 4),
        "probe_vote_minus_vote_n8": round(diffs[8]["vote"][0], 4), "probe_vote_minus_vote_n16": round(diffs[16]["vote"][0], 4),
        "probe_vote_minus_confidence_vote_n8": round(diffs[8]["confidence_vote"][0], 4),
        "probe_vote_minus_confidence_vote_n16": round(diffs[16]["confidence_vote"][0], 4),
        "early_stop_acc": round(stops["probe margin"]["accuracy"][0], 4),
        "early_stop_tokens_over_vote_n8": round(stops["probe margin"]["sampled_tokens"] / vote8_sampled, 4),
        "early_stop_mean_samples": round(stops["probe margin"]["samples"], 3),
        "esc_acc": round(stops["ESC"]["accuracy"][0], 4),
        "early_stop_sampled_trained_acc": round(stops["probe margin (sampled-trained probe)"]["accuracy"][0], 4),
        "early_stop_sampled_trained_tokens_over_vote_n8": round(stops["probe margin (sampled-trained probe)"]["sampled_tokens"] / vote8_sampled, 4),
        "oracle_stop_acc": round(stops["oracle stopping (ceiling)"]["accuracy"][0], 4),
        "oracle_stop_tokens_over_vote_n8": round(stops["oracle stopping (ceiling)"]["sampled_tokens"] / vote8_sampled, 4),
        "esc_tokens_over_vote_n8": round(stops["ESC"]["sampled_tokens"] / vote8_sampled, 4),
        "early_stop_curve_min_gap_to_vote": round(gap, 4),
        "within_question_auroc": round(wq["probe (greedy-trained)"][0], 4),
        "within_question_auroc_sampled_trained": round(wq["probe (sampled-trained)"][0], 4),
        "within_question_auroc_max_prob": round(wq["mean max-prob"][0], 4),
        "within_question_questions": wq["probe (greedy-trained)"][1],
        "sampling_throughput_over_hf": throughput.get("sampling_over_hf"),
        "sampling_throughput_over_separate_calls": throughput.get("sampling_over_separate"),
        "greedy_loop_over_hf": throughput.get("greedy_over_hf"),
        "live_probe_share": round(live["probe_share"], 5) if live else None,
        "test_questions_in_greedy_probe_training": len(overlap),
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
    write_report(args.out, _markdown(figures, table, diffs, wq, pooled, stops, vote8_sampled, live, throughput, steering, setting))
    return figures


def _interpolate(curve: list[tuple[float, float]], x: float) -> float:
    """The accuracy of a (tokens, accuracy) curve at ``x`` tokens, linear between points."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(1e-9, x1 - x0)
    return curve[0][1] if x < curve[0][0] else curve[-1][1]


def _plot(curves: dict, out: Path, setting: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, points in curves.items():
        xs, ys = zip(*points)
        style = "--" if name == "oracle" else "-"
        ax.plot(xs, ys, style, marker="o" if name.startswith("early") else ".", ms=4, label=name if name != "oracle" else "pass@N (ceiling)")
    ax.set_xscale("log")
    ax.set_xlabel("mean tokens per question (sampled + prefill)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{setting['model']}, {setting['task']}: N = 1..16 samples")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _ship(path: str, steering: dict) -> None:
    import dataclasses

    from kvprobe.steering import KVProbeGenerator

    gen = KVProbeGenerator.from_pretrained(path)
    gen.steering = dataclasses.replace(gen.steering, **steering)
    gen.save_pretrained(path)


def _markdown(f, table, diffs, wq, pooled, stops, vote8_sampled, live, throughput, steering, setting) -> str:
    pct = lambda ci: f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"
    png = str(Path(setting["out"]).with_suffix(".png"))
    lines = [
        "# Sampling with the correctness probe",
        "",
        f"Reproduce: `{setting['command']}` (the sampled capture its data config reads is made on first use: 73 min on 2 CPU "
        "cores for the default, 85 min for ASDiv's; then ~3 min" + (", and ~7 min for the live run" if setting["live"] else "")
        + "). Throughput: `python benchmarks/sampling_throughput.py` "
        f"first. Figures for programs: `{Path(setting['out']).with_suffix('.json')}`.",
        "",
        f"{setting['model']} (`{setting['data']}`), step by step, {setting['samples']} samples per question (T={setting['temperature']}, "
        f"top-p {setting['top_p']}, {setting['cap']}-token cap), {f['test_questions']} test questions ({setting['task']} "
        f"{json.dumps(setting['params'])}); {f['val_questions']} validation questions calibrate early stopping; "
        f"{setting['train']} train the sampled-answer probe. Tokens: mean per question, every sampled token "
        "plus one prefill of the prompt. Intervals: 95% bootstrap over questions.",
        "",
        "## Accuracy at N samples",
        "",
        "| rule | " + " | ".join(f"N={n}" for n in NS) + " |",
        "|---|" + "---|" * len(NS),
    ]
    for rule in ("vote", "probe_vote", "probe_vote (sampled-trained)", "confidence_vote", "probe_best", "probe_best (sampled-trained)",
                 "max_prob_best", "oracle"):
        lines.append(f"| {rule if rule != 'oracle' else 'pass@N (oracle)'} | " + " | ".join(pct(table[(rule, n)][0]) for n in NS) + " |")
    lines.append("| mean tokens | " + " | ".join(f"{table[('vote', n)][1]:.0f}" for n in NS) + " |")
    lines += [
        "",
        "Paired differences (test):",
        "",
        "| | N=8 | N=16 |",
        "|---|---|---|",
        f"| probe_vote - vote | {pct(diffs[8]['vote'])} | {pct(diffs[16]['vote'])} |",
        f"| probe_vote - confidence_vote | {pct(diffs[8]['confidence_vote'])} | {pct(diffs[16]['confidence_vote'])} |",
        "",
        "## How well each score ranks one question's samples",
        "",
        f"Mean AUROC among a question's 16 samples, over the {f['within_question_questions']} test questions with right and wrong "
        "ones; pooled AUROC over all test samples beside it.",
        "",
        "| score | within-question AUROC | pooled AUROC |",
        "|---|---|---|",
    ]
    for name, (value, _) in wq.items():
        lines.append(f"| {name} | {value:.3f} | {pooled.get(name, float('nan')):.3f} |")
    lines += [
        "",
        "## Early stopping",
        "",
        "Samples are drawn in waves; after each, a question stops once its table is settled (`kvprobe.sampling.settled`, the "
        "function the live policy calls). Each rule's setting is the cheapest on validation within 1 point of validation's "
        "vote@8; test is run once with it.",
        "",
        "| rule | setting (val) | test accuracy | mean samples | sampled tokens / vote@8's | - vote@8 (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in stops.items():
        cal = s["calibrated"]
        setting = f"wave {cal['wave']}" + (f", margin {cal['stop_at']:.3f}" if name.startswith("probe margin") else "")
        lines.append(f"| {name} | {setting}{'' if cal['met_on_val'] else ' (none met the target on val)'} | {pct(s['accuracy'])} | "
                     f"{s['samples']:.2f} | {s['sampled_tokens'] / vote8_sampled:.2f} | {pct(s['minus_vote8'])} |")
    lines += [
        "",
        f"vote@8 samples {vote8_sampled:.0f} tokens per question. Over the whole curve (every margin, `{png}`) "
        f"the probe's early stopping lies at least {f['early_stop_curve_min_gap_to_vote']:+.3f} from vote@N's accuracy at "
        "equal tokens (negative: below it somewhere).",
        "",
        f"![accuracy vs tokens]({Path(png).name})",
        "",
    ]
    if live:
        lines += [
            "## Live",
            "",
            f"`KVProbeGenerator.generate(..., policy='sample', {', '.join(f'{k}={v!r}' for k, v in steering.items())})` on the first "
            f"{live['questions']} test questions ({live['batch']} questions per call, each expanded to its samples), seeds as captured:",
            "",
            "| | live | offline simulation |",
            "|---|---|---|",
            f"| accuracy | {live['accuracy']:.3f} | {live['offline_accuracy']:.3f} |",
            f"| mean samples | {live['mean_samples']:.2f} | {live['offline_mean_samples']:.2f} |",
            f"| mean tokens | {live['mean_tokens']:.0f} | {live['offline_mean_tokens']:.0f} |",
            "",
            f"{live['samples_as_captured']:.0%} of the live samples are token for token the captured ones (the rest: bf16 sums "
            f"differ between a capture batch of 64 rows and a live one, and one flipped token changes the rest). Probe time: "
            f"{live['probe_share']:.2%} of wall time; {live['tokens_per_second']:.0f} decoded tokens/s.",
            "",
        ]
    if throughput:
        lines += ["## Throughput", "", "`python benchmarks/sampling_throughput.py` (benchmarks/results/sampling_throughput.json):", "",
                  "```", json.dumps(throughput, indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
