"""``sensepack packs ...``: operate the pack store from a shell or a script.

Mounted by ``serve.cli`` with ``main.add_command(packs)``; also runnable as ``python -m edits_store.cli``.
Every command takes ``--json`` (machine-readable output on stdout). Exit codes: 0 ok, 1 validation failure or
refused operation (any PackError: corrupt or incompatible pack, not found, retention), 2 usage error
(bad options or a malformed reference).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from .diff import diff_packs
from .errors import InvalidReferenceError, PackError
from .format import Expectations, describe, read_pack
from .store import PackStore, open_store, parse_ref

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _emit(ctx: click.Context, payload: Any, text: str) -> None:
    if ctx.obj.get("json"):
        click.echo(json.dumps(payload, indent=2, sort_keys=True))
    else:
        click.echo(text)


def _command(fn: Callable) -> Callable:
    """Shared options and error mapping: ``--json``; PackError → exit 1 (2 for malformed references)."""

    @click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
    @click.pass_context
    @functools.wraps(fn)
    def wrapper(ctx: click.Context, *args: Any, as_json: bool = False, **kwargs: Any) -> None:
        ctx.ensure_object(dict)
        ctx.obj["json"] = ctx.obj.get("json") or as_json
        try:
            fn(ctx, *args, **kwargs)
        except InvalidReferenceError as exc:
            raise click.UsageError(str(exc), ctx=ctx) from None
        except PackError as exc:
            if ctx.obj["json"]:
                click.echo(json.dumps({"ok": False, **exc.to_dict()}, indent=2, sort_keys=True))
            else:
                click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_INVALID)

    return wrapper


def _store(ctx: click.Context) -> PackStore:
    url = ctx.obj.get("store")
    if not url:
        raise click.UsageError("no store given: pass --store URL or set SENSEPACK_STORE", ctx=ctx)
    if "store_obj" not in ctx.obj:
        ctx.obj["store_obj"] = open_store(url)
    return ctx.obj["store_obj"]


@click.group(name="packs")
@click.option("--store", envvar="SENSEPACK_STORE", metavar="URL",
              help="Pack store: a directory, file:///dir or s3://bucket/prefix (env SENSEPACK_STORE).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout (also per command).")
@click.option("-v", "--verbose", is_flag=True, help="Log store operations (key=value lines on stderr).")
@click.pass_context
def packs(ctx: click.Context, store: str | None, as_json: bool, verbose: bool) -> None:
    """Edit packs: list, show, verify, publish, alias, rm, diff."""
    ctx.ensure_object(dict)
    if not logging.getLogger().handlers:  # the host CLI may have configured logging already
        logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ctx.obj.update(store=store, json=as_json)


@packs.command("list")
@click.argument("name", required=False)
@_command
def list_cmd(ctx: click.Context, name: str | None) -> None:
    """List packs, or the versions of NAME (oldest first) with their aliases."""
    store = _store(ctx)
    if name is None:
        rows = []
        for pack_name in store.list_packs():
            rows.append({"name": pack_name, "versions": len(store.list_versions(pack_name)),
                         "aliases": store.aliases(pack_name)})
        text = "\n".join(f"{r['name']}\t{r['versions']} version(s)\t"
                         + " ".join(f"{a}={v}" for a, v in r["aliases"].items()) for r in rows) or "(no packs)"
        _emit(ctx, {"packs": rows}, text)
        return
    parse_ref(name)
    infos = store.list_versions(name)
    text = "\n".join(f"{i.version}\t{i.published_at}\t{','.join(i.aliases)}" for i in infos)
    text = text or f"(no versions of {name})"
    _emit(ctx, {"name": name, "versions": [i.to_dict() for i in infos]}, text)


@packs.command("show")
@click.argument("ref")
@_command
def show_cmd(ctx: click.Context, ref: str) -> None:
    """Show the manifest of REF (name, name@version, name@alias); validates it on the way."""
    pack = _store(ctx).load(ref)
    info = describe(pack)
    _emit(ctx, info, json.dumps(info, indent=2, sort_keys=True))


def _expectations(backpack_fingerprint: str | None, tokenizer_fingerprint: str | None, vocab_size: int | None,
                  num_senses: int | None, d_model: int | None, target: str | None,
                  allow_incompatible: bool) -> Expectations:
    return Expectations(backpack_fingerprint=backpack_fingerprint, tokenizer_fingerprint=tokenizer_fingerprint,
                        vocab_size=vocab_size, num_senses=num_senses, d_model=d_model, target_fingerprint=target,
                        allow_incompatible=allow_incompatible)


@packs.command("verify")
@click.argument("refs", nargs=-1)
@click.option("--dir", "folders", multiple=True, type=click.Path(), help="Verify a pack folder outside the store.")
@click.option("--all", "verify_all", is_flag=True, help="Verify every version of every pack in the store.")
@click.option("--backpack-fingerprint", help="Refuse packs trained with another Backpack.")
@click.option("--tokenizer-fingerprint", help="Refuse packs trained with another tokenizer.")
@click.option("--vocab-size", type=int)
@click.option("--num-senses", type=int)
@click.option("--d-model", type=int)
@click.option("--target", help="Require a calibrated beta for this target-model fingerprint.")
@click.option("--allow-incompatible", is_flag=True, help="Accept Backpack/tokenizer fingerprint mismatches.")
@_command
def verify_cmd(ctx: click.Context, refs: tuple[str, ...], folders: tuple[str, ...], verify_all: bool,
               **expect_opts: Any) -> None:
    """Fully validate packs (hashes, tensors, ids, fingerprints, beta). Exit 1 if any fails."""
    expect = _expectations(**expect_opts)
    if not (refs or folders or verify_all):
        raise click.UsageError("give one or more REFs, --dir FOLDER or --all", ctx=ctx)
    targets: list[tuple[str, Callable[[], Any]]] = []
    if refs or verify_all:
        store = _store(ctx)
        for ref in refs:
            parse_ref(ref)
            targets.append((ref, functools.partial(store.load, ref, expect)))
        if verify_all:
            for name in store.list_packs():
                for info in store.list_versions(name):
                    ref = f"{name}@{info.version}"
                    targets.append((ref, functools.partial(store.load, ref, expect)))
    for folder in folders:
        targets.append((folder, functools.partial(read_pack, folder, expect=expect)))
    results, failed = [], 0
    for label, load in targets:
        try:
            pack = load()
            results.append({"ref": label, "ok": True, "version": pack.version, "n_senses_edited":
                            pack.manifest.n_senses_edited})
        except InvalidReferenceError:
            raise
        except PackError as exc:
            failed += 1
            results.append({"ref": label, "ok": False, **exc.to_dict()})
    text = "\n".join(f"OK   {r['ref']} ({r['version']}, {r['n_senses_edited']} pairs)" if r["ok"]
                     else f"FAIL {r['ref']}: {r['error']}: file {r['file']}, check {r['check']}: {r['detail']}"
                     for r in results)
    _emit(ctx, {"ok": failed == 0, "results": results}, text)
    if failed:
        ctx.exit(EXIT_INVALID)


@packs.command("publish")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--alias", "aliases", multiple=True, help="Also point this alias at the published version.")
@_command
def publish_cmd(ctx: click.Context, folder: str, aliases: tuple[str, ...]) -> None:
    """Validate the pack in FOLDER and publish it (a no-op if that content is already published)."""
    store = _store(ctx)
    pack = read_pack(folder)
    version = store.publish(pack)
    for alias in aliases:
        store.set_alias(pack.name, alias, version)
    _emit(ctx, {"ok": True, "name": pack.name, "version": version, "aliases": list(aliases)},
          f"published {pack.name}@{version}" + (f" aliases: {', '.join(aliases)}" if aliases else ""))


@packs.command("alias")
@click.argument("name")
@click.argument("alias")
@click.argument("target", required=False)
@click.option("--delete", is_flag=True, help="Remove the alias.")
@_command
def alias_cmd(ctx: click.Context, name: str, alias: str, target: str | None, delete: bool) -> None:
    """Show, set or remove NAME@ALIAS. TARGET is a version, another alias (promote canary to prod) or 'latest'."""
    store = _store(ctx)
    parse_ref(name)
    if "@" in name:
        raise click.UsageError("NAME must be a bare pack name", ctx=ctx)
    if delete:
        if target is not None:
            raise click.UsageError("--delete takes no TARGET", ctx=ctx)
        store.remove_alias(name, alias)
        _emit(ctx, {"ok": True, "name": name, "alias": alias, "removed": True}, f"removed {name}@{alias}")
        return
    if target is None:
        _, version = store.resolve(f"{name}@{alias}")
        _emit(ctx, {"name": name, "alias": alias, "version": version}, version)
        return
    previous = store.aliases(name).get(alias)
    _, version = store.resolve(f"{name}@{target}")
    store.set_alias(name, alias, version)
    _emit(ctx, {"ok": True, "name": name, "alias": alias, "version": version, "previous": previous},
          f"{name}@{alias} -> {version}" + (f" (was {previous})" if previous else ""))


@packs.command("rm")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Delete even if aliases point to it (they are removed too).")
@click.option("--keep", type=click.IntRange(min=0), help="With a bare NAME: delete all but the newest KEEP "
                                                          "un-aliased versions.")
@_command
def rm_cmd(ctx: click.Context, ref: str, force: bool, keep: int | None) -> None:
    """Delete one version (NAME@VERSION or NAME@ALIAS), or prune NAME with --keep."""
    store = _store(ctx)
    name, selector = parse_ref(ref)
    if keep is not None:
        if selector is not None:
            raise click.UsageError("--keep takes a bare pack NAME", ctx=ctx)
        deleted = store.prune(name, keep)
        _emit(ctx, {"ok": True, "name": name, "deleted": deleted}, "\n".join(f"deleted {name}@{v}" for v in deleted)
              or "nothing to delete")
        return
    if selector is None:
        raise click.UsageError("rm needs NAME@VERSION or NAME@ALIAS (or NAME --keep N)", ctx=ctx)
    _, version = store.resolve(ref)
    store.delete_version(name, version, force=force)
    _emit(ctx, {"ok": True, "name": name, "version": version, "deleted": True}, f"deleted {name}@{version}")


@packs.command("diff")
@click.argument("ref_a")
@click.argument("ref_b")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True,
              help="Show at most this many pairs per list (counts are always complete).")
@click.option("--atol", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="A pair counts as changed when ||delta_b - delta_a|| exceeds this.")
@_command
def diff_cmd(ctx: click.Context, ref_a: str, ref_b: str, top: int, atol: float) -> None:
    """Which (token, sense) pairs REF_B adds, removes or changes relative to REF_A, and by how much."""
    store = _store(ctx)
    result = diff_packs(store.load(ref_a), store.load(ref_b), atol=atol)
    payload = result.to_dict(top=top)
    lines = [f"{result.a} -> {result.b}: {len(result.added)} added, {len(result.removed)} removed, "
             f"{len(result.changed)} changed, {result.unchanged} unchanged"]
    for kind, items in (("+", result.added), ("-", result.removed), ("~", result.changed)):
        for c in items[:top]:
            lines.append(f"{kind} token {c.token} sense {c.sense}: |a|={c.norm_a:.4g} |b|={c.norm_b:.4g} "
                         f"|b-a|={c.diff_norm:.4g} max|b-a|={c.max_abs_diff:.4g}")
    _emit(ctx, payload, "\n".join(lines))


@packs.command("gc")
@click.option("--older-than", type=click.FloatRange(min=0.0), default=3600.0, show_default=True,
              help="Seconds; leftovers younger than this may belong to a running publisher.")
@_command
def gc_cmd(ctx: click.Context, older_than: float) -> None:
    """Remove invisible leftovers of killed publishers (staging dirs, uncommitted objects)."""
    removed = _store(ctx).gc(older_than)
    _emit(ctx, {"ok": True, "removed": removed}, f"removed {len(removed)} leftover(s)")


def main() -> None:
    packs(prog_name="python -m edits_store.cli")


if __name__ == "__main__":
    sys.exit(main())
