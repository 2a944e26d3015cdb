"""The difficulty probe: pooling, labels, budget calibration, routing evaluation, data splits, fit and export."""

import json
import math

import pytest
import torch

from kvprobe import routing
from kvprobe.export import ProbeMismatch, load_probe, read_card
from kvprobe.features import pool_positions, probe_input
from kvprobe.fit import main
from kvprobe.models import ModelSpec
from kvprobe.probes import DifficultyProbe


# --- pooling -------------------------------------------------------------------------------------------------
def window_tensor():
    """(batch 1, layers 3, K/V 2, heads 2, window 3, dim 2) with value = 1000*layer + 100*kv + 10*head + position."""
    x = torch.zeros(1, 3, 2, 2, 3, 2)
    for layer in range(3):
        for kv in range(2):
            for head in range(2):
                for pos in range(3):
                    x[0, layer, kv, head, pos] = torch.tensor([1000 * layer + 100 * kv + 10 * head + pos, 1.0])
    return x


def test_position_pooling_by_hand():
    x = window_tensor()
    # layer 1, V, head 0: positions hold 1100, 1101, 1102 in dim 0 and 1 in dim 1
    assert pool_positions(x, "sum")[0, 1, 1, 0].tolist() == [3303.0, 3.0]
    assert pool_positions(x, "mean")[0, 1, 1, 0].tolist() == [1101.0, 1.0]
    assert pool_positions(x, "last")[0, 1, 1, 0].tolist() == [1102.0, 1.0]
    with pytest.raises(ValueError, match="max"):
        pool_positions(x, "max")


def test_head_layer_pooling_and_l2_by_hand():
    pooled = pool_positions(window_tensor(), "last")  # (1, 3, 2, 2, 2)
    # V only, mean over heads, last two layers, flattened: layer 1 -> [(1102+1112)/2, 1], layer 2 -> [2107, 1]
    assert probe_input(pooled, [1, 2], "v", "mean", "flatten").tolist() == [[1107.0, 1.0, 2107.0, 1.0]]
    assert probe_input(pooled, [1, 2], "v", "mean", "sum").tolist() == [[3214.0, 2.0]]
    assert probe_input(pooled, [-1], "k", "flatten", "mean").tolist() == [[2002.0, 1.0, 2012.0, 1.0]]
    unit = probe_input(pooled, [1, 2], "v", "mean", "flatten", l2_norm=True).view(2, 2)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(unit[0], torch.tensor([1107.0, 1.0]) / math.hypot(1107, 1))


def test_probe_inputs_follow_config():
    probe = DifficultyProbe(kv="k", layers=2, window=2, position_pool="sum", head_pool="mean", layer_pool="flatten")
    x = probe.inputs({"prompt_kv": window_tensor()})
    # last 2 layers, K, last 2 positions summed, heads averaged: layer 1 -> [(1001+1002 + 1011+1012)/2, 2]
    assert x.tolist() == [[2013.0, 2.0, 4013.0, 2.0]]
    with pytest.raises(ValueError, match="kept only 3 prompt positions"):
        DifficultyProbe(window=4).inputs({"prompt_kv": window_tensor()})
    with pytest.raises(ValueError, match="capture holds 3 layers"):
        DifficultyProbe(layers=4, window=3).inputs({"prompt_kv": window_tensor()})
    with pytest.raises(ValueError, match="objective"):
        DifficultyProbe(objective="hinge")


# --- labels ----------------------------------------------------------------------------------------------------
def test_labels_boundary_and_missing_grades():
    nan = float("nan")
    fast_ok = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, nan, 0.0, 1.0])
    fast_tok = torch.tensor([127.0, 128.0, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    slow_ok = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 1.0, nan, nan])
    labels = routing.difficulty_labels(fast_ok, fast_tok, slow_ok, short_tokens=128)
    assert labels[:5].tolist() == [0.0, 25.0, 0.0, 75.0, 100.0]  # 127 tokens is short, 128 is not
    assert labels[5].isnan() and labels[6].isnan()  # fast grade missing; fast wrong and slow grade missing
    assert labels[7] == 0.0  # fast right: the slow grade does not matter


# --- calibration and evaluation ----------------------------------------------------------------------------------
def synthetic(n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    hard = torch.rand(n, generator=g) < 0.4
    outcomes = routing.Outcomes(
        fast_correct=(~hard & (torch.rand(n, generator=g) < 0.9)).float(),
        slow_correct=(torch.rand(n, generator=g) < torch.where(hard, 0.6, 0.85)).float(),
        fast_tokens=torch.full((n,), 4.0), slow_tokens=100 + 50 * torch.rand(n, generator=g),
    )
    scores = hard.float() + 0.7 * torch.randn(n, generator=g)  # informative but noisy
    return scores, outcomes


def test_calibration_hits_budgets():
    scores, outcomes = synthetic()
    budgets = routing.BudgetSpec(slow_share=[0.1, 0.25, 0.5], mean_tokens=[40.0], token_ratio=[0.5], paper=[0.5])
    t = routing.calibrate(scores, outcomes, budgets)
    for share in (0.1, 0.25, 0.5):
        assert (scores > t[f"share_{share:g}"]["threshold"]).float().mean() == pytest.approx(share, abs=1e-3)
    assert t["tokens_40"]["val_mean_tokens"] <= 40 < outcomes.route(scores > t["tokens_40"]["threshold"] - 0.05)["mean_tokens"] + 5
    best = t["best_at_0.5x_slow"]
    assert best["val_mean_tokens"] <= 0.5 * float(outcomes.slow_tokens.mean())
    curve = outcomes.curve(scores)
    affordable = curve["mean_tokens"] <= 0.5 * float(outcomes.slow_tokens.mean())
    assert best["val_accuracy"] == pytest.approx(float(curve["accuracy"][affordable].max()))
    assert t["paper_0.5"]["threshold"] == 0.5


def test_evaluate_fixed_modes_oracle_random():
    o = routing.Outcomes(
        fast_correct=torch.tensor([1.0, 0, 0, 1]), slow_correct=torch.tensor([1.0, 1, 0, 0]),
        fast_tokens=torch.tensor([2.0, 2, 2, 2]), slow_tokens=torch.tensor([10.0, 10, 10, 10]),
    )
    scores = torch.tensor([0.1, 0.9, 0.2, 0.0])  # ranks the one question that needs slow mode first
    rows = routing.evaluate(scores, o, {"x": {"threshold": 0.5}})
    assert rows["always_fast"] == {"accuracy": 0.5, "mean_tokens": 2.0, "slow_share": 0.0}
    assert rows["always_slow"] == {"accuracy": 0.5, "mean_tokens": 10.0, "slow_share": 1.0}
    assert rows["oracle"] == {"accuracy": 0.75, "mean_tokens": 4.0, "slow_share": 0.25}
    router = rows["router_x"]
    assert router["accuracy"] == 0.75 and router["mean_tokens"] == 4.0 and router["meets_bar"] == 1.0
    assert router["dominates_slow"] == 1.0 and router["dominates_fast"] == 0.0  # twice fast's tokens
    assert rows["random_x"] == {"accuracy": 0.5, "mean_tokens": 4.0, "slow_share": 0.25}
    assert o.route_gain(scores) > 0 > o.route_gain(-scores)


# --- data, fit, export on tiny models ------------------------------------------------------------------------------
def fit_args(tiny, tmp_path, *extra):
    return [
        "--config", "configs/difficulty.yaml",
        "--data.capture.model.name", str(tiny), "--data.capture.model.dtype", "float32",
        "--data.capture.task.name", "arithmetic", "--data.capture.task.params", '{"n": 48, "seed": 3}', "--data.capture.task.grader", "graders.by_number_mod4",
        "--data.capture.generation.max_new_tokens", '{"fast": 3, "slow": 6}', "--data.capture.generation.batch_size", "8",
        "--data.capture.generation.shard_size", "16", "--data.capture.features.hidden_states", "false",
        "--data.cache_dir", str(tmp_path / "captures"), "--data.batch_size", "16",
        "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--export_dir", str(tmp_path / "export"), *extra,
    ]


@pytest.mark.parametrize("objective", ["bce", "regression", "ce"])
def test_fit_fast_dev_run_each_objective(tiny_models, tmp_path, objective):
    results = main(fit_args(tiny_models["qwen2"], tmp_path, "--trainer.fast_dev_run", "true", "--model.init_args.objective", objective))
    test = results["test"]
    assert {"always_fast", "always_slow", "oracle", "router_share_0.25", "random_share_0.25", "router_paper_0.5"} <= test.keys()
    assert test["oracle"]["accuracy"] >= max(test["always_fast"]["accuracy"], test["always_slow"]["accuracy"])
    assert abs(test["router_share_0.5"]["slow_share"] - 0.5) < 0.35  # calibrated on val, applied to test
    config = read_card(tmp_path / "export").to_dict()
    assert config["probe_args"]["objective"] == objective and config["difficulty"]["short_tokens"] == 128
    assert config["prompt"]["fast"] and config["prompt"]["slow"] and config["prompt"]["mode"] == "fast"  # both modes' prompts
    assert set(config["calibration"]["thresholds"]) >= {"share_0.25", "best_at_0.5x_slow", "paper_0.5"}


def test_split_by_question_and_label_histogram(tiny_models, tmp_path, capsys):
    from datamodules import DifficultyDataModule
    from kvprobe.capture import CaptureSpec, GenerationSpec
    from kvprobe.tasks import TaskSpec

    dm = DifficultyDataModule(
        CaptureSpec(ModelSpec(name=str(tiny_models["llama"])), TaskSpec(params={"n": 40, "seed": 4}, grader="graders.by_number_mod4"),
                    generation=GenerationSpec(max_new_tokens={"fast": 3, "slow": 5}, batch_size=8, shard_size=16)),
        cache_dir=str(tmp_path / "captures"),
    )
    dm.prepare_data()
    dm.setup("fit")
    assert "difficulty labels (short_tokens=128): 0: 20 (50%), 25: 0 (0%), 75: 10 (25%), 100: 10 (25%)" in capsys.readouterr().out
    qids = {name: {ds.rows[g]["qid"] for g in ds.indices} for name, ds in dm.datasets.items()}
    assert not (qids["train"] & qids["val"]) and not (qids["train"] & qids["test"]) and not (qids["val"] & qids["test"])
    assert sum(len(q) for q in qids.values()) == 40
    item = dm.datasets["test"][0]
    k = int(dm.datasets["test"].rows[item["index"]]["qid"].rsplit("/", 1)[-1]) % 4
    assert float(item["label"]) == {0: 0.0, 1: 75.0, 2: 100.0, 3: 0.0}[k] and float(item["slow_needed"]) == float(k == 1)
    assert item["prompt_kv"].shape == (3, 2, 2, 8, 16)  # layers, K/V, heads, window, head_dim
    assert {p.name.split("-")[1] for p in (tmp_path / "captures").iterdir()} == {"fast", "slow"}


def test_extra_training_questions_join_train_only(tiny_models, tmp_path):
    from datamodules import DifficultyDataModule
    from kvprobe.capture import CaptureSpec, GenerationSpec
    from kvprobe.tasks import TaskSpec, load_items

    main_task, extra_task = TaskSpec(params={"n": 40, "seed": 4}, grader="graders.by_number_mod4"), TaskSpec(params={"n": 30, "seed": 5}, grader="graders.by_number_mod4")

    def module(extra):
        dm = DifficultyDataModule(
            CaptureSpec(ModelSpec(name=str(tiny_models["llama"])), main_task,
                        generation=GenerationSpec(max_new_tokens={"fast": 3, "slow": 5}, batch_size=8, shard_size=16)),
            extra_train=extra, cache_dir=str(tmp_path / "captures"),
        )
        dm.prepare_data()
        dm.setup("fit")
        return dm

    plain, extended = module(None), module(extra_task)
    qids = {dm: {name: [ds.rows[g]["qid"] for g in ds.indices] for name, ds in dm.datasets.items()} for dm in (plain, extended)}
    assert qids[extended]["val"] == qids[plain]["val"] and qids[extended]["test"] == qids[plain]["test"]
    taken = {item.question for item in load_items(main_task)}
    new = [item for item in load_items(extra_task) if item.question not in taken]
    assert 0 < len(new) < 30  # some extra questions repeat the task's: they must stay out
    assert qids[extended]["train"] == qids[plain]["train"] + [item.qid for item in new]
    ds = extended.datasets["train"]
    for i in range(len(ds)):
        row = ds.rows[ds.indices[i]]
        k = int(row["qid"].rsplit("/", 1)[-1]) % 4  # labels from the mode grader, as in the test above
        assert float(ds[i]["label"]) == {0: 0.0, 1: 75.0, 2: 100.0, 3: 0.0}[k], row["qid"]
    spec = extended.export_spec()["difficulty"]["extra_train"]
    assert spec["task"]["params"] == {"n": 30, "seed": 5} and set(spec["captures"]) == {"fast", "slow"}
    assert spec["captured"] == 30 and spec["used"] == len(new)
    assert plain.export_spec()["difficulty"]["extra_train"] is None


def test_export_round_trip_keeps_thresholds_and_refuses_other_models(tiny_models, tmp_path):
    main(fit_args(tiny_models["llama"], tmp_path, "--trainer.max_epochs", "2", "--model.init_args.layers", "2",
                  "--model.init_args.l2_norm", "true", "--model.init_args.position_pool", "sum"))
    folder = tmp_path / "export"
    probe = load_probe(folder, ModelSpec(name=str(tiny_models["llama"])))
    saved = json.loads((folder / "results.json").read_text())["calibration"]["thresholds"]
    assert probe.thresholds == saved == probe.card.thresholds and probe.budgets.slow_share == [0.25, 0.4, 0.5]
    assert probe.card.route_on == "fast" and probe.card.kind == "difficulty"
    x = torch.randn(4, 3, 2, 2, 8, 16)
    again = load_probe(folder, str(tiny_models["llama"]))
    torch.testing.assert_close(probe.score(probe(probe.inputs({"prompt_kv": x}))), again.score(again(again.inputs({"prompt_kv": x}))))
    with pytest.raises(ProbeMismatch, match="not on"):
        load_probe(folder, ModelSpec(name=str(tiny_models["qwen3"])))


def test_every_shipped_config_resolves_its_capture_reference():
    """Each capture spec is written once (configs/captures/) and referenced by relative path; every top-level config
    parses, and the probes meant to share a capture get the same one."""
    from kvprobe.fit import make_cli

    data = {}
    for name in ("coe", "difficulty", "switch", "difficulty_smollm2", "switch_smollm2"):
        data[name] = make_cli(["--config", f"configs/{name}.yaml", "--trainer.logger", "false"]).datamodule
    qwen_slow = make_cli(["--config", "configs/coe.yaml", "--data", "configs/data/qwen_mix_slow.yaml", "--trainer.logger", "false"]).datamodule
    assert data["difficulty"].capture.in_mode("slow") == qwen_slow.capture and qwen_slow.capture.model.name == "qwen2.5-coder-0.5b"
    assert data["difficulty_smollm2"].capture.in_mode("slow") == data["coe"].capture
    assert data["switch"].difficulty.capture == data["difficulty"].capture and data["switch"].window == 8
    assert data["switch"].difficulty.extra_train is None  # the switch windows need the task's answers only
    assert data["switch_smollm2"].difficulty.capture == data["difficulty_smollm2"].capture
    assert data["difficulty"].split == qwen_slow.split and data["difficulty"].extra_train.name == "mix"
