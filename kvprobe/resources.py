"""Files that ship with kvprobe: the default generator folders and the YAML configs.

In a source checkout they are ``checkpoints/`` and the repo's ``configs/``; an installed wheel carries the
configs as ``kvprobe/configs/`` (pyproject.toml maps them there), so a user outside the repo can copy them out
with ``kvprobe configs DEST``.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _pretrained() -> Path:
    """The shipped generator folders: ``kvprobe/pretrained/`` in an installed wheel (pyproject.toml maps the repo's
    ``checkpoints/`` there), the repo's ``checkpoints/`` in a source checkout or an editable install."""
    installed = PACKAGE / "pretrained"
    return installed if installed.is_dir() else PACKAGE.parent / "checkpoints"


PRETRAINED = _pretrained()


def import_function(path: str, name: str):
    """The function an import path (``package.module.function``) names, or a ValueError naming the setting ``name``."""
    import importlib

    module, _, attr = path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{name} {path!r} cannot be imported ({err}); give package.module.function") from None
    if not callable(function):
        raise ValueError(f"{name} {path!r} is not a function")
    return function


def aliases() -> list[str]:
    """Names of the shipped generator folders (``KVProbeGenerator.from_pretrained(alias)``)."""
    return sorted(p.name for p in PRETRAINED.iterdir() if (p / "generator.json").is_file()) if PRETRAINED.is_dir() else []


def resolve_generator(path: str | Path) -> Path:
    """The folder ``path`` names: a shipped alias (e.g. ``smollm2``) or a folder on disk.

    A bare alias always means the shipped generator, even when the working directory holds a folder of that name
    (a converted model folder called ``smollm2`` is common); that folder is named in a warning with the way to load
    it (``./smollm2``). Anything else is a path.
    """
    text = str(path)
    if text in aliases():
        shipped = PRETRAINED / text
        if Path(text).exists():
            warnings.warn(f"{text!r} is the shipped generator {shipped}, which was loaded; the folder {Path(text).resolve()} "
                          f"in the working directory was not (pass './{text}' to load it)", stacklevel=3)
        return shipped
    return Path(path).expanduser()


def configs_dir() -> Path:
    """The shipped YAML configs (``coe.yaml``, ``data/``, ``model/``, ...)."""
    for candidate in (PACKAGE / "configs", PACKAGE.parent / "configs"):
        if (candidate / "coe.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"kvprobe's configs are neither in {PACKAGE / 'configs'} (installed) nor in "
                            f"{PACKAGE.parent / 'configs'} (source checkout); reinstall kvprobe")


def copy_configs(dest: str | Path) -> Path:
    """Copy the shipped configs to ``dest`` (a new folder), ready for ``kvprobe fit --config DEST/coe.yaml``."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty; name a new folder for the configs")
    shutil.copytree(configs_dir(), dest, ignore=shutil.ignore_patterns("__pycache__", "*.py"), dirs_exist_ok=True)
    return dest
