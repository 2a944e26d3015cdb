"""``kvprobe study``: from (model, task, question range) to how much slow thinking the probes let you skip, and how
far each answer can be trusted, on that task.

    kvprobe study --config configs/study.yaml                                  # SmolLM2 on arithmetic, minutes
    kvprobe study --config configs/study_asdiv.yaml                            # Qwen2.5-Coder-0.5B on ASDiv 0-999
    kvprobe study --config configs/study.yaml --capture.task.name gsm8k --capture.task.limit 200 --out runs/gsm8k

1. Capture the questions in both modes (fast: answer directly; slow: step by step) with the existing capture:
   fingerprinted, resumable, a progress bar; an estimate of the answers and tokens to decode is printed first.
2. Split by question (train / validation / test), the same split for every part.
3. On train only: the difficulty router (four-class, so that it also says whether slow mode can fix a wrong fast
   answer), a logistic regression on the same prompt-window KV, the fast-answer verifier, the slow-answer
   correctness probe (and its levers), and the peers: a text-only router, a hidden-state router, prompt length.
4. On validation only: every threshold (per policy and budget), the router, the verifier and the correctness probe.
5. On test, once: every policy at every budget, paired bootstrap intervals, correctness AUROCs beside answer
   length and the output scores. ``study.md``, ``study.json`` (a ``headline`` first, a ``plan`` of every choice
   made on validation), ``study.png``, and a generator folder holding the chosen probes, policy and thresholds;
   with ``live``, that folder loaded and run on the test questions beside the simulation of its policy.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from datamodules.kv_capture import SPLITS
from kvprobe import fit
from kvprobe.cascade import ESCALATE_ON, paired_bootstrap
from kvprobe.metrics import auroc_or_nan
from kvprobe.paths import writable_folder
from kvprobe.prompts import MODES
from kvprobe.resources import configs_dir
from kvprobe.routing import Outcomes
from kvprobe.store import CaptureStore
from kvprobe.study import levers, peers
from kvprobe.study.policies import OTHER, PEER, PROBE, Policy, best_at, budget_key, by_segment, fixed, score_all
from kvprobe.study.spec import StudySpec
from kvprobe.tasks import Item, default_caps, load_items

DIFFICULTY = "difficulty probe (four-class)"
LOGISTIC = "KV logistic (prompt window)"
TEXT, LENGTH, HIDDEN = "text-only (char n-gram TF-IDF)", "prompt length", "hidden states (logistic)"
LIVE_SOURCES = ("kv", "output")  # what the live generator can score (kvprobe.steering.generator)


def estimate(spec: StudySpec) -> dict:
    """What the capture is about to decode: answers per mode and, at most, tokens (every answer at its cap)."""
    caps = spec.capture.generation.max_new_tokens or default_caps(spec.capture.task)
    tasks = [spec.capture.task] + ([spec.extra_train] if spec.extra_train else [])
    questions = sum(len(load_items(t)) for t in tasks)
    est = {"questions": questions, "answers": questions * len(MODES), "max_tokens": {m: questions * caps[m] for m in MODES}}
    print(f"[kvprobe] study: {questions} questions x {len(MODES)} modes = {est['answers']} answers to decode (cached ones "
          f"are read, not decoded); at most {sum(est['max_tokens'].values()):,} tokens (fast cap {caps['fast']}, slow cap "
          f"{caps['slow']})", flush=True)
    return est


def data_config(spec: StudySpec, mode: str | None = None) -> dict:
    """A data config (``class_path`` + ``init_args``) over the study's capture: both modes joined for the routers
    (``mode`` None), or one mode's answers for a correctness probe."""
    init = {"capture": dataclasses.asdict(spec.capture), "split": dataclasses.asdict(spec.split),
            "extra_train": dataclasses.asdict(spec.extra_train) if spec.extra_train else None, "cache_dir": spec.cache_dir}
    if mode is None:
        return {"class_path": "datamodules.DifficultyDataModule", "init_args": init | {"short_tokens": spec.short_tokens, "route_on": "fast"}}
    return {"class_path": "datamodules.KVCaptureDataModule", "init_args": init | {"mode": mode}}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def fit_probe(spec: StudySpec, config: str, data: dict, name: str, extra: list[str]) -> dict:
    """One ``kvprobe fit`` (quiet, no logger) exported to ``out/probes/<name>``; its results, folder and CLI."""
    out = Path(spec.out)
    folder = out / "probes" / slug(name)
    args = ["--config", str(configs_dir() / config), "--data", json.dumps(data), "--export_dir", str(folder),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", str(spec.max_epochs),
            "--trainer.default_root_dir", str(out / "lightning"),
            "--trainer.callbacks.init_args.dirpath", str(out / "lightning" / "checkpoints"), *extra]
    print(f"[kvprobe] study: fitting {name}", flush=True)
    results, cli = fit.fit(args)
    return {"results": results, "folder": folder, "cli": cli}


def scores(probe, loader, qids: list[str] | None = None, method: str = "predict") -> torch.Tensor:
    """``probe.<method>`` (its calibrated score; ``slow_helps`` for a difficulty probe's P(slow right | fast wrong))
    over ``loader`` in eval mode, in the order of ``qids`` (None: the loader's order)."""
    probe.eval()
    with torch.no_grad():
        values = torch.cat([getattr(probe, method)(batch).float().cpu() for batch in loader])
    if qids is None:
        return values
    ds = loader.dataset
    where = {ds.rows[i]["qid"]: k for k, i in enumerate(ds.indices)}
    return values[[where[q] for q in qids]]


def split_scores(entry: dict, qids: dict[str, list[str]], method: str = "predict") -> dict[str, torch.Tensor]:
    dm, probe = entry["cli"].datamodule, entry["cli"].model
    return {s: scores(probe, loader, qids[s], method) for s, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader()))}


def scorable_live(entry: dict) -> bool:
    """Whether the live generator can score answers with this correctness probe."""
    hp = entry["cli"].model.hparams
    return hp.source in LIVE_SOURCES and not hp.coe_features and not hp.get("length_inputs")


def correctness(spec: StudySpec, mode: str, variants: dict[str, list[str]], qids: dict, grades: dict, refit: bool = False,
                also: dict | None = None) -> dict:
    """Each variant fitted on ``mode``'s answers (``refit``: also the plain one as a logistic solved to convergence,
    and, given ``also``, another mode's plain probe entry, the same trained on both modes' training answers), with
    its validation and test AUROC."""
    config = "verifier.yaml" if mode == "fast" else "coe.yaml"
    fitted = {name: fit_probe(spec, config, data_config(spec, mode), f"{mode} {name}", extra) for name, extra in variants.items()}
    if refit:
        fitted[levers.LBFGS] = levers.lbfgs(fitted["answer KV"], Path(spec.out) / "probes" / slug(f"{mode} {levers.LBFGS}"))
        if also is not None:
            fitted[levers.BOTH_MODES] = levers.lbfgs(fitted["answer KV"], Path(spec.out) / "probes" / slug(
                f"{mode} {levers.BOTH_MODES}"), also=also)
    out = {}
    for name, entry in fitted.items():
        entry["scores"] = split_scores(entry, qids)
        entry |= {f"{s}_auroc": auroc_or_nan(entry["scores"][s], grades[s]) for s in ("val", "test")}
        entry["live"] = scorable_live(entry)
        out[name] = entry
    return out


def chosen(entries: dict, keep: str = "answer KV", tolerance: float = 0.005, where=lambda e: True) -> str:
    """The variant with the best validation AUROC among ``where``; ``keep`` (the plain answer-KV probe) when it is
    within ``tolerance`` of it (the cheapest live: no softmax over the vocabulary per token)."""
    names = [n for n, e in entries.items() if where(e)]
    best = max(names, key=lambda n: entries[n]["val_auroc"])
    return keep if keep in names and entries[keep]["val_auroc"] >= entries[best]["val_auroc"] - tolerance else best


def run(spec: StudySpec, command: str | None = None) -> dict:
    """The whole study (see the module's docstring); returns what ``study.json`` holds. ``command``: how it was
    started, written into ``study.md`` as its reproduce command."""
    start = time.perf_counter()
    writable_folder(spec.out, "the study's output folder (--out)")
    writable_folder(spec.report_path.parent, "the study's report folder (--report)")
    estimate(spec)

    # --- 1-2. both modes captured; outcomes per split, the same questions for every part ---
    diff_data = data_config(spec)
    first = fit_probe(spec, "difficulty.yaml", diff_data, DIFFICULTY, [])  # captures both modes first
    dm = first["cli"].datamodule
    outcomes, rows = {}, {}
    for s in SPLITS:
        idx = torch.tensor(dm.datasets[s].indices)
        outcomes[s] = Outcomes(**{k: dm.outcomes[k][idx] for k in ("fast_correct", "slow_correct", "fast_tokens", "slow_tokens")})
        rows[s] = [dm.datasets[s].rows[i] for i in dm.datasets[s].indices]
    qids = {s: [r["qid"] for r in rows[s]] for s in SPLITS}
    captures = {m: CaptureStore(r.path) for m, r in dm.results.items()}
    shape = captures["slow"].spec()["shape"]

    # --- 3. probes and peers on train; every choice on validation ---
    routers = {DIFFICULTY: first, LOGISTIC: fit_probe(spec, "difficulty.yaml", diff_data, LOGISTIC, [
        "--model.init_args.head", "linear", "--model.init_args.objective", "bce", "--model.init_args.dropout", "0",
        "--select_weight_decay", json.dumps(spec.weight_decays)])}
    route = {name: split_scores(e, qids) for name, e in routers.items()}
    helps = split_scores(first, qids, "slow_helps")
    grades = {mode: {s: getattr(outcomes[s], f"{mode}_correct") for s in ("val", "test")} for mode in MODES}
    verifiers = correctness(spec, "fast", {"answer KV": [], "answer KV + output scores": ["--model.init_args.output_inputs", "true"]},
                            qids, grades["fast"])
    slow_probes = correctness(spec, "slow", levers.variants(shape["layers"], spec.weight_decays) if spec.levers else {"answer KV": []},
                              qids, grades["slow"], refit=spec.levers, also=verifiers["answer KV"])
    verifier_name, slow_name = chosen(verifiers), chosen(slow_probes, where=lambda e: True)
    live_slow_name = chosen(slow_probes, where=scorable_live)
    fast_conf = verifiers[verifier_name]["scores"]
    escalate = {"wrong": {s: 1 - fast_conf[s] for s in ("val", "test")},
                "gain": {s: (1 - fast_conf[s]) * helps[s] for s in ("val", "test")}}

    train_y = [int(v) for v in outcomes["train"].slow_needed().tolist()]
    peer_settings = {}
    route[TEXT], peer_settings[TEXT] = peers.text_router({s: [r["question"] for r in rows[s]] for s in SPLITS}, train_y, outcomes["val"])
    route[LENGTH] = peers.length_router({s: [r["prompt_tokens"] for r in rows[s]] for s in SPLITS})
    lm = None
    if spec.hidden_router:
        from kvprobe.models import load_model

        lm = load_model(spec.capture.model)
        window = routers[DIFFICULTY]["cli"].model.hparams.window
        prompt = dm.mode_prompt("fast")
        hidden = {s: peers.prompt_hidden(lm, [Item(r["qid"], r["question"], r["gold"]) for r in rows[s]], prompt, window) for s in SPLITS}
        route[HIDDEN], peer_settings[HIDDEN] = peers.feature_router(hidden, train_y, outcomes["val"])

    # --- 4. every policy calibrated on validation; the router for route+verify chosen there ---
    head = budget_key("token_ratio", spec.headline_budget)
    kv_routes = [Policy(f"route ({r})", "route", r, "wrong", PROBE) for r in routers]
    calibrate = lambda ps: score_all(ps, route, escalate, outcomes, spec.budgets, spec.losses, spec.spend)
    results = calibrate(kv_routes)
    router = max(routers, key=lambda r: (results[f"route ({r})"][head]["val_accuracy"], outcomes["val"].route_gain(route[r]["val"])))
    policies = kv_routes + [Policy(f"verify ({rule})", "verify", None, rule, PROBE) for rule in ESCALATE_ON]
    policies += [Policy("route+verify (wrong)", "route+verify", router, "wrong", PROBE),
                 Policy("route+verify (gain)", "route+verify", DIFFICULTY, "gain", PROBE)]
    policies += [Policy(f"route ({TEXT})", "route", TEXT, "wrong", PEER), Policy(f"route ({LENGTH})", "route", LENGTH, "wrong", PEER),
                 Policy("random", "random", None, "wrong", PEER)]
    policies += [Policy(f"route ({HIDDEN})", "route", HIDDEN, "wrong", OTHER)] if HIDDEN in route else []
    results |= calibrate([p for p in policies if p.label not in results])
    keys = [budget_key("token_ratio", b) for b in spec.budgets] + [budget_key("max_loss", x) for x in spec.losses]
    best = {k: {PROBE: best_at(results, policies, PROBE, k), PEER: best_at(results, policies, PEER, k)} for k in keys}

    # --- 5. test, once ---
    fixed_test = fixed(outcomes["test"])
    slow_correct = fixed_test["always-slow"]["per_question"]["correct"]
    comparisons = {}
    for k in keys:
        probe_q, peer_q = (results[best[k][f]][k]["per_question"]["correct"] for f in (PROBE, PEER))
        comparisons[k] = {"minus_slow": paired_bootstrap(probe_q, slow_correct), "minus_non_probe": paired_bootstrap(probe_q, peer_q)}
    n_items = len(load_items(spec.capture.task))
    segment = torch.tensor([r["index"] * spec.segments // n_items for r in rows["test"]])
    slow_rows = {r["qid"]: r for r in captures["slow"].open()[1].to_pylist()}
    segments = {"truncated_slow": by_segment({"correct": torch.tensor([float(not slow_rows[q]["finished"]) for q in qids["test"]]),
                                              "tokens": outcomes["test"].slow_tokens}, segment, outcomes["test"].slow_tokens, spec.segments)}
    segments |= {name: by_segment(f["per_question"], segment, outcomes["test"].slow_tokens, spec.segments) for name, f in fixed_test.items()}
    segments |= {label: by_segment(r[head]["per_question"], segment, outcomes["test"].slow_tokens, spec.segments) for label, r in results.items()}
    diagnosis = where_accuracy_goes(policies, results, route, escalate, helps, outcomes["test"], spec.headline_budget, head)

    # --- the generator: the chosen probes, policy and thresholds; optionally run live on test ---
    if lm is None:
        from kvprobe.models import load_model

        lm = load_model(spec.capture.model)
    generator = save_generator(lm, Path(spec.out) / "generator", best[head][PROBE], policies, results[best[head][PROBE]][head],
                               routers, router, slow_probes[live_slow_name]["folder"], verifiers[verifier_name]["folder"])
    live_run = None
    if spec.live:
        from kvprobe.study.live import check

        live_run = check(generator, lm, dm, results[best[head][PROBE]][head], qids["test"], fixed_test["always-slow"]["mean_tokens"])

    from kvprobe.study.report import write

    study = {
        "spec": json.loads(json.dumps(dataclasses.asdict(spec), default=str)),
        "captures": {m: {"path": str(c.path)} | c.manifest()["summary"] for m, c in captures.items()},
        "plan": plan(routers, router, verifiers, verifier_name, slow_probes, slow_name, live_slow_name, peer_settings, results, best),
        "test_qids": qids["test"],
    }
    return write(spec, study, policies, results, fixed_test, best, comparisons, verifiers, slow_probes, segments, diagnosis,
                 generator, live_run, head, wall=time.perf_counter() - start, command=command or f"kvprobe.study.run.run({spec!r})")


def plan(routers, router, verifiers, verifier_name, slow_probes, slow_name, live_slow_name, peer_settings, results, best) -> dict:
    """Every choice the study made, all on validation: what a test must find unchanged when test labels change."""
    selection = lambda e: {k: v for k, v in e["results"].get("selection", {}).items() if k in ("weight_decay", "C")} or None
    return {
        "router": router, "router_weight_decay": {n: selection(e) for n, e in routers.items()},
        "verifier": verifier_name, "correctness": slow_name, "correctness_live": live_slow_name,
        "correctness_selection": {n: selection(e) for n, e in slow_probes.items()},
        "val_auroc": {f"fast {n}": e["val_auroc"] for n, e in verifiers.items()} | {f"slow {n}": e["val_auroc"] for n, e in slow_probes.items()},
        "peers": peer_settings,
        "thresholds": {label: {k: r["thresholds"] for k, r in by_key.items() if k != "frontier"} for label, by_key in results.items()},
        "best": best,
    }


def where_accuracy_goes(policies, results, route, escalate, helps, test: Outcomes, budget: float, head: str) -> dict:
    """At the headline budget, the best any threshold reaches on test (an upper bound for diagnosis, never a policy)
    with the verifier as it is and replaced by the truth; and how well each score tells "slow mode fixes it" from
    "nothing does" among the wrong fast answers."""
    from kvprobe import cascade

    ceiling = {}
    for p in policies:
        if p.family != PROBE:
            continue
        zeros = torch.zeros(len(test))
        real = cascade.Signals(route[p.router]["test"] if p.router else zeros, escalate[p.rule]["test"])
        truth_conf = test.fast_correct
        truth = cascade.Signals(real.route, cascade.escalation(p.rule, truth_conf, helps["test"]))
        ceiling[p.label] = {"calibrated": results[p.label][head]["accuracy"],
                            "best_threshold": cascade.best_within(p.kind, real, test, budget),
                            "best_threshold_perfect_verifier": cascade.best_within(p.kind, truth, test, budget)}
    wrong = test.fast_correct == 0
    fixable = {"P(slow right, given fast wrong), four-class probe": auroc_or_nan(helps["test"][wrong], test.slow_correct[wrong])}
    fixable |= {name: auroc_or_nan(s["test"][wrong], test.slow_correct[wrong]) for name, s in route.items()}
    return {"ceiling": ceiling, "fixable": fixable, "wrong_fast": int(wrong.sum())}


def save_generator(lm, folder: Path, label: str, policies: list[Policy], result: dict, routers: dict, router: str,
                   slow_folder: Path, fast_folder: Path) -> Path:
    """The generator folder: the chosen policy's router, the correctness probes of both modes, and the policy with
    its calibrated thresholds as the folder's default steering."""
    from kvprobe.steering import KVProbeGenerator, SteeringSpec

    p = next(p for p in policies if p.label == label)
    t = [float(x) for x in result["thresholds"]]
    steering = {"policy": p.kind, "escalate_on": p.rule}
    steering |= {"route": {"threshold": t[0]}, "verify": {"escalate_above": t[0]},
                 "route+verify": {"threshold": t[0], "verify_route_threshold": t[0], "escalate_above": t[-1]}}[p.kind]
    difficulty = routers[p.router if p.router in routers else DIFFICULTY if p.rule == "gain" else router]["folder"]
    gen = KVProbeGenerator.from_probes(lm, difficulty, [slow_folder, fast_folder], steering=SteeringSpec(**steering))
    return gen.save_pretrained(folder)


def main(argv: list[str] | None = None) -> dict:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="kvprobe study", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a study YAML (configs/study.yaml); every field can be overridden after it")
    parser.add_class_arguments(StudySpec, None)  # top-level fields: --capture.task.limit 200, --out runs/x
    done = parser.instantiate(parser.parse_args(argv))
    argv = sys.argv[1:] if argv is None else argv
    return run(StudySpec(**{name: getattr(done, name) for name in StudySpec.__dataclass_fields__}), shlex.join(["kvprobe", "study", *argv]))


if __name__ == "__main__":
    from kvprobe.cli import run_module

    run_module(main, "kvprobe study")
