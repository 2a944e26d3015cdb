"""Probes: one LightningModule per question asked of the KV cache."""

from kvprobe.probes.correctness import CorrectnessProbe

__all__ = ["CorrectnessProbe"]
