"""Levers on the slow-answer correctness probe, each measured (validation and test AUROC) and chosen or not on
validation: layer selection, stronger regularisation, the token trajectory's KV-CoE scores, an ensemble with the
output scores, an MLP head, a logistic regression fitted to convergence (L-BFGS) on the same standardised inputs,
and the same trained on both modes' answers to the training questions (twice the training answers)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kvprobe.export import save_probe
from kvprobe.metrics import auroc_or_nan

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
LBFGS = "answer KV, logistic to convergence (L-BFGS, C by validation)"
BOTH_MODES = "answer KV, L-BFGS, trained on both modes' answers"


def variants(layers: int, weight_decays: list[float]) -> dict[str, list[str]]:
    """The ``kvprobe fit`` arguments of each lever trained like any probe (``answer KV`` is the package's default)."""
    third = max(1, layers // 3)
    return {
        "answer KV": [],
        "answer KV, weight decay by validation": ["--select_weight_decay", json.dumps(weight_decays)],
        "answer KV, last third of layers": ["--model.init_args.layers", json.dumps(list(range(-third, 0)))],
        "answer KV, middle third of layers": ["--model.init_args.layers", json.dumps(list(range(third, 2 * third)))],
        "answer KV + KV-CoE scores (token trajectory)": ["--model.init_args.coe_features", "true"],
        "answer KV + output scores": ["--model.init_args.output_inputs", "true"],
        "answer KV, MLP head": ["--model.init_args.head", "mlp", "--model.init_args.dropout", "0.1"],
    }


def standardised(probe, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's standardised inputs and the labels over ``loader``."""
    xs, ys = [], []
    with torch.no_grad():
        for batch in loader:
            xs.append((probe.inputs(batch).float() - probe.mean) / probe.std)
            ys.append(batch["correct"])
    return torch.cat(xs), torch.cat(ys)


def lbfgs(entry: dict, folder: Path, also: dict | None = None) -> dict:
    """The linear ``answer KV`` probe refitted as a logistic regression solved to convergence (scikit-learn's L-BFGS)
    on its own standardised inputs, the inverse L2 strength C chosen by validation AUROC; recalibrated on
    validation, tested and exported like any probe (so the live generator can use it). ``also``: another mode's
    fitted probe entry, whose answers to the same training questions join the training set (twice the answers;
    validation and test stay this mode's). Returns ``kvprobe fit``'s results and the probe, in the form
    ``kvprobe.study.run.fit_probe`` gives."""
    import lightning as L
    from sklearn.linear_model import LogisticRegression

    dm, base = entry["cli"].datamodule, entry["cli"].model
    if base.hparams.head != "linear":
        raise ValueError("the L-BFGS lever refits a linear probe")
    probe = copy.deepcopy(base)
    train_x, train_y = standardised(probe, DataLoader(dm.datasets["train"], batch_size=64))
    if also is not None:
        other, own = also["cli"].datamodule.datasets["train"], dm.datasets["train"]
        if {other.rows[i]["qid"] for i in other.indices} != {own.rows[i]["qid"] for i in own.indices}:
            raise ValueError("the other mode's training answers are not the same questions' (a different split)")
        more_x, more_y = standardised(probe, DataLoader(other, batch_size=64))
        train_x, train_y = torch.cat([train_x, more_x]), torch.cat([train_y, more_y])
    val_x, val_y = standardised(probe, dm.val_dataloader())
    if train_y.min() == train_y.max():
        raise ValueError("the training answers hold one grade only: no correctness probe can be trained")
    scores = {}
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=5000).fit(train_x.numpy(), train_y.numpy())
        scores[c] = (auroc_or_nan(torch.tensor(model.decision_function(val_x.numpy())), val_y), model)
    c = max(scores, key=lambda k: scores[k][0])
    model = scores[c][1]
    linear = probe.net[-1]
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(model.coef_, dtype=linear.weight.dtype))
        linear.bias.copy_(torch.tensor(model.intercept_, dtype=linear.bias.dtype))
    probe.calibrate(dm.val_dataloader())
    probe.test_results = {}
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False).test(probe, datamodule=dm, verbose=False)
    selection = {"C": c, "val_auroc": {str(k): v[0] for k, v in scores.items()}}
    results = {"test": probe.test_results, "calibration": probe.export_state(), "selection": selection,
               "validation": probe.validation_report(dm.val_dataloader()), "capture": str(dm.path)}
    save_probe(probe, folder, dm.export_spec(), metrics={"selection": selection}, results=results)
    cli = copy.copy(entry["cli"])
    cli.model = probe
    return {"results": results, "folder": folder, "cli": cli}
