"""Provenance: ed25519-signed versions, and loaders (store, CLI, server setting) that accept only trusted keys."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edits_store import Expectations, SignatureError, write_pack
from edits_store.cli import packs
from edits_store.format import SIGNATURE_FILE
from edits_store.signing import generate_key, load_private_key, public_raw
from tests.test_store_fixtures import (  # noqa: F401  (fixtures)
    assert_content,
    make_pack,
    make_store_spec,
    store,
    store_spec,
)


@pytest.fixture(scope="module")
def keys():
    (priv_a, pub_a), (priv_b, pub_b) = generate_key(), generate_key()
    return load_private_key(priv_a), public_raw(pub_a), load_private_key(priv_b), public_raw(pub_b)


def test_signed_versions_load_only_with_a_trusted_key(store, keys):
    key_a, pub_a, _, pub_b = keys
    signed = store.publish(make_pack(1), signing_key=key_a)
    unsigned = store.publish(make_pack(2))
    assert_content(store.load(f"demo@{signed}", Expectations(trusted_keys=(pub_b, pub_a))), seed=1)
    assert_content(store.load(f"demo@{signed}"), seed=1)  # no keys configured: signatures are not required
    with pytest.raises(SignatureError) as err:
        store.load(f"demo@{signed}", Expectations(trusted_keys=(pub_b,)))
    assert err.value.check == "signature_key" and err.value.file == SIGNATURE_FILE
    with pytest.raises(SignatureError) as err:
        store.load(f"demo@{unsigned}", Expectations(trusted_keys=(pub_a,)))
    assert err.value.check == "signature_present"


def test_a_tampered_or_transplanted_signature_is_refused(store_spec, store, keys):
    key_a, pub_a, _, _ = keys
    v1 = store.publish(make_pack(1), signing_key=key_a)
    v2 = store.publish(make_pack(2))
    b = store.backend
    if store_spec.kind == "local":
        sig = (store_spec.root / "demo" / v1 / SIGNATURE_FILE).read_bytes()
        (store_spec.root / "demo" / v2 / SIGNATURE_FILE).write_bytes(sig)  # a valid signature, other content
        doc = json.loads(sig)
        doc["signature"] = doc["signature"][:-4] + ("AAA=" if not doc["signature"].endswith("AAA=") else "BBB=")
        (store_spec.root / "demo" / v1 / SIGNATURE_FILE).write_text(json.dumps(doc))
    else:
        sig = b.fs.cat_file(b._path("demo", v1, SIGNATURE_FILE))
        b.fs.pipe_file(b._path("demo", v2, SIGNATURE_FILE), sig)
        doc = json.loads(sig)
        doc["signature"] = doc["signature"][:-4] + ("AAA=" if not doc["signature"].endswith("AAA=") else "BBB=")
        b.fs.pipe_file(b._path("demo", v1, SIGNATURE_FILE), json.dumps(doc).encode())
    with pytest.raises(SignatureError) as err:
        store.load(f"demo@{v2}", Expectations(trusted_keys=(pub_a,)))
    assert err.value.check == "signature_content"
    with pytest.raises(SignatureError) as err:
        store.load(f"demo@{v1}", Expectations(trusted_keys=(pub_a,)))
    assert err.value.check == "signature"


def test_cli_keygen_publish_sign_and_verify_trusted_key(tmp_path):
    spec = make_store_spec("local", tmp_path)
    env = spec.env()
    runner = CliRunner()
    out = json.loads(runner.invoke(packs, ["keygen", str(tmp_path / "k"), "--json"], env=env).stdout)
    folder = tmp_path / "p"
    write_pack(make_pack(1), folder)
    res = runner.invoke(packs, ["publish", str(folder), "--sign-key", str(tmp_path / "k"), "--json"], env=env)
    assert res.exit_code == 0 and json.loads(res.stdout)["signed"] is True
    version = json.loads(res.stdout)["version"]
    res = runner.invoke(packs, ["verify", f"demo@{version}", "--trusted-key", out["public_key"], "--json"], env=env)
    assert res.exit_code == 0
    other = json.loads(runner.invoke(packs, ["keygen", str(tmp_path / "k2"), "--json"], env=env).stdout)
    res = runner.invoke(
        packs, ["verify", f"demo@{version}", "--trusted-key", str(tmp_path / "k2.pub"), "--json"], env=env
    )
    assert res.exit_code == 1 and json.loads(res.stdout)["results"][0]["check"] == "signature_key"
    assert other["key_id"] != out["key_id"]


def test_the_server_setting_turns_trusted_keys_into_expectations(keys):
    from serve.config import Config
    from serve.pack_cache import with_trusted_keys

    _, pub_a, _, _ = keys
    cfg = Config.model_validate({"packs": {"trusted_keys": ["ed25519:" + pub_a.hex()]}})
    expect = with_trusted_keys(Expectations(d_model=16), cfg.packs.trusted_keys)
    assert expect.trusted_keys == (pub_a,) and expect.d_model == 16
    assert with_trusted_keys(Expectations(), Config().packs.trusted_keys).trusted_keys is None
    with pytest.raises(SignatureError) as err:
        with_trusted_keys(Expectations(), ["ed25519:abcd"])
    assert err.value.check == "trusted_key"
