"""What every benchmark does with its figures: stamp the machine, print one JSON line, write it to ``out``.

Imported as ``from common import emit``: a script's own folder is first on ``sys.path`` when run as
``python benchmarks/<name>.py`` (tests/test_benchmarks.py puts it there too).
"""

from __future__ import annotations

import json
import platform
import resource
from pathlib import Path

import torch


def emit(figures: dict, out: str | Path) -> dict:
    figures = figures | {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"}
    line = json.dumps(figures)
    print(line)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(line + "\n")
    return figures


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM) to its current size."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
