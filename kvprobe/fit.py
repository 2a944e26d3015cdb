"""Train, calibrate, test and export a probe.

    python -m kvprobe.fit --config configs/coe.yaml          # correctness probe (SmolLM2, embedded default)
    python -m kvprobe.fit --config configs/difficulty.yaml   # difficulty probe / router (Qwen2.5-Coder-0.5B)

One run does it all: capture (skipped when cached) -> fit on train, select the best epoch on val -> calibrate on
val (a temperature, or routing thresholds for each budget) -> test on held-out questions beside the baselines ->
export under ``checkpoints/`` and log the lot (config, metrics, test figure, probe files) to W&B (offline unless
you set ``trainer.logger.offline: false``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from datamodules import KVCaptureDataModule
from kvprobe.export import save_probe


class FitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--export_dir", type=str, default="checkpoints/coe", help="where the exported probe is written")


def run(cli: LightningCLI, export_dir: str | Path) -> dict:
    trainer, probe, dm = cli.trainer, cli.model, cli.datamodule
    for logger in trainer.loggers:  # the whole resolved config, not only the probe's arguments
        logger.log_hyperparams({"config": cli.config.as_dict()})
    trainer.fit(probe, dm)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:  # our own checkpoint, read without unpickling arbitrary objects
        probe.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
    probe.calibrate(dm.val_dataloader())
    trainer.test(probe, dm)
    spec = dm.export_spec()
    score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    results = {"test": probe.test_results, "calibration": probe.export_state(), "best_checkpoint": best,
               "val_select": None if score is None else float(score),
               "capture": str(dm.path), "items": {k: len(v) for k, v in dm.datasets.items()}}
    folder = save_probe(probe, export_dir, spec, results)
    fig = probe.figure(f"{spec['model']['name']} / {spec['task']['name']}: test split")
    fig.savefig(Path(folder) / "test.png", dpi=120)
    (Path(folder) / "results.json").write_text(json.dumps(results, indent=1))
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            run_dir = Path(logger.experiment.dir)  # copies, not links: the run must outlive the export folder
            logger.log_image("test/figure", [wandb.Image(fig)])
            for f in ("probe.safetensors", "probe.json", "results.json", "test.png"):
                shutil.copy(Path(folder) / f, run_dir / f)
                logger.experiment.save(str(run_dir / f), base_path=str(run_dir), policy="now")
            summary = {f"test/{n}/{m}": v for n, d in probe.test_results.items() for m, v in d.items()}
            summary |= {f"data/{k}": v for k, v in spec.get("difficulty", {}).get("label_counts", {}).items()}
            logger.experiment.summary.update(summary)
            logger.experiment.finish()
    print(f"[kvprobe] probe exported to {folder}; test: {probe.headline()}")
    return results


def make_cli(args: list[str] | None = None) -> FitCLI:
    """The parsed, instantiated CLI (probe, datamodule, trainer) without running anything."""
    return FitCLI(
        LightningModule, KVCaptureDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False, args=args,
        save_config_kwargs={"overwrite": True}, parser_kwargs={"description": __doc__},
    )


def main(args: list[str] | None = None) -> dict:
    cli = make_cli(args)
    return run(cli, cli.config["export_dir"])


if __name__ == "__main__":
    main()
