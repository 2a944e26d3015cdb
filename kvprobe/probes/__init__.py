"""Probes: one LightningModule per question asked of the KV cache."""

from kvprobe.probes.correctness import CorrectnessProbe
from kvprobe.probes.difficulty import DifficultyProbe

__all__ = ["CorrectnessProbe", "DifficultyProbe"]
