"""Config validation, shipped configs, stub generation, and the CLI against a real server."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from click.testing import CliRunner

from sensepack_common.errors import ConfigError
from serve.config import CONFIG_DIR, Config, load_config, parse_config


def _leaves(model, prefix=""):
    out = set()
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        value = getattr(model, name)
        if hasattr(type(value), "model_fields"):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def _yaml_leaves(d, prefix=""):
    out = set()
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _yaml_leaves(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def test_example_config_documents_every_field_with_its_default():
    path = CONFIG_DIR / "example.yaml"
    data = yaml.safe_load(path.read_text())
    assert _yaml_leaves(data) == _leaves(Config())
    assert load_config(path) == Config()
    for line in path.read_text().splitlines():
        if re.match(r"^\s+\w+:\s*\S", line):  # every leaf line carries a comment
            assert "#" in line, line


@pytest.mark.parametrize("name", ["demo.yaml", "gptj.yaml", "example.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIG_DIR / name)
    assert cfg.model.profile == ("pretrained" if name == "gptj.yaml" else "demo")
    if name == "gptj.yaml":
        assert cfg.model.large_model == "EleutherAI/gpt-j-6b" and cfg.model.backpack == "stanfordnlp/backpack-gpt2"


@pytest.mark.parametrize(
    "data,key",
    [
        ({"limits": {"max_running": 0}}, "limits.max_running"),
        ({"limits": {"bogus": 1}}, "limits.bogus"),
        ({"nonsense": {}}, "nonsense"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"model": {"profile": "huge"}}, "model.profile"),
        ({"ab": {"traffic_share": 1.5}}, "ab.traffic_share"),
        ({"tls": {"cert_file": "/nonexistent.pem"}}, "tls"),
        ({"model": {"profile": "pretrained"}}, "store.uri"),
        ({"limits": {"default_max_new_tokens": 600, "max_new_tokens": 500}}, "limits.default_max_new_tokens"),
        ({"http": {"port": -3}}, "http.port"),
        ({"http": {"enabled": True, "port": 50051}}, "http.port"),
        ({"http": {"chat_template": "/nonexistent/template.jinja"}}, "http.chat_template"),
        ({"http": {"max_choices": 0}}, "http.max_choices"),
        ({"api": {"keys": [""]}}, "api.keys"),
    ],
)
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert key in str(ei.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("limits:\n  max_waiting: -1\n")
    with pytest.raises(ConfigError, match=r"limits\.max_waiting"):
        load_config(bad)


def test_serve_check_cli():
    from serve.cli import main

    r = CliRunner().invoke(main, ["serve", "--check", "--set", "limits.max_running=4", "--port", "6000"])
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load(r.output)
    assert cfg["limits"]["max_running"] == 4 and cfg["server"]["port"] == 6000
    assert cfg["model"]["profile"] == "demo"
    r = CliRunner().invoke(main, ["serve", "--check", "--set", "limits.nope=1"])
    assert r.exit_code != 0 and "limits.nope" in r.output


def test_cli_client_against_server(tmp_path, monkeypatch):
    from sensepack_testing.serve import TOKEN, demo_served, running_server
    from serve.cli import main

    with running_server(tmp_path, demo_served(), **{"packs.preload": []}) as server:
        target = f"127.0.0.1:{server.port}"
        run = lambda *a: CliRunner().invoke(main, ["client", "--target", target, *a])  # noqa: E731
        r = run(
            "generate", "The capital of Mauritius is", "--pack", "demo-capitals@prod", "--max-new-tokens", "4", "--json"
        )
        assert r.exit_code == 0, r.output
        out = json.loads(r.output)
        assert out["generated_token_count"] == 4 and out["packs"][0]["name"] == "demo-capitals"
        r = run("stream", "The capital of Mauritius is", "--base-only", "--max-new-tokens", "3")
        assert r.exit_code == 0, r.output
        r = run("score", "The capital of Mauritius is", " Port Louis", "--pack", "demo-capitals")
        assert r.exit_code == 0 and "packs" in r.output, r.output
        r = run("info")
        assert r.exit_code == 0 and "demo-capitals" in r.output
        r = run("packs", "list")
        assert r.exit_code != 0 and "UNAUTHENTICATED" in r.output
        r = CliRunner().invoke(main, ["client", "--target", target, "--token", TOKEN, "packs", "list"])
        assert r.exit_code == 0 and "demo-capitals" in r.output, r.output
        r = run("generate", "", "--max-new-tokens", "2")
        assert r.exit_code != 0 and "INVALID_ARGUMENT: text:" in r.output


def test_tls(tmp_path):
    crypto = pytest.importorskip("cryptography")  # noqa: F841
    import datetime

    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from sensepack_testing.serve import demo_served, running_server
    from serve.client import Client

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    store = tmp_path / "store"
    with running_server(
        store,
        demo_served(),
        **{"tls.cert_file": str(cert_file), "tls.key_file": str(key_file), "http.enabled": True, "http.port": 0},
    ) as server:
        c = Client(f"localhost:{server.port}", ca_file=str(cert_file), timeout=60)
        assert c.generate("Hello", base_only=True, max_new_tokens=2).generated_token_count == 2
        plain = Client(f"127.0.0.1:{server.port}", timeout=5)
        with pytest.raises(grpc.RpcError):
            plain.generate("Hello", base_only=True, max_new_tokens=2)
        # the HTTP front-end serves HTTPS with the same certificate, and no plaintext
        import ssl
        import urllib.error
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(cert_file))
        with urllib.request.urlopen(f"https://localhost:{server.http_port}/health", context=ctx, timeout=30) as r:
            assert r.status == 200
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/health", timeout=10)


def test_pretrained_profile_loads_checkpoint_folders(tmp_path):
    """The real profile's code path (load_large_model, BackpackLM.from_pretrained) on saved tiny checkpoints."""
    from ensemble.demo import tiny_backpack
    from ensemble.large_model import tiny_gptj
    from serve.client import Client
    from serve.server import SensepackServer

    tiny_gptj(0).save_pretrained(tmp_path / "large")
    tiny_backpack(0).save_pretrained(tmp_path / "backpack")
    cfg = load_config(
        None,
        {
            "model.profile": "pretrained",
            "model.large_model": str(tmp_path / "large"),
            "model.backpack": str(tmp_path / "backpack"),
            "store.uri": str(tmp_path / "store"),
            "server.port": 0,
            "server.metrics_port": -1,
        },
    )
    server = SensepackServer(cfg).start()
    try:
        c = Client(f"127.0.0.1:{server.port}", timeout=60)
        info = c.model_info()
        assert {m.role: m.name for m in info.models} == {
            "large": str(tmp_path / "large"),
            "backpack": str(tmp_path / "backpack"),
        }
        ref = server.ensemble.generate_greedy([[464, 3139, 286]], [[]], 4)[0]
        r = c.generate([464, 3139, 286], base_only=True, max_new_tokens=4, ignore_eos=True, tokens=True)
        assert [t.id for t in r.tokens] == ref
    finally:
        server.stop(grace=5)


def test_served_context_caps_requests_at_vllm_max_model_len():
    """engine: vllm refuses prompts longer than its max_model_len; validation uses the same bound."""
    from serve.config import parse_config, served_context

    assert served_context(parse_config({}), 2048) == 2048
    base = {
        "engine": "vllm",
        "model": {"profile": "pretrained"},
        "store": {"uri": "/tmp/x"},
        "limits": {"max_prompt_tokens": 1536, "max_new_tokens": 512},
    }
    assert served_context(parse_config(base), 4096) == 2048  # vLLM's default length
    assert served_context(parse_config({**base, "vllm": {"max_model_len": 1024}}), 2048) == 1024
    assert served_context(parse_config({**base, "vllm": {"engine_args": {"max_model_len": 700}}}), 2048) == 700
    assert served_context(parse_config({**base, "vllm": {"max_model_len": 8192}}), 2048) == 2048  # HF context


def test_build_engine_is_the_one_engine_choice(tmp_path):
    """`engine` picks the engine in one factory; the vLLM engine reads pinned versions' edits from the
    pack manager's resident table, built before both (no field patched after construction)."""
    from sensepack_testing.serve import demo_served, demo_variant
    from serve.metrics import Metrics
    from serve.pack_cache import Resident, ResidentTable
    from serve.server import build_engine
    from serve.vllm.resolver import PackUnavailable

    served = demo_served()
    table = ResidentTable()
    engine, scorer, name = build_engine(parse_config({}), served, Metrics(), None, table)
    assert name == "embedded-transformers" and type(engine).__name__ == "Engine"
    assert type(scorer).__name__ == "EmbeddedScorer"
    cfg = parse_config({"engine": "vllm", "vllm": {"model": str(tmp_path), "multiprocessing": False}})
    engine, scorer, name = build_engine(cfg, served, Metrics(), str(tmp_path), table)
    assert name == "vllm" and type(engine).__name__ == "VLLMEngine"
    assert type(scorer).__name__ == "VLLMScorer"  # Score, gate and A/B through vLLM itself
    assert engine.engine_args["model"] == str(tmp_path) and engine.engine_args["max_num_seqs"] == cfg.limits.max_running
    edits = demo_variant(served, " Paris")
    with pytest.raises(PackUnavailable):
        engine.pack_source.edits("capitals", "v1")
    engine.pack_source.stage("capitals", "v1", edits)  # a version being gated: found while staged
    assert engine.pack_source.edits("capitals", "v1") is edits
    engine.pack_source.unstage("capitals", "v1")
    with pytest.raises(PackUnavailable):
        engine.pack_source.edits("capitals", "v1")
    table[("capitals", "v1")] = Resident("capitals", "v1", edits, 1.0, 0.05)
    assert engine.pack_source.edits("capitals", "v1") is edits
