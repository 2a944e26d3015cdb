"""Probes: one LightningModule per question asked of the KV cache."""

from kvprobe.probes.correctness import CorrectnessProbe
from kvprobe.probes.difficulty import DifficultyProbe
from kvprobe.probes.switch import SwitchProbe

__all__ = ["CorrectnessProbe", "DifficultyProbe", "SwitchProbe"]
