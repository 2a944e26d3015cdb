"""kvprobe: the KV cache of a frozen causal LM as a free representation, probed and used to steer generation.

    from kvprobe import KVProbeGenerator, load_probe
"""

__version__ = "0.1.0"
__all__ = ["KVProbeGenerator", "SteeringSpec", "GenerationConfig", "GenerationResult", "ProbeCard", "load_probe",
           "save_probe", "__version__"]

_LAZY = {"KVProbeGenerator": "kvprobe.steering", "SteeringSpec": "kvprobe.steering", "GenerationConfig": "kvprobe.steering",
         "GenerationResult": "kvprobe.steering", "ProbeCard": "kvprobe.export", "load_probe": "kvprobe.export",
         "save_probe": "kvprobe.export"}


def __getattr__(name: str):
    # imported on first use: `import kvprobe` (e.g. kvprobe.assets at set-up) stays free of torch and transformers
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
