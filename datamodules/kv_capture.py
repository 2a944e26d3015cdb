"""The KV-capture LightningDataModule: ``prepare_data`` runs the capture, ``setup`` memory-maps it and splits it."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from kvprobe.baselines import label_free_scores
from kvprobe.capture import CaptureResult, CaptureSpec, capture
from kvprobe.prompts import MODES
from kvprobe.store import CaptureStore
from kvprobe.tasks import TaskSpec

SPLITS = ("train", "val", "test")


class CaptureDataset(Dataset):
    """Rows of a capture (memory-mapped shards) selected by global index."""

    def __init__(self, shards: list[dict[str, torch.Tensor]], rows: list[dict], indices: list[int], scores: dict[str, torch.Tensor]):
        self.shards, self.rows, self.indices, self.scores = shards, rows, indices, scores
        self.where = [(s, r) for s, shard in enumerate(shards) for r in range(len(shard["response_kv"]))]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        g = self.indices[i]
        s, r = self.where[g]
        shard, row = self.shards[s], self.rows[g]
        item = {
            "index": g, "correct": torch.tensor(float(row["correct"])),
            "gen_tokens": torch.tensor(float(row["gen_tokens"])), "finished": torch.tensor(float(row["finished"])),
        }
        for name, tensor in shard.items():
            if name not in ("token_kv", "token_offsets"):
                item[name] = tensor[r].float()
        item["scores"] = {name: values[g] for name, values in self.scores.items()}
        return item

    def token_kv(self, i: int) -> torch.Tensor:
        """Per-token layer-averaged K,V of item ``i``'s response: (n_tokens, 2, kv_heads, head_dim) float32."""
        s, r = self.where[self.indices[i]]
        offsets = self.shards[s]["token_offsets"]
        return self.shards[s]["token_kv"][int(offsets[r]) : int(offsets[r + 1])].float()


@dataclass
class SplitSpec:
    """Train/val/test fractions of the *questions* (never of rows: variants of a question stay together).

    Args:
        train: fraction of questions for training.
        val: fraction for model selection and calibration.
        test: fraction for the report; nothing is tuned on it.
        seed: permutation seed; the same seed gives the same split on any machine.
    """

    train: float = 0.6
    val: float = 0.2
    test: float = 0.2
    seed: int = 0

    def assign(self, qids: list[str]) -> dict[str, list[int]]:
        total = self.train + self.val + self.test
        if min(self.train, self.val, self.test) < 0 or abs(total - 1) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {self.train}, {self.val}, {self.test}")
        unique = sorted(set(qids))
        order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_train = round(self.train * len(unique))
        n_val = round(self.val * len(unique))
        split_of = {}
        for rank, u in enumerate(order):
            split_of[unique[u]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
        out = {name: [] for name in SPLITS}
        for i, q in enumerate(qids):
            out[split_of[q]].append(i)
        return out


def split_keys(rows: list[dict]) -> list[str]:
    """What each row is split by: its question id, or, where one question text (case and spacing aside) sits under
    several ids, the smallest of them, so that the same question never lands in train and in test."""
    norm = [" ".join(r["question"].lower().split()) for r in rows]
    first: dict[str, str] = {}
    for text, r in zip(norm, rows):
        first[text] = min(first.get(text, r["qid"]), r["qid"])
    return [first[text] for text in norm]


class SplitLoaders:
    """The train/val/test dataloaders of a data module over ``self.datasets``: training batches shuffled from
    ``self.shuffle_seed``, ``self.batch_size`` items each, ``self.num_workers`` workers."""

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self.datasets:
            raise RuntimeError(f"the {name} split is not set up yet: call prepare_data() then setup() first (a Trainer does both)")
        return DataLoader(
            self.datasets[name], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.shuffle_seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class KVCaptureDataModule(SplitLoaders, L.LightningDataModule):
    """Runs a frozen model over a task once, stores KV features, serves them as train/val/test.

    Args:
        capture: what to capture (model, task, prompt, generation, features): usually a path to one of
            ``configs/captures/``, so that every probe on the same capture names it once.
        split: question-level train/val/test split.
        cache_dir: where captures live; default ``$KVPROBE_CACHE/captures`` (``~/.cache/kvprobe/captures``).
        batch_size: probe-training batch size of the dataloaders.
        num_workers: dataloader workers.
        extra_train: more questions for the training split only, captured like ``capture.task``; any whose id or
            text is also in that task is left out, so validation and test stay exactly the task's. More training
            data without reshuffling (and so without recapturing) the questions a probe is judged on.
        mode: the prompt mode to answer in (``fast`` or ``slow``); null = the capture's ``prompt.mode``.
    """

    def __init__(self, capture: CaptureSpec | None = None, split: SplitSpec | None = None, cache_dir: str | None = None,
                 batch_size: int = 64, num_workers: int = 0, extra_train: TaskSpec | None = None, mode: str | None = None):
        super().__init__()
        for name, value, kind in (("capture", capture, CaptureSpec), ("split", split, SplitSpec), ("extra_train", extra_train, TaskSpec)):
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"{name} must be a {kind.__name__} (a YAML file is read by a config: kvprobe fit --data "
                                 f"FILE, or jsonargparse), not {type(value).__name__} {value!r:.80}")
        # copies: config overrides mutate specs, and a caller's spec must stay as it was
        self.capture, self.split = copy.deepcopy(capture or CaptureSpec()), copy.deepcopy(split or SplitSpec())
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"mode {mode!r} is not one of {MODES}")
            self.capture = self.capture.in_mode(mode)
        self.cache_dir, self.batch_size, self.num_workers = cache_dir, batch_size, num_workers
        self.extra_train = copy.deepcopy(extra_train)
        self.result: CaptureResult | None = None
        self.extra_results: dict[str, CaptureResult] = {}  # extra_train's captures, by mode
        self.extra_counts: dict[str, int] = {}
        self.datasets: dict[str, CaptureDataset] = {}

    @property
    def served_mode(self) -> str:
        """The mode whose captured rows this data serves."""
        return self.capture.prompt.mode

    def run_capture(self, rank: int = 0, world_size: int = 1, barrier=None) -> CaptureResult:
        """Capture what this data needs (cached: no model work when done before); the capture the probe reads."""
        result = capture(self.capture, self.cache_dir, rank, world_size, barrier)
        if self.extra_train:
            mode = self.served_mode
            self.extra_results[mode] = capture(self.capture.in_mode(mode, self.extra_train), self.cache_dir, rank, world_size, barrier)
        return result

    def _distributed(self) -> bool:
        return self.trainer is not None and self.trainer.world_size > 1

    def prepare_data(self) -> None:
        if self.result is None and not self._distributed():  # data-parallel captures in setup, on every rank
            self.result = self.run_capture()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.result is None:
            if self._distributed():
                strategy = self.trainer.strategy
                self.result = self.run_capture(self.trainer.global_rank, self.trainer.world_size, strategy.barrier)
            else:
                self.result = self.run_capture()
        shards, rows, self.parts = self._open()  # parts: each split's row indices
        self.datasets = self._datasets(shards, rows, self.parts, label_free_scores(shards, rows))

    def _open(self) -> tuple[list[dict], list[dict], dict[str, list[int]]]:
        """The capture's shards and rows split by question, then ``extra_train``'s rows appended, its new
        questions to train."""
        shards, table = CaptureStore(self.result.path).open()
        rows = table.to_pylist()
        parts = self.split.assign(split_keys(rows))
        if self.extra_train:
            extra_shards, table = CaptureStore(self.extra_results[self.served_mode].path).open()
            taken = {r["qid"] for r in rows} | {r["question"] for r in rows}
            extra = table.to_pylist()
            kept = [len(rows) + i for i, r in enumerate(extra) if r["qid"] not in taken and r["question"] not in taken]
            parts["train"] += kept
            self.extra_counts = {"captured": len(extra), "used": len(kept)}
            shards, rows = shards + extra_shards, rows + extra
        return shards, rows, parts

    def _datasets(self, shards: list[dict], rows: list[dict], parts: dict[str, list[int]], scores: dict) -> dict[str, CaptureDataset]:
        """One dataset per split over the opened capture (subclasses add what they serve beside it)."""
        return {name: CaptureDataset(shards, rows, parts[name], scores) for name in SPLITS}

    @property
    def path(self) -> Path:
        return self.result.path

    def export_spec(self) -> dict:
        """What an exported probe records about its data: the capture's spec (model, prompt, features, task)."""
        store = CaptureStore(self.path)
        summary = store.manifest()["summary"]
        spec = store.spec() | {"capture": {k: summary.get(k) for k in ("items", "accuracy", "unfinished", "cap_share")}}
        if self.extra_train:
            spec["extra_train"] = {"task": dataclasses.asdict(self.extra_train), **self.extra_counts,
                                   "captures": {m: str(r.path) for m, r in self.extra_results.items()}}
        return spec

    @property
    def shuffle_seed(self) -> int:
        return self.split.seed
