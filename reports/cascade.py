"""Write ``docs/cascade.md`` (and ``docs/cascade.json``, ``docs/cascade.png``): route, answer fast, verify, escalate.

    python -m reports.cascade     # Qwen2.5-Coder-0.5B on configs/data/difficulty_mix.yaml; captures cached; ~15 min

1. Verifiers: correctness probes on the fast (direct) answers of the difficulty mix (``configs/verifier.yaml``) with
   the answer's KV, its output scores (mean max-probability and entropy), or both; and on the slow answers, with and
   without output scores. Per mode, the one with the best validation AUROC gives the returned confidence (the
   answer-KV-only probe when it is within 0.005: output scores cost a softmax over the vocabulary per token live).
2. Routers on the same questions: the shipped KV difficulty probe, a text-only router (character n-gram TF-IDF and
   logistic regression, RouteLLM-style), logistic regressions on the prompt's hidden states and on its KV window
   (the same model on either), prompt length, random.
3. Offline: every policy simulated from the captures (``kvprobe.cascade``), thresholds calibrated on validation
   (jointly for route+verify) to <= 0.5x always-slow's decoded tokens and to <= 2 / 3 points of accuracy loss, then
   applied once to test. Paired bootstrap of the best cascade minus route.
4. Live: the same policies through ``KVProbeGenerator`` at the calibrated thresholds; agreement with the offline
   simulation per question. The generator with the chosen verifier and thresholds is saved to ``--generator_out``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvprobe import cascade
from kvprobe.evaluate import evaluate, load_data
from kvprobe.export import load_probe
from kvprobe.metrics import auroc_or_nan
from kvprobe.models import left_pad
from kvprobe.plots import pyplot
from kvprobe.routing import Outcomes
from kvprobe.steering import KVProbeGenerator, SteeringSpec
from kvprobe.study.peers import logistic_router
from kvprobe.tasks import Item
from reports.common import quiet_fit, scores_of, split_columns, write_report

VERIFIERS = {  # name -> (config, extra fit arguments)
    "fast: answer KV": ("configs/verifier.yaml", []),
    "fast: answer KV + output scores": ("configs/verifier.yaml", ["--model.init_args.output_inputs", "true"]),
    "fast: output scores only": ("configs/verifier.yaml", ["--model.init_args.source", "output"]),
    "slow: answer KV": ("configs/coe.yaml", ["--data", "configs/data/qwen_mix_slow.yaml"]),
    "slow: answer KV + output scores": ("configs/coe.yaml", ["--data", "configs/data/qwen_mix_slow.yaml", "--model.init_args.output_inputs", "true"]),
}
BUDGET = 0.5  # x always-slow's mean decoded tokens
LOSSES = (0.02, 0.03)  # accuracy loss vs always-slow, the paper's headline form
TEXT_ROUTER = "text-only router (char n-gram TF-IDF, logistic)"


def grades_of(loader) -> torch.Tensor:
    """The captured grade of every answer ``loader`` serves, in order."""
    ds = loader.dataset
    return torch.tensor([float(ds.rows[i]["correct"]) for i in ds.indices])


def aligned(values: torch.Tensor, qids: list[str], want: list[str]) -> torch.Tensor:
    where = {q: i for i, q in enumerate(qids)}
    return values[[where[q] for q in want]]


def fit_verifiers(root: Path, splits: dict[str, list[str]]) -> dict[str, dict]:
    """Each verifier variant fitted (train), its scores on validation and test and its AUROCs."""
    out = {}
    for name, (config, extra) in VERIFIERS.items():
        folder = root / ("verifier-" + name.replace(": ", "-").replace(" ", "_").replace("+", "plus"))
        results, cli = quiet_fit(["--config", config, *extra], folder)
        dm, probe = cli.datamodule, cli.model
        entry = {"probe": probe, "folder": folder, "dm": dm, "mode": name.split(":")[0], "results": results["test"]}
        for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
            s, qids = scores_of(probe, loader)
            entry[split] = aligned(s, qids, splits[split])
            entry[f"{split}_auroc"] = auroc_or_nan(s, grades_of(loader))
        out[name] = entry
    return out


def choose(verifiers: dict, mode: str, tolerance: float = 0.005) -> str:
    """The verifier of ``mode`` with the best validation AUROC, except that the answer-KV-only probe is kept when it is
    within ``tolerance`` of it: output-score inputs cost a softmax over the vocabulary at every decoded token live."""
    names = [n for n, v in verifiers.items() if v["mode"] == mode]
    best = max(names, key=lambda n: verifiers[n]["val_auroc"])
    kv_only = f"{mode}: answer KV"
    return kv_only if verifiers[kv_only]["val_auroc"] >= verifiers[best]["val_auroc"] - tolerance else best


def old_confidence(verifiers: dict) -> float:
    """Test AUROC of the slow-answer KV probe (what every answer's confidence came from before) on the fast answers."""
    probe, dm = verifiers["slow: answer KV"]["probe"], verifiers["fast: answer KV"]["dm"]
    loader = dm.test_dataloader()
    return auroc_or_nan(scores_of(probe, loader)[0], grades_of(loader))


def prompt_hidden(gen: KVProbeGenerator, rows: list[dict], window: int, batch_size: int = 32) -> torch.Tensor:
    """Per question: each layer's hidden state averaged over the fast prompt's last ``window`` positions (the same
    positions the KV router reads): (n, layers + 1, hidden)."""
    lm = gen.lm
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="prompt hidden states", unit="batch"):
        chunk = rows[start : start + batch_size]
        ids, mask = left_pad([gen.prompt_ids(Item(r["qid"], r["question"], r["gold"]), "fast") for r in chunk], lm.tokenizer.pad_token_id)
        with torch.inference_mode():
            hs = lm.model(input_ids=ids.to(lm.input_device), attention_mask=mask.to(lm.input_device),
                          position_ids=(mask.cumsum(1) - 1).clamp_min(0).to(lm.input_device), output_hidden_states=True).hidden_states
        out.append(torch.stack([h[:, -window:].float().mean(1).cpu() for h in hs], 1))
    return torch.cat(out)


def routers(gen: KVProbeGenerator, dm, val: Outcomes, rows: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Routing scores on validation and test per router, and each learned router's settings."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    probe = gen.difficulty
    scores = {"KV difficulty probe (shipped)": {s: scores_of(probe, loader)[0] for s, loader in
                                                (("val", dm.val_dataloader()), ("test", dm.test_dataloader()))}}
    needed = dm.outcomes["slow_needed"]
    train_y = [int(needed[i]) for i in dm.datasets["train"].indices]
    text = {s: [r["question"] for r in rows[s]] for s in rows}
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True).fit(text["train"])
    x = {s: vec.transform(t) for s, t in text.items()}
    model, settings = {}, {}
    model["text"], settings[TEXT_ROUTER] = logistic_router(x["train"], train_y, x["val"], val, scale=False, grid=[0.1, 1.0, 10.0, 100.0])
    scores[TEXT_ROUTER] = {s: torch.tensor(model["text"].predict_proba(x[s])[:, 1]) for s in ("val", "test")}
    window = probe.hparams.window
    hidden = {s: prompt_hidden(gen, rows[s], window).flatten(1).numpy() for s in rows}
    kv = {s: torch.stack([dm.datasets[s][i]["prompt_kv"][..., -window:, :].mean(-2).flatten() for i in range(len(dm.datasets[s]))]).numpy()
          for s in rows}
    for name, feats in (("hidden-state router (logistic)", hidden), ("KV router (logistic, same model as the hidden-state one)", kv)):
        m, settings[name] = logistic_router(feats["train"], train_y, feats["val"], val, scale=True, grid=[0.001, 0.01, 0.1, 1.0])
        scores[name] = {s: torch.tensor(m.predict_proba(feats[s])[:, 1]) for s in ("val", "test")}
    for s, seed in (("val", 1), ("test", 2)):  # ties broken by a seeded jitter under one token (reports.difficulty)
        jitter = torch.rand(len(rows[s]), generator=torch.Generator().manual_seed(seed)) * 0.5
        scores.setdefault("prompt-length router", {})[s] = torch.tensor([float(r["prompt_tokens"]) for r in rows[s]]) + jitter
    return scores, settings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m reports.cascade", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="qwen2.5-coder-0.5b", help="the generator whose difficulty (and switch) probe to use")
    parser.add_argument("--data", default="configs/data/difficulty_mix.yaml")
    parser.add_argument("--out", default="docs/cascade.md")
    parser.add_argument("--probes", default="runs/report", help="where the report's probes are exported")
    parser.add_argument("--generator_out", default="runs/report/cascade-generator",
                        help="where the generator with the chosen verifier and thresholds is saved (the shipped one: "
                             "checkpoints/qwen2.5-coder-0.5b)")
    parser.add_argument("--no_live", action="store_true", help="offline only")
    args = parser.parse_args(argv)
    root, out = Path(args.probes), Path(args.out)

    dm = load_data(args.data)
    cols, rows = {}, {}
    for s in ("train", "val", "test"):
        cols[s], rows[s] = split_columns(dm, s)
    qids = {s: [r["qid"] for r in rows[s]] for s in rows}
    val, test = cols["val"], cols["test"]
    slow_tokens = float(test.slow_tokens.mean())

    verifiers = fit_verifiers(root, qids)
    chosen = {mode: choose(verifiers, mode) for mode in ("fast", "slow")}
    verifier = verifiers[chosen["fast"]]

    gen = KVProbeGenerator.from_pretrained(args.generator)
    route_scores, router_settings = routers(gen, dm, val, rows)
    kv_router = "KV difficulty probe (shipped)"

    helps = {split: scores_of(gen.difficulty, loader, "slow_helps")[0] for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader()))}

    def signals(split: str, router: str, rule: str) -> cascade.Signals:
        return cascade.Signals(route_scores[router][split], cascade.escalation(rule, verifier[split], helps[split]))

    # --- offline: calibrate on validation, apply once to test ---
    policies = {"route": ("route", kv_router, "wrong")}
    for rule in cascade.ESCALATE_ON:
        policies |= {f"verify ({rule})": ("verify", kv_router, rule), f"route+verify ({rule})": ("route+verify", kv_router, rule)}
    policies |= {f"route ({name})": ("route", name, "wrong") for name in route_scores if name != kv_router}
    policies["route+verify (wrong, text-only router)"] = ("route+verify", TEXT_ROUTER, "wrong")
    offline = {}
    for label, (policy, router, rule) in policies.items():
        entry = offline[label] = {"policy": policy, "router": router, "rule": rule}
        val_s, test_s = signals("val", router, rule), signals("test", router, rule)
        for budget, kw in [("at_half", {"token_ratio": BUDGET})] + [(f"loss_{loss:g}", {"max_loss": loss}) for loss in LOSSES]:
            entry[budget] = cascade.calibrate_then_test(policy, (val_s, val), (test_s, test), **kw)
        entry["frontier"] = cascade.frontier(policy, test_s, test)
    fixed = {name: cascade.summary(cascade.outcome(test, slow, torch.zeros_like(slow)), slow_tokens) for name, slow in
             (("always-fast", torch.zeros(len(test), dtype=torch.bool)), ("always-slow", torch.ones(len(test), dtype=torch.bool)),
              ("oracle", test.oracle()))}
    cascades = [label for label, (_, router, _) in policies.items() if "verify" in label and router == kv_router]
    best = max(cascades, key=lambda p: (offline[p]["at_half"]["val_accuracy"], -offline[p]["at_half"]["val_mean_tokens"]))  # on validation
    diff = cascade.paired_bootstrap(offline[best]["at_half"]["per_question"]["correct"], offline["route"]["at_half"]["per_question"]["correct"])

    # --- why: at the budget, the best any threshold reaches on test (an upper bound, for diagnosis only), with the
    # verifier as it is and replaced by the truth (the fast answer's grade); and how well each score tells "slow mode
    # fixes it" from "nothing does" among the wrong fast answers
    ceiling = {}
    for label in ["route"] + cascades:
        policy, router, rule = policies[label]
        real = signals("test", router, rule)
        truth = cascade.Signals(real.route, cascade.escalation(rule, test.fast_correct, helps["test"]))
        ceiling[label] = {"calibrated": offline[label]["at_half"]["accuracy"],
                          "verifier": cascade.best_within(policy, real, test, BUDGET),
                          "truth": cascade.best_within(policy, truth, test, BUDGET)}
    wrong = test.fast_correct == 0
    fixable = {"P(slow right | fast wrong), four-class KV probe": auroc_or_nan(helps["test"][wrong], test.slow_correct[wrong])}
    fixable |= {name: auroc_or_nan(v["test"][wrong], test.slow_correct[wrong]) for name, v in route_scores.items()}

    # --- confidence offline: each answer's confidence from its mode's chosen probe ---
    conf = {mode: verifiers[chosen[mode]]["test"] for mode in ("fast", "slow")}
    route_pq = offline["route"]["at_half"]["per_question"]
    mixed = torch.where(route_pq["slow"], conf["slow"], conf["fast"])
    confidence = {"fast answers": auroc_or_nan(conf["fast"], test.fast_correct),
                  "slow answers": auroc_or_nan(conf["slow"], test.slow_correct),
                  "route's answers": auroc_or_nan(mixed, route_pq["correct"]),
                  "slow-answer KV probe on fast answers (the old confidence)": old_confidence(verifiers)}

    # --- live: the same test questions through the generator at the calibrated thresholds ---
    live, agreement, live_diff = {}, {}, None
    if not args.no_live:
        probes = [load_probe(verifiers[chosen[m]]["folder"], gen.lm) for m in ("slow", "fast")]  # as exported, card and all
        route_t = float(offline["route"]["at_half"]["thresholds"][0])
        setups = {"fast": ("fast", {}), "slow": ("slow", {}), "route": ("route", {})}
        for label in cascades:
            t = offline[label]["at_half"]["thresholds"]
            setups[label] = (policies[label][0], {"escalate_on": policies[label][2], "escalate_above": float(t[-1])}
                             | ({"verify_route_threshold": float(t[0])} if len(t) == 2 else {}))
        steerings = {}
        for label, (policy, extra) in setups.items():
            steerings[label] = SteeringSpec(**{**vars(gen.steering), "threshold": route_t, **extra})
            g = KVProbeGenerator(gen.lm, gen.difficulty, probes, gen.switch, steerings[label])
            live[label] = evaluate(g, dm, "test", [policy])[policy]
        for label in ["route"] + cascades:
            pq = offline[label]["at_half"]["per_question"]
            lr = live[label]["rows"]
            assert [r["qid"] for r in lr] == qids["test"]
            same_decision = [(r["final_mode"] == "slow") == bool(s or e) and r["escalated"] == bool(e)
                             for r, s, e in zip(lr, pq["slow"].tolist(), pq["escalated"].tolist())]
            same_grade = [bool(r["correct"]) == bool(c) for r, c in zip(lr, pq["correct"].tolist())]
            agreement[label] = {"decisions": sum(same_decision) / len(lr), "grades": sum(same_grade) / len(lr),
                                "both": sum(a and b for a, b in zip(same_decision, same_grade)) / len(lr)}
        live_diff = cascade.paired_bootstrap(torch.tensor([float(r["correct"]) for r in live[best]["rows"]]),
                                             torch.tensor([float(r["correct"]) for r in live["route"]["rows"]]))
        KVProbeGenerator(gen.lm, gen.difficulty, probes, gen.switch, steerings[best]).save_pretrained(args.generator_out)

    figure = out.with_name("cascade.png")
    draw(offline, fixed, test, len(test)).savefig(figure, dpi=120)
    figures = headline(offline, fixed, best, diff, verifier, confidence, live, agreement, len(test), route_scores)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=1))
    text = report(args, offline, fixed, best, diff, verifiers, chosen, confidence, live, agreement, router_settings,
                  figures, figure, live_diff, ceiling, fixable, int(wrong.sum()))
    write_report(out, text)
    return figures


def headline(offline, fixed, best, diff, verifier, confidence, live, agreement, n, route_scores) -> dict:
    half = lambda name: offline[name]["at_half"]
    text_name = next(k for k in offline if k.startswith("route (text"))
    hidden_name = next(k for k in offline if k.startswith("route (hidden"))
    return {
        "slow_acc": fixed["always-slow"]["accuracy"], "slow_tokens": fixed["always-slow"]["mean_tokens"],
        "fast_acc": fixed["always-fast"]["accuracy"], "fast_tokens": fixed["always-fast"]["mean_tokens"],
        "route_acc_at_half": half("route")["accuracy"], "route_tokens_over_slow": half("route")["tokens_over_slow"],
        "cascade_policy": best, "cascade_acc_at_half": half(best)["accuracy"], "cascade_tokens_over_slow": half(best)["tokens_over_slow"],
        "cascade_minus_route": diff["diff"], "cascade_minus_route_ci_lo": diff["lo"], "cascade_minus_route_ci_hi": diff["hi"],
        **{f"{re.sub('[^a-z0-9]+', '_', k).strip('_')}_acc_at_half": half(k)["accuracy"] for k in offline if k.startswith(("verify (", "route+verify ("))},
        "text_router_acc_at_half": half(text_name)["accuracy"], "hidden_router_acc_at_half": half(hidden_name)["accuracy"],
        "verifier_test_auroc": verifier["test_auroc"],
        "confidence_auroc_fast_answers": confidence["fast answers"], "confidence_auroc_route_answers": confidence["route's answers"],
        "live_cascade_acc_at_half": live[best]["accuracy"] if live else None,
        "live_cascade_tokens_over_slow": live[best]["mean_tokens"] / live["slow"]["mean_tokens"] if live else None,
        "live_route_acc_at_half": live["route"]["accuracy"] if live else None,
        "live_confidence_auroc_route_answers": live["route"]["confidence_auroc"] if live else None,
        "live_confidence_auroc_fast_answers": live["fast"]["confidence_auroc"] if live else None,
        "live_offline_agreement": min(a["both"] for a in agreement.values()) if agreement else None,
        "verifier_probe_share_of_wall": live[best]["probe_share"] if live else None,
        "test_questions": n,
    }


def fmt(r: dict) -> str:
    return f"{r['accuracy']:.3f} | {r['mean_tokens']:.1f} | {r['tokens_over_slow']:.2f}"


def report(args, offline, fixed, best, diff, verifiers, chosen, confidence, live, agreement, router_settings, figures,
           figure, live_diff, ceiling, fixable, n_wrong) -> str:
    slow = fixed["always-slow"]
    lines = [
        "# Cascades: route, answer fast, verify, escalate", "",
        "Reproduce (captures of `configs/data/difficulty_mix.yaml` cached; the report fits five verifiers, four routers, "
        "and runs seven policies live, ~20 min on 2 cores):", "",
        "```bash", "bash scripts/setup_qwen.sh      # the optional second model, once",
        f"python -m reports.cascade{'' if args.generator_out == 'runs/report/cascade-generator' else ' --generator_out ' + args.generator_out}",
        "```", "",
        f"Qwen2.5-Coder-0.5B-Instruct on the difficulty mix: {figures['test_questions']} test questions (the same for every "
        "policy: comparisons are paired), 120 validation questions for every threshold, 1390 training questions for every "
        "learned part. Tokens count every decoded token of both modes and of both attempts of an escalated question "
        "(its fast answer, then slow mode); the escalation's extra prefill (the slow prompt's differing suffix) is listed "
        "apart live. `verify`: answer fast, escalate when the fast answer's escalation score > t: `(wrong)` = 1 − the "
        "fast-answer verifier's P(correct); `(gain)` = that times P(slow right | fast wrong) = P(75) / (P(75) + P(100)) "
        "of the four-class difficulty probe on the fast prompt, the accuracy an escalation is expected to buy. "
        "`route+verify`: route score > t_r goes straight to slow, the rest go through `verify` (t_r and t calibrated "
        "jointly on a 41 x 41 grid of validation quantiles). Every threshold and every choice (verifier inputs, router "
        "settings, the best cascade) is made on validation; test is touched once.", "",
        "## Verifiers (correctness probes per answer mode; test AUROC, chosen per mode by validation AUROC; the answer-KV-only probe is kept within 0.005 of the best, since output-score inputs cost a softmax over the vocabulary per decoded token live)", "",
        "| probe | val AUROC | test AUROC [95% CI] | mean max-prob | −entropy | length-only |", "|---|---|---|---|---|---|",
    ]
    for name, v in verifiers.items():
        t = v["results"]
        mark = " **(chosen)**" if chosen[v["mode"]] == name else ""
        lines.append(f"| {name}{mark} | {v['val_auroc']:.3f} | {t['probe']['auroc']:.3f} [{t['probe']['auroc_lo']:.3f}, "
                     f"{t['probe']['auroc_hi']:.3f}] | {t['max_prob']['auroc']:.3f} | {t['neg_entropy']['auroc']:.3f} | "
                     f"{t['length_probe']['auroc']:.3f} |")
    lines += ["", "Returned confidence, test AUROC against the grades (each answer scored by its own mode's chosen probe):", "",
              "| answers | AUROC |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in confidence.items()]
    lines += ["", f"## Policies offline, calibrated on validation to <= {BUDGET}x always-slow's tokens (test)", "",
              f"![accuracy vs tokens]({figure.name})", "",
              "| policy | router | accuracy | mean decoded tokens | tokens / always-slow | straight to slow | escalated | thresholds (val) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in fixed.items():
        lines.append(f"| {name} | – | {fmt(r)} | {r['straight_to_slow']:.2f} | – | – |")
    for label, e in offline.items():
        h = e["at_half"]
        thr = ", ".join(f"{t:.4g}" for t in h["thresholds"]) + ("" if h["fits"] else " (no choice fits the budget on val)")
        lines.append(f"| {'**' + label + '**' if label == best else label} | {e['router']} | {fmt(h)} | {h['straight_to_slow']:.2f} | "
                     f"{h['escalated']:.2f} | {thr} |")
    lines += ["", f"Best cascade (chosen on validation): `{best}`. Paired bootstrap over test questions, `{best}` minus `route` "
              f"at the same budget: {diff['diff']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}]"
              + (f"; live: {live_diff['diff']:+.3f} [{live_diff['lo']:+.3f}, {live_diff['hi']:+.3f}]." if live_diff else "."), ""]
    lines += ["## Where the accuracy goes: the verifier is not the limit", "",
              f"Test accuracy at <= {BUDGET}x always-slow's tokens: calibrated on validation (the policies above), and the "
              "best any threshold choice reaches on test (an upper bound for diagnosis: it is picked on the questions it is "
              "measured on), with the verifier as it is and with the verifier replaced by the truth (each fast answer's grade):", "",
              "| policy | calibrated on val | best threshold on test | best threshold on test, perfect verifier |", "|---|---|---|---|"]
    lines += [f"| {k} | {r['calibrated']:.3f} | {r['verifier']:.3f} | {r['truth']:.3f} |" for k, r in ceiling.items()]
    lines += ["", f"What a cascade must still decide is which wrong fast answers slow mode can fix. AUROC of each score for "
              f"\"slow mode gets it right\" among the {n_wrong} test questions whose fast answer is wrong:", "",
              "| score | AUROC |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in fixable.items()] + [""]
    lines += ["## The paper's headline form: the cheapest policy within 2 / 3 points of always-slow (calibrated on val)", "",
              "| policy | router | loss budget | test accuracy | accuracy loss vs always-slow | tokens / always-slow | token reduction |",
              "|---|---|---|---|---|---|---|"]
    for label, e in offline.items():
        for loss in LOSSES:
            r = e[f"loss_{loss:g}"]
            lines.append(f"| {label} | {e['router']} | {loss * 100:.0f} pts | {r['accuracy']:.3f} | {(slow['accuracy'] - r['accuracy']) * 100:+.1f} pts | "
                         f"{r['tokens_over_slow']:.2f} | {1 / max(r['tokens_over_slow'], 1e-9):.2f}x |")
    lines += ["", "Router settings chosen on validation: " + "; ".join(f"{k}: " + ", ".join(f"{a}={b:.4g}" for a, b in v.items())
                                                                   for k, v in router_settings.items()) + ".", ""]
    if live:
        lines += ["## Live through KVProbeGenerator (same test questions, calibrated thresholds)", "",
                  "| policy | accuracy | mean decoded tokens | tokens / always-slow | escalations | re-prompted tokens / q | "
                  "confidence AUROC | probe time / wall | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        for policy, r in live.items():
            lines.append(f"| {policy} | {r['accuracy']:.3f} | {r['mean_tokens']:.1f} | {r['mean_tokens'] / live['slow']['mean_tokens']:.2f} | "
                         f"{r['escalations']} | {r['mean_reprompt_tokens']:.1f} | {r['confidence_auroc']:.3f} | {r['probe_share']:.2%} | {r['wall_seconds']:.0f} |")
        lines += ["", "Live against the offline simulation, per question (share of test questions with the same decision: "
                  "straight to slow / escalated / fast; the same grade; both):", "",
                  "| policy | decisions | grades | both |", "|---|---|---|---|"]
        lines += [f"| {p} | {a['decisions']:.3f} | {a['grades']:.3f} | {a['both']:.3f} |" for p, a in agreement.items()]
        lines += [""]
    return "\n".join(lines) + "\n"


def draw(offline, fixed, test: Outcomes, n: int):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.2))
    for i, (label, e) in enumerate(offline.items()):
        xs, ys = e["frontier"]
        ax.plot(xs, ys, lw=2.2 if "verify" in label else 1, label=f"{label} (best over thresholds, test)", color=f"C{i}")
        h = e["at_half"]
        ax.plot(h["mean_tokens"], h["accuracy"], "o", ms=7, mfc="none", mec=f"C{i}")
    for name, marker in (("always-fast", "s"), ("always-slow", "D"), ("oracle", "*")):
        ax.plot(fixed[name]["mean_tokens"], fixed[name]["accuracy"], marker, ms=10, color="gold" if name == "oracle" else "k",
                mec="k", ls="none", label=name)
    f, s = fixed["always-fast"], fixed["always-slow"]
    ax.plot([f["mean_tokens"], s["mean_tokens"]], [f["accuracy"], s["accuracy"]], "k:", lw=1, label="random router")
    ax.axvline(BUDGET * s["mean_tokens"], color="grey", lw=0.7, ls="--", label=f"{BUDGET}x always-slow tokens")
    ax.set(xlabel="mean decoded tokens per question", ylabel="accuracy",
           title=f"cascades vs routers, {n} test questions (circles: calibrated on val)")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
