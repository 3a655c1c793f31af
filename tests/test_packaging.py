"""What the server's process imports: no training or plotting code (those are the `train` extra).

(grpcio itself probes for grpc_tools when it is installed; that the stubs need no generator is
tests/test_proto_stubs.py's check.)"""

import subprocess
import sys

from tests.conftest import REPO

FORBIDDEN = ("matplotlib", "train_edits")


def test_the_server_imports_no_training_or_plotting_code():
    code = (
        "import sys\n"
        "import serve.cli, serve.server, serve.engine, serve.packs, serve.abtest, sensepack_proto\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"the server's import graph pulls in {r.stdout.strip()}"


def test_the_probe_sees_a_forbidden_import():
    # the check above can fail: importing train_edits' plots shows up in the same probe
    code = "import sys, train_edits.plots\nprint('matplotlib' in sys.modules, 'train_edits' in sys.modules)\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]
