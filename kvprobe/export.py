"""Exported probes: ``probe.safetensors`` + ``probe.json`` stamped with the base model it belongs to.

Weights are safetensors (never a pickle). The JSON records the probe class and its arguments, the base model's
name, fingerprint and layer/head shape, the capture's feature and prompt specs, the metrics it reached, and the
versions that made it. Loading onto another model fails with a message naming both.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import kvprobe

ALLOWED_CLASSES = {"kvprobe.probes.correctness.CorrectnessProbe", "kvprobe.probes.difficulty.DifficultyProbe",
                   "kvprobe.probes.switch.SwitchProbe"}


class ProbeMismatch(ValueError):
    """A probe was exported for another model (or another feature layout) than the one it is loaded onto."""


def _versions() -> dict:
    import lightning
    import transformers

    return {"kvprobe": kvprobe.__version__, "transformers": transformers.__version__, "torch": torch.__version__, "lightning": lightning.__version__}


def save_probe(probe: torch.nn.Module, folder: str | Path, capture_spec: dict, metrics: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
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
        **{k: capture_spec[k] for k in ("difficulty", "switch") if k in capture_spec},
        "metrics": metrics or {},
        "versions": _versions(),
    }
    return write_probe(probe, folder, config)


def write_probe(probe: torch.nn.Module, folder: str | Path, config: dict) -> Path:
    """Weights as safetensors, ``config`` as probe.json (its calibration refreshed from the probe)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config | {"calibration": probe.export_state()}
    save_file({k: v.detach().contiguous().cpu() for k, v in probe.state_dict().items()}, folder / "probe.safetensors")
    (folder / "probe.json").write_text(json.dumps(config, indent=1, default=str))
    return folder


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "probe.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no probe.json: not an exported kvprobe probe")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-export the probe") from None


def check_model(config: dict, fingerprint: str, shape: dict | None, where: str, name: str = "the model given") -> None:
    """Raise ProbeMismatch unless the probe's recorded base model is the one given."""
    base = config["base_model"]
    if base["fingerprint"] != fingerprint or (shape and base.get("shape") and base["shape"] != shape):
        raise ProbeMismatch(
            f"the probe in {where} was trained on model {base['name']!r} (fingerprint {base['fingerprint'][:24]}, "
            f"shape {base.get('shape')}), not on {name!r} (fingerprint {fingerprint[:24]}, shape {shape}); "
            "retrain the probe on this model or load the model it was trained on"
        )


def load_probe(folder: str | Path, fingerprint: str | None = None, shape: dict | None = None, model_name: str = "the model given") -> torch.nn.Module:
    """Rebuild an exported probe; with ``fingerprint`` (and ``shape``), refuse one made for another model."""
    config = read_config(folder)
    if fingerprint is not None:
        check_model(config, fingerprint, shape, str(folder), model_name)
    if config["probe_class"] not in ALLOWED_CLASSES:
        raise ValueError(f"{folder}: unknown probe class {config['probe_class']!r}")
    module, name = config["probe_class"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    state = load_file(Path(folder) / "probe.safetensors")
    probe = cls(**config["probe_args"])
    for key in ("iso_x", "iso_y"):  # variable-length calibration buffers take the saved size
        if key in state:
            setattr(probe, key, torch.empty_like(state[key]))
    probe.load_state_dict(state)
    probe.load_export_state(config.get("calibration", {}))
    return probe.eval()
