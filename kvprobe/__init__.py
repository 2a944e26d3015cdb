"""kvprobe: the KV cache of a frozen causal LM as a free representation, probed and used to steer generation."""

__version__ = "0.1.0"
