"""The difficulty DataModule: one task captured in both modes, joined per question, labelled for routing.

Each question is answered fast (directly) and slow (step by step) with the same prompt spec the generator uses;
the two captures are ordinary KV captures (cached, resumable). The probe reads the prompt-window KV of the
``route_on`` mode's prompt (known before any answer token); the labels come from both modes' grades.
"""

from __future__ import annotations

from collections import Counter

import torch

from datamodules.kv_capture import SPLITS, CaptureDataset, KVCaptureDataModule, SplitSpec
from kvprobe.capture import CaptureResult, CaptureSpec, capture
from kvprobe.prompts import MODES
from kvprobe.routing import LABELS, difficulty_labels
from kvprobe.store import CaptureStore
from kvprobe.tasks import TaskSpec


class DifficultyDataset(CaptureDataset):
    """Rows of the ``route_on`` capture plus, per question, both modes' outcomes and the difficulty labels."""

    def __init__(self, base: CaptureDataset, outcomes: dict[str, torch.Tensor]):
        super().__init__(base.shards, base.rows, base.indices, base.scores)
        self.outcomes = outcomes

    def __getitem__(self, i: int) -> dict:
        g = self.indices[i]
        return super().__getitem__(i) | {name: values[g] for name, values in self.outcomes.items()}


class DifficultyDataModule(KVCaptureDataModule):
    """Captures a task in fast and slow mode and serves prompt KV with routing labels, split by question.

    Args:
        capture: what to capture (model, task, prompt, generation, features); captured once per mode (the prompt's
            ``mode`` is set per capture; the instructions are shared). ``max_new_tokens`` needs both modes and
            ``features.prompt_window`` > 0 (the probe's input).
        split: question-level train/val/test split.
        extra_train: more questions for the training split only, captured in both modes like ``capture.task``
            (see ``KVCaptureDataModule``).
        short_tokens: a fast answer counts as short (label 0, else 25) under this many generated tokens.
        route_on: whose prompt the probe reads: ``fast`` (the generator prefills the fast prompt first and moves on
            to slow only when the probe says so) or ``slow``.
        cache_dir: where captures live; default ``$KVPROBE_CACHE/captures``.
        batch_size: probe-training batch size.
        num_workers: dataloader workers.
    """

    def __init__(self, capture: CaptureSpec | None = None, split: SplitSpec | None = None, extra_train: TaskSpec | None = None,
                 short_tokens: int = 128, route_on: str = "fast", cache_dir: str | None = None, batch_size: int = 64,
                 num_workers: int = 0):
        super().__init__(capture, split, cache_dir, batch_size, num_workers, extra_train)
        if route_on not in MODES:
            raise ValueError(f"route_on {route_on!r} is not one of {MODES}")
        if not self.capture.features.prompt_window:
            raise ValueError("the difficulty probe reads the prompt window: set capture.features.prompt_window > 0")
        self.short_tokens, self.route_on = short_tokens, route_on
        self.results: dict[str, CaptureResult] = {}
        self.label_counts: dict[str, int] = {}

    @property
    def served_mode(self) -> str:
        return self.route_on

    def mode_prompt(self, mode: str):
        """The prompt spec of ``mode`` (the capture's instructions)."""
        return self.capture.in_mode(mode).prompt

    def _sources(self) -> list[tuple[TaskSpec, dict[str, CaptureResult]]]:
        """The task and, when set, ``extra_train``, each with its captures per mode (filled by ``run_capture``)."""
        return [(self.capture.task, self.results)] + ([(self.extra_train, self.extra_results)] if self.extra_train else [])

    def run_capture(self, rank: int = 0, world_size: int = 1, barrier=None) -> CaptureResult:
        for task, results in self._sources():
            for mode in MODES:  # the cheap fast mode first: its summary shows up in minutes
                results[mode] = capture(self.capture.in_mode(mode, task), self.cache_dir, rank, world_size, barrier)
        if rank == 0:
            self._join()
            print(f"[kvprobe] difficulty labels (short_tokens={self.short_tokens}): {self.label_histogram()}", flush=True)
        return self.results[self.route_on]

    def _join(self) -> None:
        """Per row of the route_on captures (``task``'s, then ``extra_train``'s, in ``_open``'s order): both modes'
        outcomes and labels (NaN where a grade is missing)."""
        nan = float("nan")
        keys = [(mode, key) for mode in MODES for key in ("correct", "gen_tokens")]
        values = {k: [] for k in keys}
        for _, results in self._sources():
            tables = {mode: CaptureStore(r.path).open()[1].to_pylist() for mode, r in results.items()}
            by_qid = {mode: {row["qid"]: row for row in rows} for mode, rows in tables.items()}
            for r in tables[self.route_on]:
                for mode, key in keys:
                    values[mode, key].append(float(by_qid[mode][r["qid"]][key]) if r["qid"] in by_qid[mode] else nan)
        out = {f"{mode}_{key}": torch.tensor(v) for (mode, key), v in values.items()}
        out = {k.replace("gen_tokens", "tokens"): v for k, v in out.items()}
        out["label"] = difficulty_labels(out["fast_correct"], out["fast_tokens"], out["slow_correct"], self.short_tokens)
        out["slow_needed"] = (out["label"] == 75).float().where(~out["label"].isnan(), torch.tensor(nan))
        self.outcomes = out
        counts = Counter("unlabelled" if v != v else str(int(v)) for v in out["label"].tolist())
        self.label_counts = {str(k): counts.get(str(k), 0) for k in LABELS} | {"unlabelled": counts.get("unlabelled", 0)}

    def label_histogram(self) -> str:
        n = sum(self.label_counts.values())
        return ", ".join(f"{k}: {v} ({v / n:.0%})" for k, v in self.label_counts.items() if v or k != "unlabelled")

    def _datasets(self, shards: list[dict], rows: list[dict], parts: dict[str, list[int]], scores: dict) -> dict:
        """Each split's labelled questions (the split is by question, so the same in every mode), with outcomes."""
        if not self.label_counts:  # captured on another rank, or before this object existed
            self._join()
        labelled = ~self.outcomes["label"].isnan()
        return {name: DifficultyDataset(CaptureDataset(shards, rows, [i for i in parts[name] if labelled[i]], scores), self.outcomes)
                for name in SPLITS}

    def export_spec(self) -> dict:
        spec = super().export_spec()
        extra = spec.pop("extra_train", None)
        spec["difficulty"] = {"short_tokens": self.short_tokens, "route_on": self.route_on, "label_counts": self.label_counts,
                              "captures": {mode: str(r.path) for mode, r in self.results.items()}, "extra_train": extra}
        return spec
