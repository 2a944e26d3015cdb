"""Train, calibrate, test and export a probe.

    python -m kvprobe.fit --config configs/coe.yaml          # correctness probe (SmolLM2, embedded default)
    python -m kvprobe.fit --config configs/difficulty.yaml   # difficulty probe / router (Qwen2.5-Coder-0.5B)

One run does it all: capture (skipped when cached) -> fit on train, select the best epoch on val -> calibrate on
val (a temperature, or routing thresholds for each budget) -> test on held-out questions beside the baselines ->
export to ``--export_dir`` (default: a new folder under ``runs/probes/``; the shipped probes change only when you
name their folder) -> draw the test figure and log the lot (config, metrics, figure, probe files) to W&B (offline
unless you set ``trainer.logger.init_args.offline: false``). The export is complete before any figure or logging
step runs, and a failure there is reported without touching it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from kvprobe.assets import as_created
from kvprobe.export import check_replaceable, save_probe
from kvprobe.paths import writable_folder
from kvprobe.plots import pyplot


class FitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="where the exported probe is written; null = runs/probes/<time>-<probe>-<task>/")
        parser.add_argument("--select_weight_decay", type=list[float] | None, default=None,
                            help="weight decays to try (one fit each, the capture cached); the best by val/select is "
                                 "kept and the choice recorded. null = the probe's own weight_decay")


def default_export_dir(root: str | Path, probe: LightningModule, task: str) -> Path:
    kind = type(probe).__name__.removesuffix("Probe").lower()
    return Path(root) / "probes" / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{task}"


def _warnings(validation: dict) -> list[str]:
    """What the exported card and the end of the run must say about a probe that may not be trusted."""
    if validation.get("beats_length") is False:
        d = validation["probe_minus_length_probe"]
        return [f"on validation the probe does not beat the length-only baseline (AUROC difference {d['diff']:+.3f}, "
                f"95% CI [{d['lo']:+.3f}, {d['hi']:+.3f}]): it may know nothing beyond answer length. More training "
                "questions, --select_weight_decay, or --model.init_args.length_inputs true may help"]
    return []


def select_weight_decay(args: list[str] | None, grid: list[float]) -> dict:
    """One quiet fit per weight decay on the same (cached) capture; the best by the probe's val/select wins."""
    scores = {}
    for wd in grid:
        trial = make_cli([*(args or []), "--select_weight_decay", "null", "--trainer.logger", "false",
                          "--trainer.enable_progress_bar", "false", "--model.init_args.weight_decay", str(wd)])
        trial.trainer.fit(trial.model, trial.datamodule)
        scores[wd] = float(trial.trainer.checkpoint_callback.best_model_score)
    best = max(scores, key=scores.get)
    print(f"[kvprobe] weight decay by val/select: {', '.join(f'{wd:g}: {s:.3f}' for wd, s in scores.items())} -> {best:g}")
    return {"weight_decay": best, "val_select": scores}


def run(cli: LightningCLI, export_dir: str | Path | None = None, selection: dict | None = None) -> dict:
    trainer, probe, dm = cli.trainer, cli.model, cli.datamodule
    folder = Path(export_dir or default_export_dir(trainer.default_root_dir, probe, dm.capture.task.name))
    # before any work: a folder that must not be replaced, or that cannot be written, is refused now, not after training
    check_replaceable(folder)
    writable_folder(folder.parent, "the export folder's parent")
    for logger in trainer.loggers:  # the whole resolved config, not only the probe's arguments
        logger.log_hyperparams({"config": cli.config.as_dict()})
    trainer.fit(probe, dm)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:  # our own checkpoint, read without unpickling arbitrary objects
        probe.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
    probe.calibrate(dm.val_dataloader())
    validation = probe.validation_report(dm.val_dataloader())  # before test: nothing here may depend on it
    trainer.test(probe, dm)
    spec = dm.export_spec()
    score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    results = {"test": probe.test_results, "calibration": probe.export_state(), "best_checkpoint": best,
               "val_select": None if score is None else float(score), "validation": validation,
               "warnings": _warnings(validation), **({"selection": selection} if selection else {}),
               "capture": str(dm.path), "items": {k: len(v) for k, v in dm.datasets.items()}}
    card = {k: results[k] for k in ("validation", "warnings", "selection") if k in results}
    save_probe(probe, folder, spec, metrics=card, results=results)
    print(f"[kvprobe] probe exported to {folder}; test: {probe.headline()}")
    for warning in results["warnings"]:
        print(f"[kvprobe] WARNING: {warning}")
    # everything below is presentation: a failure is reported, the export stays as written
    fig = _figure(probe, f"{spec['model']['name']} / {spec['task']['name']}: test split", folder)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            _log_wandb(logger, probe, spec, folder, fig)
    if fig is not None:  # pyplot keeps every figure until closed; a study fits a dozen probes in one process
        pyplot().close(fig)
    return results


def _report(step: str, err: BaseException, folder: Path) -> None:
    detail = traceback.format_exc() if os.environ.get("KVPROBE_DEBUG") else ""
    print(f"[kvprobe] warning: {step} failed ({type(err).__name__}: {err}); the probe in {folder} is complete "
          f"(KVPROBE_DEBUG=1 shows the traceback)\n{detail}".rstrip())


def _figure(probe: LightningModule, title: str, folder: Path):
    """The probe's test figure, written to ``folder/test.png`` (through a temporary file); None if drawing fails."""
    try:
        fig = probe.figure(title)
        fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
        os.close(fd)
        fig.savefig(tmp, dpi=120)
        as_created(tmp)
        os.replace(tmp, folder / "test.png")
        return fig
    except Exception as err:  # noqa: BLE001 - a figure never costs the user the probe
        _report("drawing the test figure", err, folder)
        return None


def _log_wandb(logger: WandbLogger, probe: LightningModule, spec: dict, folder: Path, fig) -> None:
    """Metrics, figure and a copy of the exported files into the W&B run; the run is finished whatever happens."""
    try:
        import wandb

        run_dir = Path(logger.experiment.dir)  # copies, not links: the run must outlive the export folder
        if fig is not None:
            logger.log_image("test/figure", [wandb.Image(fig)])
        for f in sorted(p.name for p in folder.iterdir()):
            shutil.copy(folder / f, run_dir / f)
            logger.experiment.save(str(run_dir / f), base_path=str(run_dir), policy="now")
        summary = {f"test/{n}/{m}": v for n, d in probe.test_results.items() for m, v in d.items()}
        summary |= {f"data/{k}": v for k, v in spec.get("difficulty", {}).get("label_counts", {}).items()}
        summary["export_dir"] = str(folder.resolve())
        logger.experiment.summary.update(summary)
    except Exception as err:  # noqa: BLE001
        _report("logging to W&B", err, folder)
    finally:
        logger.experiment.finish()


def whole_data(args: list[str]) -> list[str]:
    """``args`` with every ``--data <config>`` replacing the data config before it rather than merging into it.
    jsonargparse merges a config given again into the one it follows, so a field the new file leaves out would keep
    the old file's value (``--config configs/coe.yaml --data <an ASDiv config>`` would ask ASDiv for arithmetic's
    ``task.params``); a data config is a whole capture, so it is given on a clean slate (``--data null`` first).
    Dotted overrides (``--data.capture.task.limit 32``) still merge."""
    out = []
    for a in args:
        if a == "--data" or a.startswith("--data="):
            out += ["--data", "null"]
        out.append(a)
    return out


def own_checkpoints(trainer) -> None:
    """Give this run's checkpoint file a name no other run can write (time, process, random), so that two fits at
    once in one folder never reload each other's weights: ``best.ckpt`` would be rewritten by whichever run saved
    last, and the other would export it under its own card."""
    callback = trainer.checkpoint_callback
    if callback is not None:
        callback.filename = f"{callback.filename or 'best'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def make_cli(args: list[str] | None = None) -> FitCLI:
    """The parsed, instantiated CLI (probe, datamodule, trainer) without running anything."""
    argv = sys.argv
    args = whole_data(argv[1:] if args is None else args)
    sys.argv = argv[:1]  # LightningCLI warns when it sees both ``args`` and a command line (pytest's, say)
    try:
        cli = FitCLI(
            LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False, args=args,
            save_config_kwargs={"overwrite": True}, parser_kwargs={"description": __doc__},
        )
    finally:
        sys.argv = argv
    own_checkpoints(cli.trainer)
    return cli


def fit(args: list[str]) -> tuple[dict, FitCLI]:
    """One ``kvprobe fit`` run of ``args`` (weight decay selection included): its results and the CLI that ran,
    holding the fitted probe (``cli.model``) and its data (``cli.datamodule``)."""
    cli = make_cli(args)
    grid = cli.config["select_weight_decay"]
    if not grid:
        return run(cli, cli.config["export_dir"]), cli
    selection = select_weight_decay(args, grid)
    cli = make_cli([*args, "--select_weight_decay", "null", "--model.init_args.weight_decay", str(selection["weight_decay"])])
    return run(cli, cli.config["export_dir"], selection), cli


def main(args: list[str] | None = None) -> dict:
    return fit(sys.argv[1:] if args is None else list(args))[0]


if __name__ == "__main__":
    from kvprobe.cli import run_module

    run_module(main, "kvprobe fit")
