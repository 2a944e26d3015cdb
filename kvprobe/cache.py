"""The one place that reads KV caches.

Every other module asks this one for per-layer (K, V) shaped (batch, kv_heads, seq, head_dim). It understands
transformers 5.x caches (``cache.layers[i].keys/.values``), 4.5x caches (``key_cache[i]``/``value_cache[i]``) and
legacy tuples, and refuses what it cannot read faithfully: a sliding-window layer that already dropped tokens,
quantized or offloaded caches, linear-attention state, layers that disagree on length.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch

KV = tuple[torch.Tensor, torch.Tensor]


class UnreadableCache(ValueError):
    """The cache cannot be read as complete per-layer K and V."""


def cache_of(obj):
    """The cache inside a model/generate output, or ``obj`` itself when it already is one."""
    if isinstance(obj, (tuple, list)):  # a legacy tuple cache (its tuples have no such attributes anyway)
        return obj
    for attr in ("cache", "past_key_values"):
        if (cache := getattr(obj, attr, None)) is not None:
            return cache
    return obj


def _layer_kv(layer, index: int) -> KV:
    name = type(layer).__name__
    _check_kind(type(layer))
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None or keys.numel() == 0:
        raise UnreadableCache(f"layer {index} ({name}) holds no keys yet: read the cache after a forward pass")
    seen = getattr(layer, "cumulative_length", None)
    seen = int(seen) if seen is not None else keys.shape[-2]
    if keys.shape[-2] < seen:
        raise UnreadableCache(
            f"layer {index} ({name}) keeps {keys.shape[-2]} of {seen} positions: a sliding window dropped tokens, "
            "so pooled features would silently miss the start of the sequence"
        )
    return keys, values


def layer_kv(obj, device: torch.device | str | None = None) -> list[KV]:
    """Per-layer (K, V), each (batch, kv_heads, seq, head_dim), optionally moved to ``device``.

    Under ``device_map="auto"`` each layer lives on its own GPU; ``device`` gathers them where features are pooled.
    """
    cache = cache_of(obj)
    if getattr(cache, "offloading", False):
        raise UnreadableCache("the cache is offloaded: its layers are not resident; generate without offloading")
    if hasattr(cache, "layers"):  # transformers >= 4.56 / 5.x
        pairs = [_layer_kv(layer, i) for i, layer in enumerate(cache.layers)]
    elif hasattr(cache, "key_cache"):  # transformers 4.4x-4.55
        pairs = list(zip(cache.key_cache, cache.value_cache))
    elif isinstance(cache, Sequence) and all(isinstance(p, Sequence) and len(p) >= 2 for p in cache):
        pairs = [(p[0], p[1]) for p in cache]  # legacy tuple-of-tuples
    else:
        raise UnreadableCache(f"cannot read a KV cache from {type(cache).__name__}")
    if not pairs:
        raise UnreadableCache("the cache has no layers")
    lengths = {k.shape[-2] for k, _ in pairs}
    if len(lengths) != 1:
        raise UnreadableCache(f"layers hold different numbers of positions {sorted(lengths)}: cannot align them")
    if device is not None:  # moves only what lives elsewhere: the decode loop reads the cache every token
        device = torch.device(device)
        pairs = [(k if k.device == device else k.to(device, non_blocking=True),
                  v if v.device == device else v.to(device, non_blocking=True)) for k, v in pairs]
    return pairs


def newest_kv(obj, device: torch.device | str | None = None, kv: str = "both") -> torch.Tensor:
    """Every layer's K and V (``kv``: ``k``, ``v`` or ``both``) at the newest position, stacked:
    (batch, layers, 1 or 2, kv_heads, head_dim).

    The decode loop asks for this every token, so a 5.x cache's layers are read directly (one column each) with
    their kinds checked once per class, not ``layer_kv``'s per-layer checks of the whole sequence (a sliding
    window that dropped old positions still holds the newest one). Columns on several devices
    (``device_map="auto"``) are gathered on ``device``.
    """
    cache = cache_of(obj)
    if hasattr(cache, "layers") and not getattr(cache, "offloading", False):
        for kind in {type(layer) for layer in cache.layers}:
            _check_kind(kind)
        ends = (cache.layers[0].keys, cache.layers[-1].values) if cache.layers else (None,)
        if any(t is None or t.numel() == 0 for t in ends):
            raise UnreadableCache("the cache holds no keys yet: read it after a forward pass")
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = layer_kv(cache)
    parts = {"k": (0,), "v": (1,), "both": (0, 1)}[kv]
    columns = [pair[i].select(2, -1) for pair in pairs for i in parts]
    try:
        stacked = torch.stack(columns, 1)
    except RuntimeError:  # layers on different devices
        target = torch.device(device) if device is not None else columns[0].device
        stacked = torch.stack([c.to(target) for c in columns], 1)
    if device is not None and stacked.device != torch.device(device):
        stacked = stacked.to(device)
    return stacked.view(stacked.shape[0], len(pairs), len(parts), *stacked.shape[2:])


@functools.lru_cache(maxsize=None)
def _check_kind(kind: type) -> None:
    for bad, why in (("Quantized", "quantized K/V cannot be read faithfully; use a DynamicCache"),
                     ("LinearAttention", "recurrent state is not a KV cache")):
        if bad in kind.__name__:
            raise UnreadableCache(f"a {kind.__name__} layer: {why}")


def forward_takes(model) -> frozenset[str]:
    """The keyword names ``model``'s forward accepts (a PEFT wrapper looked through to its base model); looked up
    once per model class, since the decode loop asks every token."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _parameters(type(base))


@functools.lru_cache(maxsize=None)
def _parameters(cls) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_argument(model, cache) -> dict:
    """The keyword that hands ``cache`` to ``model``'s forward: ``cache`` in transformers 5.x (``past_key_values``
    is deprecated there), ``past_key_values`` before."""
    return {"cache": cache} if "cache" in forward_takes(model) else {"past_key_values": cache}
