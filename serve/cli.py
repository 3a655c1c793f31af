"""The `sensepack` command line."""

from __future__ import annotations

import json
import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """sensepack: serve a large LM steered by Backpack sense-edit packs."""


@main.command()
@click.argument("prompt", default="The capital of Mauritius is")
@click.option("--demo", is_flag=True, help="Use tiny random models (real architectures, real tokenizer); no download.")
@click.option("--max-new-tokens", default=12, show_default=True, type=click.IntRange(1, 512))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def generate(prompt: str, demo: bool, max_new_tokens: int, seed: int, as_json: bool) -> None:
    """Greedy base and edited continuations of PROMPT, side by side."""
    if not demo:
        raise click.UsageError("only --demo is available here; run `sensepack serve` for real models")
    from ensemble.demo import run_demo

    result = run_demo(prompt, max_new_tokens=max_new_tokens, seed=seed)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"prompt : {result['prompt']!r}")
    click.echo(f"pack   : {result['pack']}")
    click.echo(f"base   : {result['base']!r}")
    click.echo(f"edited : {result['edited']!r}")


# `serve`, `client ...` (serve/serve_cli.py) and the store's `packs` group (edits_store.cli, when present).
from serve.serve_cli import register as _register_serving  # noqa: E402

_register_serving(main)


if __name__ == "__main__":
    sys.exit(main())
