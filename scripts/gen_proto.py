"""Generate the gRPC stubs in ``sensepack_proto/`` from ``proto/sensepack/v1/*.proto``.

The stubs are committed (``tests/test_proto_stubs.py`` regenerates them into a temporary folder and
compares), so neither an install nor an import runs protoc and grpcio-tools is only a dev dependency.
Run it after editing a ``.proto`` file, with the pinned grpcio-tools (``make proto``):

    python scripts/gen_proto.py [--out DIR]

protoc writes ``from sensepack.v1 import generation_pb2`` for the ``sensepack/v1`` source path; the
imports are rewritten to the flat ``sensepack_proto`` package, a name that collides with nothing.
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"
SOURCES = ("sensepack/v1/generation.proto", "sensepack/v1/admin.proto")
PACKAGE = "sensepack_proto"
_IMPORT = re.compile(r"^from sensepack\.v1 import ", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` for every source into ``out_dir``."""
    from grpc_tools import protoc

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    written = []
    with tempfile.TemporaryDirectory(prefix="sensepack-protoc-") as tmp:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *SOURCES,
            ]
        )
        if rc != 0:
            raise SystemExit(f"grpc_tools.protoc failed (exit {rc}) on {PROTO_ROOT}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(Path(tmp, "sensepack", "v1").iterdir()):
            text = _IMPORT.sub(f"from {PACKAGE} import ", src.read_text(encoding="utf-8"))
            dst = out_dir / src.name
            dst.write_text(text, encoding="utf-8")
            written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / PACKAGE, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
