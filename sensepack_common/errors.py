"""The configuration error of every sensepack command and server: its message names each bad key."""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A config (file, options or API value) that fails validation; the message names each bad key, e.g.
    ``limits.max_waiting: Input should be greater than 0``. Commands map it to exit code 2."""


def describe_validation_error(err: ValidationError, source: str) -> str:
    """pydantic's errors as one line per bad key under a header naming where the config came from."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "(top level)"
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)
