"""What a study is given: the capture (model, task, question range, token caps), the split and the budgets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datamodules.kv_capture import SplitSpec
from kvprobe.capture import CaptureSpec
from kvprobe.tasks import TaskSpec


@dataclass
class StudySpec:
    """Will probing pay off on this model and task? One study captures the task in both modes, trains the probes and
    their peers on the training questions, calibrates every threshold and choice on the validation questions, and
    scores every policy once on the test questions (the same ones for every policy: comparisons are paired).

    Args:
        capture: the model (``capture.model.name``: an alias, a local HF folder, a .gguf file or a hub id), the task
            (``capture.task``: any registered task; ``offset`` and ``limit`` choose the question range), the per-mode
            token caps (``capture.generation.max_new_tokens``) and the stored features (the routers need
            ``features.prompt_window`` > 0). Captured in both modes, cached by fingerprint and resumable.
        split: question-level train / validation / test fractions and seed; the same split for every part.
        extra_train: more questions for the training split only (both modes), never for validation or test.
        out: the output folder: ``generator/`` (``from_pretrained`` loads it), ``probes/`` (every fitted probe,
            exported as ``kvprobe fit`` would) and, unless ``report`` says otherwise, ``study.md``, ``.json``, ``.png``.
        report: where the report goes, as a path without suffix (``docs/study_asdiv`` writes ``docs/study_asdiv.md``,
            ``.json`` and ``.png``); ``null`` = ``OUT/study``.
        budgets: token budgets, as multiples of always-slow's mean decoded tokens, at which every policy is
            calibrated on validation and then scored on test; the one nearest 0.5 is the headline.
        losses: accuracy losses against always-slow (0.01 = one point) for the paper's form: the cheapest policy
            within each loss.
        spend: within a token budget, calibrate to thresholds that use at least this share of it on validation
            where any does (0 = the most accurate choice within the budget, however little it spends).
        segments: also report the test policies per this many consecutive parts of the question range (4 reports
            quarters: for a source that is ordered by difficulty, such as ASDiv).
        short_tokens: the difficulty labels' cut between a short and a long right fast answer.
        max_epochs: training epochs of every probe (the best epoch by validation is kept).
        weight_decays: the weight decays tried, by validation, for the logistic router and the regularisation lever.
        levers: also fit the correctness levers (layer selection, regularisation, token-trajectory CoE scores,
            output scores, an MLP head) and report each one's validation and test AUROC.
        hidden_router: also fit a router on the prompt's hidden states (one forward pass over every prompt).
        live: also load the generator folder the study wrote and run its policy live on the test questions (a decode
            of each one, about the chosen policy's share of always-slow's capture time for them), reporting its
            accuracy, tokens and per-question agreement with the study's simulation of that policy.
        cache_dir: where captures live; ``null`` = ``$KVPROBE_CACHE/captures``.
    """

    capture: CaptureSpec = field(default_factory=CaptureSpec)
    split: SplitSpec = field(default_factory=SplitSpec)
    extra_train: TaskSpec | None = None
    out: str = "runs/study"
    report: str | None = None
    budgets: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    losses: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.03])
    spend: float = 0.9
    segments: int = 1
    short_tokens: int = 128
    max_epochs: int = 40
    weight_decays: list[float] = field(default_factory=lambda: [0.01, 1.0, 100.0])
    levers: bool = True
    hidden_router: bool = True
    live: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise ValueError(f"budgets must be multiples of always-slow's tokens in (0, 1], not {self.budgets!r}")
        if not self.losses or any(not 0 <= x < 1 for x in self.losses):
            raise ValueError(f"losses must be accuracy losses in [0, 1), not {self.losses!r}")
        if not 0 <= self.spend <= 1:
            raise ValueError(f"spend must be a share of the budget in [0, 1], not {self.spend!r}")
        for name in ("segments", "max_epochs", "short_tokens"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, not {getattr(self, name)!r}")
        if not self.weight_decays or any(not w >= 0 for w in self.weight_decays):
            raise ValueError(f"weight_decays must be numbers >= 0, not {self.weight_decays!r}")
        if not self.capture.features.prompt_window:
            raise ValueError("the routers read the prompt window: set capture.features.prompt_window > 0")

    @property
    def report_path(self) -> Path:
        """The report's path without suffix: ``.md``, ``.json`` and ``.png`` are added."""
        return Path(self.report) if self.report else Path(self.out) / "study"

    @property
    def headline_budget(self) -> float:
        return min(self.budgets, key=lambda b: abs(b - 0.5))
