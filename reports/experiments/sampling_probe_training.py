"""Would a correctness probe trained differently choose better among sampled answers? Two levers on the targets of
docs/sampling.md (probe_vote >= vote and >= confidence_vote; early stopping at half vote@8's tokens): more sampled
training answers, and a within-question objective.

    python -m reports.experiments.sampling_probe_training   # the extra capture (60 questions x 16) takes ~25 min once

The data is configs/data/qwen_sampled_more.yaml: the sampling report's validation and test questions unchanged, and
its 30 training questions plus 60 more of another seed (16 samples each). Probes, all scored on the same test samples:

- ``greedy``: the shipped probe (trained on greedy answers of other questions);
- ``fit 30`` and ``fit 90``: ``kvprobe fit`` (configs/coe.yaml) on the 30, or all 90, training questions' samples;
- ``pointwise 30/90`` and ``pairwise 30/90``: a linear head on the same standardised KV inputs, fitted by L-BFGS with
  either the logistic loss on each sample (pointwise) or the logistic loss on the score difference of every
  (right, wrong) pair of samples of one question (pairwise: it learns only to rank a question's samples, so its
  scores are mapped to P(correct) by a logistic fit on validation). The L2 strength of each is chosen by validation's
  within-question AUROC.

Prints one line per probe: test within-question and pooled AUROC, probe_vote at N=8 and 16 with its paired difference
to vote and confidence_vote, and the probe's margin early stopping calibrated on validation (accuracy, sampled tokens
over vote@8's). A third lever rides along: validation is small (30 questions) and easier than test (vote@8 0.900
vs 0.750), so for the probes that never saw the 60 extra questions, the margin rule is also calibrated on validation
plus those 60 (90 questions). And a fourth: a learned stopping rule. From a question's samples so far (scored by the
shipped probe, which never trained on these questions) a logistic model on six statistics (samples drawn, vote lead,
vote lead per sample, probe margin, the leader's share of summed P(correct), mean P(correct)) predicts whether the
current probe_vote pick is already the pick of all 16 samples; it is fitted on the 90 training questions (no grades
needed), and sampling stops once the prediction reaches a threshold chosen, with the wave, on validation.
Writes docs/sampling_probe_training.json. Nothing is chosen on test.
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kvprobe import calibration
from kvprobe.evaluate import load_data
from kvprobe.export import load_probe
from kvprobe.metrics import auroc_or_nan
from kvprobe.probes import CorrectnessProbe
from kvprobe.sampling import first_settled
from kvprobe.study.run import scores as probe_scores
from reports.common import quiet_fit
from reports.sampling import (DATA, SHIPPED, WAVES, calibrate, cheapest, early, grouped_auroc, margins, paired,
                              questions_of, rule_at, waves, within_question_auroc)

MORE = "configs/data/qwen_sampled_more.yaml"
L2 = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
SPLITS = ("train", "val", "test")


def features(dm, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The split's probe inputs (the shipped probe's: per-layer K and V pooled over the answer), labels, question ids."""
    ds = dm.datasets[split]
    probe = CorrectnessProbe()
    x = torch.cat([probe.inputs(b) for b in DataLoader(ds, batch_size=256)])
    y = torch.tensor([float(ds.rows[i]["correct"]) for i in ds.indices])
    return x, y, [ds.rows[i]["qid"] for i in ds.indices]


def pairs(y: torch.Tensor, qids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (right, wrong) pair of samples of one question, as two index tensors."""
    by: dict[str, list[int]] = {}
    for i, q in enumerate(qids):
        by.setdefault(q, []).append(i)
    right, wrong = [], []
    for rows in by.values():
        for i in rows:
            for j in rows:
                if y[i] > 0.5 > y[j]:
                    right.append(i)
                    wrong.append(j)
    return torch.tensor(right), torch.tensor(wrong)


def fit_linear(x: torch.Tensor, y: torch.Tensor, qids: list[str], objective: str, l2: float) -> torch.Tensor:
    """(weights..., bias) of a linear score on standardised ``x``, by L-BFGS on the pointwise or pairwise loss."""
    coef = torch.zeros(x.shape[1] + 1, requires_grad=True)
    opt = torch.optim.LBFGS([coef], max_iter=300, line_search_fn="strong_wolfe")
    i, j = pairs(y, qids)

    def closure():
        opt.zero_grad()
        s = x @ coef[:-1] + coef[-1]
        if objective == "pointwise":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(s, y)
        else:
            loss = torch.nn.functional.softplus(s[j] - s[i]).mean()
        loss = loss + l2 * coef[:-1].pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return coef.detach()


def own_probe(train, splits: dict, objective: str) -> tuple[dict[str, torch.Tensor], dict]:
    """P(correct) of every split's samples under a linear head fitted on ``train`` (L2 chosen on ``splits["val"]``)."""
    xt, yt, qt = train
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    xs = {s: (x - mean) / std for s, (x, _, _) in splits.items()}
    _, yv, qv = splits["val"]
    standard = (xt - mean) / std
    fits = {l2: fit_linear(standard, yt, qt, objective, l2) for l2 in L2}
    chosen = {l2: grouped_auroc(xs["val"] @ c[:-1] + c[-1], yv, qv)[0] for l2, c in fits.items()}
    l2 = max(chosen, key=chosen.get)
    c = fits[l2]
    raw = {s: x @ c[:-1] + c[-1] for s, x in xs.items()}
    platt = calibration.fit_logistic(raw["val"][:, None], yv)  # monotone: rankings unchanged, P(correct) on validation's scale
    return ({s: torch.sigmoid(r * platt[0] + platt[1]) for s, r in raw.items()},
            {"l2": l2, "val_within_question_auroc": {str(k): round(v, 4) for k, v in chosen.items()}})


def stop_statistics(t) -> list[float]:
    """What the learned stopping rule sees of a question's samples so far (``t``: their vote table)."""
    m = len(t.classes)
    votes = sorted(t.totals([1.0] * m).values(), reverse=True) + [0.0, 0.0]
    probe = sorted(t.totals(t.probe).values(), reverse=True) + [0.0, 0.0]
    return [m / 16, votes[0] - votes[1], (votes[0] - votes[1]) / m, probe[0] - probe[1],
            probe[0] / max(1e-9, sum(probe)), sum(t.probe) / m]


def learned_stop(train, val, test, probe: str) -> dict:
    """The learned stopping rule (see the module's text): fitted on ``train``, threshold and wave from ``val``."""
    x, y = [], []
    for q in train:
        t = q.tables[probe]
        final = t.choose("probe_vote")
        for m in range(1, 16):
            x.append(stop_statistics(t.head(m)))
            y.append(float(t.head(m).choose("probe_vote") == final))
    x = torch.tensor(x)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    coef = calibration.fit_logistic((x - mean) / std, torch.tensor(y))

    def run(qs, wave: int, threshold: float):
        def settle(so_far) -> bool:
            z = (torch.tensor(stop_statistics(so_far)) - mean) / std
            return float(torch.sigmoid(z @ coef[:-1] + coef[-1])) >= threshold

        return waves(qs, probe, wave, "probe_vote", lambda t: first_settled(t, 16, wave, settle))

    grid = [(w, th) for w in WAVES for th in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.01)]
    cal = cheapest(val, grid, run)
    right, tokens, used = run(test, cal["wave"], cal["stop_at"])
    return {"wave": cal["wave"], "stop_at": cal["stop_at"], "met_on_val": cal["met_on_val"],
            "coef": [round(float(c), 4) for c in coef], "right": right, "tokens": tokens, "used": used}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m reports.experiments.sampling_probe_training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/report")
    parser.add_argument("--out", default="docs/sampling_probe_training.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    dm = load_data(MORE)
    base = load_data(DATA)
    assert all(dm.datasets[s].rows[i]["qid"] == base.datasets[s].rows[k]["qid"]
               for s in ("val", "test") for i, k in zip(dm.datasets[s].indices, base.datasets[s].indices)), \
        "validation and test must be the sampling report's"
    first = {base.datasets["train"].rows[i]["qid"] for i in base.datasets["train"].indices}

    scores, notes = {s: {} for s in SPLITS}, {}
    fitted = {"greedy": load_probe(Path(SHIPPED) / "correctness")}
    for name, data in (("fit 30", DATA), ("fit 90", MORE)):
        folder = Path(args.runs) / ("sampling-probe-" + name.replace(" ", "-"))
        quiet_fit(["--config", "configs/coe.yaml", "--data", data], folder)
        fitted[name] = load_probe(folder)
    for name, probe in fitted.items():
        for s in SPLITS:
            scores[s][name] = probe_scores(probe, DataLoader(dm.datasets[s], batch_size=256))

    splits = {s: features(dm, s) for s in SPLITS}
    full = splits["train"]
    keep = torch.tensor([q in first for q in full[2]])
    thirty = (full[0][keep], full[1][keep], [q for q, k in zip(full[2], keep) if k])
    for objective in ("pointwise", "pairwise"):
        for n, train in ((30, thirty), (90, full)):
            name = f"{objective} {n}"
            out, notes[name] = own_probe(train, splits, objective)
            for s in SPLITS:
                scores[s][name] = out[s]
            print(name, notes[name], flush=True)

    qs = {s: questions_of(dm, s, scores[s]) for s in SPLITS}
    extra = [q for q in qs["train"] if q.qid not in first]  # questions only the "90" probes trained on
    t = qs["test"]
    vote8, prompt_mean = rule_at(t, "vote", 8), sum(q.prompt_tokens for q in t) / len(t)
    vote8_sampled = float(vote8[1].mean()) - prompt_mean

    def figures(right, tokens, used) -> dict:
        """A stopping rule's test figures: accuracy, samples, sampled tokens over vote@8's, difference to vote@8."""
        return {"accuracy": float(right.mean()), "samples": float(used.mean()),
                "tokens_over_vote_n8": (float(tokens.mean()) - prompt_mean) / vote8_sampled, "minus_vote_n8": paired(right, vote8[0])}

    def margin_stop(val: list, name: str) -> dict:
        """The probe ``name``'s margin rule calibrated on ``val``, run on test."""
        cal = calibrate(val, "margin", [(w, s) for w in WAVES for s in margins(val, name)], probe=name)
        return {k: cal[k] for k in ("wave", "stop_at", "met_on_val")} | figures(*early(t, "margin", cal["stop_at"], cal["wave"], probe=name))

    results = {"train_questions": {"30": len(first), "90": len(set(full[2]))}, "test_questions": len(t),
               "vote_acc_n8_val": float(rule_at(qs["val"], "vote", 8)[0].mean()),
               "vote_acc_n8_extra": float(rule_at(extra, "vote", 8)[0].mean()),
               "vote_acc_n8": float(vote8[0].mean()), "vote_acc_n16": float(rule_at(t, "vote", 16)[0].mean()),
               "confidence_vote_acc_n8": float(rule_at(t, "confidence_vote", 8)[0].mean()),
               "confidence_vote_acc_n16": float(rule_at(t, "confidence_vote", 16)[0].mean()), "probes": {}}
    for name in scores["test"]:
        r = {"within_question_auroc": within_question_auroc(t, lambda q: q.tables[name].probe)[0],
             "pooled_auroc": auroc_or_nan(torch.tensor([p for q in t for p in q.tables[name].probe]),
                                          torch.tensor([float(c) for q in t for c in q.tables[name].correct]))}
        for n in (8, 16):
            pv = rule_at(t, "probe_vote", n, name)[0]
            r[f"probe_vote_acc_n{n}"] = float(pv.mean())
            r[f"minus_vote_n{n}"] = paired(pv, rule_at(t, "vote", n)[0])
            r[f"minus_confidence_vote_n{n}"] = paired(pv, rule_at(t, "confidence_vote", n)[0])
        r["early_stop"] = margin_stop(qs["val"], name)
        if not name.endswith("90"):  # the threshold from 90 validation questions: the 30 and the extra 60
            r["early_stop_val90"] = margin_stop(qs["val"] + extra, name)
        r |= notes.get(name, {})
        results["probes"][name] = r
        e = r["early_stop"]
        print(f"{name:14s} within {r['within_question_auroc']:.3f} pooled {r['pooled_auroc']:.3f} | probe_vote@8 "
              f"{r['probe_vote_acc_n8']:.3f} (vs vote {r['minus_vote_n8'][0]:+.3f} [{r['minus_vote_n8'][1]:+.3f}, "
              f"{r['minus_vote_n8'][2]:+.3f}], vs conf {r['minus_confidence_vote_n8'][0]:+.3f}) @16 {r['probe_vote_acc_n16']:.3f} "
              f"(vs vote {r['minus_vote_n16'][0]:+.3f}, vs conf {r['minus_confidence_vote_n16'][0]:+.3f}) | early stop "
              f"{e['accuracy']:.3f} at {e['tokens_over_vote_n8']:.2f}x (wave {e['wave']})" + (
                  f"; calibrated on 90: {r['early_stop_val90']['accuracy']:.3f} at {r['early_stop_val90']['tokens_over_vote_n8']:.2f}x"
                  if "early_stop_val90" in r else ""), flush=True)
    learned = learned_stop(qs["train"], qs["val"], t, "greedy")
    results["learned_stop"] = {k: v for k, v in learned.items() if k not in ("right", "tokens", "used")} | figures(
        learned["right"], learned["tokens"], learned["used"])
    e = results["learned_stop"]
    print(f"learned stop (greedy probe): {e['accuracy']:.3f} at {e['tokens_over_vote_n8']:.2f}x vote@8's sampled tokens, "
          f"{e['samples']:.2f} samples (wave {e['wave']}, threshold {e['stop_at']}, met on validation: {e['met_on_val']})")
    print(f"vote@8 {results['vote_acc_n8']:.3f} @16 {results['vote_acc_n16']:.3f}; confidence_vote@8 "
          f"{results['confidence_vote_acc_n8']:.3f} @16 {results['confidence_vote_acc_n16']:.3f}")
    Path(args.out).write_text(json.dumps(_rounded(results), indent=1) + "\n")
    return results


def _rounded(x):
    """``x`` with every float to 4 decimals (the JSON is read by people too)."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


if __name__ == "__main__":
    main()
