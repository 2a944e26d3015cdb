"""Values against type annotations, for the spec dataclasses read from YAML, JSON cards and the command line: a
wrong type is named where it is read, not where it is first used (often mid-capture or mid-decode)."""

from __future__ import annotations

import types
import typing
from dataclasses import fields


def matches(value, hint) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (unions, None, bool apart from int, lists and dicts by
    their items)."""
    if hint is typing.Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is int:
        return type(value) is int  # not a bool
    if hint is float:
        return type(value) in (int, float)
    if origin is list:
        return isinstance(value, list) and (not args or all(matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items()))
    return isinstance(value, origin or hint)


def describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (list, dict):
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def check_fields(obj, where: str) -> None:
    """Raise ValueError naming ``where.<field>`` unless every field of dataclass ``obj`` matches its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not matches(value, hints[f.name]):
            raise ValueError(f"{where}.{f.name} must be {describe(hints[f.name])}, not {value!r:.80}")
