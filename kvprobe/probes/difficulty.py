"""Difficulty probe (KVClassifier): from the prompt's KV, before any answer token, does this question need thinking?

The input is the raw K and V of the prompt's last positions (stored by capture as ``prompt_kv``). The design
space is config: K, V or both; which layers; how many positions; pooling over positions, heads and layers; L2
normalisation; a small MLP. Three objectives: ``bce`` on "slow needed" (only slow mode answers right),
``regression`` on the KV paper's 0/25/75/100 labels scaled to [0, 1], or ``ce`` over those four classes. Each gives a
routing score (higher = send to slow mode). After training, thresholds are calibrated to budgets on the validation
split (``kvprobe.routing``) and travel with the export.
"""

from __future__ import annotations

import torch
from torch import nn

from kvprobe import routing
from kvprobe.features import pool_positions, probe_input
from kvprobe.metrics import auroc_or_nan, score_metrics
from kvprobe.probes.head import HeadProbe

OBJECTIVES = ("bce", "regression", "ce")
OUTCOME_KEYS = ("fast_correct", "slow_correct", "fast_tokens", "slow_tokens")


class DifficultyProbe(HeadProbe):
    """A small head on pooled prompt-window KV that scores how much a question needs slow (step-by-step) mode.

    Args:
        kv: ``k``, ``v`` or ``both``.
        layers: an int n = the last n layers; a list of layer ids (negative counts from the last); ``null`` = all.
        window: the last ``window`` prompt positions (at most the capture's ``features.prompt_window``).
        position_pool: ``sum``, ``mean`` or ``last`` over the window's positions.
        head_pool: ``flatten`` keeps each KV head; ``mean`` averages them.
        layer_pool: ``flatten`` keeps each layer; ``mean``/``sum`` pool them.
        l2_norm: scale each layer's pooled vector to unit length before layer pooling.
        head: ``mlp`` (one hidden layer) or ``linear``.
        hidden_dim: MLP width.
        dropout: dropout on the standardised input.
        objective: ``bce`` (slow needed), ``regression`` (labels / 100) or ``ce`` (four classes).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        budgets: thresholds to calibrate on the validation split (see ``kvprobe.routing.BudgetSpec``).
        input_dim: set from the data; given when a probe is reloaded.
    """

    def __init__(
        self,
        kv: str = "both",
        layers: int | list[int] | None = None,
        window: int = 8,
        position_pool: str = "mean",
        head_pool: str = "flatten",
        layer_pool: str = "flatten",
        l2_norm: bool = False,
        head: str = "mlp",
        hidden_dim: int = 64,
        dropout: float = 0.1,
        objective: str = "bce",
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        budgets: routing.BudgetSpec = routing.BudgetSpec(),
        input_dim: int | None = None,
    ):
        super().__init__()
        if kv not in ("k", "v", "both") or head not in ("linear", "mlp") or objective not in OBJECTIVES:
            raise ValueError(f"bad difficulty probe config: kv={kv!r} head={head!r} objective={objective!r} (objectives: {OBJECTIVES})")
        if position_pool not in ("sum", "mean", "last") or head_pool not in ("flatten", "mean") or layer_pool not in ("flatten", "mean", "sum"):
            raise ValueError(f"bad pooling: position_pool={position_pool!r} head_pool={head_pool!r} layer_pool={layer_pool!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not isinstance(budgets, routing.BudgetSpec):  # a dict from an export's JSON, or a parsed namespace
            budgets = routing.BudgetSpec(**(budgets if isinstance(budgets, dict) else budgets.as_dict()))
        self.save_hyperparameters()
        self.budgets = budgets
        self.net: nn.Module | None = None
        if input_dim is not None:
            self._build(input_dim)
        self.thresholds: dict[str, dict[str, float]] = {}
        self._outputs: list[dict] = []
        self.test_results: dict[str, dict[str, float]] = {}
        self.test_outputs: dict[str, torch.Tensor] = {}

    # --- inputs -------------------------------------------------------------------------------------------
    def layer_ids(self, n_layers: int) -> list[int] | None:
        layers = self.hparams.layers
        if isinstance(layers, int):
            if not 1 <= layers <= n_layers:
                raise ValueError(f"layers={layers} (last n) but the capture holds {n_layers} layers")
            return list(range(n_layers - layers, n_layers))
        return layers

    def pooled_inputs(self, pooled: torch.Tensor) -> torch.Tensor:
        """Position-pooled window KV (batch, layers, 2, heads, dim) -> probe input; the live generator enters here."""
        hp = self.hparams
        return probe_input(pooled.float(), self.layer_ids(pooled.shape[1]), hp.kv, hp.head_pool, hp.layer_pool, hp.l2_norm)

    def inputs(self, batch: dict) -> torch.Tensor:
        if "prompt_kv" not in batch:
            raise KeyError("the difficulty probe needs 'prompt_kv' in the capture; capture with features.prompt_window > 0")
        x = batch["prompt_kv"]  # (batch, layers, 2, heads, window, dim)
        if self.hparams.window > x.shape[-2]:
            raise ValueError(f"window={self.hparams.window} but the capture kept only {x.shape[-2]} prompt positions (features.prompt_window)")
        return self.pooled_inputs(pool_positions(x[..., -self.hparams.window :, :].float(), self.hparams.position_pool))

    @property
    def n_outputs(self) -> int:
        return 4 if self.hparams.objective == "ce" else 1

    # --- model --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw outputs (logits) for already-pooled inputs: (batch,) or (batch, 4) for ``ce``."""
        out = self.head_outputs(x)
        return out if self.hparams.objective == "ce" else out.squeeze(-1)

    def score(self, out: torch.Tensor) -> torch.Tensor:
        """Routing score in [0, 1], higher = slow mode: P(slow needed), predicted difficulty, or P(class 75)."""
        if self.hparams.objective == "ce":
            return out.softmax(-1)[:, routing.LABELS.index(75)]
        return torch.sigmoid(out)

    def slow_helps(self, batch: dict) -> torch.Tensor:
        """P(slow mode answers right | fast mode answers wrong) per question: P(75) / (P(75) + P(100)) of the four
        classes (``ce`` probes only): what an escalation of a wrong fast answer can buy."""
        if self.hparams.objective != "ce":
            raise ValueError(f"P(slow right | fast wrong) needs the four-class objective 'ce', not {self.hparams.objective!r}")
        p = self(self.inputs(batch)).softmax(-1)
        only_slow, neither = p[:, routing.LABELS.index(75)], p[:, routing.LABELS.index(100)]
        return only_slow / (only_slow + neither).clamp_min(1e-12)

    def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        objective = self.hparams.objective
        if objective == "bce":
            return nn.functional.binary_cross_entropy_with_logits(out.float(), batch["slow_needed"].float())
        if objective == "regression":
            return nn.functional.mse_loss(torch.sigmoid(out.float()), batch["label"].float() / 100)
        classes = torch.bucketize(batch["label"], torch.tensor(routing.LABELS, dtype=batch["label"].dtype, device=out.device))
        return nn.functional.cross_entropy(out.float(), classes)

    def training_step(self, batch: dict, _) -> torch.Tensor:
        loss = self.loss(self(self.inputs(batch)), batch)
        self.log("train/loss", loss, on_epoch=True, on_step=False, batch_size=len(batch["label"]))
        return loss

    def _collect(self, batch: dict) -> dict:
        out = self(self.inputs(batch))
        return {"score": self.score(out), "loss": self.loss(out, batch).expand(len(out))} | {
            k: batch[k] for k in OUTCOME_KEYS + ("slow_needed", "label")
        }

    def validation_step(self, batch: dict, _) -> None:
        self._outputs.append(self._collect(batch))

    def on_validation_epoch_end(self) -> None:
        cols = self._gather()
        outcomes = routing.Outcomes(*(cols[k] for k in OUTCOME_KEYS))
        self.log("val/loss", cols["loss"].mean(), prog_bar=True)
        gain = outcomes.route_gain(cols["score"])
        self.log("val/route_gain", gain, prog_bar=True)
        self.log("val/select", gain)  # what checkpoint selection maximises (configs/trainer/)
        self.log("val/auroc", auroc_or_nan(cols["score"], cols["slow_needed"]))

    # --- calibration and test -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_scores(self, loader) -> tuple[torch.Tensor, routing.Outcomes]:
        """Routing scores and both modes' outcomes over every batch of ``loader``, in eval mode."""
        self.eval()
        for batch in loader:
            self._outputs.append(self._collect(batch))
        cols = self._gather()
        return cols["score"], routing.Outcomes(*(cols[k] for k in OUTCOME_KEYS))

    def calibrate(self, val_loader) -> None:
        """Thresholds for every budget, fitted on the validation split only."""
        scores, outcomes = self.predict_scores(val_loader)
        self.thresholds = routing.calibrate(scores, outcomes, self.budgets)
        self.val_metrics = {"route_gain": outcomes.route_gain(scores), "auroc": auroc_or_nan(scores, outcomes.slow_needed())}

    def test_step(self, batch: dict, _) -> None:
        self._outputs.append(self._collect(batch))

    def on_test_epoch_end(self) -> None:
        cols = self._gather()
        outcomes = routing.Outcomes(*(cols[k] for k in OUTCOME_KEYS))
        self.test_outputs = cols
        self.test_results = routing.evaluate(cols["score"], outcomes, self.thresholds)
        needed = cols["slow_needed"].long()
        self.test_results["score_vs_slow_needed"] = {"route_gain": outcomes.route_gain(cols["score"])} | (
            score_metrics(cols["score"], needed, is_probability=True) if needed.min() != needed.max() else {"auroc": float("nan")}
        )
        for name, values in self.test_results.items():
            for metric, v in values.items():
                self.log(f"test/{name}/{metric}", v)
        self.log("test/items", float(len(outcomes)))

    # --- export and report ------------------------------------------------------------------------------------
    def export_state(self) -> dict:
        return {"thresholds": self.thresholds, "val": getattr(self, "val_metrics", {})}

    def load_export_state(self, state: dict) -> None:
        self.thresholds = state.get("thresholds", {})

    def figure(self, title: str):
        outcomes = routing.Outcomes(*(self.test_outputs[k] for k in OUTCOME_KEYS))
        return routing.routing_figure({"difficulty probe": outcomes.curve(self.test_outputs["score"])}, self.test_results, title)

    def headline(self) -> str:
        r = self.test_results
        best = max((n for n in r if n.startswith("router_")), key=lambda n: (r[n]["meets_bar"], r[n]["accuracy"]), default=None)
        fast, slow = r["always_fast"], r["always_slow"]
        line = (f"always-fast {fast['accuracy']:.3f} @ {fast['mean_tokens']:.0f} tok, always-slow {slow['accuracy']:.3f} @ "
                f"{slow['mean_tokens']:.0f} tok")
        if best:
            line += f"; {best} {r[best]['accuracy']:.3f} @ {r[best]['mean_tokens']:.0f} tok (meets bar: {bool(r[best]['meets_bar'])})"
        return line
