"""``sensepack packs ...`` (edits_store.cli.packs): commands, --json output, exit codes (0 ok, 1 invalid, 2 usage)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from edits_store import build_pack, write_pack
from edits_store.cli import packs
from tests.test_store_fixtures import (  # noqa: F401  (fixtures)
    BACKPACK_FP,
    SENSES,
    TARGET_FP,
    TOKENIZER_FP,
    VOCAB,
    make_pack,
    make_store_spec,
    store_spec,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def local_spec(tmp_path):
    """The CLI logic is backend-independent (the store tests cover both); one test below also runs it on S3."""
    return make_store_spec("local", tmp_path)


@pytest.fixture
def store(local_spec):
    return local_spec.open()


def run(spec, *args: str) -> tuple[int, dict | str]:
    result = CliRunner().invoke(packs, list(args), env=spec.env(), catch_exceptions=False)
    out = result.stdout
    if "--json" in args:
        return result.exit_code, json.loads(out)
    return result.exit_code, out + result.stderr


def packed_folder(tmp_path: Path, seed: int, **kwargs) -> tuple[Path, str]:
    pack = make_pack(seed, **kwargs)
    folder = tmp_path / f"pack-{seed}-{pack.name}"
    write_pack(pack, folder)
    return folder, pack.version


def test_publish_list_show_verify(store_spec, tmp_path):
    folder, version = packed_folder(tmp_path, 1)
    code, out = run(store_spec, "publish", str(folder), "--alias", "prod", "--json")
    assert code == 0 and out == {"ok": True, "name": "demo", "version": version, "aliases": ["prod"], "signed": False}
    code, out = run(store_spec, "publish", str(folder), "--json")  # idempotent
    assert code == 0 and out["version"] == version
    code, out = run(store_spec, "list", "--json")
    assert code == 0 and out == {"packs": [{"name": "demo", "versions": 1, "aliases": {"prod": version}}]}
    code, out = run(store_spec, "list", "demo", "--json")
    assert [(v["version"], v["aliases"]) for v in out["versions"]] == [(version, ["prod"])]
    code, out = run(store_spec, "show", "demo@prod", "--json")
    assert code == 0 and out["version"] == version and out["calibration"][0]["target_fingerprint"] == TARGET_FP
    code, out = run(
        store_spec, "verify", "demo", "--target", TARGET_FP, "--backpack-fingerprint", BACKPACK_FP, "--json"
    )
    assert code == 0 and out["ok"] and out["results"][0]["version"] == version
    code, text = run(store_spec, "list")
    assert code == 0 and f"prod={version}" in text


def test_verify_exit_1_names_the_failed_check(local_spec, store, tmp_path):
    folder, version = packed_folder(tmp_path, 1)
    store.publish(make_pack(1))
    code, out = run(local_spec, "verify", "demo", "--target", "sha256:" + "0" * 64, "--json")
    assert code == 1 and out["ok"] is False
    assert out["results"][0]["error"] == "MissingBetaError" and out["results"][0]["check"] == "beta_for_target"
    code, out = run(local_spec, "verify", "demo", "--tokenizer-fingerprint", "sha256:x", "--json")
    assert code == 1 and out["results"][0]["error"] == "IncompatiblePackError"
    code, out = run(
        local_spec, "verify", "demo", "--tokenizer-fingerprint", "sha256:x", "--allow-incompatible", "--json"
    )
    assert code == 0
    tensor = folder / "senses.safetensors"
    data = bytearray(tensor.read_bytes())
    data[-1] ^= 0xFF
    tensor.write_bytes(bytes(data))
    code, out = run(local_spec, "verify", "--dir", str(folder), "--json")
    assert code == 1 and out["results"][0]["error"] == "HashMismatchError"
    assert out["results"][0]["file"] == "senses.safetensors"
    code, out = run(local_spec, "publish", str(folder), "--json")  # a corrupt folder is never published
    assert code == 1 and out["error"] == "HashMismatchError"
    assert [v.version for v in store.list_versions("demo")] == [version]


def test_alias_promote_and_delete(local_spec, store):
    v1, v2 = store.publish(make_pack(1)), store.publish(make_pack(2))
    assert run(local_spec, "alias", "demo", "prod", v1, "--json")[1]["version"] == v1
    assert run(local_spec, "alias", "demo", "canary", v2, "--json")[1]["previous"] is None
    code, out = run(local_spec, "alias", "demo", "prod", "canary", "--json")  # promote canary
    assert code == 0 and (out["version"], out["previous"]) == (v2, v1)
    assert store.aliases("demo") == {"canary": v2, "prod": v2}
    assert run(local_spec, "alias", "demo", "prod", "--json")[1]["version"] == v2
    assert run(local_spec, "alias", "demo", "canary", "--delete", "--json")[0] == 0
    assert store.aliases("demo") == {"prod": v2}
    code, out = run(local_spec, "alias", "demo", "prod", "f" * 16, "--json")
    assert code == 1 and out["error"] == "PackNotFoundError"


def test_rm_respects_retention_and_prunes(local_spec, store):
    v1, v2 = store.publish(make_pack(1)), store.publish(make_pack(2))
    store.set_alias("demo", "prod", v1)
    code, out = run(local_spec, "rm", f"demo@{v1}", "--json")
    assert code == 1 and out["error"] == "RetentionError"
    assert run(local_spec, "rm", "demo")[0] == 2  # a bare name would be ambiguous
    assert run(local_spec, "rm", "demo", "--keep", "0", "--json")[1]["deleted"] == [v2]
    assert run(local_spec, "rm", "demo@prod", "--force", "--json")[1] == {
        "ok": True,
        "name": "demo",
        "version": v1,
        "deleted": True,
    }
    assert store.list_packs() == []


def test_diff_reports_added_removed_and_changed_pairs_with_magnitudes(local_spec, store):
    d = 16
    base = torch.randn(3, d, generator=torch.Generator().manual_seed(0))
    common = dict(
        backpack_name="b",
        backpack_fingerprint=BACKPACK_FP,
        tokenizer_fingerprint=TOKENIZER_FP,
        vocab_size=VOCAB,
        num_senses=SENSES,
        epsilon=1e-4,
    )
    a = build_pack("demo", [10, 20, 30], [1, 2, 3], base, **common)
    bumped = base.clone()
    bumped[1, 4] += 0.5  # (20, 2) moves by exactly 0.5
    b_deltas = torch.cat([bumped[:2], torch.full((1, d), 2.0)])  # (30, 3) removed, (40, 0) added: norm 8
    b = build_pack("demo", [10, 20, 40], [1, 2, 0], b_deltas, **common)
    store.publish(a)
    store.publish(b)
    code, out = run(local_spec, "diff", f"demo@{a.version}", f"demo@{b.version}", "--json")
    assert code == 0
    assert out["counts"] == {"added": 1, "removed": 1, "changed": 1, "unchanged": 1}
    assert (out["added"][0]["token"], out["added"][0]["sense"]) == (40, 0)
    assert out["added"][0]["diff_norm"] == pytest.approx(8.0)
    assert (out["removed"][0]["token"], out["removed"][0]["sense"]) == (30, 3)
    assert out["removed"][0]["diff_norm"] == pytest.approx(float(base[2].norm()))
    changed = out["changed"][0]
    assert (changed["token"], changed["sense"]) == (20, 2)
    assert changed["diff_norm"] == pytest.approx(0.5, abs=1e-6)
    assert changed["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    code, out = run(local_spec, "diff", f"demo@{a.version}", f"demo@{b.version}", "--atol", "0.6", "--json")
    assert out["counts"]["changed"] == 0 and out["counts"]["unchanged"] == 2
    code, out = run(local_spec, "diff", f"demo@{a.version}", f"demo@{a.version}", "--json")
    assert out["identical"] is True


def test_usage_errors_exit_2(local_spec):
    assert run(local_spec, "frobnicate")[0] == 2
    assert run(local_spec, "show", "not a ref")[0] == 2
    assert run(local_spec, "verify")[0] == 2
    result = CliRunner().invoke(packs, ["list"], env={"SENSEPACK_STORE": ""})
    assert result.exit_code == 2 and "SENSEPACK_STORE" in result.output


def test_packs_mounts_under_a_host_cli(local_spec, store):
    version = store.publish(make_pack(1))

    @click.group()
    def main():
        """Stand-in for serve.cli:main."""

    main.add_command(packs)
    result = CliRunner().invoke(main, ["packs", "list", "demo", "--json"], env=local_spec.env())
    assert result.exit_code == 0
    assert json.loads(result.stdout)["versions"][0]["version"] == version


def test_python_dash_m_entry_point_and_exit_codes(tmp_path):
    """The real process: exit codes as a shell script sees them."""
    store_dir = tmp_path / "store"
    folder, version = packed_folder(tmp_path, 1)
    env = {"SENSEPACK_STORE": str(store_dir), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "edits_store.cli", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = cli("publish", str(folder), "--alias", "prod", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["version"] == version
    (store_dir / "demo" / version / "manifest.json").write_text("{}")
    bad = cli("verify", "demo@prod", "--no-such-option")
    assert bad.returncode == 2  # usage error
    bad = cli("verify", "demo@prod")
    assert bad.returncode == 1 and "SchemaError" in bad.stdout + bad.stderr
