"""`train_edits build NAME`: build a named artefact by its recipe (train_edits.recipes).

ensemble.zoo runs this on first use of a name (`backpack-smollm2`, `capitals-smollm2`) and caches the
folder; run it by hand to rebuild into a folder of your choice.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("build")
@click.argument("name")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    required=True,
    help="output folder (must be empty or absent); ensemble.zoo passes a temporary folder it then caches",
)
@click.option("--no-progress", is_flag=True, help="no progress bars")
def build(name: str, out: str, no_progress: bool) -> None:
    """Build NAME (backpack-smollm2, sense-smollm2, capitals-smollm2) by its recipe into --out."""
    from ..recipes import RECIPES
    from ..recipes import build as build_recipe

    if name not in RECIPES:
        raise click.BadParameter(f"{name!r}: unknown recipe (known: {', '.join(sorted(RECIPES))})", param_hint="NAME")
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise click.BadParameter(f"{out}: not empty", param_hint="--out")
    try:
        build_recipe(name, folder, progress=not no_progress)
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as exc:
        click.echo(f"error: {name}: {exc}", err=True)
        sys.exit(1)
    click.echo(str(folder))


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="folder for report.json / report.md")
@click.option("--stem", default="report", show_default=True, help="file name stem")
def report(run_dirs: tuple[str, ...], out: str, stem: str) -> None:
    """Merge the report.json of several runs (one per task) into one Table 3 / Table 4."""
    import json

    from ..report import write_reports

    reports = []
    for d in run_dirs:
        p = Path(d) / "report.json"
        if not p.is_file():
            raise click.BadParameter(f"{p}: missing; run `train_edits eval --run-dir {d}` first", param_hint="RUN_DIRS")
        data = json.loads(p.read_text())
        reports += data if isinstance(data, list) else [data]
    js, md = write_reports(reports, out, stem)
    click.echo(json.dumps({"json": str(js), "markdown": str(md), "tasks": [r["task"] for r in reports]}))
