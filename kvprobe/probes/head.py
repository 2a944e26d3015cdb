"""What every probe shares: inputs standardised with training-split statistics, a linear or one-hidden-layer MLP
head, AdamW. A probe subclass says how a batch becomes inputs (``inputs``) and how many outputs its head has."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn


class HeadProbe(L.LightningModule):
    """Base of the probes; expects hyperparameters ``head``, ``hidden_dim``, ``dropout``, ``lr``, ``weight_decay``."""

    n_outputs = 1

    def inputs(self, batch: dict) -> torch.Tensor:
        """A batch of capture tensors (or the same computed live) as the head's input rows."""
        raise NotImplementedError

    def score(self, out: torch.Tensor) -> torch.Tensor:
        """The calibrated score of raw head outputs (what the probe predicts; see the subclass)."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, folder, model=None) -> "HeadProbe":
        """An exported probe of this class with its ``card``, for ``model`` (see ``kvprobe.export.load_probe``: another
        model's probe is refused; ``None`` checks the base model its card names)."""
        from kvprobe.export import load_probe

        probe = load_probe(folder, model)
        if not isinstance(probe, cls):
            raise ValueError(f"{folder} holds a {type(probe).__name__}, not a {cls.__name__}")
        return probe

    def save_pretrained(self, folder) -> "Path":
        """Write this probe and its ``card`` to ``folder`` (whole, or not at all); a probe without a card (never
        exported by ``kvprobe fit``) is refused."""
        from kvprobe.export import write_probe

        if getattr(self, "card", None) is None:
            raise ValueError("this probe has no card (base model, capture specs): export it with kvprobe fit first")
        return write_probe(self, folder)

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        """The calibrated score of every item in ``batch``: ``score(forward(inputs(batch)))``, one verb for all probes."""
        return self.score(self(self.inputs(batch)))

    def _build(self, dim: int) -> None:
        self.hparams.input_dim = dim
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        hp = self.hparams
        if hp.head == "linear":
            self.net = nn.Sequential(nn.Dropout(hp.dropout), nn.Linear(dim, self.n_outputs))
        else:
            self.net = nn.Sequential(nn.Dropout(hp.dropout), nn.Linear(dim, hp.hidden_dim), nn.GELU(),
                                     nn.Linear(hp.hidden_dim, self.n_outputs))

    def setup(self, stage: str) -> None:
        """Size the head and fit the standardisation on the training split (one pass over it)."""
        if self.net is not None or stage != "fit":
            return
        batches = list(self.trainer.datamodule.train_dataloader())
        xs = torch.cat([self.inputs(b) for b in batches])
        self._build(xs.shape[1])
        self.mean.copy_(xs.mean(0))
        self.std.copy_(xs.std(0).clamp_min(1e-6))
        self.fit_on_train(batches)

    def fit_on_train(self, batches: list[dict]) -> None:
        """Anything else a probe fits on the training split before training (nothing by default)."""

    def validation_report(self, val_loader) -> dict:
        """Checks on the validation split that an export should carry (and ``fit`` warns about); none by default."""
        return {}

    def _gather(self) -> dict[str, torch.Tensor]:
        """The step outputs collected in ``self._outputs`` since the last call, one CPU tensor per key (cleared)."""
        cols = {k: torch.cat([o[k] for o in self._outputs]).cpu() for k in self._outputs[0]}
        self._outputs.clear()
        return cols

    def head_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The head on standardised inputs: (batch, n_outputs)."""
        return self.net((x.float() - self.mean) / self.std)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
