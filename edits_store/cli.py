"""``sensepack packs ...``: operate the pack store from a shell or a script.

Mounted by ``serve.cli`` with ``main.add_command(packs)``; also runnable as ``python -m edits_store.cli``.
Every command takes ``--json`` (machine-readable output on stdout, errors included:
``{"ok": false, "error": ..., "check": ..., "detail": ...}``). Exit codes: 0 ok; 1 validation failure or
refused operation (any PackError: corrupt, unsigned or incompatible pack, not found, retention, storage
error such as a full disk or a read-only store); 2 usage error (bad options, a malformed reference or alias).
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
from .errors import AliasError, InvalidReferenceError, PackError, PackNotFoundError
from .format import Expectations, describe, read_pack
from .references import check_alias_name, parse_pack_reference
from .store import PackStore, open_store

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _emit(ctx: click.Context, payload: Any, text: str) -> None:
    if ctx.obj.get("json"):
        click.echo(json.dumps(payload, indent=2, sort_keys=True))
    else:
        click.echo(text)


def _usage_payload(exc: click.ClickException) -> dict[str, Any]:
    return {
        "ok": False,
        "error": "UsageError",
        "pack": None,
        "file": None,
        "check": "usage",
        "detail": exc.format_message(),
        "status": "INVALID_ARGUMENT",
    }


def _command(fn: Callable[..., None]) -> Callable[..., None]:
    """Shared options and error mapping: ``--json``; PackError → exit 1 (2 for malformed references/aliases);
    an OSError outside the store's own handling (e.g. reading a --dir folder) → exit 1, typed."""

    def wrapper(ctx: click.Context, /, *args: Any, as_json: bool = False, **kwargs: Any) -> None:
        ctx.ensure_object(dict)
        ctx.obj["json"] = ctx.obj.get("json") or as_json
        try:
            fn(ctx, *args, **kwargs)
        except InvalidReferenceError as exc:
            raise click.UsageError(str(exc), ctx=ctx) from None
        except PackError as exc:
            _fail(ctx, exc.to_dict(), str(exc))
        except OSError as exc:
            _fail(
                ctx,
                {
                    "error": type(exc).__name__,
                    "pack": None,
                    "file": exc.filename,
                    "check": "io",
                    "detail": exc.strerror or str(exc),
                    "status": "UNAVAILABLE",
                },
                f"{type(exc).__name__}: {exc}",
            )

    functools.update_wrapper(wrapper, fn)  # click takes the command's name and help from fn
    json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout (errors too).")
    return json_option(click.pass_context(wrapper))


def _fail(ctx: click.Context, payload: dict[str, Any], text: str, **extra: Any) -> None:
    if ctx.obj.get("json"):
        click.echo(json.dumps({"ok": False, **payload, **extra}, indent=2, sort_keys=True))
    else:
        click.echo(f"error: {text}", err=True)
    ctx.exit(EXIT_INVALID)


def _store(ctx: click.Context, create: bool = False) -> PackStore:
    """The store; a local one that does not exist is refused (a typo must not silently create an empty store),
    except for publish, which creates it."""
    url = ctx.obj.get("store")
    if not url:
        raise click.UsageError("no store given: pass --store URL or set SENSEPACK_STORE", ctx=ctx)
    if "store_obj" not in ctx.obj:
        ctx.obj["store_obj"] = open_store(url, create=create)
    store: PackStore = ctx.obj["store_obj"]
    return store


class _PacksGroup(click.Group):
    """A group whose usage errors are JSON too when ``--json`` is anywhere on the command line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["packs_json"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.ClickException as exc:
            if not ctx.meta.get("packs_json"):
                raise
            click.echo(json.dumps(_usage_payload(exc), indent=2, sort_keys=True))
            ctx.exit(exc.exit_code)

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:  # errors in the group's own options, before invoke
            if "--json" in argv:
                click.echo(json.dumps(_usage_payload(exc), indent=2, sort_keys=True))
            else:
                exc.show()
            code = exc.exit_code
        except click.Abort:
            click.echo("Aborted!", err=True)
            code = 1
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(name="packs", cls=_PacksGroup)
@click.option(
    "--store",
    envvar="SENSEPACK_STORE",
    metavar="URL",
    help="Pack store: a directory, file:///dir or s3://bucket/prefix (env SENSEPACK_STORE).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout (also per command).")
@click.option("-v", "--verbose", is_flag=True, help="Log store operations (key=value lines on stderr).")
@click.pass_context
def packs(ctx: click.Context, store: str | None, as_json: bool, verbose: bool) -> None:
    """Edit packs: list, show, verify, publish, alias, history, rm, diff, gc, keygen."""
    ctx.ensure_object(dict)
    if not logging.getLogger().handlers:  # the host CLI may have configured logging already
        logging.basicConfig(
            level=logging.INFO if verbose else logging.ERROR,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
    ctx.obj.update(store=store, json=as_json)


@packs.command("list")
@click.argument("name", required=False)
@_command
def list_cmd(ctx: click.Context, name: str | None) -> None:
    """List packs, or the versions of NAME (oldest first, by publish sequence number) with their aliases."""
    if name is not None and parse_pack_reference(name).selector is not None:
        raise click.UsageError(f"list takes a bare pack NAME, not {name!r}; use show or alias for a reference", ctx=ctx)
    store = _store(ctx)
    if name is None:
        rows: list[dict[str, Any]] = []
        for pack_name in store.list_packs():
            rows.append(
                {
                    "name": pack_name,
                    "versions": len(store.list_versions(pack_name)),
                    "aliases": store.aliases(pack_name),
                }
            )
        text = (
            "\n".join(
                f"{r['name']}\t{r['versions']} version(s)\t" + " ".join(f"{a}={v}" for a, v in r["aliases"].items())
                for r in rows
            )
            or "(no packs)"
        )
        _emit(ctx, {"packs": rows}, text)
        return
    if parse_pack_reference(name).selector is not None:
        raise click.UsageError(f"list takes a bare pack NAME, not {name!r}; use show or alias for a reference", ctx=ctx)
    infos = store.list_versions(name)
    if not infos and not store.aliases(name):
        raise PackNotFoundError("no such pack in the store", pack=name, check="exists")
    text = "\n".join(f"{i.seq}\t{i.version}\t{i.published_at}\t{','.join(i.aliases)}" for i in infos)
    text = text or f"(no versions of {name})"
    _emit(ctx, {"name": name, "versions": [i.to_dict() for i in infos]}, text)


@packs.command("show")
@click.argument("ref")
@_command
def show_cmd(ctx: click.Context, ref: str) -> None:
    """Show the manifest of REF (name, name@version, name@alias); validates it on the way."""
    parse_pack_reference(ref)  # a usage error before the store is touched
    pack = _store(ctx).load(ref)
    info = describe(pack)
    _emit(ctx, info, json.dumps(info, indent=2, sort_keys=True))


def _expectations(
    backpack_fingerprint: str | None,
    tokenizer_fingerprint: str | None,
    vocab_size: int | None,
    num_senses: int | None,
    d_model: int | None,
    target: str | None,
    allow_incompatible: bool,
) -> Expectations:
    return Expectations(
        backpack_fingerprint=backpack_fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint,
        vocab_size=vocab_size,
        num_senses=num_senses,
        d_model=d_model,
        target_fingerprint=target,
        allow_incompatible=allow_incompatible,
    )


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
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    metavar="KEY",
    help="Require a signature by this ed25519 public key (PEM file or ed25519:<hex>); repeatable.",
)
@_command
def verify_cmd(
    ctx: click.Context,
    refs: tuple[str, ...],
    folders: tuple[str, ...],
    verify_all: bool,
    trusted_keys: tuple[str, ...],
    **expect_opts: Any,
) -> None:
    """Fully validate packs (hashes, tensors, ids, signatures, fingerprints, beta). Exit 1 if any fails."""
    expect = _expectations(**expect_opts)
    if trusted_keys:
        from .signing import public_raw

        expect.trusted_keys = tuple(public_raw(k) for k in trusted_keys)
    if not (refs or folders or verify_all):
        raise click.UsageError("give one or more REFs, --dir FOLDER or --all", ctx=ctx)
    targets: list[tuple[str, Callable[[], Any]]] = []
    for ref in refs:
        parse_pack_reference(ref)
    if refs or verify_all:
        store = _store(ctx)
        for ref in refs:
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
            results.append(
                {"ref": label, "ok": True, "version": pack.version, "n_senses_edited": pack.manifest.n_senses_edited}
            )
        except InvalidReferenceError:
            raise
        except PackError as exc:
            failed += 1
            results.append({"ref": label, "ok": False, **exc.to_dict()})
    text = "\n".join(
        f"OK   {r['ref']} ({r['version']}, {r['n_senses_edited']} pairs)"
        if r["ok"]
        else f"FAIL {r['ref']}: {r['error']}: file {r['file']}, check {r['check']}: {r['detail']}"
        for r in results
    )
    _emit(ctx, {"ok": failed == 0, "results": results}, text)
    if failed:
        ctx.exit(EXIT_INVALID)


@packs.command("publish")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--alias", "aliases", multiple=True, help="Also point this alias at the published version.")
@click.option(
    "--sign-key",
    type=click.Path(dir_okay=False),
    help="Sign the version with this ed25519 private key (PEM, from `packs keygen`).",
)
@_command
def publish_cmd(ctx: click.Context, folder: str, aliases: tuple[str, ...], sign_key: str | None) -> None:
    """Validate the pack in FOLDER and publish it (a no-op if that content is already published).

    Every --alias is checked before anything is written; if moving one fails anyway, the JSON error says which
    aliases were already moved."""
    for alias in aliases:  # all or nothing for what can be known up front
        try:
            check_alias_name("-", alias)
        except AliasError as exc:
            raise click.UsageError(f"--alias {alias!r}: {exc.detail}", ctx=ctx) from None
    key = None
    if sign_key:
        from .signing import load_private_key

        with open(sign_key, "rb") as f:
            key = load_private_key(f.read(65536))
    store = _store(ctx, create=True)
    pack = read_pack(folder)
    version = store.publish(pack, signing_key=key)
    moved: list[str] = []
    for alias in aliases:
        try:
            store.set_alias(pack.name, alias, version)
        except PackError as exc:
            _fail(
                ctx,
                exc.to_dict(),
                f"{exc} (published {pack.name}@{version}; aliases moved: {moved or 'none'})",
                name=pack.name,
                version=version,
                published=True,
                aliases_moved=moved,
            )
        moved.append(alias)
    _emit(
        ctx,
        {"ok": True, "name": pack.name, "version": version, "aliases": list(aliases), "signed": key is not None},
        f"published {pack.name}@{version}"
        + (f" aliases: {', '.join(aliases)}" if aliases else "")
        + (" (signed)" if key is not None else ""),
    )


@packs.command("alias")
@click.argument("name")
@click.argument("alias")
@click.argument("target", required=False)
@click.option("--delete", is_flag=True, help="Remove the alias.")
@_command
def alias_cmd(ctx: click.Context, name: str, alias: str, target: str | None, delete: bool) -> None:
    """Show, set or remove NAME@ALIAS. TARGET is a version, another alias (promote canary to prod) or 'latest'."""
    parse_pack_reference(name)
    if "@" in name:
        raise click.UsageError("NAME must be a bare pack name", ctx=ctx)
    try:
        check_alias_name(name, alias)
    except AliasError as exc:
        raise click.UsageError(exc.detail, ctx=ctx) from None
    if target is not None:
        parse_pack_reference(f"{name}@{target}")
    store = _store(ctx)
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
    _, version = store.resolve(f"{name}@{target}")
    doc = store.set_alias(name, alias, version)
    previous = doc["previous"]
    _emit(
        ctx,
        {"ok": True, "name": name, "alias": alias, "version": version, "previous": previous, "seq": doc["seq"]},
        f"{name}@{alias} -> {version}" + (f" (was {previous})" if previous else ""),
    )


@packs.command("history")
@click.argument("name")
@click.option("--alias", help="Only this alias.")
@_command
def history_cmd(ctx: click.Context, name: str, alias: str | None) -> None:
    """Alias moves of NAME, oldest first: seq, when, who, from → to (append-only)."""
    if parse_pack_reference(name).selector is not None:
        raise click.UsageError("history takes a bare pack NAME", ctx=ctx)
    store = _store(ctx)
    rows = store.history(name, alias)
    if not rows and not store.list_versions(name):
        raise PackNotFoundError("no such pack in the store", pack=name, check="exists")
    text = (
        "\n".join(
            f"{r['alias']}\t#{r['seq']}\t{r['at']}\t{r['by']}\t{r['from'] or '-'} -> {r['to'] or '(removed)'}"
            for r in rows
        )
        or f"(no alias moves for {name})"
    )
    _emit(ctx, {"name": name, "history": rows}, text)


@packs.command("rm")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Delete even if aliases point to it (they are removed too).")
@click.option(
    "--keep", type=click.IntRange(min=0), help="With a bare NAME: delete all but the newest KEEP un-aliased versions."
)
@_command
def rm_cmd(ctx: click.Context, ref: str, force: bool, keep: int | None) -> None:
    """Delete one version (NAME@VERSION or NAME@ALIAS), or prune NAME with --keep."""
    parsed = parse_pack_reference(ref)
    name, selector = parsed.name, parsed.selector
    store = _store(ctx)
    if keep is not None:
        if selector is not None:
            raise click.UsageError("--keep takes a bare pack NAME", ctx=ctx)
        deleted = store.prune(name, keep)
        _emit(
            ctx,
            {"ok": True, "name": name, "deleted": deleted},
            "\n".join(f"deleted {name}@{v}" for v in deleted) or "nothing to delete",
        )
        return
    if selector is None:
        raise click.UsageError("rm needs NAME@VERSION or NAME@ALIAS (or NAME --keep N)", ctx=ctx)
    _, version = store.resolve(ref)
    store.delete_version(name, version, force=force)
    _emit(ctx, {"ok": True, "name": name, "version": version, "deleted": True}, f"deleted {name}@{version}")


@packs.command("diff")
@click.argument("ref_a")
@click.argument("ref_b")
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Show at most this many pairs per list (counts are always complete).",
)
@click.option(
    "--atol",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="A pair counts as changed when ||delta_b - delta_a|| exceeds this.",
)
@_command
def diff_cmd(ctx: click.Context, ref_a: str, ref_b: str, top: int, atol: float) -> None:
    """Which (token, sense) pairs REF_B adds, removes or changes relative to REF_A, and by how much."""
    parse_pack_reference(ref_a), parse_pack_reference(ref_b)
    store = _store(ctx)
    result = diff_packs(store.load(ref_a), store.load(ref_b), atol=atol)
    payload = result.to_dict(top=top)
    lines = [
        f"{result.a} -> {result.b}: {len(result.added)} added, {len(result.removed)} removed, "
        f"{len(result.changed)} changed, {result.unchanged} unchanged"
    ]
    for kind, items in (("+", result.added), ("-", result.removed), ("~", result.changed)):
        for c in items[:top]:
            lines.append(
                f"{kind} token {c.token} sense {c.sense}: |a|={c.norm_a:.4g} |b|={c.norm_b:.4g} "
                f"|b-a|={c.diff_norm:.4g} max|b-a|={c.max_abs_diff:.4g}"
            )
    _emit(ctx, payload, "\n".join(lines))


@packs.command("gc")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0.0),
    default=3600.0,
    show_default=True,
    help="Seconds; leftovers younger than this may belong to a running publisher.",
)
@_command
def gc_cmd(ctx: click.Context, older_than: float) -> None:
    """Remove invisible leftovers of killed publishers (staging dirs, uncommitted objects)."""
    removed = _store(ctx).gc(older_than)
    _emit(ctx, {"ok": True, "removed": removed}, f"removed {len(removed)} leftover(s)")


@packs.command("keygen")
@click.argument("private_out", type=click.Path(dir_okay=False))
@_command
def keygen_cmd(ctx: click.Context, private_out: str) -> None:
    """Write a new ed25519 signing key to PRIVATE_OUT (mode 0600) and its public key to PRIVATE_OUT.pub."""
    import os

    from .signing import generate_key, key_id, public_raw

    private, public = generate_key()
    fd = os.open(private_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    with open(private_out + ".pub", "xb") as f:
        f.write(public)
    raw = public_raw(public)
    _emit(
        ctx,
        {
            "ok": True,
            "private": private_out,
            "public": private_out + ".pub",
            "key_id": key_id(raw),
            "public_key": "ed25519:" + raw.hex(),
        },
        f"wrote {private_out} and {private_out}.pub (key id {key_id(raw)}; trust it as ed25519:{raw.hex()})",
    )


def main() -> None:
    packs(prog_name="python -m edits_store.cli")


if __name__ == "__main__":
    main()
