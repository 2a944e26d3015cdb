"""Correctness probe: is this answer right? A small head on the answer's per-layer KV (or hidden states).

Inputs are standardised with statistics of the training split; the loss is BCE in float32; after training the
logits are calibrated on the validation split only (temperature or isotonic). ``source="hidden"`` trains the very
same class on pooled hidden states, so KV-versus-hidden-state comparisons use equal machinery.
"""

from __future__ import annotations

import torch
from torch import nn

from kvprobe import calibration
from kvprobe.features import probe_input
from kvprobe.metrics import bucketed_auroc, paired_bootstrap_auroc, score_metrics
from kvprobe.plots import pyplot
from kvprobe.probes.head import HeadProbe

SOURCES = {"kv": "response_kv", "prompt_kv": "prompt_kv", "hidden": "hidden", "length": "gen_tokens", "output": "scores"}
COE_INPUTS = ("kv_coe_r_layer", "kv_coe_c_layer", "kv_coe_r_token", "kv_coe_c_token")


def length_features(batch: dict) -> torch.Tensor:
    """(log(1 + generated tokens), finished before the cap): all a length-only baseline sees."""
    return torch.stack((torch.log1p(batch["gen_tokens"].float()), batch["finished"].float()), 1)


def output_features(batch: dict) -> torch.Tensor:
    """(mean max-probability, negative mean entropy) of the answer's token distributions (``features.step_stats``)."""
    scores = batch["scores"]
    if "max_prob" not in scores:
        raise KeyError("output scores need max_prob and entropy in the capture; capture with features.output_stats true")
    return torch.stack((scores["max_prob"].float(), scores["neg_entropy"].float()), 1)


class CorrectnessProbe(HeadProbe):
    """A linear or MLP head over the answer's KV trajectory; outputs a calibrated P(correct).

    Args:
        source: ``kv`` (per-layer KV pooled over the response), ``prompt_kv`` (the prompt's last positions, known
            before any answer token), ``hidden`` (per-layer hidden states pooled over the response), ``output``
            (mean max-probability and mean entropy of the answer's tokens alone) or ``length`` (log response length
            and finished-before-the-cap only: the trivial baseline a probe must beat).
        layers: layer ids to use (negative counts from the last); ``null`` = all.
        kv: ``k``, ``v`` or ``both`` (ignored for hidden states).
        head_pool: ``flatten`` keeps each KV head; ``mean`` averages heads.
        layer_pool: ``flatten`` keeps each layer (the trajectory); ``mean``/``sum`` pool it away.
        coe_features: append the label-free KV-CoE scores (layer and token axis) to the input.
        length_inputs: append the length-only baseline's inputs (log response length, finished before the cap), so
            the probe sees what that baseline sees and has no reason to do worse.
        output_inputs: append the answer's mean max-probability and mean entropy (what ``source: output`` sees).
        head: ``linear`` (logistic regression) or ``mlp`` (one hidden layer).
        hidden_dim: width of the MLP's hidden layer.
        dropout: dropout on the standardised input.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (the L2 strength of the linear head).
        calibration: ``temperature``, ``isotonic`` or ``none``; fitted on the validation split only.
        input_dim: set automatically from the data; given when a probe is reloaded.
    """

    def __init__(
        self,
        source: str = "kv",
        layers: list[int] | None = None,
        kv: str = "both",
        head_pool: str = "flatten",
        layer_pool: str = "flatten",
        coe_features: bool = False,
        length_inputs: bool = False,
        output_inputs: bool = False,
        head: str = "linear",
        hidden_dim: int = 64,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        calibration: str = "temperature",
        input_dim: int | None = None,
    ):
        super().__init__()
        if source not in SOURCES or kv not in ("k", "v", "both") or head not in ("linear", "mlp"):
            raise ValueError(f"bad probe config: source={source!r} kv={kv!r} head={head!r}")
        if calibration not in ("temperature", "isotonic", "none"):
            raise ValueError(f"calibration {calibration!r} is not temperature, isotonic or none")
        self.save_hyperparameters()
        self.net: nn.Module | None = None
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("iso_x", torch.zeros(0))
        self.register_buffer("iso_y", torch.zeros(0))
        self.register_buffer("length_coef", torch.zeros(3))  # the trivial baseline: logistic on (log length, finished)
        if input_dim is not None:
            self._build(input_dim)
        self._outputs: list[dict] = []
        self.test_results: dict[str, dict[str, float]] = {}
        self.test_outputs: dict[str, torch.Tensor] = {}

    # --- inputs -------------------------------------------------------------------------------------------
    def inputs(self, batch: dict) -> torch.Tensor:
        hp = self.hparams
        key = SOURCES[hp.source]
        if key not in batch:
            raise KeyError(f"probe source {hp.source!r} needs {key!r} in the capture; capture with the matching feature flag")
        if hp.source == "length":
            x = length_features(batch)
        elif hp.source == "output":
            x = output_features(batch)
        elif hp.source == "hidden":  # (batch, layers + 1, hidden) as one "head" of one "K/V" slot per layer
            x = probe_input(batch[key].float()[:, :, None, None], hp.layers, "both", "flatten", hp.layer_pool)
        else:
            x = batch[key].float()
            if hp.source == "prompt_kv":
                x = x.mean(-2)  # (batch, layers, 2, heads, window, dim) -> mean over the window
            x = probe_input(x, hp.layers, hp.kv, hp.head_pool, hp.layer_pool)
        if hp.coe_features:
            x = torch.cat([x] + [batch["scores"][name].float()[:, None] for name in COE_INPUTS if name in batch["scores"]], 1)
        if hp.get("length_inputs") and hp.source != "length":
            x = torch.cat([x, length_features(batch)], 1)
        if hp.get("output_inputs") and hp.source != "output":
            x = torch.cat([x, output_features(batch)], 1)
        return x

    def fit_on_train(self, batches: list[dict]) -> None:
        self.length_coef.copy_(calibration.fit_logistic(
            torch.cat([length_features(b) for b in batches]), torch.cat([b["correct"] for b in batches])))

    # --- model --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits of 'correct' for already-pooled inputs."""
        return self.head_outputs(x).squeeze(-1)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated P(correct) from raw logits."""
        if self.hparams.calibration == "isotonic" and len(self.iso_x):
            return calibration.apply_isotonic(logits, self.iso_x, self.iso_y)
        return torch.sigmoid(logits / self.temperature)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self(self.inputs(batch))
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["correct"].float())
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", on_epoch=True, on_step=False, batch_size=len(logits))
        return loss if stage == "train" else logits

    def training_step(self, batch: dict, _) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, _) -> None:
        self._outputs.append({"logits": self._step(batch, "val"), "correct": batch["correct"]})

    def on_validation_epoch_end(self) -> None:
        logits = torch.cat([o["logits"] for o in self._outputs])
        labels = torch.cat([o["correct"] for o in self._outputs]).long()
        self._outputs.clear()
        if labels.min() != labels.max():
            from torchmetrics.functional.classification import binary_auroc

            auroc = binary_auroc(logits, labels)
        else:
            auroc = torch.tensor(0.5)
        self.log("val/auroc", auroc, prog_bar=True)
        self.log("val/select", auroc)  # what checkpoint selection maximises (configs/trainer/)

    # --- calibration and test -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_logits(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw logits, correct labels) over every batch of ``loader``, in eval mode."""
        self.eval()
        logits, labels = [], []
        for batch in loader:
            logits.append(self(self.inputs(batch)))
            labels.append(batch["correct"])
        return torch.cat(logits), torch.cat(labels)

    def calibrate(self, val_loader) -> None:
        """Fit the calibration map on validation answers only."""
        logits, labels = self.predict_logits(val_loader)
        if self.hparams.calibration == "temperature":
            self.temperature.fill_(calibration.fit_temperature(logits, labels))
        elif self.hparams.calibration == "isotonic":
            self.iso_x, self.iso_y = calibration.fit_isotonic(logits, labels)

    @torch.no_grad()
    def validation_report(self, val_loader) -> dict:
        """Does the probe beat the length-only baseline on validation? A paired bootstrap of the AUROC difference;
        ``beats_length`` is False when its 95% interval reaches 0 (the probe may know nothing beyond length)."""
        logits, labels = self.predict_logits(val_loader)
        lengths = torch.cat([length_features(b) for b in val_loader])
        baseline = lengths @ self.length_coef[:2] + self.length_coef[2]
        if labels.min() == labels.max():
            return {}
        diff = paired_bootstrap_auroc(logits, baseline, labels)
        return {"probe_minus_length_probe": diff, "beats_length": diff["lo"] > 0}

    def test_step(self, batch: dict, _) -> None:
        out = {"probe": self.score(self(self.inputs(batch))), "correct": batch["correct"], "length_probe":
               torch.sigmoid(length_features(batch) @ self.length_coef[:2] + self.length_coef[2]), "gen_tokens": batch["gen_tokens"]}
        out |= {name: value for name, value in batch["scores"].items()}
        self._outputs.append(out)

    def on_test_epoch_end(self) -> None:
        cols = {k: v.float() for k, v in self._gather().items()}
        labels, lengths = cols.pop("correct").long(), cols.pop("gen_tokens")
        self.test_outputs = cols | {"correct": labels, "gen_tokens": lengths}
        self.test_results = {name: score_metrics(s, labels, is_probability=name.endswith("probe")) for name, s in cols.items()}
        # what the probe knows beyond length: paired difference to the length-only baseline, and within length buckets
        self.test_results["probe_minus_length_probe"] = paired_bootstrap_auroc(cols["probe"], cols["length_probe"], labels)
        self.test_results["within_length_buckets"] = {
            k: v for k, v in bucketed_auroc({"probe": cols["probe"], "length_probe": cols["length_probe"]}, labels, lengths)[-1].items() if k != "range"
        }
        for name, values in self.test_results.items():
            for metric, v in values.items():
                self.log(f"test/{name}/{metric}", v)
        self.log("test/items", float(len(labels)))
        self.log("test/correct_share", labels.float().mean())

    # --- export and report ------------------------------------------------------------------------------------
    def export_state(self) -> dict:
        return {"temperature": float(self.temperature)}  # a buffer too; here for readers of results.json

    def load_export_state(self, state: dict) -> None:
        pass  # everything lives in the weights file

    def figure(self, title: str):
        """Test ROC of the probe beside every label-free baseline."""
        return roc_figure(self.test_outputs, title)

    def headline(self) -> str:
        r = self.test_results["probe"]
        return f"AUROC {r['auroc']:.3f} [{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}]"


def roc_figure(outputs: dict[str, torch.Tensor], title: str):
    plt = pyplot()
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    labels = outputs["correct"].long()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, scores in outputs.items():
        if name in ("correct", "gen_tokens"):
            continue
        fpr, tpr, _ = binary_roc(scores.float(), labels)
        auc = float(binary_auroc(scores.float(), labels))
        ax.plot(fpr, tpr, lw=2.5 if name == "probe" else 1, label=f"{name} ({auc:.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate (correct = positive)", title=f"{title}: ROC")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
