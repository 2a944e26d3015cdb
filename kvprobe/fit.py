"""Train, calibrate, test and export a probe: ``python -m kvprobe.fit --config configs/coe.yaml``.

One run does it all: capture (skipped when cached) -> fit on train, select the best epoch on val -> calibrate on
val -> test on the held-out questions beside every label-free baseline -> export under ``checkpoints/`` and log
the lot (config, metrics, ROC plot, probe files) to W&B (offline unless you set ``trainer.logger.offline: false``).
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
from kvprobe.store import CaptureStore


class FitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--export_dir", type=str, default="checkpoints/coe", help="where the exported probe is written")


def roc_figure(outputs: dict[str, torch.Tensor], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    labels = outputs["correct"].long()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, scores in outputs.items():
        if name == "correct":
            continue
        fpr, tpr, _ = binary_roc(scores.float(), labels)
        auc = float(binary_auroc(scores.float(), labels))
        ax.plot(fpr, tpr, lw=2.5 if name == "probe" else 1, label=f"{name} ({auc:.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate (correct = positive)", title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


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
    spec = CaptureStore(dm.path).spec()
    results = {"test": probe.test_results, "best_checkpoint": best, "temperature": float(probe.temperature),
               "capture": str(dm.path), "items": {k: len(v) for k, v in dm.datasets.items()}}
    folder = save_probe(probe, export_dir, spec, results)
    fig = roc_figure(probe.test_outputs, f"{spec['model']['name']} / {spec['task']['name']}: test ROC")
    fig.savefig(Path(folder) / "roc.png", dpi=120)
    (Path(folder) / "results.json").write_text(json.dumps(results, indent=1))
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            run_dir = Path(logger.experiment.dir)  # copies, not links: the run must outlive the export folder
            logger.log_image("test/roc", [wandb.Image(fig)])
            for f in ("probe.safetensors", "probe.json", "results.json", "roc.png"):
                shutil.copy(Path(folder) / f, run_dir / f)
                logger.experiment.save(str(run_dir / f), base_path=str(run_dir), policy="now")
            logger.experiment.summary.update({f"test/{n}/{m}": v for n, d in probe.test_results.items() for m, v in d.items()})
            logger.experiment.finish()
    print(f"[kvprobe] probe exported to {folder}; test AUROC {probe.test_results['probe']['auroc']:.3f} "
          f"[{probe.test_results['probe']['auroc_lo']:.3f}, {probe.test_results['probe']['auroc_hi']:.3f}]")
    return results


def make_cli(args: list[str] | None = None) -> FitCLI:
    """The parsed, instantiated CLI (probe, datamodule, trainer) without running anything."""
    return FitCLI(
        LightningModule, KVCaptureDataModule, subclass_mode_model=True, run=False, args=args,
        save_config_kwargs={"overwrite": True}, parser_kwargs={"description": __doc__},
    )


def main(args: list[str] | None = None) -> dict:
    cli = make_cli(args)
    return run(cli, cli.config["export_dir"])


if __name__ == "__main__":
    main()
