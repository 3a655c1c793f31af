"""sensepack's gRPC API: ``.proto`` sources under ``proto/sensepack/v1`` and
the Python stubs generated from them.

Stubs are build outputs (``*_pb2.py``, ``*_pb2_grpc.py`` are git-ignored). They
are generated with ``grpc_tools.protoc`` on first import when missing or stale
(each generated file records the hash of the sources it came from), under a
file lock so that concurrent processes do not race. When the package folder is
not writable (a read-only install) they go to a per-user cache folder that is
added to the ``proto.sensepack.v1`` package path.

    from proto import pb, pb_grpc, admin_pb, admin_pb_grpc

``python -m proto`` regenerates them explicitly (a build hook can call it).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parent                 # -I root: generated imports read "from proto.sensepack.v1 import ..."
PROTO_DIR = PACKAGE_DIR / "sensepack" / "v1"
PROTO_FILES = ("generation.proto", "admin.proto")
_HASH_PREFIX = "# sensepack-proto-sources: "


def sources_hash() -> str:
    import grpc_tools
    import google.protobuf

    h = hashlib.sha256()
    for name in PROTO_FILES:
        h.update(name.encode())
        h.update((PROTO_DIR / name).read_bytes())
    h.update(getattr(grpc_tools, "__version__", "").encode())
    h.update(google.protobuf.__version__.encode())
    return h.hexdigest()[:32]


def _outputs(stem: str) -> tuple[str, str]:
    return f"{stem}_pb2.py", f"{stem}_pb2_grpc.py"


def _fresh(out_dir: Path, digest: str) -> bool:
    for name in PROTO_FILES:
        for out in _outputs(Path(name).stem):
            p = out_dir / out
            try:
                with open(p, encoding="utf-8") as f:
                    if f.readline().strip() != (_HASH_PREFIX + digest):
                        return False
            except OSError:
                return False
    return True


def _generate(out_dir: Path, digest: str) -> None:
    from grpc_tools import protoc
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory(prefix="sensepack-protoc-") as tmp:
        args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}",
                f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
        args += [str((PROTO_DIR / n).relative_to(ROOT)) for n in PROTO_FILES]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed (exit {rc}) on {PROTO_DIR}")
        gen = Path(tmp) / PROTO_DIR.relative_to(ROOT)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in PROTO_FILES:
            for out in _outputs(Path(name).stem):
                text = (gen / out).read_text(encoding="utf-8")
                dst = out_dir / out
                tmp_dst = dst.with_name(f".{out}.{os.getpid()}.tmp")
                tmp_dst.write_text(f"{_HASH_PREFIX}{digest}\n{text}", encoding="utf-8")
                os.replace(tmp_dst, dst)


def ensure_stubs(force: bool = False) -> Path:
    """Generate the stubs if missing or stale; return the folder holding them."""
    try:
        import grpc_tools  # noqa: F401
    except ImportError:      # runtime-only install: use the stubs the build generated
        if all((PROTO_DIR / out).is_file() for n in PROTO_FILES for out in _outputs(Path(n).stem)):
            return PROTO_DIR
        raise ImportError("sensepack's gRPC stubs are missing and grpcio-tools is not installed to generate "
                          "them (pip install grpcio-tools, or run `python -m proto` at build time)") from None
    digest = sources_hash()
    if not force and _fresh(PROTO_DIR, digest):
        return PROTO_DIR
    out_dir = PROTO_DIR
    if not os.access(PROTO_DIR, os.W_OK):
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        out_dir = cache / "sensepack" / "stubs" / digest
    lock_path = Path(tempfile.gettempdir()) / f"sensepack-protoc-{hashlib.sha1(str(out_dir).encode()).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if force or not _fresh(out_dir, digest):
                _generate(out_dir, digest)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if out_dir != PROTO_DIR:
        import proto.sensepack.v1 as v1

        if str(out_dir) not in v1.__path__:
            v1.__path__.append(str(out_dir))
    return out_dir


def _load():
    ensure_stubs()
    mods = {}
    for stem in ("generation", "admin"):
        mods[stem] = importlib.import_module(f"proto.sensepack.v1.{stem}_pb2")
        mods[stem + "_grpc"] = importlib.import_module(f"proto.sensepack.v1.{stem}_pb2_grpc")
    return mods


_mods = _load()
pb = _mods["generation"]
pb_grpc = _mods["generation_grpc"]
admin_pb = _mods["admin"]
admin_pb_grpc = _mods["admin_grpc"]

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
ADMIN_SERVICE = admin_pb.DESCRIPTOR.services_by_name["PackAdmin"].full_name

__all__ = ["pb", "pb_grpc", "admin_pb", "admin_pb_grpc", "ensure_stubs",
           "GENERATION_SERVICE", "ADMIN_SERVICE"]
