"""Switch probe: during a step-by-step answer, has the final result been written yet? (slow -> fast, mid-decode)

Input: the layer-averaged K and V of the latest ``window`` decode positions, mean-pooled (``kvprobe.switching``).
Target: "keep thinking" = the answer's final result is not yet written as a result. After training, the cut
threshold is calibrated on the validation split by replaying the generator's policy over every decode position
of every validation answer (``switching.calibrate``): the most tokens saved while cutting at most ``max_lost`` of
the answers right before their result is written. The thresholds travel with the export as the generator's
``switch_low`` / ``switch_high``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvprobe import switching
from kvprobe.features import probe_input
from kvprobe.metrics import auroc_or_nan, score_metrics
from kvprobe.plots import pyplot
from kvprobe.probes.head import HeadProbe

ANSWER_KEYS = ("n", "settled", "correct")
SQRT_HALF = math.sqrt(0.5)


class SwitchProbe(HeadProbe):
    """A small head on the pooled KV of the latest decode positions: P(keep thinking) during a slow answer.

    Args:
        kv: ``k``, ``v`` or ``both``.
        head_pool: ``flatten`` keeps each KV head; ``mean`` averages them.
        head: ``mlp`` (one hidden layer) or ``linear``.
        hidden_dim: MLP width.
        dropout: dropout on the standardised input.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        switch_high: the generator arms the switch once the score rises above this (hysteresis).
        max_lost: calibration keeps the share of right answers cut before their result is written at most this.
        min_tokens: no switch before this many decoded tokens (the generator's ``min_tokens``).
        probe_every: the generator probes every this many decoded tokens; calibration replays the same cadence.
        input_dim: set from the data; given when a probe is reloaded.
    """

    def __init__(
        self,
        kv: str = "both",
        head_pool: str = "flatten",
        head: str = "mlp",
        hidden_dim: int = 64,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        switch_high: float = 0.5,
        max_lost: float = 0.01,
        min_tokens: int = 16,
        probe_every: int = 1,
        input_dim: int | None = None,
    ):
        super().__init__()
        if kv not in ("k", "v", "both") or head not in ("linear", "mlp") or head_pool not in ("flatten", "mean"):
            raise ValueError(f"bad switch probe config: kv={kv!r} head={head!r} head_pool={head_pool!r}")
        if not 0 < switch_high < 1 or not 0 <= max_lost < 1 or min_tokens < 1 or probe_every < 1:
            raise ValueError(f"bad switch policy: switch_high={switch_high} max_lost={max_lost} min_tokens={min_tokens} "
                             f"probe_every={probe_every}")
        self.save_hyperparameters()
        self.net: nn.Module | None = None
        if input_dim is not None:
            self._build(input_dim)
        self.thresholds: dict[str, float] = {}
        self._outputs: list[dict] = []
        self.test_results: dict[str, dict[str, float]] = {}
        self.test_curve: list[dict[str, float]] = []

    def pooled_inputs(self, window: torch.Tensor) -> torch.Tensor:
        """Pooled window (batch, 2, heads, dim) -> probe input; the live generator enters here."""
        return probe_input(window.float()[:, None], None, self.hparams.kv, self.hparams.head_pool)

    def live(self, window: int) -> "LiveSwitch":
        """This probe rearranged for a decode loop that keeps the latest ``window`` positions (see ``LiveSwitch``)."""
        return LiveSwitch(self, window)

    def inputs(self, batch: dict) -> torch.Tensor:
        if "window" not in batch:
            raise KeyError("the switch probe reads 'window' batches from datamodules.SwitchDataModule")
        return self.pooled_inputs(batch["window"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_outputs(x).squeeze(-1)

    def score(self, out: torch.Tensor) -> torch.Tensor:
        """P(keep thinking): low = the result is written, the answer may stop reasoning."""
        return torch.sigmoid(out)

    def training_step(self, batch: dict, _) -> torch.Tensor:
        loss = nn.functional.binary_cross_entropy_with_logits(self(self.inputs(batch)), batch["keep"].float())
        self.log("train/loss", loss, on_epoch=True, on_step=False, batch_size=len(batch["keep"]))
        return loss

    def _collect(self, batch: dict) -> dict:
        return {"score": self.score(self(self.inputs(batch))), "keep": batch["keep"], "t": batch["t"], "answer": batch["answer"]} | {
            k: batch[k] for k in ANSWER_KEYS}

    def validation_step(self, batch: dict, _) -> None:
        self._outputs.append(self._collect(batch))

    def on_validation_epoch_end(self) -> None:
        cols = self._gather()
        auroc = auroc_or_nan(cols["score"], cols["keep"])
        self.log("val/auroc", auroc, prog_bar=True)
        self.log("val/select", auroc)

    def _policy_inputs(self, cols: dict) -> tuple:
        """(scores, t, answer, per-answer info) for ``switching.simulate``/``calibrate``."""
        answers = {}
        for a, n, s, c in zip(*(cols[k].tolist() for k in ("answer",) + ANSWER_KEYS)):
            answers[int(a)] = {"n": int(n), "settled": None if s < 0 else int(s), "correct": bool(c)}
        return cols["score"].float(), cols["t"].long(), cols["answer"].long(), answers

    @torch.no_grad()
    def calibrate(self, val_loader) -> None:
        """``switch_low`` from the validation split's answers, replaying the live policy at every position."""
        self.eval()
        for batch in val_loader:
            self._outputs.append(self._collect(batch))
        cols = self._gather()
        hp = self.hparams
        best = switching.calibrate(*self._policy_inputs(cols), hp.switch_high, hp.min_tokens, hp.max_lost, hp.probe_every)
        self.thresholds = {"switch_low": best["low"], "switch_high": best["high"]}
        self.val_metrics = {"auroc": auroc_or_nan(cols["score"], cols["keep"])} | {k: best[k] for k in ("saved_tokens", "cut_share", "lost_share")}

    def test_step(self, batch: dict, _) -> None:
        self._outputs.append(self._collect(batch))

    def on_test_epoch_end(self) -> None:
        cols = self._gather()
        hp = self.hparams
        scores, t, answer, answers = self._policy_inputs(cols)
        at = switching.simulate(scores, t, answer, answers, self.thresholds["switch_low"], hp.switch_high, hp.min_tokens, hp.probe_every)
        n = [a["n"] for a in answers.values()]
        settled = 1 - cols["keep"].long()
        self.test_results = {
            "windows": score_metrics(1 - cols["score"], settled, is_probability=True) if settled.min() != settled.max() else {"auroc": float("nan")},
            "policy": at | {"mean_tokens": sum(n) / len(n), "answers": float(len(n)),
                            "accuracy": sum(a["correct"] for a in answers.values()) / len(n)},
        }
        self.test_curve = [{"low": low} | switching.simulate(scores, t, answer, answers, low, hp.switch_high, hp.min_tokens, hp.probe_every)
                           for low in torch.linspace(0.02, hp.switch_high - 0.02, 12).tolist()]
        for name, values in self.test_results.items():
            for metric, v in values.items():
                self.log(f"test/{name}/{metric}", v)

    def export_state(self) -> dict:
        return {"thresholds": self.thresholds, "val": getattr(self, "val_metrics", {})}

    def load_export_state(self, state: dict) -> None:
        self.thresholds = state.get("thresholds", {})

    def figure(self, title: str):
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6, 4))
        lost = [c["lost_share"] * 100 for c in self.test_curve]
        saved = [c["saved_tokens"] for c in self.test_curve]
        ax.plot(lost, saved, "o-", color="tab:blue", label="cut threshold swept")
        p = self.test_results["policy"]
        ax.plot([p["lost_share"] * 100], [p["saved_tokens"]], "*", ms=14, color="tab:red",
                label=f"calibrated on validation (switch_low {self.thresholds['switch_low']:.2f})")
        ax.set_xlabel("right answers cut before their result was written (%)")
        ax.set_ylabel("decoded tokens saved per slow answer")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def headline(self) -> str:
        p, w = self.test_results["policy"], self.test_results["windows"]
        return (f"settled-window AUROC {w['auroc']:.3f}; cuts {p['cut_share']:.0%} of slow answers, saves "
                f"{p['saved_tokens']:.1f} of {p['mean_tokens']:.1f} tokens, cuts {p['lost_share']:.1%} right answers early")


class LiveSwitch:
    """A trained switch probe rearranged for the decode loop, which asks it every token.

    Everything between the positions of a window and the head's first activation is linear: the window mean,
    the K/V and head pooling, the standardisation and the first layer. So the first layer distributes over the
    positions: ``project`` maps each decoded position's layer-averaged K and V to the head's hidden width once,
    when the position is appended, and a probe call sums the window's projected vectors and finishes the head
    (``scores``). Equal to ``probe.score(probe(probe.pooled_inputs(window_mean)))`` up to float reassociation
    (tested). The head's tail (GELU, the output unit, the sigmoid: ~64 numbers a row) runs on Python floats: right
    after a decode step every small torch kernel the model did not just run costs tens of microseconds of cold code
    (GELU's ~130 us on SmolLM2, measured in the decode loop), more than the arithmetic itself.
    """

    def __init__(self, probe: SwitchProbe, window: int):
        if probe.net is None:
            raise ValueError("the switch probe has no trained head: fit or load it before steering with it")
        with torch.no_grad():
            first = probe.net[1]  # after the input dropout: Linear (then GELU, Linear for the mlp head)
            scaled = first.weight.float() / probe.std  # (hidden, features): standardisation folded in
            self.weight = (scaled / window).T.contiguous()  # (features, hidden); the window mean's 1/window too
            self.bias = first.bias.float() - scaled @ probe.mean
            rest = list(probe.net[2:])
            self.out = (rest[1].weight[0].tolist(), float(rest[1].bias[0])) if rest else None
        self.kv, self.head_pool = probe.hparams.kv, probe.hparams.head_pool

    def to(self, device) -> "LiveSwitch":
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        return self

    def project(self, positions: torch.Tensor) -> torch.Tensor:
        """Per-position layer-averaged K and/or V, only the parts this probe reads (``kv``): (batch, 1 or 2,
        kv_heads, head_dim) -> (batch, hidden)."""
        if self.head_pool == "flatten":  # probe_input's layout, without its views
            return positions.reshape(len(positions), -1) @ self.weight
        return probe_input(positions[:, None], None, "both", self.head_pool) @ self.weight

    def scores(self, summed: torch.Tensor) -> list[float]:
        """P(keep thinking) from the sum of a window's projected positions (batch, hidden), one float a row."""
        scores = []
        for z in (summed + self.bias).tolist():
            if self.out is not None:  # GELU (exact, as nn.GELU), then the output unit
                weights, bias = self.out
                z = [bias + sum(w * 0.5 * x * (1.0 + math.erf(x * SQRT_HALF)) for w, x in zip(weights, z))]
            scores.append(1.0 / (1.0 + math.exp(-z[0])) if z[0] > -700 else 0.0)
        return scores
