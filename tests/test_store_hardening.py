"""The store under hostile input: every bad byte is a typed refusal, every version published loads, writers
cannot race.

One section per case. Races are driven through ``Backend.hook`` (a test seam the
writers call at named points; production code never sets it), never by sleeping in production code.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edits_store import (
    AliasError,
    HashMismatchError,
    InvalidReferenceError,
    PackError,
    PackNotFoundError,
    SchemaError,
    TensorFormatError,
    UnsafeFileError,
    build_pack,
    open_store,
    parse_pack_reference,
    read_pack,
    write_pack,
)
from edits_store.backends.base import FENCES_DIR, LEASES_DIR
from edits_store.backends.object_store import FsspecBackend
from edits_store.cli import packs
from edits_store.format import MANIFEST_FILE, TENSOR_FILE, compute_version, pack_files
from tests.test_store_fixtures import (  # noqa: F401  (fixtures)
    assert_content,
    make_pack,
    make_store_spec,
    store,
    store_spec,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def st_bytes(header: dict | bytes, body: bytes) -> bytes:
    """A safetensors file from a header (dict or raw JSON bytes) and a body, written by hand."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def split_st(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_folder(folder: Path, manifest: dict | bytes, tensor: bytes, *, reseal: bool = True) -> dict | bytes:
    """Write a pack folder; ``reseal``: set files' sha256 and the version so the bytes pass the hash layer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TENSOR_FILE).write_bytes(tensor)
    if isinstance(manifest, dict) and reseal:
        manifest = dict(manifest, files={TENSOR_FILE: hashlib.sha256(tensor).hexdigest()})
        manifest["version"] = compute_version(manifest)
    (folder / MANIFEST_FILE).write_bytes(manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())
    return manifest


def good_files(seed: int = 1) -> tuple[dict, bytes]:
    files = pack_files(make_pack(seed))
    return json.loads(files[MANIFEST_FILE]), files[TENSOR_FILE]


def cli(spec_or_env, *args: str) -> tuple[int, dict | str]:
    env = spec_or_env if isinstance(spec_or_env, dict) else spec_or_env.env()
    result = CliRunner().invoke(packs, list(args), env=env, catch_exceptions=False)
    if "--json" in args:
        return result.exit_code, json.loads(result.stdout)
    return result.exit_code, result.stdout + result.stderr


# --------------------------------------------------------------------------- 1. untyped failures before the hash


def test_float_data_offsets_are_a_hash_mismatch_when_the_hash_is_wrong_and_a_format_error_when_resealed(tmp_path):
    manifest, tensor = good_files()
    header, body = split_st(tensor)
    header["deltas"]["data_offsets"] = [float(x) for x in header["deltas"]["data_offsets"]]
    bad = st_bytes(header, body)
    write_folder(tmp_path / "stale", manifest, bad, reseal=False)  # manifest still lists the good sha256
    with pytest.raises(HashMismatchError) as err:
        read_pack(tmp_path / "stale")
    assert err.value.check == "sha256"  # a hash mismatch always wins
    write_folder(tmp_path / "sealed", manifest, bad)
    with pytest.raises(TensorFormatError) as err:
        read_pack(tmp_path / "sealed")
    assert err.value.check == "safetensors_header" and "data_offsets" in err.value.detail


def test_deeply_nested_json_is_a_typed_refusal_in_the_manifest_and_the_tensor_header(tmp_path):
    manifest, tensor = good_files()
    deep = b"[" * 200_000 + b"]" * 200_000
    write_folder(tmp_path / "m", deep, tensor, reseal=False)
    with pytest.raises(SchemaError) as err:
        read_pack(tmp_path / "m")
    assert err.value.check == "json" and "nesting" in err.value.detail
    _, body = split_st(tensor)
    write_folder(tmp_path / "t", manifest, st_bytes(b"[" * 30_000 + b"]" * 30_000, body))  # within the header cap
    with pytest.raises(TensorFormatError) as err:
        read_pack(tmp_path / "t")
    assert err.value.check == "safetensors_header" and "nesting" in err.value.detail
    write_folder(tmp_path / "t2", manifest, st_bytes(b"[" * 200_000 + b"]" * 200_000, body))  # beyond: unread
    with pytest.raises(UnsafeFileError) as err:
        read_pack(tmp_path / "t2")
    assert err.value.check == "size"


@pytest.mark.parametrize("fname", ["bad\x00name", "sub", "x" * 300, "../escape", "extra.bin"])
def test_listed_file_names_other_than_the_tensor_file_are_a_schema_error(tmp_path, fname):
    manifest, tensor = good_files()
    (tmp_path / "p" / "sub").mkdir(parents=True)
    m = dict(manifest, files={TENSOR_FILE: hashlib.sha256(tensor).hexdigest(), fname: "0" * 64})
    m["version"] = compute_version(m)
    write_folder(tmp_path / "p", m, tensor, reseal=False)
    with pytest.raises(SchemaError) as err:
        read_pack(tmp_path / "p")
    assert err.value.check == "schema" and "files" in err.value.detail


def test_failed_loads_leak_no_thread(tmp_path):
    manifest, tensor = good_files()
    write_folder(tmp_path / "flip", manifest, tensor[:-1] + bytes([tensor[-1] ^ 1]), reseal=False)
    header, body = split_st(tensor)
    header["deltas"]["data_offsets"] = [0.5, 1.5]
    write_folder(tmp_path / "float", manifest, st_bytes(header, body))
    before = threading.active_count()
    for _ in range(12):
        for folder in ("flip", "float"):
            with pytest.raises(PackError):
                read_pack(tmp_path / folder)
    assert threading.active_count() == before


def test_verify_all_json_reports_every_version_past_a_broken_one(store_spec, store):
    v1, v2 = store.publish(make_pack(1)), store.publish(make_pack(2))
    if store_spec.kind == "local":
        path = store_spec.root / "demo" / v1 / TENSOR_FILE
        header, body = split_st(path.read_bytes())
        header["deltas"]["data_offsets"] = [1.0, 2.0]
        path.write_bytes(st_bytes(header, body))
    else:
        store.backend.fs.pipe_file(store.backend._path("demo", v1, TENSOR_FILE), b"[" * 100)
    code, out = cli(store_spec, "verify", "--all", "--json")
    assert code == 1 and out["ok"] is False
    by_ref = {r["ref"]: r for r in out["results"]}
    assert by_ref[f"demo@{v1}"]["error"] in ("HashMismatchError", "TruncatedFileError")
    assert by_ref[f"demo@{v2}"]["ok"] is True


# --------------------------------------------------------------------------- 2. every published version loads


def test_a_manifest_listing_an_extra_file_is_refused_by_verify_and_publish_and_prod_stays(tmp_path):
    spec = make_store_spec("local", tmp_path)
    store = spec.open()
    v1 = store.publish(make_pack(1))
    store.set_alias("demo", "prod", v1)
    manifest, tensor = good_files(2)
    m = dict(manifest, files={TENSOR_FILE: hashlib.sha256(tensor).hexdigest(), "extra.txt": "0" * 64})
    m["version"] = compute_version(m)
    folder = tmp_path / "extra"
    write_folder(folder, m, tensor, reseal=False)
    (folder / "extra.txt").write_bytes(b"")
    code, out = cli(spec, "verify", "--dir", str(folder), "--json")
    assert code == 1 and out["results"][0]["error"] == "SchemaError"
    code, out = cli(spec, "publish", str(folder), "--alias", "prod", "--json")
    assert code == 1 and out["error"] == "SchemaError"
    assert store.resolve("demo@prod") == ("demo", v1)
    assert [i.version for i in store.list_versions("demo")] == [v1]


def test_publish_reads_back_before_the_version_becomes_visible(store_spec, store):
    pack = make_pack(1)

    def corrupt(point: str) -> None:  # the disk/object store returns other bytes than were written
        if point == "local_files_written":
            staging = next((store_spec.root / ".staging").iterdir())
            (staging / TENSOR_FILE).write_bytes(b"\0" * 64)
        elif point == "s3_files_written":
            store.backend.fs.pipe_file(store.backend._path("demo", pack.version, TENSOR_FILE), b"\0" * 64)

    store.backend.hook = corrupt
    with pytest.raises(HashMismatchError):
        store.publish(pack)
    store.backend.hook = None
    assert store.list_versions("demo") == []
    assert store.publish(pack) == pack.version
    assert_content(store.load("demo"), seed=1)


# --------------------------------------------------------------------------- 3. local race


def test_a_second_publisher_of_the_same_content_never_moves_the_committed_version(tmp_path):
    root = tmp_path / "store"
    first, second = open_store(root), open_store(root)
    pack = make_pack(1)
    inode = {}

    def meanwhile(point: str) -> None:
        if point == "local_files_written":  # the second publisher is past its "already there?" check
            second.backend.hook = None
            first.publish(pack)
            first.set_alias("demo", "prod", pack.version)
            inode["before"] = os.stat(root / "demo" / pack.version).st_ino

    second.backend.hook = meanwhile
    assert second.publish(pack) == pack.version
    assert os.stat(root / "demo" / pack.version).st_ino == inode["before"]  # never moved, never replaced
    assert not list((root / ".trash").glob("*")) if (root / ".trash").exists() else True
    assert_content(first.load("demo@prod"), seed=1)


# --------------------------------------------------------------------------- 4. S3 races


@pytest.fixture
def s3_spec(tmp_path):
    return make_store_spec("s3", tmp_path)


def test_s3_gc_while_a_publisher_writes_leaves_its_files_alone(s3_spec):
    publisher, collector = s3_spec.open(), s3_spec.open()
    pack = make_pack(1)
    # a killed publisher of the same content left an old orphan tensor object
    orphan = publisher.backend._path("demo", pack.version, TENSOR_FILE)
    publisher.backend.fs.pipe_file(orphan, b"left by a killed publisher")
    removed = []

    def gc_now(point: str) -> None:
        if point == "s3_files_written":  # tensor PUT done, manifest PUT not yet
            removed.extend(collector.gc(older_than_s=0))

    publisher.backend.hook = gc_now
    publisher.publish(pack)
    assert removed == []  # the live lease kept gc away
    assert_content(collector.load(f"demo@{pack.version}"), seed=1)


def test_s3_a_publisher_waits_for_a_running_gc_fence(s3_spec):
    publisher, collector = s3_spec.open(), s3_spec.open()
    pack = make_pack(1)
    collector.backend.fs.pipe_file(collector.backend._path("demo", pack.version, TENSOR_FILE), b"orphan")
    collector.backend.lease_ttl_s = 0.0  # "every lease is stale": this gc deletes whatever it fences
    in_gc, go_on, done = threading.Event(), threading.Event(), []

    def hold(point: str) -> None:
        if point == "s3_gc_fenced":
            in_gc.set()
            go_on.wait(30)

    collector.backend.hook = hold
    t = threading.Thread(target=lambda: done.append(collector.gc(older_than_s=0)))
    t.start()
    assert in_gc.wait(30)
    seen = []
    publisher.backend.hook = lambda point: (seen.append(point), go_on.set()) if point == "s3_lease_taken" else None
    publisher.publish(pack)  # waits for the fence, then writes after gc's deletes
    t.join()
    assert seen == ["s3_lease_taken"] and done and done[0]
    assert_content(publisher.load(f"demo@{pack.version}"), seed=1)


def test_s3_delete_racing_a_republish_leaves_a_complete_version(s3_spec):
    deleter, publisher = s3_spec.open(), s3_spec.open()
    pack = make_pack(1)
    deleter.publish(pack)
    leased, go_on = threading.Event(), threading.Event()

    def hold(point: str) -> None:
        if point == "s3_lease_taken":  # the re-publisher holds its lease, has written nothing yet
            leased.set()
            go_on.wait(30)

    deleter.delete_version("demo", pack.version)
    publisher.backend.hook = hold
    t = threading.Thread(target=publisher.publish, args=(pack,))
    t.start()
    assert leased.wait(30)
    deleter.publish(pack)  # back again, then deleted while the re-publisher is at work
    deleter.delete_version("demo", pack.version)  # sees the lease: uncommits, leaves the files to the publisher
    go_on.set()
    t.join()
    assert_content(deleter.load(f"demo@{pack.version}"), seed=1)  # complete, not manifest-only


def test_s3_publish_noop_waits_for_a_deletion_in_progress(s3_spec):
    deleter, publisher = s3_spec.open(), s3_spec.open()
    pack = make_pack(1)
    deleter.publish(pack)
    in_delete, go_on = threading.Event(), threading.Event()

    def hold(point: str) -> None:
        if point == "s3_delete_uncommitted":
            in_delete.set()
            go_on.wait(30)

    deleter.backend.hook = hold
    t = threading.Thread(target=deleter.delete_version, args=("demo", pack.version))
    t.start()
    assert in_delete.wait(30)
    publisher.backend.hook = lambda point: go_on.set() if point == "s3_lease_taken" else None
    assert publisher.publish(pack) == pack.version  # not a no-op on a version being deleted
    t.join()
    assert_content(publisher.load(f"demo@{pack.version}"), seed=1)


def test_s3_gc_aborts_stale_multipart_uploads(s3_spec):
    import boto3

    store = s3_spec.open()
    bucket, _, prefix = store.backend.root.partition("/")
    client = boto3.client(
        "s3",
        endpoint_url=s3_spec.options["endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    up = client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/demo/{'a' * 32}/{TENSOR_FILE}")
    client.upload_part(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 1024)
    assert len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
    removed = store.gc(older_than_s=0)
    assert any(up["UploadId"] in r for r in removed)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# --------------------------------------------------------------------------- 5. unbounded or hanging reads


@pytest.mark.timeout(60)
def test_a_fifo_as_tensor_file_is_refused_without_hanging(tmp_path):
    store = open_store(tmp_path / "store")
    version = store.publish(make_pack(1))
    path = tmp_path / "store" / "demo" / version / TENSOR_FILE
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(UnsafeFileError) as err:
        store.load(f"demo@{version}")
    assert err.value.check == "regular_file" and err.value.file == TENSOR_FILE


def test_a_huge_sparse_manifest_and_an_oversized_tensor_file_are_refused_unread(tmp_path):
    manifest, tensor = good_files()
    folder = tmp_path / "sparse"
    write_folder(folder, manifest, tensor)
    with open(folder / MANIFEST_FILE, "r+b") as f:
        f.truncate(3 << 29)  # 1.5 GiB, sparse: costs no disk
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UnsafeFileError) as err:
        read_pack(folder)
    assert err.value.check == "size" and err.value.file == MANIFEST_FILE
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100 * 1024  # KiB: nothing was read
    big = tmp_path / "big"
    write_folder(big, manifest, tensor + b" " * (1 << 17))  # more than n x d and the header cap allow
    with pytest.raises(UnsafeFileError) as err:
        read_pack(big)
    assert err.value.check == "size" and err.value.file == TENSOR_FILE


def test_symlinked_version_folders_and_files_are_not_followed(tmp_path):
    store = open_store(tmp_path / "store")
    v1 = store.publish(make_pack(1))
    outside = tmp_path / "outside"
    write_pack(make_pack(2), outside)
    v2 = make_pack(2).version
    (tmp_path / "store" / "demo" / v2).symlink_to(outside, target_is_directory=True)
    with pytest.raises(PackNotFoundError):
        store.load(f"demo@{v2}")  # not listed, not resolvable
    assert [i.version for i in store.list_versions("demo")] == [v1]
    src = store.backend.source("demo", v2)
    with pytest.raises(UnsafeFileError) as err:
        from edits_store.format import load_from_source

        load_from_source(src)
    assert err.value.check == "symlink"
    tensor = tmp_path / "store" / "demo" / v1 / TENSOR_FILE
    tensor.unlink()
    tensor.symlink_to(outside / TENSOR_FILE)
    with pytest.raises(UnsafeFileError) as err:
        store.load(f"demo@{v1}")
    assert err.value.check == "symlink" and err.value.file == TENSOR_FILE


# --------------------------------------------------------------------------- 6. names


def test_names_and_aliases_with_a_trailing_newline_are_refused_and_nothing_is_created(tmp_path):
    tokens, senses, deltas = torch.tensor([1]), torch.tensor([0]), torch.zeros(1, 4)
    with pytest.raises(SchemaError):
        build_pack(
            "demo\n",
            tokens,
            senses,
            deltas,
            backpack_name="b",
            backpack_fingerprint="f",
            tokenizer_fingerprint="t",
            vocab_size=10,
            num_senses=2,
            epsilon=0.0,
        )
    with pytest.raises(InvalidReferenceError):
        parse_pack_reference("demo\n")
    with pytest.raises(InvalidReferenceError):
        parse_pack_reference("demo@prod\n")
    spec = make_store_spec("local", tmp_path)
    store = spec.open()
    version = store.publish(make_pack(1))
    with pytest.raises(AliasError):
        store.set_alias("demo", "prod\n", version)
    assert cli(spec, "alias", "demo", "prod\n", version)[0] == 2
    assert sorted(p.name for p in (spec.root / "demo").iterdir()) == [".lock", "_seq", version]
    assert store.aliases("demo") == {}


# --------------------------------------------------------------------------- 7. byte-exact content address


@pytest.mark.parametrize("lr", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_in_the_manifest_are_refused(tmp_path, lr):
    manifest, tensor = good_files()
    m = write_folder(tmp_path / "p", dict(manifest, training=dict(manifest["training"], lr=None)), tensor)
    text = json.dumps(m).replace('"lr": null', f'"lr": {lr}')
    (tmp_path / "p" / MANIFEST_FILE).write_text(text)
    with pytest.raises(SchemaError) as err:
        read_pack(tmp_path / "p")
    assert err.value.check == "json"


def test_the_version_is_byte_exact_and_128_bits(tmp_path):
    manifest, tensor = good_files()
    versions = set()
    for i, lr in enumerate([None, 0.001, 1, 1.0]):  # 1 and 1.0 are different bytes: different versions
        m = write_folder(tmp_path / str(i), dict(manifest, training=dict(manifest["training"], lr=lr)), tensor)
        assert read_pack(tmp_path / str(i)).version == m["version"]
        versions.add(m["version"])
    assert len(versions) == 4 and all(len(v) == 32 for v in versions)
    m = write_folder(tmp_path / "dup", manifest, tensor)
    text = json.dumps(m)
    (tmp_path / "dup" / MANIFEST_FILE).write_text(text[:-1] + ', "epsilon": 0.5}')  # a duplicate key
    with pytest.raises(SchemaError) as err:
        read_pack(tmp_path / "dup")
    assert err.value.check == "json" and "duplicate" in err.value.detail


# --------------------------------------------------------------------------- 8. CLI


@pytest.fixture
def local_spec(tmp_path):
    return make_store_spec("local", tmp_path)


def test_publish_with_a_bad_second_alias_moves_nothing(local_spec, tmp_path):
    store = local_spec.open()
    v1 = store.publish(make_pack(1))
    store.set_alias("demo", "canary", v1)
    folder = tmp_path / "p2"
    write_pack(make_pack(2), folder)
    code, out = cli(local_spec, "publish", str(folder), "--alias", "canary", "--alias", "bad alias", "--json")
    assert code == 2 and out["ok"] is False and out["error"] == "UsageError" and "bad alias" in out["detail"]
    assert store.aliases("demo") == {"canary": v1}
    assert [i.version for i in store.list_versions("demo")] == [v1]


def test_rm_keep_keeps_the_newest_unaliased_versions(local_spec):
    store = local_spec.open()
    versions = [store.publish(make_pack(s)) for s in range(5)]
    store.set_alias("demo", "prod", versions[4])  # the newest overall is aliased
    code, out = cli(local_spec, "rm", "demo", "--keep", "2", "--json")
    assert code == 0 and sorted(out["deleted"]) == sorted(versions[:2])
    assert [i.version for i in store.list_versions("demo")] == versions[2:]  # 2 un-aliased + the aliased one


def test_cli_refusals_exit_codes_and_json_errors(local_spec, tmp_path):
    store = local_spec.open()
    store.publish(make_pack(1))
    code, out = cli(local_spec, "list", "demo@prod", "--json")
    assert code == 2 and out["error"] == "UsageError"
    code, out = cli(local_spec, "list", "nosuch", "--json")
    assert code == 1 and out["error"] == "PackNotFoundError"
    code, out = cli(local_spec, "show", "demo@bad alias", "--json")
    assert code == 2 and out["check"] == "usage"
    code, out = cli(local_spec, "frobnicate", "--json")
    assert code == 2 and out["error"] == "UsageError"
    code, out = cli(local_spec, "verify", "--bogus-option", "--json")
    assert code == 2 and out["error"] == "UsageError"
    typo = tmp_path / "stroe"
    code, out = cli({"SENSEPACK_STORE": str(typo)}, "list", "--json")
    assert code == 1 and out["check"] == "store_exists" and not typo.exists()


def test_a_write_refused_by_the_os_is_a_typed_json_error(local_spec, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), the same path as ENOSPC or a read-only store."""
    folder = tmp_path / "p"
    write_pack(make_pack(1, n=256, d=64), folder)
    local_spec.open()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = subprocess.run(
        [sys.executable, "-m", "edits_store.cli", "publish", str(folder), "--json"],
        env=dict(local_spec.env(), PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["error"] == "StoreIOError" and out["check"] == "io" and "Traceback" not in proc.stderr
    assert local_spec.open().list_versions("demo") == []


# --------------------------------------------------------------------------- 9. ordering, history, notifications


def test_latest_follows_the_publish_sequence_not_file_times(store_spec, store):
    v1, v2 = store.publish(make_pack(1)), store.publish(make_pack(2))
    if store_spec.kind == "local":
        os.utime(store_spec.root / "demo" / v1 / MANIFEST_FILE, (4e9, 4e9))  # "touch" the older one into the future
    else:
        path = store.backend._path("demo", v1, MANIFEST_FILE)
        store.backend.fs.pipe_file(path, store.backend.fs.cat_file(path))  # rewritten: a newer LastModified
    assert store.resolve("demo") == ("demo", v2)
    assert [(i.version, i.seq) for i in store.list_versions("demo")] == [(v1, 1), (v2, 2)]


def test_s3_listing_and_latest_read_no_object(s3_spec):
    store = s3_spec.open()
    versions = [store.publish(make_pack(s)) for s in range(4)]
    reads = []
    fs = store.backend.fs
    real_cat = fs.cat_file
    fs.cat_file = lambda *a, **k: (reads.append(a[0]), real_cat(*a, **k))[1]  # a counting spy: calls go through
    try:
        assert store.resolve("demo@latest") == ("demo", versions[-1])
        assert [i.version for i in store.list_versions("demo")] == versions
    finally:
        del fs.cat_file
    assert reads == []


def test_alias_history_and_missed_moves(store_spec, store):
    v1, v2 = store.publish(make_pack(1)), store.publish(make_pack(2))
    sub = store.subscribe(lambda e: None, interval_s=3600)  # polled by hand below: deterministic
    try:
        store.set_alias("demo", "prod", v1)
        [first] = sub.poll()
        store.set_alias("demo", "prod", v2)
        store.set_alias("demo", "prod", v1)  # A -> B -> A inside one "interval"
        [event] = sub.poll()
    finally:
        sub.close()
    assert (first.kind, first.version, first.seq, first.missed) == ("alias_moved", v1, 1, 0)
    assert (event.kind, event.version, event.previous, event.seq, event.missed) == ("alias_moved", v1, v1, 3, 1)
    store.remove_alias("demo", "prod")
    hist = store.history("demo")
    assert [(h["seq"], h["from"], h["to"]) for h in hist] == [(1, None, v1), (2, v1, v2), (3, v2, v1), (4, v1, None)]
    assert all(h["by"] and h["at"] for h in hist)
    code, out = cli(store_spec, "history", "demo", "--json")
    assert code == 0 and [h["to"] for h in out["history"]] == [v1, v2, v1, None]


def test_s3_concurrent_alias_movers_lose_no_move(s3_spec):
    stores = [s3_spec.open() for _ in range(4)]
    versions = [stores[0].publish(make_pack(s)) for s in range(2)]
    errors = []

    def mover(i: int) -> None:
        try:
            for k in range(5):
                stores[i].set_alias("demo", "prod", versions[(i + k) % 2])
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=mover, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    seqs = [h["seq"] for h in stores[0].history("demo", "prod")]
    assert seqs == list(range(1, 21))  # every one of the 20 moves is counted and logged exactly once


def test_s3_gc_removes_stale_leases_and_fences(s3_spec):
    store = s3_spec.open()
    b = store.backend
    assert isinstance(b, FsspecBackend)
    for sub in (LEASES_DIR, FENCES_DIR):
        b.fs.pipe_file(b._path(sub, "demo", "a" * 32, "dead"), b"")
    b.lease_ttl_s = b.fence_ttl_s = 0.0
    removed = store.gc(older_than_s=0)
    assert sorted(p.rsplit("/", 4)[-4] for p in removed if p.endswith("/dead")) == sorted([LEASES_DIR, FENCES_DIR])


def test_s3_store_with_a_missing_bucket_is_refused_by_read_commands(s3_spec):
    env = dict(s3_spec.env(), SENSEPACK_STORE="s3://no-such-bucket-" + "x" * 8 + "/packs")
    code, out = cli(env, "list", "--json")
    assert code == 1 and out["check"] == "store_exists"


def test_s3_an_oversized_object_is_refused_before_it_is_read(s3_spec):
    store = s3_spec.open()
    version = store.publish(make_pack(1))
    b = store.backend
    b.fs.pipe_file(b._path("demo", version, TENSOR_FILE), b"\0" * (1 << 17))
    b.fs.pipe_file(b._path("demo", version, MANIFEST_FILE) + ".big", b"")  # unrelated object: ignored
    with pytest.raises(UnsafeFileError) as err:
        store.load(f"demo@{version}")
    assert err.value.check == "size" and err.value.file == TENSOR_FILE
