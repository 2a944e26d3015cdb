"""Exported probes: ``probe.safetensors`` + ``probe.json`` stamped with the base model it belongs to.

Weights are safetensors (never a pickle). The JSON records the probe class and its arguments, the base model's
name, fingerprint and layer/head shape, the capture's feature and prompt specs, the metrics it reached, and the
versions that made it. Loading onto another model fails with a message naming both.

A folder is written whole: into a staging folder beside it, renamed into place once every file is there. A crash
leaves the previous export as it was, never new weights beside old results.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

import kvprobe
from kvprobe.assets import as_created
from kvprobe.capture import GenerationSpec
from kvprobe.features import FeatureSpec
from kvprobe.prompts import PromptSpec
from kvprobe.tasks import TaskSpec
from kvprobe.typecheck import check_fields

PROBE_FILES = ("probe.safetensors", "probe.json", "results.json", "test.png")
REQUIRED_KEYS = ("probe_class", "probe_args", "base_model", "features", "prompt", "generation", "task")
ALLOWED_CLASSES = {"kvprobe.probes.correctness.CorrectnessProbe": "correctness",
                   "kvprobe.probes.difficulty.DifficultyProbe": "difficulty", "kvprobe.probes.switch.SwitchProbe": "switch"}


class ProbeMismatch(ValueError):
    """A probe was exported for another model (or another feature layout) than the one it is loaded onto."""


@dataclass
class BaseModel:
    """The model a probe belongs to: its name (as given to capture), content fingerprint, dtype and layer/head shape."""

    name: str
    fingerprint: str
    dtype: str = "float32"
    shape: dict | None = None

    def __post_init__(self) -> None:
        check_fields(self, "base_model")


@dataclass
class ProbeCard:
    """Everything an exported probe says about itself, written to ``probe.json`` and read back typed.

    Args:
        probe_class: the probe's class (one of ``ALLOWED_CLASSES``).
        probe_args: its constructor arguments.
        base_model: the model it reads.
        features: the capture's feature spec (what the probe's inputs were computed from).
        prompt: the capture's prompt spec: the generator prompts live questions the same way.
        generation: the capture's generation spec (its token caps are the generator's defaults).
        task: the task it was trained on.
        calibration: the probe's calibrated state (temperature, thresholds).
        difficulty: difficulty data facts (``route_on``, ``short_tokens``, label counts, captures).
        switch: switch data facts (``window``).
        capture: the capture's summary (items, accuracy, unfinished answers, cap share).
        metrics: what the export records about its quality (validation checks, warnings).
        versions: the package versions that made it.
        weights_sha256: the sha256 of ``probe.safetensors``, checked on load (a damaged file is refused, not scored).
    """

    probe_class: str
    probe_args: dict
    base_model: BaseModel
    features: FeatureSpec
    prompt: PromptSpec
    generation: GenerationSpec
    task: TaskSpec
    calibration: dict = field(default_factory=dict)
    difficulty: dict | None = None
    switch: dict | None = None
    capture: dict | None = None
    metrics: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    weights_sha256: str | None = None

    @property
    def kind(self) -> str:
        """Which generator slot it fills: difficulty, correctness or switch."""
        return ALLOWED_CLASSES[self.probe_class]

    @property
    def route_on(self) -> str:
        """Whose prompt a difficulty probe reads (fast unless its data said otherwise)."""
        return (self.difficulty or {}).get("route_on", "fast")

    @property
    def thresholds(self) -> dict:
        """A difficulty or switch probe's calibrated thresholds, by name."""
        return self.calibration.get("thresholds", {})

    @property
    def window(self) -> int | None:
        """The decode positions a switch probe's input averages."""
        return (self.switch or {}).get("window")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["task"] = {k: v for k, v in out["task"].items() if k != "grader" or v is not None}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, config, where: str = "probe.json") -> "ProbeCard":
        """A card from its JSON form; a missing or malformed part is named with ``where``."""
        missing = [k for k in REQUIRED_KEYS if not isinstance(config, dict) or k not in config]
        if not missing and not {"name", "fingerprint"} <= set(config["base_model"] if isinstance(config["base_model"], dict) else ()):
            missing = ["base_model.name/fingerprint"]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}: not a complete kvprobe probe; re-export it")
        if not isinstance(config["probe_class"], str) or config["probe_class"] not in ALLOWED_CLASSES:
            raise ValueError(f"{where}: unknown probe class {config['probe_class']!r}")
        for key in ("probe_args", "features", "prompt", "generation", "task", "calibration", "metrics", "versions"):
            if key in config and not isinstance(config[key], dict):
                raise ValueError(f"{where}: '{key}' must be an object, not {type(config[key]).__name__}; re-export the probe")
        for key in ("difficulty", "switch", "capture"):
            if config.get(key) is not None and not isinstance(config[key], dict):
                raise ValueError(f"{where}: '{key}' must be an object or absent, not {type(config[key]).__name__}; re-export the probe")
        route_on = (config.get("difficulty") or {}).get("route_on", "fast")
        if route_on not in ("fast", "slow"):
            raise ValueError(f"{where}: difficulty.route_on must be 'fast' or 'slow', not {route_on!r}; re-export the probe")
        if config.get("weights_sha256") is not None and not isinstance(config["weights_sha256"], str):
            raise ValueError(f"{where}: 'weights_sha256' must be a hex string; re-export the probe")
        known = {f.name for f in fields(cls)}
        try:
            typed = {"base_model": BaseModel(**{k: v for k, v in config["base_model"].items() if k in {f.name for f in fields(BaseModel)}}),
                     "features": FeatureSpec(**config["features"]), "prompt": PromptSpec(**config["prompt"]),
                     "generation": GenerationSpec(**config["generation"]), "task": TaskSpec(**config["task"])}
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}; re-export the probe") from None
        return cls(**({k: v for k, v in config.items() if k in known} | typed))

    @classmethod
    def from_capture(cls, probe: torch.nn.Module, capture_spec: dict, metrics: dict | None = None) -> "ProbeCard":
        """The card of ``probe`` trained on a capture (``export_spec()`` of its data module)."""
        args = {k: asdict(v) if is_dataclass(v) else v for k, v in probe.hparams.items() if not k.startswith("_")}  # LightningCLI adds _class_path
        config = {
            "probe_class": f"{type(probe).__module__}.{type(probe).__qualname__}", "probe_args": args,
            "calibration": probe.export_state(), "base_model": capture_spec["model"] | {"shape": capture_spec.get("shape")},
            **{k: capture_spec[k] for k in ("features", "prompt", "task")},
            # the generation spec's own fields (a sampled capture's record also names its sampler, for its fingerprint)
            "generation": {k: v for k, v in capture_spec["generation"].items() if k in {f.name for f in fields(GenerationSpec)}},
            **{k: capture_spec[k] for k in ("difficulty", "switch", "capture") if k in capture_spec},
            "metrics": metrics or {}, "versions": _versions(),
        }
        return cls.from_dict(json.loads(json.dumps(config, default=str)), "the export")


def _versions() -> dict:
    import lightning
    import transformers

    return {"kvprobe": kvprobe.__version__, "transformers": transformers.__version__, "torch": torch.__version__, "lightning": lightning.__version__}


def save_probe(probe: torch.nn.Module, folder: str | Path, capture_spec: dict, metrics: dict | None = None,
               results: dict | None = None) -> Path:
    """Export ``probe`` with its card (its base model's stamp from ``capture_spec``); ``results`` go beside it as
    results.json. The probe keeps the card (``probe.card``)."""
    probe.card = ProbeCard.from_capture(probe, capture_spec, metrics)
    return write_probe(probe, folder, results)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_probe(probe: torch.nn.Module, folder: str | Path, results: dict | None = None) -> Path:
    """Weights as safetensors and ``probe.card`` as probe.json (its calibration refreshed from the probe), all at once."""
    probe.card.calibration = probe.export_state()
    with replace_folder(folder, "probe.json", set(PROBE_FILES)) as staging:
        save_file({k: v.detach().contiguous().cpu() for k, v in probe.state_dict().items()}, staging / "probe.safetensors")
        probe.card.weights_sha256 = sha256_of(staging / "probe.safetensors")
        (staging / "probe.json").write_text(json.dumps(probe.card.to_dict(), indent=1, default=str))
        if results is not None:
            (staging / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return Path(folder)


@contextmanager
def replace_folder(folder: str | Path, marker: str, known: set[str]) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without error it replaces ``folder`` in one rename.

    ``folder`` may be absent, empty, or an earlier export (it holds ``marker`` and nothing outside ``known``); any
    other folder is refused, so that a mistyped export path never deletes a user's files. On error the staging
    folder is removed and ``folder`` is left as it was.
    """
    if not str(folder).strip() or Path(folder).expanduser().resolve() == Path.cwd().resolve():
        raise ValueError(f"the destination {str(folder)!r} names no folder (the working directory itself); name a new folder")
    folder = Path(folder).expanduser()
    check_replaceable(folder, marker, known)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        yield staging
        as_created(staging)  # mkdtemp makes 0700; an export is shared like any folder
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_replaceable(folder: str | Path, marker: str = "probe.json", known: set[str] = set(PROBE_FILES)) -> None:
    """Raise FileExistsError unless ``folder`` is absent, empty, or an earlier export that may be replaced."""
    folder = Path(folder).expanduser()
    if folder.exists():
        entries = {p.name for p in folder.iterdir()} if folder.is_dir() else None
        if entries is None or (entries and (marker not in entries or entries - known)):
            raise FileExistsError(f"{folder} exists and is not a kvprobe export ({marker} and only {sorted(known)}); "
                                  "export to a new or empty folder")


def read_card(folder: str | Path) -> ProbeCard:
    """The card of an exported probe folder."""
    path = Path(folder) / "probe.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no probe.json: not an exported kvprobe probe")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-export the probe") from None
    return ProbeCard.from_dict(config, str(path))


def check_model(card: ProbeCard, fingerprint: str, shape: dict | None, where: str, name: str) -> None:
    """Raise ProbeMismatch unless the probe's recorded base model is the one given."""
    base = card.base_model
    if base.fingerprint != fingerprint or (shape and base.shape and base.shape != shape):
        raise ProbeMismatch(
            f"the probe in {where} was trained on model {base.name!r} (fingerprint {base.fingerprint[:24]}, "
            f"shape {base.shape}), not on {name!r} (fingerprint {fingerprint[:24]}, shape {shape}); "
            "retrain the probe on this model or load the model it was trained on"
        )


def load_probe(folder: str | Path, model=None) -> torch.nn.Module:
    """Rebuild an exported probe, with its ``card``, for ``model``: a kvprobe ``LoadedModel``, a ``ModelSpec`` or a
    model name (an alias, a folder; no weights are loaded to check it); ``None`` = the base model its card names,
    which must still resolve to the same weights. A probe made for another model is refused."""
    card = read_card(folder)
    module, name = card.probe_class.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    weights = Path(folder) / "probe.safetensors"
    if card.weights_sha256 is not None and weights.is_file() and sha256_of(weights) != card.weights_sha256:
        raise ValueError(f"{weights} does not match the sha256 its probe.json records (damaged, or another probe's "
                         "weights); re-export the probe")
    try:  # safetensors parses a header and raw arrays: nothing in the file is ever executed
        state = load_file(weights)
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: say which file and what to do
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); re-export the probe") from None
    fingerprint, shape, model_name = _model_stamp(card.base_model.name if model is None else model, card)
    check_model(card, fingerprint, shape, str(folder), model_name)
    fix = f"{Path(folder) / 'probe.json'} does not describe {weights.name}"
    try:
        probe = cls(**card.probe_args)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{Path(folder) / 'probe.json'}: probe_args do not build a {name} ({type(err).__name__}: {err}); "
                         "re-export the probe") from None
    _check_layers(card, probe, folder)
    for key in ("iso_x", "iso_y"):  # variable-length calibration buffers take the saved size
        if key in state:
            setattr(probe, key, torch.empty_like(state[key]))
    try:
        probe.load_state_dict(state)
        probe.load_export_state(card.calibration)
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"{fix} ({type(err).__name__}: {' '.join(str(err).split())[:300]}); re-export the probe") from None
    probe.card = card
    return probe.eval()


def _check_layers(card: ProbeCard, probe, folder) -> None:
    """Layer ids a probe reads must exist in its base model (a tampered card would fail mid-decode)."""
    layers = (card.base_model.shape or {}).get("layers") if isinstance(card.base_model.shape, dict) else None
    chosen = probe.hparams.get("layers")
    ids = chosen if isinstance(chosen, (list, tuple)) else [chosen] if isinstance(chosen, int) and not isinstance(chosen, bool) else []
    if chosen is not None and not ids or any(type(i) is not int for i in ids):
        raise ValueError(f"{Path(folder) / 'probe.json'}: probe_args.layers must be null, a whole number or a list of "
                         f"layer ids, not {chosen!r}; re-export the probe")
    if layers and isinstance(chosen, (list, tuple)) and any(not -layers <= i < layers for i in ids):
        raise ValueError(f"{Path(folder) / 'probe.json'}: probe_args.layers {chosen} are not all layers of a "
                         f"{layers}-layer model; re-export the probe")
    if layers and isinstance(chosen, int) and not 1 <= chosen <= layers:
        raise ValueError(f"{Path(folder) / 'probe.json'}: probe_args.layers {chosen} (the last n) is not in 1..{layers}; "
                         "re-export the probe")


def _model_stamp(model, card: ProbeCard) -> tuple[str, dict | None, str]:
    """(fingerprint, shape, name) of a LoadedModel, a ModelSpec or a model name, without loading weights; for an
    embedded alias whose fingerprint already differs from ``card``'s, without converting it either (shape None)."""
    from transformers import AutoConfig

    from kvprobe.models import LoadedModel, ModelSpec, known_fingerprint, locate, model_shape

    if isinstance(model, LoadedModel):
        return model.fingerprint, asdict(model.shape), model.spec.name
    spec = model if isinstance(model, ModelSpec) else ModelSpec(name=str(model))
    known = known_fingerprint(spec.name) if not spec.adapter else None
    if known is not None and known != card.base_model.fingerprint:  # refuse before converting a model it cannot use
        return known, None, spec.name
    source, digest = locate(spec)
    return digest, asdict(model_shape(AutoConfig.from_pretrained(source))), spec.name
