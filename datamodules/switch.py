"""The switch DataModule: every decode position of every slow answer, as a window of KV and a "keep thinking" label.

The data are the difficulty captures (both modes, cached; only the slow answers are read). For a slow answer of
n tokens it serves n samples, one per decoded-token count t: the mean of the layer-averaged K and V of the latest
``window`` positions (from capture's ``token_kv`` trajectory, ``switching.trajectory_windows``) and the label
"keep thinking" = the answer's final result is not yet written at t (``switching.settled_at`` on the response text).
The split is the difficulty data's question-level split, so a question sits in the same split for both probes.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from datamodules.difficulty import DifficultyDataModule
from datamodules.kv_capture import SPLITS, CaptureDataset, SplitSpec
from kvprobe import switching
from kvprobe.capture import GenerationSpec
from kvprobe.features import FeatureSpec
from kvprobe.models import ModelSpec, fingerprint, load_tokenizer
from kvprobe.prompts import PromptSpec
from kvprobe.store import CaptureStore
from kvprobe.tasks import TaskSpec


class SwitchDataset(Dataset):
    """Per-position samples: ``window`` (2, heads, dim), ``keep``, ``t``, ``answer`` and the answer's n/settled/correct."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["t"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}


class SwitchDataModule(DifficultyDataModule):
    """The difficulty data, served as decode-position windows of the slow answers for the switch probe.

    Args:
        model: which frozen model to run (alias, HF folder, GGUF file or hub id) and how.
        task: which items.
        prompt: the prompt spec of both modes.
        generation: decoding settings; ``max_new_tokens`` needs an entry for each mode.
        features: what capture stores; needs ``token_trajectory`` (the windows' source).
        split: question-level train/val/test split (the difficulty probe's).
        short_tokens: as in the difficulty data (labels are recorded in the export beside this probe's).
        route_on: as in the difficulty data.
        window: decode positions averaged into one input (the generator keeps a ring buffer of this many).
        cache_dir: where captures live; default ``$KVPROBE_CACHE/captures``.
        batch_size: probe-training batch size.
        num_workers: dataloader workers.
    """

    def __init__(
        self,
        model: ModelSpec = ModelSpec(),
        task: TaskSpec = TaskSpec(),
        prompt: PromptSpec = PromptSpec(),
        generation: GenerationSpec = GenerationSpec(),
        features: FeatureSpec = FeatureSpec(),
        split: SplitSpec = SplitSpec(),
        short_tokens: int = 128,
        route_on: str = "fast",
        window: int = 8,
        cache_dir: str | None = None,
        batch_size: int = 512,
        num_workers: int = 0,
    ):
        super().__init__(model, task, prompt, generation, features, split, short_tokens=short_tokens, route_on=route_on,
                         cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers)
        if not features.token_trajectory:
            raise ValueError("the switch probe reads decode windows from the trajectory: set features.token_trajectory: true")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window

    def _datasets(self, shards: list[dict], rows: list[dict], parts: dict[str, list[int]], scores: dict) -> dict:
        """Each split's slow answers, one sample per decoded-token count; a question's split is the one ``parts``
        gave it in the route_on capture (the difficulty probe's)."""
        slow_shards, table = CaptureStore(self.results["slow"].path).open()
        slow_rows = table.to_pylist()
        split_of = {rows[i]["qid"]: name for name, indices in parts.items() for i in indices}
        split = {name: [i for i, r in enumerate(slow_rows) if split_of.get(r["qid"]) == name] for name in SPLITS}
        answers = CaptureDataset(slow_shards, slow_rows, list(range(len(slow_rows))), {})
        tokenizer = load_tokenizer(fingerprint(self.model_spec)[0])
        columns = {name: {k: [] for k in ("window", "keep", "t", "answer", "n", "settled", "correct")} for name in SPLITS}
        for name in SPLITS:
            for i in tqdm(split[name], desc=f"switch windows ({name})", unit="answer", leave=False):
                row = slow_rows[i]
                trajectory = answers.token_kv(i)
                n = len(trajectory)
                ends = [end for _, end in tokenizer(row["response"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
                settled = switching.settled_at(row["response"], row["prediction"], ends)
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
        return super().export_spec() | {"switch": {"window": self.window, "source": "token_kv trajectory, slow answers"}}
