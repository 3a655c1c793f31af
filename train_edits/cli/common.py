"""What every `train_edits` command shares: one mapping from errors to exit codes."""

from __future__ import annotations

import functools
import sys

import click

from sensepack_common.errors import ConfigError

from ..tasks import DataError


def guard(fn):
    """Map errors to exit codes: usage (ConfigError, which bad training options also are) -> 2,
    data/runtime -> 1."""

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except (DataError, FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return inner
