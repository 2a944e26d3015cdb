"""``kvprobe study`` end to end on a tiny model: every part runs, the report and generator are written, and no
threshold or choice depends on the test questions."""

import json

import pytest

import graders
from kvprobe.cli import main as cli_main
from kvprobe.study.run import main
from kvprobe.study.spec import StudySpec
from kvprobe.steering import KVProbeGenerator


def study_args(tiny, root, out, grader="graders.by_number_mod4", *extra):
    return ["--config", "configs/study.yaml", "--capture.model.name", str(tiny), "--capture.model.dtype", "float32",
            "--capture.task.params", '{"n": 60, "seed": 5}', "--capture.task.grader", grader,
            "--capture.generation.max_new_tokens", '{"fast": 4, "slow": 12}', "--capture.generation.batch_size", "16",
            "--capture.features.hidden_states", "false", "--cache_dir", str(root / "captures"), "--out", str(out),
            "--max_epochs", "2", "--segments", "2", *extra]


@pytest.fixture(scope="module")
def studied(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    out = root / "first"
    return {"root": root, "out": out, "tiny": tiny_models["llama"], "study": main(study_args(tiny_models["llama"], root, out, "graders.by_number_mod4", "--live", "true"))}


def test_study_writes_report_json_figure_and_a_generator(studied):
    study, out = studied["study"], studied["out"]
    assert {p.name for p in out.iterdir()} >= {"study.md", "study.json", "study.png", "generator", "probes"}
    on_disk = json.loads((out / "study.json").read_text())
    assert next(iter(on_disk)) == "headline"  # a script reads the headline first
    h = on_disk["headline"]
    assert set(h) >= {"task", "model", "test_questions", "always_slow", "always_fast", "at_half", "paper_form", "correctness",
                      "verifier_fast_auroc", "wall_seconds"}
    assert set(h["at_half"]) >= {"best_probe_policy", "accuracy", "tokens_over_slow", "best_non_probe_policy",
                                 "non_probe_accuracy", "minus_slow_ci", "minus_non_probe_ci"}
    assert set(h["correctness"]) >= {"probe", "probe_auroc", "length_auroc", "max_prob_auroc", "minus_length_ci"}
    assert h["test_questions"] == len(study["test_qids"]) == 12
    policies = study["policies"]
    assert {"route (difficulty probe (four-class))", "route (KV logistic (prompt window))", "verify (wrong)", "verify (gain)",
            "route+verify (wrong)", "route+verify (gain)", "random", "route (prompt length)"} <= set(policies)
    assert any(p.startswith("route (text-only") for p in policies) and any(p.startswith("route (hidden") for p in policies)
    for label, p in policies.items():  # every policy at every budget: 3 token budgets and 3 accuracy losses
        assert {"tokens_0.3", "tokens_0.5", "tokens_0.7", "loss_0.01", "loss_0.02", "loss_0.03"} <= set(p), label
    assert h["at_half"]["best_probe_policy"] in policies and policies[h["at_half"]["best_probe_policy"]]["family"] == "probe"
    assert policies[h["at_half"]["best_non_probe_policy"]]["family"] == "no probe"
    lo, hi = h["at_half"]["minus_slow_ci"]
    assert lo <= h["at_half"]["minus_slow"] <= hi
    md = (out / "study.md").read_text()
    assert "kvprobe study --config configs/study.yaml" in md and "![accuracy against tokens](study.png)" in md
    assert len(study["segments"]["always-slow"]) == 2
    assert len(study["correctness"]["slow"]) == 9 and len(study["correctness"]["fast"]) == 2  # the levers, each measured
    assert "answer KV, L-BFGS, trained on both modes' answers" in study["correctness"]["slow"]
    gen = KVProbeGenerator.from_pretrained(out / "generator")
    chosen = policies[h["at_half"]["best_probe_policy"]]
    assert gen.steering.policy == chosen["kind"]  # the study's policy is the folder's default
    assert set(gen.correctness) == {"fast", "slow"}
    result = gen.generate("What is 3 + 4?", max_new_tokens=3)
    assert result.text is not None and result.confidence is not None


def test_the_generator_folder_live_does_what_the_simulation_said(studied):
    """``live``: the folder the study wrote, loaded and run on the test questions, takes the simulated decision and
    gets the simulated grade on every question (float32 tiny model: no near ties between capture and live)."""
    study = studied["study"]
    live, best = study["live"], study["headline"]["at_half"]["best_probe_policy"]
    assert live["policy"] == study["policies"][best]["kind"] and live["questions"] == 12
    assert live["agreement"] == {"decisions": 1.0, "grades": 1.0, "both": 1.0}
    assert live["accuracy"] == pytest.approx(study["policies"][best]["tokens_0.5"]["accuracy"])
    assert study["headline"]["live"]["agreement"] == 1.0
    assert "## Live: the generator folder on the test questions" in (studied["out"] / "study.md").read_text()


def test_no_threshold_or_choice_depends_on_the_test_questions(studied):
    """The same study with every test question's grade inverted (both modes): the test figures move, and every
    threshold, router, verifier, correctness probe and best policy stays exactly as it was."""
    first = studied["study"]
    graders.FLIPPED.clear()
    graders.FLIPPED.update(first["test_qids"])
    try:
        again = main(study_args(studied["tiny"], studied["root"], studied["root"] / "flipped", "graders.flipped"))
    finally:
        graders.FLIPPED.clear()
    assert again["test_qids"] == first["test_qids"]
    assert again["headline"]["always_slow"]["accuracy"] == pytest.approx(1 - first["headline"]["always_slow"]["accuracy"])
    assert again["plan"] == first["plan"]


def test_bad_study_input_is_refused_before_model_work(tmp_path, capsys):
    with pytest.raises(ValueError, match="budgets"):
        StudySpec(budgets=[1.5])
    with pytest.raises(ValueError, match="prompt_window"):
        main(["--config", "configs/study.yaml", "--capture.features.prompt_window", "0"])
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert cli_main(["study", "--config", "configs/study.yaml", "--out", str(blocked / "out")]) == 2
    assert "cannot be written" in capsys.readouterr().err
