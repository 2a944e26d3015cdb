"""The switch DataModule: every decode position of every slow answer, as a window of KV and a "keep thinking" label.

The data are the difficulty captures (both modes, cached; only the slow answers are read). For a slow answer of
n tokens it serves n samples, one per decoded-token count t: the mean of the layer-averaged K and V of the latest
``window`` positions (from capture's ``token_kv`` trajectory, ``switching.trajectory_windows``) and the label
"keep thinking" = the answer's final result is not yet written at t (``switching.settled_at`` on the response text).
The split is the difficulty data's question-level split, so a question sits in the same split for both probes.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from datamodules.difficulty import DifficultyDataModule
from datamodules.kv_capture import SPLITS, CaptureDataset, SplitLoaders
from kvprobe import switching
from kvprobe.models import load_tokenizer, locate
from kvprobe.resources import import_function
from kvprobe.store import CaptureStore


class SwitchDataset(Dataset):
    """Per-position samples: ``window`` (2, heads, dim), ``keep``, ``t``, ``answer`` and the answer's n/settled/correct."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["t"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}


class SwitchDataModule(SplitLoaders, L.LightningDataModule):
    """The slow answers of a difficulty data module, served as decode-position windows for the switch probe.

    Args:
        difficulty: the difficulty data whose captures (its task's slow answers) and question split this serves;
            usually a path to its config, e.g. ``configs/data/difficulty_mix.yaml``. Its capture needs
            ``features.token_trajectory`` (the windows' source). Its ``extra_train`` questions are not served and
            so not captured here.
        window: decode positions averaged into one input (the generator keeps a ring buffer of this many).
        settled_at: where an answer's result stands written: the import path (``package.module.function``) of a
            function like ``kvprobe.switching.settled_at`` (response, prediction, token ends) -> decoded tokens or
            None; ``None`` = that one.
        batch_size: probe-training batch size.
        num_workers: dataloader workers.
    """

    def __init__(self, difficulty: DifficultyDataModule, window: int = 8, settled_at: str | None = None,
                 batch_size: int = 512, num_workers: int = 0):
        super().__init__()
        if not difficulty.capture.features.token_trajectory:
            raise ValueError("the switch probe reads decode windows from the trajectory: set capture.features.token_trajectory: true")
        if type(window) is not int or window < 1:
            raise ValueError(f"window must be a whole number >= 1, got {window!r}")
        difficulty.extra_train = None  # the windows come from the task's slow answers alone: nothing else to capture
        self.difficulty, self.window, self.batch_size, self.num_workers = difficulty, window, batch_size, num_workers
        self.settled_at = switching.settled_at if settled_at is None else import_function(settled_at, "settled_at")
        self.datasets: dict[str, SwitchDataset] = {}

    @property
    def capture(self):
        return self.difficulty.capture

    @property
    def path(self):
        return self.difficulty.results["slow"].path

    def prepare_data(self) -> None:
        self.difficulty.trainer = self.trainer
        self.difficulty.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.difficulty.trainer = self.trainer
        self.difficulty.setup(stage)
        self.datasets = self._windows()

    def _windows(self) -> dict[str, SwitchDataset]:
        """Each split's slow answers of the difficulty task, one sample per decoded-token count; a question's split
        is the one the difficulty data gave it."""
        slow_shards, table = CaptureStore(self.difficulty.results["slow"].path).open()
        slow_rows = table.to_pylist()
        rows = self.difficulty.datasets["train"].rows
        split_of = {rows[i]["qid"]: name for name, indices in self.difficulty.parts.items() for i in indices}
        split = {name: [i for i, r in enumerate(slow_rows) if split_of.get(r["qid"]) == name] for name in SPLITS}
        answers = CaptureDataset(slow_shards, slow_rows, list(range(len(slow_rows))), {})
        tokenizer = load_tokenizer(locate(self.capture.model)[0])
        columns = {name: {k: [] for k in ("window", "keep", "t", "answer", "n", "settled", "correct")} for name in SPLITS}
        for name in SPLITS:
            for i in tqdm(split[name], desc=f"switch windows ({name})", unit="answer", leave=False):
                row = slow_rows[i]
                trajectory = answers.token_kv(i)
                n = len(trajectory)
                ends = [end for _, end in tokenizer(row["response"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
                settled = self.settled_at(row["response"], row["prediction"], ends)
                t = torch.arange(1, n + 1)
                c = columns[name]
                c["window"].append(switching.trajectory_windows(trajectory, self.window))
                c["keep"].append((t < settled).float() if settled is not None else torch.ones(n))
                c["t"].append(t)
                c["answer"].append(torch.full((n,), i))
                c["n"].append(torch.full((n,), n))
                c["settled"].append(torch.full((n,), -1 if settled is None else settled))
                c["correct"].append(torch.full((n,), float(row["correct"])))
        return {name: SwitchDataset({k: torch.cat(v) for k, v in columns[name].items()}) for name in SPLITS}

    def export_spec(self) -> dict:
        return self.difficulty.export_spec() | {"switch": {"window": self.window, "source": "token_kv trajectory, slow answers"}}

    @property
    def shuffle_seed(self) -> int:
        return self.difficulty.split.seed

