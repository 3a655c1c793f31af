"""`sensepack serve` and `sensepack client ...` (mounted on serve.cli:main)."""

from __future__ import annotations

import json
import signal
import sys
import threading

import click
import grpc
import yaml

from sensepack_proto import pb


@click.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config (default: serve/configs/demo.yaml; every field: serve/configs/example.yaml).",
)
@click.option("--port", type=int, default=None, help="Override server.port.")
@click.option("--http-port", type=int, default=None, help="Override http.port (and set http.enabled).")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set limits.max_running=8 (value parsed as YAML).",
)
@click.option("--check", is_flag=True, help="Validate the config, print it and exit.")
def serve_cmd(config_path, port, http_port, sets, check):
    """Run the gRPC server, and the OpenAI-compatible HTTP API when http.enabled (demo profile by default:
    offline, tiny models)."""
    from sensepack_common.errors import ConfigError
    from serve.config import load_config

    overrides = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--set")
        overrides[key] = yaml.safe_load(value)
    if port is not None:
        overrides["server.port"] = port
    if http_port is not None:
        overrides["http.port"] = http_port
        overrides["http.enabled"] = True
    if config_path is None:
        from serve.config import CONFIG_DIR

        config_path = CONFIG_DIR / "demo.yaml"
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    if check:
        click.echo(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
        return
    from sensepack_common.logs import setup_logging
    from serve.server import SensepackServer

    setup_logging(cfg.logging.level, cfg.logging.json_logs)
    server = SensepackServer(cfg).start()
    click.echo(
        f"sensepack serving on {cfg.server.host}:{server.port}"
        + (f", OpenAI-compatible HTTP on http://{cfg.http.host}:{server.http_port}/v1" if server.http_port else "")
        + (
            f", metrics on http://{cfg.server.metrics_host}:{server.metrics_port}/metrics"
            if server.metrics_port
            else ""
        ),
        err=True,
    )
    done = threading.Event()

    def _stop(signum, frame):
        if not done.is_set():
            done.set()
            threading.Thread(target=server.stop, name="sensepack-shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.wait()
    if server.exit_code:  # the engine died (e.g. vLLM's engine core): let the orchestrator restart us
        raise SystemExit(server.exit_code)


def _client(ctx):
    from serve.client import Client

    o = ctx.obj
    return Client(o["target"], token=o["token"], ca_file=o["ca"], timeout=o["timeout"], api_key=o["api_key"])


def _rpc_error(e: grpc.RpcError) -> click.ClickException:
    """The server's status as a CLI error (exit 1, no traceback); anything else is a bug and propagates."""
    return click.ClickException(f"{e.code().name}: {e.details()}")


def _dump(msg, as_json: bool):
    from google.protobuf.json_format import MessageToDict

    if as_json:
        click.echo(json.dumps(MessageToDict(msg, preserving_proto_field_name=True)))
    else:
        click.echo(str(msg).rstrip())


@click.group("client")
@click.option("--target", default="127.0.0.1:50051", show_default=True, help="host:port of the server.")
@click.option(
    "--token", envvar="SENSEPACK_ADMIN_TOKEN", default=None, help="Admin bearer token (or $SENSEPACK_ADMIN_TOKEN)."
)
@click.option(
    "--api-key",
    envvar="SENSEPACK_API_KEY",
    default=None,
    help="Generation API key when the server sets api.keys (or $SENSEPACK_API_KEY).",
)
@click.option("--ca", type=click.Path(dir_okay=False), default=None, help="CA certificate for TLS.")
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.pass_context
def client_group(ctx, target, token, api_key, ca, timeout):
    """Talk to a running server."""
    ctx.obj = {"target": target, "token": token, "api_key": api_key, "ca": ca, "timeout": timeout}


def _gen_options(f):
    opts = [
        click.argument("prompt"),
        click.option(
            "--pack",
            "packs",
            multiple=True,
            help="name, name@version or name@alias (repeatable); name=BETA to override beta",
        ),
        click.option("--base-only", is_flag=True),
        click.option("--max-new-tokens", type=int, default=0),
        click.option("--min-new-tokens", type=int, default=0),
        click.option("--sample", is_flag=True, help="Sample instead of greedy."),
        click.option("--temperature", type=float, default=0.0),
        click.option("--top-k", type=int, default=0),
        click.option("--top-p", type=float, default=0.0),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="Stop sequence (repeatable)."),
        click.option("--logprobs", is_flag=True),
        click.option("--top-n", type=int, default=0),
        click.option("--json", "as_json", is_flag=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _pack_args(packs):
    out = []
    for p in packs:
        ref, eq, beta = p.partition("=")
        out.append((ref, float(beta)) if eq else ref)
    return out


def _gen_kwargs(kw):
    return dict(
        packs=_pack_args(kw["packs"]),
        base_only=kw["base_only"],
        max_new_tokens=kw["max_new_tokens"],
        min_new_tokens=kw["min_new_tokens"],
        greedy=not kw["sample"],
        temperature=kw["temperature"],
        top_k=kw["top_k"],
        top_p=kw["top_p"],
        seed=kw["seed"],
        stop=kw["stop"],
        tokens=kw["logprobs"] or kw["top_n"] > 0,
        logprobs=kw["logprobs"],
        top_n=kw["top_n"],
    )


@client_group.command("generate")
@_gen_options
@click.pass_context
def client_generate(ctx, prompt, **kw):
    """Generate a completion."""
    try:
        r = _client(ctx).generate(prompt, **_gen_kwargs(kw))
    except grpc.RpcError as e:
        raise _rpc_error(e) from None
    if kw["as_json"] or kw["logprobs"] or kw["top_n"]:
        _dump(r, kw["as_json"])
    else:
        used = ", ".join(f"{p.name}@{p.version} (beta={p.beta:g}, arm={p.arm})" for p in r.packs) or "base"
        stop = r.stop_reason and pb.StopReason.Name(r.stop_reason)
        click.echo(f"{prompt}{r.text}")
        click.echo(f"[{r.generated_token_count} tokens, stop={stop}, packs: {used}]", err=True)


@client_group.command("stream")
@_gen_options
@click.pass_context
def client_stream(ctx, prompt, **kw):
    """Stream a completion token by token."""
    try:
        for m in _client(ctx).stream(prompt, **_gen_kwargs(kw)):
            if kw["as_json"]:
                _dump(m, True)
            else:
                click.echo(m.text, nl=False)
                sys.stdout.flush()
    except grpc.RpcError as e:
        raise _rpc_error(e) from None
    if not kw["as_json"]:
        click.echo()


@client_group.command("score")
@click.argument("prefix")
@click.argument("continuations", nargs=-1, required=True)
@click.option("--pack", "packs", multiple=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def client_score(ctx, prefix, continuations, packs, as_json):
    """Log-likelihood of CONTINUATIONS after PREFIX (base and packs)."""
    try:
        r = _client(ctx).score(prefix, list(continuations), packs=_pack_args(packs))
    except grpc.RpcError as e:
        raise _rpc_error(e) from None
    if as_json:
        return _dump(r, True)
    for text, c in zip(continuations, r.continuations, strict=True):
        line = f"{text!r}: base {c.base.total_logprob:.4f}"
        if c.packed.token_logprobs:
            line += f"  packs {c.packed.total_logprob:.4f}"
        click.echo(line)


@client_group.command("tokenize")
@click.argument("text")
@click.pass_context
def client_tokenize(ctx, text):
    try:
        _dump(_client(ctx).tokenize(text), True)
    except grpc.RpcError as e:
        raise _rpc_error(e) from None


@client_group.command("info")
@click.pass_context
def client_info(ctx):
    """Models, fingerprints, vocabulary, limits, active packs."""
    try:
        _dump(_client(ctx).model_info(), True)
    except grpc.RpcError as e:
        raise _rpc_error(e) from None


@client_group.group("packs")
def client_packs():
    """Pack administration (needs the admin token)."""


@client_packs.command("list")
@click.pass_context
def packs_list(ctx):
    try:
        _dump(_client(ctx).list_packs(True), True)
    except grpc.RpcError as e:
        raise _rpc_error(e) from None


@client_packs.command("load")
@click.argument("ref")
@click.option("--no-activate", is_flag=True, help="Load (and gate) only; do not route requests to it.")
@click.pass_context
def packs_load(ctx, ref, no_activate):
    try:
        _dump(_client(ctx).load_pack(ref, activate=not no_activate), True)
    except grpc.RpcError as e:
        raise _rpc_error(e) from None


@client_packs.command("alias")
@click.argument("name")
@click.argument("alias")
@click.argument("version")
@click.pass_context
def packs_alias(ctx, name, alias, version):
    """Move NAME@ALIAS to VERSION (hot swap)."""
    try:
        _dump(_client(ctx).set_alias(name, alias, version), True)
    except grpc.RpcError as e:
        raise _rpc_error(e) from None


@client_packs.command("unload")
@click.argument("ref")
@click.pass_context
def packs_unload(ctx, ref):
    try:
        _dump(_client(ctx).unload_pack(ref), True)
    except grpc.RpcError as e:
        raise _rpc_error(e) from None


@client_packs.command("ab")
@click.argument("name", default="")
@click.pass_context
def packs_ab(ctx, name):
    """Gate and live A/B ball ratios."""
    try:
        _dump(_client(ctx).ab_report(name), True)
    except grpc.RpcError as e:
        raise _rpc_error(e) from None


def register(main: click.Group) -> None:
    main.add_command(serve_cmd)
    main.add_command(client_group)
    from edits_store.cli import packs

    main.add_command(packs)
