"""What a study writes: ``study.json`` (a ``headline`` first, so that runs compare by script), ``study.md`` (every
figure with the command that reproduces it) and ``study.png`` (accuracy against tokens, every policy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvprobe.plots import pyplot
from kvprobe.study.policies import OTHER, PEER, PROBE, budget_key, strip

NOTES = "<!-- notes: everything below this line is hand-written and kept when the tables are regenerated -->"


def with_notes(path: Path, text: str) -> str:
    """``text`` followed by the hand-written notes below ``NOTES`` in the file at ``path`` it replaces (the marker the
    reports in docs/ share, so a report the study takes over keeps its notes)."""
    if path.is_file() and NOTES in path.read_text():
        return text.rstrip("\n") + "\n\n" + NOTES + path.read_text().split(NOTES, 1)[1]
    return text


def headline(spec, study: dict, results: dict, fixed: dict, best: dict, comparisons: dict, verifiers: dict,
             slow_probes: dict, head: str, wall: float) -> dict:
    slow, fast = fixed["always-slow"], fixed["always-fast"]
    bp, bn = best[head][PROBE], best[head][PEER]
    r, n, c = results[bp][head], results[bn][head], comparisons[head]
    loss_key = budget_key("max_loss", min(spec.losses))
    paper = results[best[loss_key][PROBE]][loss_key]
    plan = study["plan"]
    test = slow_probes[plan["correctness"]]["results"]["test"]
    ci = lambda d: [d["lo"], d["hi"]]
    return {
        "task": spec.capture.task.name, "model": spec.capture.model.name, "test_questions": len(study["test_qids"]),
        "always_slow": {"accuracy": slow["accuracy"], "tokens": slow["mean_tokens"]},
        "always_fast": {"accuracy": fast["accuracy"], "tokens": fast["mean_tokens"]},
        "at_half": {"budget": spec.headline_budget, "best_probe_policy": bp, "accuracy": r["accuracy"],
                    "tokens_over_slow": r["tokens_over_slow"], "best_non_probe_policy": bn, "non_probe_accuracy": n["accuracy"],
                    "non_probe_tokens_over_slow": n["tokens_over_slow"],
                    "minus_slow": c["minus_slow"]["diff"], "minus_slow_ci": ci(c["minus_slow"]),
                    "minus_non_probe": c["minus_non_probe"]["diff"], "minus_non_probe_ci": ci(c["minus_non_probe"])},
        "paper_form": {"within_pts": min(spec.losses) * 100, "policy": best[loss_key][PROBE],
                       "loss_pts": (slow["accuracy"] - paper["accuracy"]) * 100, "tokens_over_slow": paper["tokens_over_slow"]},
        "correctness": {"probe": plan["correctness"], "probe_auroc": test["probe"]["auroc"],
                        "length_auroc": test["length_probe"]["auroc"], "max_prob_auroc": test["max_prob"]["auroc"],
                        "minus_length": test["probe_minus_length_probe"]["diff"], "minus_length_ci": ci(test["probe_minus_length_probe"])},
        "verifier_fast_auroc": verifiers[plan["verifier"]]["test_auroc"],
        "wall_seconds": round(wall, 1),
    }


def write(spec, study: dict, policies, results, fixed, best, comparisons, verifiers, slow_probes, segments, diagnosis,
          generator: Path, live: dict | None, head: str, wall: float, command: str) -> dict:
    base = spec.report_path
    base.parent.mkdir(parents=True, exist_ok=True)
    top = headline(spec, study, results, fixed, best, comparisons, verifiers, slow_probes, head, wall)
    if live is not None:
        top["live"] = {k: live[k] for k in ("policy", "accuracy", "tokens_over_slow", "confidence_auroc")} | {"agreement": live["agreement"]["both"]}
    study = {"headline": top} | study
    study |= {
        "command": command, "generator": str(generator),
        "fixed": {k: strip(v) for k, v in fixed.items()},
        "policies": {p.label: {"kind": p.kind, "router": p.router, "rule": p.rule, "family": p.family}
                     | {k: strip(v) for k, v in results[p.label].items() if k != "frontier"} for p in policies},
        "comparisons": comparisons,
        "correctness": {mode: {n: {"val_auroc": e["val_auroc"], "test_auroc": e["test_auroc"], "live": e["live"], "test": e["results"]["test"]}
                               for n, e in entries.items()} for mode, entries in (("fast", verifiers), ("slow", slow_probes))},
        "segments": segments, "diagnosis": diagnosis, "live": live,
    }
    atomic(base.with_suffix(".json"), json.dumps(study, indent=1, default=float))
    fig = figure(spec, policies, results, fixed)
    fig.savefig(base.with_suffix(".png"), dpi=120)
    pyplot().close(fig)
    text = markdown(spec, study, policies, results, fixed, best, head, base.with_suffix(".png").name)
    path = base.with_suffix(".md")
    atomic(path, with_notes(path, text))
    h = study["headline"]
    a = h["at_half"]
    print(f"[kvprobe] study written to {path}: at {a['budget']}x always-slow's tokens the best probe policy "
          f"({a['best_probe_policy']}) gets {a['accuracy']:.3f} at {a['tokens_over_slow']:.2f}x, always-slow "
          f"{h['always_slow']['accuracy']:.3f}, the best policy without a probe ({a['best_non_probe_policy']}) "
          f"{a['non_probe_accuracy']:.3f}; correctness AUROC {h['correctness']['probe_auroc']:.3f} vs answer length "
          f"{h['correctness']['length_auroc']:.3f}. Generator: {generator}", flush=True)
    return study


def atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt(r: dict) -> str:
    return f"{r['accuracy']:.3f} / {r['tokens_over_slow']:.2f}"


def markdown(spec, study: dict, policies, results, fixed, best, head: str, png: str) -> str:
    h, plan = study["headline"], study["plan"]
    caps = study["captures"]
    task = spec.capture.task
    rng = f"questions {task.offset}-{task.offset + caps['slow']['items'] - 1}" if task.limit else f"from question {task.offset}"
    a = h["at_half"]
    lines = [
        f"# Study: {h['model']} on {h['task']}", "",
        "Reproduce (captures are cached by fingerprint, so a rerun does no model work):", "", "```bash", study["command"], "```", "",
        f"Wall time on this machine: {h['wall_seconds'] / 60:.1f} min for the study (capture time below, per mode).", "",
        f"{h['model']}, task `{task.name}` ({rng}), split by question {spec.split.train:g} / {spec.split.val:g} / "
        f"{spec.split.test:g} (seed {spec.split.seed}): {h['test_questions']} test questions, the same for every policy "
        "(comparisons are paired). Every probe and peer is trained on the training questions; every threshold, router, "
        "verifier and correctness probe is chosen on the validation questions; test is scored once.", "",
        "| mode | answers | accuracy | mean decoded tokens | cut off by the cap | capture s |", "|---|---|---|---|---|---|",
    ]
    caps_cfg = spec.capture.generation.max_new_tokens or {}
    for mode, c in caps.items():
        lines.append(f"| {mode} (cap {caps_cfg.get(mode, 'default')}) | {c['items']} | {c['accuracy']:.3f} | {c['mean_gen_tokens']:.1f} | "
                     f"{c['cap_share']:.1%} | {c['capture_seconds']:.0f} |")
    lines += ["", "## Headline", "",
              f"- Always-slow {h['always_slow']['accuracy']:.3f} at {h['always_slow']['tokens']:.1f} tokens; always-fast "
              f"{h['always_fast']['accuracy']:.3f} at {h['always_fast']['tokens']:.1f}.",
              f"- At <= {a['budget']:g}x always-slow's tokens (calibrated on validation): the best probe policy, chosen on "
              f"validation, `{a['best_probe_policy']}`, gets {a['accuracy']:.3f} at {a['tokens_over_slow']:.2f}x; minus "
              f"always-slow {a['minus_slow']:+.3f} [{a['minus_slow_ci'][0]:+.3f}, {a['minus_slow_ci'][1]:+.3f}].",
              f"- The best policy without a probe at the same budget, `{a['best_non_probe_policy']}`: "
              f"{a['non_probe_accuracy']:.3f} at {a['non_probe_tokens_over_slow']:.2f}x; the probe policy minus it "
              f"{a['minus_non_probe']:+.3f} [{a['minus_non_probe_ci'][0]:+.3f}, {a['minus_non_probe_ci'][1]:+.3f}] "
              "(paired bootstrap over test questions, 95%).",
              f"- The paper's form: the cheapest probe policy within {h['paper_form']['within_pts']:g} point(s) of always-slow "
              f"on validation, `{h['paper_form']['policy']}`, loses {h['paper_form']['loss_pts']:+.1f} points on test at "
              f"{h['paper_form']['tokens_over_slow']:.2f}x always-slow's tokens.",
              f"- Correctness of slow answers: `{h['correctness']['probe']}` AUROC {h['correctness']['probe_auroc']:.3f}; "
              f"answer length {h['correctness']['length_auroc']:.3f}, mean max-probability {h['correctness']['max_prob_auroc']:.3f}; "
              f"probe minus length {h['correctness']['minus_length']:+.3f} [{h['correctness']['minus_length_ci'][0]:+.3f}, "
              f"{h['correctness']['minus_length_ci'][1]:+.3f}]. Fast-answer verifier AUROC {h['verifier_fast_auroc']:.3f}.", "",
              f"![accuracy against tokens]({png})", ""]

    families = {PROBE: "probe", PEER: "no probe", OTHER: "peer (model internals)"}
    keys = [budget_key("token_ratio", b) for b in spec.budgets]
    lines += ["## Every policy at each token budget (test; thresholds calibrated on validation)", "",
              "Accuracy / tokens over always-slow's. `route`: the router's score above t goes to slow mode. `verify`: "
              "answer fast, answer again in slow mode when the fast answer's escalation score is above t (`wrong`: 1 − the "
              "verifier's P(correct); `gain`: that times the four-class probe's P(slow right | fast wrong)). "
              "`route+verify`: clearly hard questions straight to slow, the rest through `verify` (two thresholds, "
              f"calibrated jointly). Within a budget, thresholds that spend at least {spec.spend:.0%} of it on validation "
              "are preferred (where any does). **Bold**: the best of its family at that budget, chosen on validation.", "",
              "| policy | family | " + " | ".join(f"<= {k.split('_')[1]}x: acc / tokens" for k in keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for name, f in fixed.items():
        lines.append(f"| {name} | – | " + " | ".join(fmt(f) for _ in keys) + " |")
    for p in policies:
        cells = [("**" + fmt(results[p.label][k]) + "**") if best[k].get(p.family) == p.label else fmt(results[p.label][k]) for k in keys]
        lines.append(f"| {p.label} | {families[p.family]} | " + " | ".join(cells) + " |")
    lines += ["", "Paired bootstrap over test questions (95%), the best probe policy at each budget:", "",
              "| budget | best probe policy | minus always-slow | best policy without a probe | probe minus it |", "|---|---|---|---|---|"]
    for k in keys:
        c = study["comparisons"][k]
        lines.append(f"| <= {k.split('_')[1]}x | {best[k][PROBE]} | {c['minus_slow']['diff']:+.3f} [{c['minus_slow']['lo']:+.3f}, "
                     f"{c['minus_slow']['hi']:+.3f}] | {best[k][PEER]} | {c['minus_non_probe']['diff']:+.3f} "
                     f"[{c['minus_non_probe']['lo']:+.3f}, {c['minus_non_probe']['hi']:+.3f}] |")
    slow_acc = fixed["always-slow"]["accuracy"]
    lines += ["", "## The paper's form: the cheapest policy within 1 / 2 / 3 points of always-slow (calibrated on validation)", "",
              "| policy | family | " + " | ".join(f"within {x * 100:g} pts: loss / tokens" for x in spec.losses) + " |",
              "|---|---|" + "---|" * len(spec.losses)]
    for p in policies:
        cells = []
        for x in spec.losses:
            r = results[p.label][budget_key("max_loss", x)]
            cell = f"{(slow_acc - r['accuracy']) * 100:+.1f} / {r['tokens_over_slow']:.2f}"
            cells.append(f"**{cell}**" if best[budget_key("max_loss", x)].get(p.family) == p.label else cell)
        lines.append(f"| {p.label} | {families[p.family]} | " + " | ".join(cells) + " |")

    lines += ["", "## Correctness: is this answer right?", "",
              "Each probe on its mode's answers; chosen per mode by validation AUROC (the plain answer-KV probe is kept "
              "within 0.005 of the best: it is the cheapest live). Test AUROC with a 95% bootstrap interval, beside the "
              "label-free scores and a logistic on answer length (fitted on train).", "",
              "| mode | probe | val AUROC | test AUROC [95% CI] | length | mean max-prob | −entropy | probe − length [95% CI] | live |",
              "|---|---|---|---|---|---|---|---|---|"]
    for mode, entries in study["correctness"].items():
        for name, e in entries.items():
            t = e["test"]
            mark = " **(chosen)**" if name == plan["verifier" if mode == "fast" else "correctness"] else ""
            d = t["probe_minus_length_probe"]
            live = "yes" if e["live"] else "no"
            lines.append(f"| {mode} | {name}{mark} | {e['val_auroc']:.3f} | {t['probe']['auroc']:.3f} [{t['probe']['auroc_lo']:.3f}, "
                         f"{t['probe']['auroc_hi']:.3f}] | {t['length_probe']['auroc']:.3f} | {t['max_prob']['auroc']:.3f} | "
                         f"{t['neg_entropy']['auroc']:.3f} | {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] | {live} |")
    if plan["correctness_live"] != plan["correctness"]:
        lines += ["", f"The generator holds `{plan['correctness_live']}`, the best on validation that the live generator can "
                  "score (KV-CoE inputs are not computed live)."]

    if spec.segments > 1:
        seg = study["segments"]
        n = spec.segments
        lines += ["", f"## Per part of the question range ({n} consecutive parts, test questions; <= {spec.headline_budget:g}x budget)", "",
                  "Accuracy / tokens over the part's always-slow tokens. The budget is calibrated over the whole range, so a "
                  "part can spend more or less than it.", "",
                  "| policy | " + " | ".join(f"part {k + 1} (n={seg['always-slow'][k]['questions']})" for k in range(n)) + " |",
                  "|---|" + "---|" * n,
                  "| slow answers cut off by the cap | " + " | ".join(f"{c.get('accuracy', float('nan')):.1%}" for c in seg["truncated_slow"]) + " |"]
        shown = list(fixed) + [p.label for p in policies]
        for label in shown:
            cells = [f"{c['accuracy']:.3f} / {c['tokens_over_slow']:.2f}" if c["questions"] else "–" for c in seg[label]]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

    d = study["diagnosis"]
    lines += ["", f"## Where the accuracy goes (<= {spec.headline_budget:g}x)", "",
              "Test accuracy calibrated on validation, the best any threshold reaches on test (an upper bound for "
              "diagnosis: picked on the questions it is measured on), and the same with the verifier replaced by the "
              "truth (each fast answer's grade):", "",
              "| policy | calibrated on val | best threshold on test | with a perfect verifier |", "|---|---|---|---|"]
    lines += [f"| {k} | {r['calibrated']:.3f} | {r['best_threshold']:.3f} | {r['best_threshold_perfect_verifier']:.3f} |"
              for k, r in d["ceiling"].items()]
    lines += ["", f"Which wrong fast answers can slow mode fix? AUROC of each score for \"slow mode gets it right\" among the "
              f"{d['wrong_fast']} test questions whose fast answer is wrong:", "", "| score | AUROC |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in d["fixable"].items()]
    if study["live"] is not None:
        v = study["live"]
        ag, d = v["agreement"], v["minus_offline"]
        lines += ["", "## Live: the generator folder on the test questions", "",
                  f"The folder below, loaded with `from_pretrained` as a user would, answered the {v['questions']} test "
                  f"questions with its default policy (`{v['policy']}`, the thresholds calibrated above) through "
                  "`KVProbeGenerator`. Per question, the decision (straight to slow, escalated after a fast answer, or "
                  "answered fast) and the grade against the study's simulation of that policy from the captures:", "",
                  "| | accuracy | tokens / always-slow | escalations | re-prompted tokens / q | confidence AUROC | probe time / wall | wall s |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| live | {v['accuracy']:.3f} | {v['tokens_over_slow']:.2f} | {v['escalations']} | {v['mean_reprompt_tokens']:.1f} | "
                  f"{v['confidence_auroc']:.3f} | {v['probe_share']:.2%} | {v['wall_seconds']:.0f} |",
                  f"| simulated | {v['offline_accuracy']:.3f} | {v['offline_tokens_over_slow']:.2f} | | | | | |", "",
                  f"Same decision on {ag['decisions']:.1%} of the questions, same grade on {ag['grades']:.1%}, both on "
                  f"{ag['both']:.1%}; live minus simulated accuracy {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] "
                  "(paired bootstrap). A question can differ where a live batch takes another token than the capture's "
                  "batch did at a near tie."]
    lines += ["", "## Choices made on validation", "",
              f"- Router for `route+verify (wrong)`: `{plan['router']}` (between the difficulty probe and a logistic "
              "regression on the same prompt-window KV, by validation accuracy at the headline budget).",
              f"- Fast-answer verifier: `{plan['verifier']}`; slow-answer correctness: `{plan['correctness']}`.",
              "- Peers: " + "; ".join(f"{k}: " + ", ".join(f"{a}={b:.4g}" for a, b in v.items()) for k, v in plan["peers"].items()) + ".",
              "",
              "## The generator", "",
              f"`{study['generator']}` holds the chosen policy's router, the correctness probes of both modes, and "
              f"`{h['at_half']['best_probe_policy']}` with its thresholds as the default steering:", "",
              "```python", "from kvprobe import KVProbeGenerator", "",
              f"gen = KVProbeGenerator.from_pretrained(\"{study['generator']}\")",
              "result = gen.generate(\"your question\")   # the study's policy; result.mode, result.confidence", "```", ""]
    return "\n".join(lines) + "\n"


def figure(spec, policies, results, fixed):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    styles = {PROBE: "-", PEER: "--", OTHER: ":"}
    for i, p in enumerate(policies):
        xs, ys = results[p.label]["frontier"]
        ax.plot(xs, ys, styles[p.family], lw=2 if p.family == PROBE else 1.2, color=f"C{i % 10}", label=f"{p.label} (every threshold, test)")
        r = results[p.label][budget_key("token_ratio", spec.headline_budget)]
        ax.plot(r["mean_tokens"], r["accuracy"], "o", ms=7, mfc="none", mec=f"C{i % 10}")
    for name, marker in (("always-fast", "s"), ("always-slow", "D"), ("oracle", "*")):
        ax.plot(fixed[name]["mean_tokens"], fixed[name]["accuracy"], marker, ms=10, ls="none", mec="k",
                color="gold" if name == "oracle" else "k", label=name)
    slow_tokens = fixed["always-slow"]["mean_tokens"]
    for b in spec.budgets:
        ax.axvline(b * slow_tokens, color="grey", lw=0.7, ls="--")
        ax.annotate(f"{b:g}x", (b * slow_tokens, ax.get_ylim()[0]), fontsize=7, color="grey", xytext=(2, 2), textcoords="offset points")
    ax.set(xlabel="mean decoded tokens per question", ylabel="accuracy",
           title=f"{spec.capture.model.name} / {spec.capture.task.name}: every policy (circles: calibrated on validation, "
                 f"<= {spec.headline_budget:g}x)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig
