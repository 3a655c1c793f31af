"""Strict JSON: duplicate keys, non-finite numbers and nesting past MAX_JSON_DEPTH are refused, not
silently collapsed.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

log = logging.getLogger("edits_store.format")

MAX_JSON_DEPTH = 32


class _JSONRefusal(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _JSONRefusal(f"non-finite number {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JSONRefusal(f"number {text} overflows to {value}")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JSONRefusal(f"duplicate key {key!r}")
        out[key] = value
    return out


def _json_depth(obj: Any) -> int:
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, level)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return depth


def strict_json_loads(data: bytes | bytearray | memoryview) -> Any:
    """json.loads that refuses what would make two different files mean one value: NaN/Infinity, numbers that
    overflow to inf, duplicate keys; and nesting deeper than MAX_JSON_DEPTH. Raises ValueError with the reason."""
    try:
        text = bytes(data).decode("utf-8")
        obj = json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
    except RecursionError:
        raise ValueError(f"nesting deeper than {MAX_JSON_DEPTH}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc})") from None
    except _JSONRefusal as exc:
        raise ValueError(str(exc)) from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise ValueError(f"not valid JSON ({exc})") from None
    if _json_depth(obj) > MAX_JSON_DEPTH:
        raise ValueError(f"nesting deeper than {MAX_JSON_DEPTH}")
    return obj
