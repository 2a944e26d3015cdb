"""Where results go, checked before any model work: a destination that cannot be written is named now, not after
hours of capture and training."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _probe_write(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".kvprobe-write-check-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise OSError(f"{what} cannot be written ({err.strerror or err}); name another") from None


def writable_folder(folder: str | Path, what: str = "the output folder") -> Path:
    """``folder``, created if missing, once a file has been written and removed there."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OSError(f"{what} {folder} is a file, not a folder; name a folder")
    _probe_write(folder, f"{what} {folder}")
    return folder


def writable_file(path: str | Path, what: str = "the output file") -> Path:
    """``path``, a file that can be written: not a folder, its folder created if missing and writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OSError(f"{what} {path} is a folder; name a file in it, e.g. {path / 'results.json'}")
    _probe_write(path.parent, f"{what} {path} (its folder {path.parent})")
    return path


def write_json_or_keep(path: str | Path, data, what: str = "results") -> Path:
    """Write ``data`` as JSON to ``path``; when that fails after all, keep it in a temporary file and say where."""
    text = json.dumps(data, indent=1)
    try:
        Path(path).write_text(text)
        return Path(path)
    except OSError as err:
        fd, kept = tempfile.mkstemp(prefix="kvprobe-results-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        raise OSError(f"writing the {what} to {path} failed ({err.strerror or err}); they are kept in {kept}") from None
