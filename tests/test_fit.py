"""The correctness probe end to end on tiny models: LightningCLI fit, W&B offline run, export round trip."""

import json

import pytest
import torch

from kvprobe.export import ProbeMismatch, load_probe, read_card
from kvprobe.fit import main
from kvprobe.probes import CorrectnessProbe, DifficultyProbe
from kvprobe.models import ModelSpec, locate


def fit_args(tiny, tmp_path, *extra):
    return [
        "--config", "configs/coe.yaml",
        "--data.capture.model.name", str(tiny), "--data.capture.task.params", '{"n": 40, "seed": 2}', "--data.capture.task.grader", "graders.parity",
        "--data.capture.generation.max_new_tokens", '{"fast": 4, "slow": 6}', "--data.capture.generation.batch_size", "8",
        "--data.cache_dir", str(tmp_path / "captures"), "--data.batch_size", "16",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ckpt"),
        "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--export_dir", str(tmp_path / "export"), *extra,
    ]


def test_fit_fast_dev_run_end_to_end(tiny, tmp_path):
    results = main(fit_args(tiny, tmp_path, "--trainer.fast_dev_run", "true", "--trainer.logger", "false"))
    test = results["test"]
    assert {"probe", "kv_coe_r_layer", "kv_coe_c_token", "hs_coe_r", "max_prob", "neg_entropy", "neg_length", "finished", "length_probe"} <= test.keys()
    paired = test["probe_minus_length_probe"]
    assert paired["lo"] <= paired["diff"] <= paired["hi"] and paired["diff"] == pytest.approx(test["probe"]["auroc"] - test["length_probe"]["auroc"])
    assert test["within_length_buckets"]["n"] <= results["items"]["test"]  # buckets holding one class are left out
    config = read_card(tmp_path / "export").to_dict()
    base = config["base_model"]
    assert base["shape"]["layers"] == 3 and base["shape"]["kv_heads"] == 2 and base["fingerprint"] == locate(ModelSpec(name=str(tiny)))[1]
    assert {"kvprobe", "transformers", "torch"} <= config["versions"].keys() and config["features"]["prompt_window"] == 8
    assert config["prompt"]["mode"] == "slow"
    assert config["capture"]["items"] == 40 and config["capture"]["cap_share"] == config["capture"]["unfinished"] / 40


@pytest.mark.parametrize("source", ["hidden", "prompt_kv", "length"])
def test_other_sources_and_coe_features(tiny_models, tmp_path, source):
    results = main(fit_args(tiny_models["qwen2"], tmp_path, "--trainer.fast_dev_run", "true", "--trainer.logger", "false",
                            "--model.init_args.source", source, "--model.init_args.coe_features", "true",
                            "--model.init_args.layers", "[0, -1]"))
    config = read_card(tmp_path / "export").to_dict()
    assert config["probe_args"]["source"] == source and config["probe_args"]["coe_features"]
    width = {"hidden": 2 * 64, "prompt_kv": 2 * 2 * 2 * 16, "length": 2}[source]  # 2 layers x (hidden | K,V x heads x dim)
    assert config["probe_args"]["input_dim"] == width + 4  # + four KV-CoE scores
    probe = results["test"]["probe"]
    assert probe["auroc_lo"] <= probe["auroc"] <= probe["auroc_hi"]  # the bootstrap interval holds its estimate


def test_export_round_trip_and_model_mismatch(tiny_models, tmp_path):
    main(fit_args(tiny_models["llama"], tmp_path, "--trainer.max_epochs", "2", "--trainer.logger", "false",
                  "--model.init_args.head", "mlp", "--model.init_args.calibration", "isotonic"))
    folder = tmp_path / "export"
    probe = load_probe(folder)  # the base model its card names, resolved again (no weights loaded)
    x = torch.randn(5, probe.hparams.input_dim)
    again = CorrectnessProbe.from_pretrained(folder, str(tiny_models["llama"]))  # a model name: fingerprinted without loading weights
    assert again.hparams.head == "mlp" and again.card == probe.card and again.card.base_model.name == str(tiny_models["llama"])
    with pytest.raises(ProbeMismatch, match="not on"):
        load_probe(folder, str(tiny_models["qwen2"]))
    with pytest.raises(ValueError, match="holds a CorrectnessProbe, not a DifficultyProbe"):
        DifficultyProbe.from_pretrained(folder)
    copy = again.save_pretrained(tmp_path / "copy")  # save_pretrained writes what from_pretrained reads
    kv = {"response_kv": torch.randn(3, 3, 2, 2, 16)}
    torch.testing.assert_close(CorrectnessProbe.from_pretrained(copy).predict(kv), again.predict(kv))
    torch.testing.assert_close(probe.score(probe(x)), again.score(again(x)))
    assert len(probe.iso_x) > 0 and probe.hparams.head == "mlp"
    with pytest.raises(ProbeMismatch, match="trained on model .*llama.*not on '.*qwen2'"):
        load_probe(folder, ModelSpec(name=str(tiny_models["qwen2"])))
    (folder / "probe.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_probe(folder)


def test_wandb_offline_run_holds_test_metrics(tiny_models, tmp_path):
    main(fit_args(tiny_models["qwen3"], tmp_path, "--trainer.max_epochs", "2"))
    [run] = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    files = run / "files"
    results = json.loads((files / "results.json").read_text())
    assert "auroc" in results["test"]["probe"] and (files / "probe.safetensors").stat().st_size > 0
    assert (files / "test.png").is_file() and not (files / "test.png").is_symlink()
    import wandb

    wandb.teardown()  # finish() hands the records to W&B's service process, which writes them when it can: wait for it
    log = next(run.glob("run-*.wandb")).read_bytes()
    assert b"test/probe/auroc" in log and b"val/auroc" in log  # logged metrics, in W&B's own record
    assert b"max_new_tokens" in log  # the resolved config (data section included) is in the run


def test_a_failing_figure_leaves_a_complete_export_and_a_finished_run(tiny_models, tmp_path, monkeypatch, capsys):
    from kvprobe.probes.correctness import CorrectnessProbe

    main(fit_args(tiny_models["qwen3"], tmp_path, "--trainer.max_epochs", "1", "--trainer.logger", "false"))
    export = tmp_path / "export"
    assert (export / "test.png").is_file()
    def no_matplotlib(self, title):
        raise ModuleNotFoundError("No module named 'matplotlib'")
    monkeypatch.setattr(CorrectnessProbe, "figure", no_matplotlib)
    results = main(fit_args(tiny_models["qwen3"], tmp_path, "--trainer.max_epochs", "2", "--model.init_args.head", "mlp"))
    assert "drawing the test figure failed (ModuleNotFoundError" in capsys.readouterr().out
    assert sorted(p.name for p in export.iterdir()) == ["probe.json", "probe.safetensors", "results.json"]  # no stale test.png
    assert read_card(export).to_dict()["probe_args"]["head"] == "mlp" and load_probe(export).hparams.head == "mlp"
    assert json.loads((export / "results.json").read_text())["test"]["probe"] == pytest.approx(results["test"]["probe"])
    [run] = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert (run / "files" / "probe.safetensors").is_file()  # logging went on without the figure
    import wandb

    assert wandb.run is None  # the run was finished
    assert not list(tmp_path.glob(".export.*"))  # no staging folder left


def test_an_interrupted_export_leaves_the_previous_one_whole(tiny_models, tmp_path, monkeypatch):
    import kvprobe.export

    main(fit_args(tiny_models["llama"], tmp_path, "--trainer.max_epochs", "1", "--trainer.logger", "false"))
    export = tmp_path / "export"
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    def crash(tensors, path, *args, **kwargs):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(kvprobe.export, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        main(fit_args(tiny_models["llama"], tmp_path, "--trainer.max_epochs", "2", "--trainer.logger", "false"))
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_default_export_goes_to_a_new_run_folder_and_never_over_a_user_folder(tiny_models, tmp_path):
    args = fit_args(tiny_models["qwen2"], tmp_path, "--trainer.fast_dev_run", "true", "--trainer.logger", "false")
    at = args.index("--export_dir")
    main(args[:at] + args[at + 2:])
    [folder] = (tmp_path / "runs" / "probes").iterdir()
    assert folder.name.endswith("-correctness-arithmetic") and (folder / "probe.json").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a kvprobe export"):
        main(args[:at] + ["--export_dir", str(mine)] + args[at + 2:])
    assert (mine / "notes.txt").read_text() == "keep me"


def test_weight_decay_selection_length_inputs_and_the_length_warning(tiny_models, tmp_path, capsys):
    """Labels by question parity: nothing in the KV (nor the length) knows them, so the probe cannot beat the
    length-only baseline on validation, and the run says so at the end, in results.json and in the card."""
    results = main(fit_args(tiny_models["qwen2"], tmp_path, "--trainer.max_epochs", "3", "--trainer.logger", "false",
                            "--select_weight_decay", "[0.01, 100]", "--model.init_args.length_inputs", "true"))
    selection = results["selection"]
    assert set(selection["val_select"]) == {0.01, 100.0}
    assert selection["weight_decay"] == max(selection["val_select"], key=selection["val_select"].get)
    config = read_card(tmp_path / "export").to_dict()
    assert config["probe_args"]["weight_decay"] == selection["weight_decay"] and config["probe_args"]["length_inputs"]
    assert config["probe_args"]["input_dim"] == 3 * 2 * 2 * 16 + 2  # KV of every layer, then log length and finished
    assert results["val_select"] == pytest.approx(selection["val_select"][selection["weight_decay"]])  # the same fit again
    d = results["validation"]["probe_minus_length_probe"]
    assert results["validation"]["beats_length"] is (d["lo"] > 0) is False
    assert results["warnings"] and "does not beat the length-only baseline" in results["warnings"][0]
    assert config["metrics"]["warnings"] == results["warnings"]
    out = capsys.readouterr().out
    assert "weight decay by val/select" in out and "WARNING: on validation the probe does not beat" in out


def test_a_data_config_on_the_command_line_replaces_the_one_before_it():
    """configs/coe.yaml names arithmetic data; ``--data <an ASDiv config>`` must give that config's capture as written
    (task.params empty), not one that keeps arithmetic's params where the ASDiv file is silent. Dotted overrides after
    it still apply."""
    from kvprobe.fit import make_cli

    data = "configs/data/qwen_sampled_asdiv.yaml"
    cli = make_cli(["--config", "configs/coe.yaml", "--data", data, "--data.capture.task.limit", "7", "--trainer.logger", "false"])
    task = cli.datamodule.capture.task
    assert (task.name, task.params, task.limit) == ("asdiv", {}, 7)
    again = make_cli(["--config", "configs/coe.yaml", f"--data={data}", "--trainer.logger", "false"]).datamodule.capture
    assert again.task.params == {} and again.task.limit == 180 and again.generation.samples == 16


def test_concurrent_fits_in_one_folder_keep_their_own_checkpoints(tiny_models, tmp_path):
    """Two fits started at once with the same checkpoint folder and root (as two runs in one project would) each
    export the weights of their own training, equal to the same fit run alone: a run never reloads a checkpoint
    that another run wrote (both once wrote ``best.ckpt`` and each reloaded whichever came last)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    def args(wd, export, shared):
        return [*fit_args(tiny_models["llama"], shared, "--trainer.logger", "false", "--trainer.max_epochs", "12",
                          "--trainer.enable_progress_bar", "false", "--model.init_args.weight_decay", str(wd)),
                "--export_dir", str(export)]

    shared = tmp_path / "shared"
    for wd in (0.01, 100):  # alone, one after the other (the first also captures, for every later run)
        main(args(wd, tmp_path / f"solo-{wd}", shared))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path("tests").resolve()), os.environ.get("PYTHONPATH", "")])}
    runs = [subprocess.Popen([sys.executable, "-m", "kvprobe.fit", *args(wd, tmp_path / f"together-{wd}", shared)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for wd in (0.01, 100)]
    for run in runs:
        assert run.wait(timeout=600) == 0, run.stderr.read()[-2000:]
    weights = {name: load_file(tmp_path / name / "probe.safetensors") for name in
               ("solo-0.01", "solo-100", "together-0.01", "together-100")}
    for wd in ("0.01", "100"):
        for key, value in weights[f"solo-{wd}"].items():
            torch.testing.assert_close(weights[f"together-{wd}"][key], value)
    differ = [k for k, v in weights["solo-0.01"].items() if v.shape == weights["solo-100"][k].shape
              and not torch.allclose(v, weights["solo-100"][k])]
    assert differ  # the two weight decays train different probes, so a swap would show
