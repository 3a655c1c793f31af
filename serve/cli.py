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
@click.option(
    "--profile",
    default=None,
    metavar="NAME",
    help="A shipped profile (serve/configs/NAME.yaml): smollm2 (real SmolLM2 + Backpack, built and cached "
    "on first use), demo (tiny random models, offline, instant), gptj.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="A server config file instead of --profile; its packs.preload[0] is the pack used.",
)
@click.option("--pack", "pack_ref", default=None, help="Pack reference (default: the profile's first preloaded pack).")
@click.option("--demo", is_flag=True, help="Same as --profile demo.")
@click.option("--max-new-tokens", default=12, show_default=True, type=click.IntRange(1, 512))
@click.option("--seed", default=0, show_default=True, type=int, help="demo profile: seed of the tiny random models.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object {prompt, pack, beta, base, edited}.")
def generate(
    prompt: str,
    profile: str | None,
    config_path: str | None,
    pack_ref: str | None,
    demo: bool,
    max_new_tokens: int,
    seed: int,
    as_json: bool,
) -> None:
    """Greedy base and edited continuations of PROMPT, side by side, without a server."""
    if demo:
        profile = profile or "demo"
    if profile and config_path:
        raise click.UsageError("give --profile or --config, not both")
    if not profile and not config_path:
        raise click.UsageError("give --profile NAME (smollm2, demo, gptj), --demo or --config FILE")
    if profile == "demo":
        from ensemble.demo import run_demo

        result = run_demo(prompt, max_new_tokens=max_new_tokens, seed=seed)
    else:
        from sensepack_common.errors import ConfigError
        from serve.models import ProfileError, generate_side_by_side, profile_config

        try:
            cfg = profile_config(profile, config_path)
            result = generate_side_by_side(cfg, prompt, max_new_tokens, pack_ref)
        except (ConfigError, ProfileError) as e:
            raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"prompt : {result['prompt']!r}")
    click.echo(f"pack   : {result['pack']}")
    click.echo(f"base   : {result['base']!r}")
    click.echo(f"edited : {result['edited']!r}")


@main.group()
def models() -> None:
    """Named models and stores (ensemble.zoo): fetched or built once, verified, cached."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_list(as_json: bool) -> None:
    """Every registry name, its kind, and whether it is cached."""
    from ensemble import zoo

    rows = [
        {
            "name": m.name,
            "kind": m.kind,
            "cached": zoo.is_cached(m.name),
            "folder": str(m.folder),
            "description": m.description,
        }
        for m in zoo.REGISTRY.values()
    ]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        click.echo(f"{r['name']:<24} {r['kind']:<9} {'cached' if r['cached'] else '-':<7} {r['description']}")


@models.command("fetch")
@click.argument("names", nargs=-1, required=True)
def models_fetch(names: tuple[str, ...]) -> None:
    """Fetch or build NAMES now (each is otherwise built on first use), then print their folders."""
    from ensemble import zoo

    for name in names:
        if not zoo.is_named(name):
            raise click.BadParameter(
                f"{name!r}: unknown (known: {', '.join(sorted(zoo.REGISTRY))})", param_hint="NAMES"
            )
    for name in names:
        try:
            click.echo(f"{name}\t{zoo.resolve(name)}")
        except zoo.ZooError as e:
            raise click.ClickException(str(e)) from None


# `serve`, `client ...` (serve/serve_cli.py) and the store's `packs` group (edits_store.cli, when present).
from serve.serve_cli import register as _register_serving  # noqa: E402

_register_serving(main)


if __name__ == "__main__":
    sys.exit(main())
