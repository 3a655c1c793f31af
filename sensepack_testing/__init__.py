"""Helpers for the tests and benchmarks, kept out of the wheel (pyproject's package list leaves this package
out): `sensepack_testing.serve` runs a real server on 127.0.0.1 and publishes demo packs;
`sensepack_testing.vllm` saves the tiny GPT-J that vLLM loads and makes random packs. Import them from the
repo root (pytest's rootdir, or `sys.path` as bench/ scripts set it)."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers and torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def backpack_train_command(cfg_file: str, nproc: int = 1) -> list[str]:
    """`train_edits backpack train --config cfg_file` as a command line: one process, or `nproc` through
    torchrun on one node (rendezvous on a free loopback port)."""
    cli = ["-m", "train_edits", "backpack", "train", "--config", cfg_file, "--no-progress"]
    if nproc == 1:
        return [sys.executable, *cli]
    rendezvous = ["--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *rendezvous, *cli]
