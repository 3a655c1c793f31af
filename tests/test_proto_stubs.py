"""The committed gRPC stubs (sensepack_proto) are what the pinned grpcio-tools makes of proto/."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

STUBS = REPO / "sensepack_proto"


def test_committed_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the stubs")
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    generated = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in STUBS.iterdir() if "_pb2" in p.name)
    assert generated == committed
    stale = [n for n in generated if (tmp_path / n).read_bytes() != (STUBS / n).read_bytes()]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit sensepack_proto/"


def test_stubs_import_without_a_generator():
    # A fresh interpreter that cannot import grpc_tools still loads the stubs: nothing runs protoc on import.
    code = (
        "import sys; sys.modules['grpc_tools'] = None\n"
        "import sensepack_proto as p\n"
        "assert p.pb.DESCRIPTOR.package == 'sensepack.v1'\n"
        "assert p.GENERATION_SERVICE == 'sensepack.v1.GenerationService'\n"
        "assert p.ADMIN_SERVICE == 'sensepack.v1.PackAdmin'\n"
        "assert p.pb_grpc.GenerationServiceStub and p.admin_pb_grpc.PackAdminStub\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
