"""Exported probes: ``probe.safetensors`` + ``probe.json`` stamped with the base model it belongs to.

Weights are safetensors (never a pickle). The JSON records the probe class and its arguments, the base model's
name, fingerprint and layer/head shape, the capture's feature and prompt specs, the metrics it reached, and the
versions that made it. Loading onto another model fails with a message naming both.

A folder is written whole: into a staging folder beside it, renamed into place once every file is there. A crash
leaves the previous export as it was, never new weights beside old results.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

import kvprobe
from kvprobe.assets import as_created

PROBE_FILES = ("probe.safetensors", "probe.json", "results.json", "test.png")
PROBE_KINDS = ("difficulty", "correctness", "switch")  # a generator folder's probe subfolders
REQUIRED_KEYS = ("probe_class", "probe_args", "base_model", "features", "prompt", "generation")
ALLOWED_CLASSES = {"kvprobe.probes.correctness.CorrectnessProbe", "kvprobe.probes.difficulty.DifficultyProbe",
                   "kvprobe.probes.switch.SwitchProbe"}


class ProbeMismatch(ValueError):
    """A probe was exported for another model (or another feature layout) than the one it is loaded onto."""


def _versions() -> dict:
    import lightning
    import transformers

    return {"kvprobe": kvprobe.__version__, "transformers": transformers.__version__, "torch": torch.__version__, "lightning": lightning.__version__}


def save_probe(probe: torch.nn.Module, folder: str | Path, capture_spec: dict, metrics: dict | None = None,
               results: dict | None = None) -> Path:
    """Export ``probe`` with its base model's stamp (from ``capture_spec``); ``results`` go beside it as results.json."""
    cls = f"{type(probe).__module__}.{type(probe).__qualname__}"
    config = {
        "probe_class": cls,
        "probe_args": {k: asdict(v) if is_dataclass(v) else v for k, v in probe.hparams.items() if not k.startswith("_")},  # LightningCLI adds _class_path
        "calibration": probe.export_state(),
        "base_model": capture_spec["model"] | {"shape": capture_spec.get("shape")},
        "features": capture_spec["features"],
        "prompt": capture_spec["prompt"],
        "task": capture_spec["task"],
        "generation": capture_spec["generation"],
        **{k: capture_spec[k] for k in ("difficulty", "switch", "capture") if k in capture_spec},
        "metrics": metrics or {},
        "versions": _versions(),
    }
    return write_probe(probe, folder, config, results)


def write_probe(probe: torch.nn.Module, folder: str | Path, config: dict, results: dict | None = None) -> Path:
    """Weights as safetensors, ``config`` as probe.json (its calibration refreshed from the probe), all at once."""
    config = config | {"calibration": probe.export_state()}
    with replace_folder(folder, "probe.json", set(PROBE_FILES)) as staging:
        save_file({k: v.detach().contiguous().cpu() for k, v in probe.state_dict().items()}, staging / "probe.safetensors")
        (staging / "probe.json").write_text(json.dumps(config, indent=1, default=str))
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


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "probe.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no probe.json: not an exported kvprobe probe")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-export the probe") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(config, dict) or k not in config]
    if not missing and not {"name", "fingerprint"} <= set(config["base_model"] if isinstance(config["base_model"], dict) else ()):
        missing = ["base_model.name/fingerprint"]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a complete kvprobe probe; re-export it")
    return config


def check_model(config: dict, fingerprint: str, shape: dict | None, where: str, name: str = "the model given") -> None:
    """Raise ProbeMismatch unless the probe's recorded base model is the one given."""
    base = config["base_model"]
    if base["fingerprint"] != fingerprint or (shape and base.get("shape") and base["shape"] != shape):
        raise ProbeMismatch(
            f"the probe in {where} was trained on model {base['name']!r} (fingerprint {base['fingerprint'][:24]}, "
            f"shape {base.get('shape')}), not on {name!r} (fingerprint {fingerprint[:24]}, shape {shape}); "
            "retrain the probe on this model or load the model it was trained on"
        )


def load_probe(folder: str | Path, model=None, *, fingerprint: str | None = None, shape: dict | None = None,
               model_name: str = "the model given", check: bool = True) -> torch.nn.Module:
    """Rebuild an exported probe for ``model`` (a kvprobe ``LoadedModel``, a ``ModelSpec`` or a model name: an alias,
    a folder; no weights are loaded to check it) and refuse one made for another model. ``fingerprint`` (and
    ``shape``) give the model's stamp directly. Loading without any is refused unless ``check=False`` says so."""
    config = read_config(folder)
    if model is not None:
        fingerprint, shape, model_name = _model_stamp(model)
    if fingerprint is not None:
        check_model(config, fingerprint, shape, str(folder), model_name)
    elif check:
        raise ValueError(f"load_probe({str(folder)!r}) needs the model the probe is for, to refuse another model's probe: "
                         f"model=... (the probe was trained on {config['base_model']['name']!r}), fingerprint=..., or "
                         "check=False to load it unchecked")
    if config["probe_class"] not in ALLOWED_CLASSES:
        raise ValueError(f"{folder}: unknown probe class {config['probe_class']!r}")
    module, name = config["probe_class"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    try:  # safetensors parses a header and raw arrays: nothing in the file is ever executed
        state = load_file(Path(folder) / "probe.safetensors")
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: say which file and what to do
        raise ValueError(f"{Path(folder) / 'probe.safetensors'} is not a readable safetensors file ({err}); re-export the probe") from None
    probe = cls(**config["probe_args"])
    for key in ("iso_x", "iso_y"):  # variable-length calibration buffers take the saved size
        if key in state:
            setattr(probe, key, torch.empty_like(state[key]))
    probe.load_state_dict(state)
    probe.load_export_state(config.get("calibration", {}))
    return probe.eval()


def _model_stamp(model) -> tuple[str, dict, str]:
    """(fingerprint, shape, name) of a LoadedModel, a ModelSpec or a model name, without loading weights."""
    from transformers import AutoConfig

    from kvprobe.models import LoadedModel, ModelSpec, locate, model_shape

    if isinstance(model, LoadedModel):
        return model.fingerprint, asdict(model.shape), model.spec.name
    spec = model if isinstance(model, ModelSpec) else ModelSpec(name=str(model))
    source, digest = locate(spec)
    return digest, asdict(model_shape(AutoConfig.from_pretrained(source))), spec.name
